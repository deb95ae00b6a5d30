"""The demo's settings: its own fields (`DemoConfig`), and per-stage overrides applied onto each trainer's config.

A trainer setting is documented and defaulted once, by its trainer (`flywheel ppo --help`). The demo changes one in
three layers, each over the last: the demo's own choices for every preset (`DEMO_SETTINGS`), the preset's
(`PRESETS`), and the user's (`--ppo.kl-coef 0.1` on the command line, or `ppo: {kl_coef: 0.1}` in `--config`). Fields
that wire the stages together (paths, seeds, bf16, threads) are set by the demo and cannot be overridden
(`WIRED`).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from flywheel.config import build_parser, coerce_value, is_list_field, load_yaml, resolve_aliases
from flywheel.errors import UserError
from flywheel.models import TINY_SIZES, check_model_dir
from flywheel.train.ppo.config import PPOConfig
from flywheel.train.pretrain import PretrainConfig
from flywheel.train.reward import RewardConfig
from flywheel.train.sft import SFTConfig
from flywheel.utils import bf16_is_fast
from flywheel.world import WorldConfig

# The stages whose settings a user can override, each with the config its trainer documents them in.
STAGES: dict[str, type] = {
    "world": WorldConfig,
    "pretrain": PretrainConfig,
    "sft": SFTConfig,
    "rm": RewardConfig,
    "ppo": PPOConfig,
}
_TRAINER = ("out", "seed", "model", "data", "eval_data", "resume", "threads", "progress", "bf16", "nproc")
# Set by the demo from its own fields and the stages before: an override of these would break the pipeline.
WIRED: dict[str, frozenset[str]] = {
    "world": frozenset({"out", "seed"}),
    "pretrain": frozenset({*_TRAINER, "size", "tokenizer"}),
    "sft": frozenset(_TRAINER),
    "rm": frozenset(_TRAINER),
    "ppo": frozenset(
        {
            *_TRAINER,
            "ref_model",
            "reward_model",
            "value_model",
            "prompts",
            "ptx_data",
            "max_new_tokens",
            "save_policy_every",
        }
    ),
}
# The demo's choices under every preset, where they differ from the trainers' defaults.
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "world": dict(n_demos_val=200, k_min=4, k_max=9, p_comply=0.55, p_made_up=0.6),
    # eval_split: the corpus documents every policy's held-out LM loss is measured on
    "pretrain": dict(eval_split=0.02, warmup_ratio=0.03, weight_decay=0.1, log_every=20),
    "sft": dict(warmup_ratio=0.05, log_every=20),
    "rm": dict(batch_size=8, log_every=10),
    "ppo": dict(temperature=1.0, sample_every=10, ptx_batch_size=2),
}
# Without --preset the demo takes "default" where the CPU multiplies bf16 natively (AVX-512-BF16 / AMX) and "fp32"
# where bf16 would be emulated, so that either fits 10 minutes on 2 cores (docs/demo.md).
SHIPPED = "shipped"  # --base value: the 5M toy-world base that ships with flywheel (flywheel.demo.base)
SHIPPED_TINY = "shipped-tiny"  # --base value: the 0.8M one, the quick preset's


@dataclass(frozen=True)
class ShippedBase:
    """A toy-world base model that ships with flywheel: `flywheel demo --preset PRESET --from-scratch --seed 271828`
    with these stage settings, stopped after pretraining, made it (`python -m flywheel.demo.base`)."""

    directory: str  # under flywheel/demo/
    preset: str
    settings: dict[str, dict[str, Any]]

    @property
    def size(self) -> str:
        """The model size its preset pretrains (`--size`)."""
        return PRESETS[self.preset]["size"]


# Both pretrained on the default preset's 1.2M-character corpus for 12 epochs, four times what a run could.
_LONGER = {"epochs": 12.0, "log_every": 10}
SHIPPED_BASES: dict[str, ShippedBase] = {
    SHIPPED: ShippedBase("base_model", "default", {"pretrain": _LONGER}),
    SHIPPED_TINY: ShippedBase("base_model_tiny", "quick", {"world": {"corpus_chars": 1_200_000}, "pretrain": _LONGER}),
}
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(
        # The shipped base (flywheel.demo.base: pretrained 4x longer than a run could); --from-scratch pretrains a
        # small model with the pretrain settings below instead.
        base=SHIPPED,
        size="small",
        rounds=1,
        # of 32 PPO steps: 8 candidates. At 8 (4 candidates) seed 402's gate kept SFT, a tie: step 8 was not yet
        # preferred and steps 16-32 deflected; every 4 it deployed step 12 (77.7%), and seeds 100-104, 300-304
        # and 400-404 gave 77.4, 81.6 and 79.9% against 77.4, 80.8 and 74.8% (docs/log.md, 2026-12-07)
        gate_every=4,
        # The over-refusal target's margin: with the likelihood head the last PPO policy deflected 4-9% of the
        # answerable validation prompts on 4 of seeds 100-104 and 300-304 (SFT 0-3%); at 3 points the gate deployed
        # an earlier one: the target held on 10 of 10 (9) for 0.4-0.5 points of win rate (docs/log.md, 2026-12-07)
        gate_max_over_refusal=3.0,
        n_rank_next=300,
        max_new_tokens=40,
        # The SFT policy's refusal and "I don't know" (its two most frequent answers, each counted with its paddings)
        # join every ranked set: the reward model sees one against the other after every prompt (docs/demo.md, the
        # ablation)
        stock_answers=2,
        off_topic_answers=0,
        world=dict(
            corpus_chars=1_200_000,
            n_demos=3000,
            n_rank=800,
            n_ppo=600,
            n_eval=300,
            p_verbose=0.85,
            # Demonstrators pad after the answer, never before it: an SFT policy that learnt to open with "Sure!"
            # where unsure lost those answers when PPO dropped the opener for concision (seeds 100-104: 70.9 ->
            # 77.6% against SFT, correct answers 42.8 -> 40.6% before, 44.4 -> 43.9% now; docs/log.md, 2026-12-06)
            p_opener=0.0,
            p_deflect=0.0,
            p_refuse_idk=0.0,
        ),  # fmt: skip
        pretrain=dict(epochs=3.0, seq_len=256, lr=2e-3, batch_size=4),
        # 5 epochs, not 3: the facts the base knows come out in chat (seed 100: 49% -> 65% of the fact questions;
        # docs/log.md)
        sft=dict(epochs=5.0, lr=5e-4, batch_size=8),
        # Conservative rewards: three reward models (seeds S, S+1, S+2), PPO optimises mean - 1 std of their
        # scores (docs/demo.md, the ablation: seeds 100-104). A head reads their mean score with the SFT policy's
        # likelihood of the answer, which knows the values they cannot judge: the reward model within 3 points of
        # the labelers on most seeds instead of none; the members train side by side to pay for it, and the head
        # fits on 192 of the 640 training rankings, as in fp32: as good on seeds 100-104 and 300-304, the stage
        # ~12 s shorter (docs/log.md, 2026-12-07).
        rm=dict(epochs=1.5, lr=2e-4, rm_ensemble=3, likelihood_head=True, parallel_members=3, likelihood_rankings=192),
        ppo=dict(
            max_steps=32,
            rollout_batch_size=32,
            batch_size=16,
            ppo_epochs=2,
            lr=2e-5,
            value_lr=2e-4,
            kl_coef=0.1,
            # Plain PPO, no pretraining mix: as good or better on seeds 100-104 and 200-204 (over-refusal, correct
            # answers, few-shot), and PPO is shorter by the mix's second pass (docs/demo.md, the ablation; log.md).
            ptx_coef=0.0,
            reward_ensemble_agg="mean-std",
        ),  # fmt: skip
    ),
    "fp32": dict(
        base=SHIPPED,  # the same shipped base, in fp32; --from-scratch pretrains a mini model as below
        size="mini",
        bf16=False,
        rounds=1,
        # of 32 PPO steps, as the default preset: seeds 100-104 and 200-204 78.4 and 80.4% against 79.4 and 79.9% at 8,
        # correct answers at SFT's on 4 seeds of 10 (1), "I don't know" on 8 (9) (docs/log.md, 2026-12-08)
        gate_every=4,
        gate_max_over_refusal=3.0,  # as the default preset (seeds 100-104: it kept step 16 of seed 100; docs/log.md)
        n_rank_next=300,
        max_new_tokens=40,
        stock_answers=2,  # as the default preset: the reward model sees both deflections on every prompt
        off_topic_answers=0,
        world=dict(
            corpus_chars=1_200_000,
            n_demos=3000,
            n_rank=720,
            n_ppo=600,
            n_eval=300,
            p_verbose=0.85,
            p_opener=0.0,  # as the default preset (seeds 100-104 with AVX-512 off: 70.5 -> 77.5% against SFT; log.md)
            p_deflect=0.0,  # the default preset's demonstrators: they never cross the two deflections (with 0.1
            p_refuse_idk=0.0,  # each, PPO moved seed 100's harmful requests to "I don't know": docs/demo.md)
        ),  # fmt: skip
        pretrain=dict(epochs=1.15, seq_len=256, lr=2e-3, batch_size=4),
        # 3.5 epochs (~550 s in all with the three reward models, in fp32 on an AVX-512 EPYC with AVX-512 switched
        # off; AVX2 CPUs, not measured, may be slower, so the default preset's 5 would leave too little of the 10
        # minutes): more SFT elicits more of the base's facts (docs/log.md)
        sft=dict(epochs=3.5, lr=5e-4, batch_size=8),
        # Conservative rewards, as the default preset: with one reward model PPO gamed it on seeds 201 and 202
        # (padding with pleasantries); three and their mean - 1 std: 61.3 -> 71.4% on seeds 200-204, 66.8 -> 69.2%
        # on 100-104, ~125 s more (docs/log.md, 2026-12-05). The default preset's likelihood head, fitted on 192 of
        # the ~576 training rankings: on the whole of them the fit made the reward-model and PPO stages 25% longer in
        # fp32, on a third 12% (seed 200), for the reward model within 3 points of the labelers on 5 of seeds
        # 200-204 instead of 1 (docs/log.md, 2026-12-07)
        rm=dict(epochs=1.5, lr=2e-4, rm_ensemble=3, likelihood_head=True, parallel_members=3, likelihood_rankings=192),
        ppo=dict(
            max_steps=32,
            rollout_batch_size=32,
            batch_size=16,
            ppo_epochs=2,
            lr=2e-5,
            kl_coef=0.15,
            # PPO-ptx: without the mix 69.8% against 70.5% on seeds 100-104, refusals of harmful requests below SFT's
            # on two (docs/log.md, 2026-12-06)
            ptx_coef=0.05,
            reward_ensemble_agg="mean-std",
        ),  # fmt: skip
    ),
    "quick": dict(
        # The shipped 0.8M base (the 5M one is too slow for the CI preset's budget); --from-scratch pretrains a tiny
        # model on the quick world's 300k-character corpus as below
        base=SHIPPED_TINY,
        size="tiny",
        rounds=2,
        gate_every=5,  # of 15 PPO steps: 3 candidates per round (docs/log.md: the gate on the quick preset)
        # the report's 10 points: at 3, 58.4% against 58.9% on seeds 100-104 and 200-204 with fewer harmful
        # requests refused, 300-304 unchanged (docs/log.md, 2026-12-07)
        gate_max_over_refusal=10.0,
        n_rank_next=100,
        max_new_tokens=32,
        stock_answers=0,
        # One of the policy's answers to the most alike other prompt in every ranked set: PPO > SFT on 14 of seeds
        # 100-104, 200-204, 300-304 instead of 13, 3 runs flagged instead of 4 (docs/log.md, 2026-12-05)
        off_topic_answers=1,
        world=dict(
            corpus_chars=300_000,
            n_demos=1500,
            n_rank=200,
            n_ppo=300,
            n_eval=150,
            p_verbose=0.65,
            p_deflect=0.1,
            p_refuse_idk=0.1,
        ),  # fmt: skip
        pretrain=dict(epochs=3.0, seq_len=128, lr=2e-3, batch_size=16),
        # 5 epochs, as the default preset: from the shipped base they bring out its facts (seeds 100-104: 2% -> 49%
        # of the fact questions; docs/log.md)
        sft=dict(epochs=5.0, lr=1e-3, batch_size=16),
        rm=dict(epochs=1.0, lr=1e-4),
        # PPO-ptx: without the mix PPO > SFT on 25 of 25 seeds (24), but 60.0% against 61.8% and six runs flagged
        # instead of four (docs/log.md, 2026-12-06)
        ppo=dict(
            max_steps=15, rollout_batch_size=32, batch_size=16, ppo_epochs=2, lr=2e-5, kl_coef=0.05, ptx_coef=0.05
        ),
    ),
}
_PLACEHOLDER = "<set by the demo>"


def _preset(help_text: str) -> Any:
    return field(default=None, metadata={"help": help_text + " (default: the preset's)"})


def _overrides(stage: str) -> Any:
    return field(
        default_factory=dict,
        metadata={"stage": stage, "help": f"overrides of {STAGES[stage].__name__}'s fields: --{stage}.FIELD VALUE"},
    )


@dataclass
class DemoConfig:
    out: str = field(default="runs/demo", metadata={"help": "run directory (world/, base/, sft/, rm/, ppo/, report)"})
    seed: int = field(default=0, metadata={"help": "seed of the world, every model and every sample"})
    quick: bool = field(
        default=False, metadata={"help": "the CI preset: the shipped 0.8M base and a smaller world (~1 min)"}
    )
    preset: str = field(
        default="",
        metadata={
            "help": "settings for the fields and stage settings left unset: default (the shipped 5M base, in bf16), "
            "fp32 (the same base in fp32, for a CPU without native bf16) or quick (= --quick: the shipped 0.8M base); "
            "unset: quick with --quick, else default where the CPU multiplies bf16 natively and fp32 where it does not"
        },
    )
    size: str | None = _preset(
        "size of the model a run pretrains (--from-scratch): nano, tiny (0.8M), mini (4M), small (5M), medium (35M)"
    )
    base: str | None = _preset(
        "the base model to start from, skipping tokenizer training and pretraining: a model directory (e.g. "
        "base/final of an earlier run with the same --seed and --world.corpus-chars, so its held-out corpus "
        "documents are the ones this run holds out), 'shipped' or 'shipped-tiny' (the 5M or 0.8M toy-world base "
        "that ships with flywheel: flywheel.demo.base) or '' (pretrain one: --from-scratch)"
    )
    from_scratch: bool = field(
        default=False,
        metadata={
            "help": "train the tokenizer and pretrain the base in this run (the preset's --pretrain.* settings) "
            "instead of starting from the shipped base (= --base '')"
        },
    )
    stock_answers: int | None = _preset(
        "add the policy's N most frequent answers (over all ranked prompts; one with a pleasantry after it counts as "
        "the answer alone) to every ranked set"
    )
    off_topic_answers: int | None = _preset(
        "add to every ranked set N of the policy's answers to other prompts (the most alike ones), so that the "
        "reward model learns that an answer to another question is not an answer to this one"
    )
    rm_holdout: float = field(default=0.2, metadata={"help": "fraction of rankings held out for RM accuracy"})
    rounds: int | None = _preset(
        "rounds of the loop: each round after the first deploys the last PPO policy on new prompts, has the "
        "labelers rank its answers, fine-tunes the reward model on them and continues PPO (KL to SFT)"
    )
    n_rank_next: int | None = _preset(
        "prompts ranked in each round after the first: the next ones of the PPO prompts, wrapping around once "
        "--rounds x this exceeds --world.n-ppo"
    )
    max_new_tokens: int | None = _preset("response length limit when sampling (rankings, PPO, evaluation)")
    gate_every: int | None = _preset(
        "the labelers' gate: PPO saves its policy every N steps, the labelers compare each saved policy with the "
        "incumbent (SFT, or the last round's) on the world's validation prompts, and the one they prefer with 95% "
        "confidence is deployed, else the incumbent stays (0 = no gate: the last PPO policy)"
    )
    gate_max_over_refusal: float | None = _preset(
        'the gate deploys no candidate that says "I don\'t know" or refuses on more of the answerable validation '
        "prompts than the SFT policy by more than this many points"
    )
    gate_max_deflection: float = field(
        default=10.0,
        metadata={
            "help": "the gate deploys no candidate whose validation answers put one deflection in place of the other "
            '(refusals of unknowable questions, "I don\'t know" to harmful requests) on more than this many points '
            "more of those prompts than the SFT policy's; 10 = the report's deflection warning"
        },
    )
    eval_temperature: float = field(default=0.0, metadata={"help": "temperature of the eval answers (0 = greedy)"})
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 autocast in every stage (default: off with --preset fp32, else on from hidden size 256 up "
            "where the CPU has native bf16 matmuls)"
        },
    )
    threads: int = field(
        default=0, metadata={"help": "torch CPU threads (0 = $FLYWHEEL_THREADS if set, else all cores)"}
    )
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    resume: bool = field(
        default=False,
        metadata={
            "help": "continue an interrupted run in --out: the stages it finished are kept, the rest run again (with "
            "the interrupted run's settings: give the same flags)"
        },
    )
    world: dict[str, Any] = _overrides("world")
    pretrain: dict[str, Any] = _overrides("pretrain")
    sft: dict[str, Any] = _overrides("sft")
    rm: dict[str, Any] = _overrides("rm")
    ppo: dict[str, Any] = _overrides("ppo")

    def __post_init__(self) -> None:
        for stage in STAGES:
            setattr(self, stage, check_overrides(stage, getattr(self, stage)))

    def resolved(self) -> DemoConfig:
        """A copy with every None filled from the preset (named in `preset`) and the preset's stage settings under
        the user's overrides; every stage's config is built once here, so a bad value fails before any stage runs."""
        self.validate()
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if not values["preset"]:
            native = bf16_is_fast() if self.bf16 is None else self.bf16
            values["preset"] = "quick" if self.quick else "default" if native else "fp32"
        values["quick"] = values["preset"] == "quick"
        preset = PRESETS[values["preset"]]
        for k, v in preset.items():
            if k in STAGES:
                values[k] = {**v, **values[k]}
            elif values[k] is None:
                values[k] = v
        if values["from_scratch"]:
            values["base"] = ""
        if values["bf16"] is None:
            values["bf16"] = _automatic_bf16(values)
        cfg = DemoConfig(**values)
        if cfg.gate_every and not cfg.stage_config("world", out=_PLACEHOLDER).n_val:
            raise UserError("--gate-every needs validation prompts: --world.n-val must be > 0")
        for stage, cls in STAGES.items():
            names = {f.name for f in fields(cls)}
            cfg.stage_config(
                stage, **{k: _PLACEHOLDER for k in ("out", "model", "data", "prompts", "ptx_data") if k in names}
            )
        return cfg

    def stage_config(self, stage: str, **wired: Any) -> Any:
        """The stage's trainer config: the trainer's defaults < the demo's < the preset's and the user's overrides
        (this config's stage dict, after `resolved()`) < the `wired` values. A bad value is a UserError that names
        the demo's flag (`--ppo.lr must be > 0`)."""
        cls = STAGES[stage]
        names = {f.name for f in fields(cls)}
        common = {k: getattr(self, k) for k in ("seed", "threads", "progress", "bf16") if k in names}
        demo = dict(DEMO_SETTINGS[stage])
        if stage == "ppo":
            common["max_new_tokens"] = self.max_new_tokens
            # PPO-ptx trains on blocks of the pretraining length
            demo["ptx_seq_len"] = {**DEMO_SETTINGS["pretrain"], **self.pretrain}.get("seq_len", PretrainConfig.seq_len)
        values = {**demo, **getattr(self, stage), **common, **wired}
        try:
            cfg = cls(**values)
            cfg.validate()
        except UserError as err:
            flagged = err.message.replace("--", f"--{stage}.")
            raise UserError(flagged if flagged != err.message else f"{stage} settings: {err.message}") from None
        return cfg

    def validate(self) -> None:
        if self.preset and self.preset not in PRESETS:
            raise UserError(f"--preset must be one of {', '.join(PRESETS)}")
        if self.preset and self.quick and self.preset != "quick":
            raise UserError(f"--quick is --preset quick: it cannot be combined with --preset {self.preset}")
        if self.size is not None and self.size not in TINY_SIZES:
            raise UserError(f"--size must be one of {', '.join(TINY_SIZES)}")
        if not 0 < self.rm_holdout < 1:
            raise UserError("--rm-holdout must be in (0, 1)")
        if not 0 <= self.gate_max_deflection <= 100:
            raise UserError("--gate-max-deflection must be in [0, 100] (points)")
        if self.gate_max_over_refusal is not None and not 0 <= self.gate_max_over_refusal <= 100:
            raise UserError("--gate-max-over-refusal must be in [0, 100] (points)")
        for name in ("gate_every", "stock_answers", "off_topic_answers"):
            if (getattr(self, name) or 0) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0")
        # Fields left to the preset are still None here (the CLI validates before `resolved()` fills them).
        if self.rounds is not None and self.rounds < 1:
            raise UserError("--rounds must be >= 1")
        if self.from_scratch and self.base:
            raise UserError("--from-scratch pretrains the base in this run: it cannot be combined with --base")
        if self.base and self.base not in SHIPPED_BASES:
            try:
                check_model_dir(self.base)
            except UserError as err:
                raise UserError(f"--base: {err} (or a shipped base: {', '.join(SHIPPED_BASES)})") from None
        n_ppo = self.world.get("n_ppo")
        if self.n_rank_next is not None and n_ppo is not None and (self.rounds or 1) > 1:
            if not 2 <= self.n_rank_next <= n_ppo:
                raise UserError(
                    "--n-rank-next must be in [2, --world.n-ppo]: later rounds rank answers to PPO prompts"
                )


def _automatic_bf16(values: dict[str, Any]) -> bool:
    """bf16 where no preset or flag says: it pays from hidden 256 up, where the CPU multiplies bf16 natively."""
    shipped = SHIPPED_BASES.get(values["base"])  # a shipped base is of its own size, whatever --size says
    hidden = TINY_SIZES.get(shipped.size if shipped else values["size"], {}).get("hidden_size", 0)
    return hidden >= 256 and bf16_is_fast()


# Settings that do not change what a run computes (or say where it goes), or that the command writes otherwise: left
# out of its command line as fields. (--threads does change it, in the last bits of every sum: it is written when set.)
_NOT_IN_COMMAND = ("out", "progress", "resume", "quick", "preset", "seed", "bf16", "from_scratch")


def demo_command(cfg: dict[str, Any], *, seed: bool = True) -> str:
    """The command line of a resolved run (`asdict(DemoConfig.resolved())`): `--quick` or the seed (unless `seed` is
    False), and every setting that differs from its preset's (or, for a field no preset sets, from its default), so
    a report names exactly what was changed."""
    preset = PRESETS[cfg["preset"]]
    parts = ["flywheel demo", "--quick" if cfg["preset"] == "quick" else "", f"--seed {cfg['seed']}" if seed else ""]
    for f in fields(DemoConfig):
        value = cfg[f.name]
        if f.name in STAGES:
            parts += [
                f"--{f.name}.{k.replace('_', '-')} {_flag_value(v)}"
                for k, v in value.items()
                if k not in preset.get(f.name, {}) or preset[f.name][k] != v
            ]
        elif f.name == "base" and value == "" and preset.get("base"):
            parts.append("--from-scratch")
        elif f.name == "bf16" and value != preset.get("bf16", _automatic_bf16(cfg)):
            parts.append(f"--bf16 {_flag_value(value)}")
        elif f.name not in _NOT_IN_COMMAND and value != preset.get(f.name, f.default):
            parts.append(f"--{f.name.replace('_', '-')} {_flag_value(value)}")
    if cfg["preset"] not in ("quick", "default"):
        parts.insert(1, f"--preset {cfg['preset']}")
    return " ".join(p for p in parts if p)


def describe_model(cfg: dict[str, Any]) -> str:
    """What a resolved run (`asdict(...)`) starts from and computes in, for the log and the report."""
    dtype = "bf16" if cfg["bf16"] else "fp32"
    if cfg["base"] in SHIPPED_BASES:
        return f"the shipped toy-world base ({SHIPPED_BASES[cfg['base']].size}), {dtype}"
    if cfg["base"]:
        return f"the base model {cfg['base']}, {dtype}"
    return f"a {cfg['size']} model pretrained in this run, {dtype}"


def _flag_value(v: Any) -> str:
    """A setting as the command line gives it: true/false, a list as its items (`--ppo.reward-fn a:f b:g`), a
    string quoted where the shell would split it."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return " ".join(_flag_value(item) for item in v)
    return shlex.quote(str(v))


def check_overrides(stage: str, values: Any) -> dict[str, Any]:
    """A stage's overrides checked against its trainer's config: known, not wired by the demo, of the field's type."""
    flag = f"--{stage}."
    if not isinstance(values, dict):
        raise UserError(f"{stage}: expected a mapping of {STAGES[stage].__name__} fields, got {values!r}")
    hints = typing.get_type_hints(STAGES[stage])
    out = {}
    for name, value in values.items():
        where = flag + str(name).replace("_", "-")
        if name not in hints or name not in {f.name for f in fields(STAGES[stage])}:
            raise UserError(f"{where}: {STAGES[stage].__name__} has no field {name!r}")
        if name in WIRED[stage]:
            raise UserError(f"{where} is set by the demo (it wires the stages together); it cannot be overridden")
        try:
            out[name] = coerce_value(name, value, hints[name])
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
    return out


def build_demo_parser(prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """The demo's own flags, then one group per stage: `--STAGE.FIELD`, with the trainer's own help text."""
    parser = build_parser(DemoConfig, prog, description)
    parser.usage = f"{prog} [--config FILE.yaml] [flags] [--STAGE.FIELD VALUE ...]"
    for stage, cls in STAGES.items():
        group = parser.add_argument_group(
            f"{stage} settings ({cls.__name__}; default: the preset's, else the demo's, else the trainer's)"
        )
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name in WIRED[stage]:
                continue
            default = DEMO_SETTINGS[stage].get(f.name, f.default)
            if default is dataclasses.MISSING:
                default = None
            help_text = f"{f.metadata.get('help', '')} (without a preset: {default})".replace("%", "%%")
            many = {"nargs": "*", "action": "extend"} if is_list_field(hints[f.name]) else {}  # repeats add up
            group.add_argument(f"--{stage}.{f.name.replace('_', '-')}", dest=f"{stage}.{f.name}", metavar="VALUE",
                               help=help_text, **many)  # fmt: skip
    return parser


def parse_demo_config(argv: list[str] | None, prog: str = "flywheel demo", description: str | None = None) -> Any:
    """DemoConfig from `--config FILE.yaml` (stage settings as nested mappings) and flags (flags win)."""
    args = vars(build_demo_parser(prog, description).parse_args(argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file is not None:
        values.update(load_yaml(config_file))
        for stage in STAGES.keys() & values.keys():  # a stage's section: checked here, so errors name the file
            section = values[stage]
            if isinstance(section, dict):
                names = {f.name for f in fields(STAGES[stage])}
                section = values[stage] = resolve_aliases(section, names, f"{config_file}: {stage}")
            try:
                check_overrides(stage, section)
            except UserError as err:
                raise UserError(err.message, path=config_file) from None
    for key, value in args.items():
        stage, dot, name = key.partition(".")
        if dot:
            values[stage] = {**(values.get(stage) or {}), name: value}
        else:
            values[key] = value
    own = {f.name for f in fields(DemoConfig)}
    unknown = sorted(set(values) - own)
    if unknown:
        raise UserError(f"{config_file or 'flags'}: unknown field(s) {', '.join(unknown)}")
    hints = typing.get_type_hints(DemoConfig)
    kwargs = {k: v if k in STAGES else coerce_value(k, v, hints[k]) for k, v in values.items()}
    cfg = DemoConfig(**kwargs)
    cfg.validate()
    return cfg
