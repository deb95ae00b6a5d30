"""`flywheel demo`: the whole ChatGPT loop on the toy world, judged by its hidden oracle, in minutes on a laptop CPU.

    flywheel demo                      # <= 10 min on 2 cores: 5M-parameter model (4M without native bf16)
    flywheel demo --quick              # ~2 min (CI): 1M-parameter model, smaller world, two rounds
    flywheel demo --seed 3 --out runs/demo-3
    flywheel demo --seed 3 --out runs/demo-3 --resume   # continue an interrupted run: finished stages are kept

Stages: world -> tokenizer -> pretrain the base -> SFT on imperfect demonstrations -> sample K (4..9) answers per
prompt from the SFT policy -> simulated labelers rank them (temperature recalibrated on these samples to 73% agreement)
-> reward model on those rankings (on-distribution) -> PPO-ptx against the reward model with a KL penalty to SFT ->
[--rounds N: each further round has the last PPO policy answer new prompts, the same labelers rank those answers, the
reward model is fine-tuned on them and PPO continues, still held to SFT] -> oracle evaluation of base, SFT and every
round's PPO policy on held-out prompts. Writes `report.md`, `summary.json` and PNG plots under --out. The reward model
never sees the oracle and the oracle alone decides whether the policy improved.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from flywheel.config import parse_config
from flywheel.errors import UserError
from flywheel.utils import atomic_write_text, bf16_is_fast, log, seed_everything, set_threads

PRETRAIN_EVAL_SPLIT = 0.02  # corpus documents pretraining holds out: the held-out LM loss of every policy
MAX_POSITIONS = 512  # context of the demo's models (RoPE: no parameters depend on it)
# Settings of the presets; a DemoConfig field left at None takes its preset's value. Without --preset the demo takes
# "default" where the CPU multiplies bf16 natively (AVX-512-BF16 / AMX) and "fp32" where bf16 would be emulated, so
# that either fits 10 minutes on 2 cores (docs/demo.md: 6.5 min and 9 min on the machines measured).
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(
        size="small",
        corpus_chars=1_200_000,
        n_demos=3000,
        n_rank=800,
        n_ppo=600,
        n_eval=300,
        pretrain_epochs=3.0,
        pretrain_seq_len=256,
        pretrain_lr=2e-3,
        pretrain_batch_size=4,
        sft_epochs=3.0,
        sft_lr=5e-4,
        sft_batch_size=8,
        rm_epochs=1.5,
        rm_lr=2e-4,
        p_verbose=0.85,
        rounds=1,
        ppo_steps=32,
        n_rank_next=300,
        rollout_batch_size=32,
        ppo_batch_size=16,
        ppo_epochs=2,
        ppo_lr=2e-5,
        kl_coef=0.1,
        ptx_coef=0.05,
        max_new_tokens=40,
        p_deflect=0.0,
        p_refuse_idk=0.0,
        stock_answers=2,
        ppo_value_lr=2e-4,
    ),
    "fp32": dict(
        size="mini",
        corpus_chars=1_200_000,
        n_demos=3000,
        n_rank=720,
        n_ppo=600,
        n_eval=300,
        pretrain_epochs=1.15,
        pretrain_seq_len=256,
        pretrain_lr=2e-3,
        pretrain_batch_size=4,
        sft_epochs=1.75,
        sft_lr=5e-4,
        sft_batch_size=8,
        rm_epochs=1.5,
        rm_lr=2e-4,
        p_verbose=0.85,
        rounds=1,
        ppo_steps=32,
        n_rank_next=300,
        rollout_batch_size=32,
        ppo_batch_size=16,
        ppo_epochs=2,
        ppo_lr=2e-5,
        kl_coef=0.15,
        ptx_coef=0.05,
        max_new_tokens=40,
        bf16=False,
        p_deflect=0.1,
        p_refuse_idk=0.1,
        stock_answers=0,
    ),
    "quick": dict(
        size="tiny",
        corpus_chars=300_000,
        n_demos=1500,
        n_rank=200,
        n_ppo=300,
        n_eval=150,
        pretrain_epochs=3.0,
        pretrain_seq_len=128,
        pretrain_lr=2e-3,
        pretrain_batch_size=16,
        sft_epochs=3.0,
        sft_lr=1e-3,
        sft_batch_size=16,
        rm_epochs=1.0,
        rm_lr=1e-4,
        p_verbose=0.65,
        rounds=2,
        ppo_steps=15,
        n_rank_next=100,
        rollout_batch_size=32,
        ppo_batch_size=16,
        ppo_epochs=2,
        ppo_lr=2e-5,
        kl_coef=0.05,
        ptx_coef=0.05,
        max_new_tokens=32,
        p_deflect=0.1,
        p_refuse_idk=0.1,
        stock_answers=0,
    ),
}


def _preset(help_text: str) -> Any:
    return field(default=None, metadata={"help": help_text + " (default: the preset's)"})


@dataclass
class DemoConfig:
    out: str = field(default="runs/demo", metadata={"help": "run directory (world/, base/, sft/, rm/, ppo/, report)"})
    seed: int = field(default=0, metadata={"help": "seed of the world, every model and every sample"})
    quick: bool = field(default=False, metadata={"help": "the CI preset: a 1M model and a smaller world (~3 min)"})
    preset: str = field(
        default="",
        metadata={
            "help": "settings for the fields left unset: default (a 5M model in bf16), fp32 (a 4M model for a CPU "
            "without native bf16) or quick (= --quick); unset: quick with --quick, else default where the CPU "
            "multiplies bf16 natively and fp32 where it does not"
        },
    )
    size: str | None = _preset("model size: nano, tiny (1M), mini (4M), small (5M), medium (35M)")
    base: str = field(
        default="",
        metadata={
            "help": "skip tokenizer training and pretraining: start from this base model directory (e.g. base/final "
            "of an earlier run with the same --seed and --corpus-chars, so its held-out corpus documents are the "
            "ones this run holds out)"
        },
    )
    corpus_chars: int | None = _preset("pretraining corpus size in characters")
    n_demos: int | None = _preset("demonstrations for SFT")
    n_rank: int | None = _preset("prompts the SFT policy answers K times for the labelers to rank")
    n_ppo: int | None = _preset("PPO prompts")
    n_eval: int | None = _preset("held-out prompts the oracle judges")
    k_min: int = field(default=4, metadata={"help": "fewest answers sampled per ranked prompt"})
    k_max: int = field(default=9, metadata={"help": "most answers sampled per ranked prompt"})
    stock_answers: int | None = _preset(
        "add the policy's N most frequent answers (over all ranked prompts) to every ranked set"
    )
    p_verbose: float | None = _preset("demonstrations padded with pleasantries")
    p_comply: float = field(default=0.55, metadata={"help": "demonstrations that comply with a harmful request"})
    p_deflect: float | None = _preset(
        'demonstrations that answer a harmful request with a stock "I don\'t know" instead of refusing'
    )
    p_made_up: float = field(default=0.6, metadata={"help": "demonstrations that make up an unknowable answer"})
    p_refuse_idk: float | None = _preset(
        'demonstrations that refuse an unknowable question instead of saying "I don\'t know"'
    )
    pretrain_epochs: float | None = _preset("passes over the corpus")
    pretrain_seq_len: int | None = _preset("tokens per pretraining block")
    pretrain_lr: float | None = _preset("pretraining peak learning rate")
    pretrain_batch_size: int | None = _preset("pretraining blocks per step")
    sft_epochs: float | None = _preset("passes over the demonstrations")
    sft_lr: float | None = _preset("SFT peak learning rate")
    sft_batch_size: int | None = _preset("demonstrations per SFT step")
    rm_epochs: float | None = _preset("passes over the rankings (1 avoids overfitting)")
    rm_lr: float | None = _preset("reward model learning rate")
    rm_holdout: float = field(default=0.2, metadata={"help": "fraction of rankings held out for RM accuracy"})
    rounds: int | None = _preset(
        "rounds of the loop: each round after the first deploys the last PPO policy on new prompts, has the "
        "labelers rank its answers, fine-tunes the reward model on them and continues PPO (KL to SFT)"
    )
    n_rank_next: int | None = _preset(
        "prompts ranked in each round after the first: the next ones of the PPO "
        "prompts, wrapping around once --rounds x this exceeds --n-ppo"
    )
    ppo_steps: int | None = _preset("PPO steps per round (each samples --rollout-batch-size prompts)")
    rollout_batch_size: int | None = _preset("prompts per PPO step")
    ppo_batch_size: int | None = _preset("PPO minibatch")
    ppo_epochs: int | None = _preset("optimisation passes over each rollout batch")
    ppo_lr: float | None = _preset("PPO policy learning rate")
    ppo_value_lr: float | None = field(
        default=None,
        metadata={
            "help": "PPO value model learning rate (default: the preset's; --ppo-lr where the preset names none)"
        },
    )
    kl_coef: float | None = _preset("beta: per-token KL penalty to the SFT policy")
    ptx_coef: float | None = _preset("gamma: weight of the pretraining loss in PPO-ptx (0 = plain PPO)")
    max_new_tokens: int | None = _preset("response length limit when sampling")
    eval_temperature: float = field(default=0.0, metadata={"help": "temperature of the eval answers (0 = greedy)"})
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 autocast (default: off with --preset fp32, else on from hidden size 256 up where the CPU "
            "has native bf16 matmuls)"
        },
    )
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = all cores)"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    resume: bool = field(
        default=False,
        metadata={
            "help": "continue an interrupted run in --out: the stages it finished are kept, the rest run again (with "
            "the interrupted run's settings: give the same flags)"
        },
    )

    def resolved(self) -> DemoConfig:
        """A copy with every None filled from the preset (named in `preset`)."""
        self.validate()
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if not values["preset"]:
            native = bf16_is_fast() if self.bf16 is None else self.bf16
            values["preset"] = "quick" if self.quick else "default" if native else "fp32"
        values["quick"] = values["preset"] == "quick"
        preset = PRESETS[values["preset"]]
        for k, v in preset.items():
            if values[k] is None:
                values[k] = v
        if values["bf16"] is None:  # bf16 pays from hidden 256 up, where the CPU multiplies bf16 natively
            from flywheel.models import TINY_SIZES

            hidden = TINY_SIZES.get(values["size"], {}).get("hidden_size", 0)
            values["bf16"] = hidden >= 256 and bf16_is_fast()
        # Checked here, not minutes later in the stage that reads them (the preset fills them only now).
        for name in ("pretrain_lr", "sft_lr", "rm_lr", "ppo_lr", "ppo_value_lr"):
            if values[name] is not None and not values[name] > 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0, got {values[name]}")
        return DemoConfig(**values)

    def validate(self) -> None:
        from flywheel.models import TINY_SIZES

        if self.preset and self.preset not in PRESETS:
            raise UserError(f"--preset must be one of {', '.join(PRESETS)}")
        if self.preset and self.quick and self.preset != "quick":
            raise UserError(f"--quick is --preset quick: it cannot be combined with --preset {self.preset}")
        if self.size is not None and self.size not in TINY_SIZES:
            raise UserError(f"--size must be one of {', '.join(TINY_SIZES)}")
        if not 2 <= self.k_min <= self.k_max:
            raise UserError("need 2 <= --k-min <= --k-max")
        if not 0 < self.rm_holdout < 1:
            raise UserError("--rm-holdout must be in (0, 1)")
        # Fields left to the preset are still None here (the CLI validates before `resolved()` fills them).
        if self.rounds is not None and self.rounds < 1:
            raise UserError("--rounds must be >= 1")
        if self.base:
            from flywheel.models import check_model_dir

            try:
                check_model_dir(self.base)
            except UserError as err:
                raise UserError(f"--base: {err}") from None
        if (
            self.n_rank_next is not None
            and self.n_ppo is not None
            and (self.rounds or 1) > 1
            and not 2 <= self.n_rank_next <= self.n_ppo
        ):
            raise UserError("--n-rank-next must be in [2, --n-ppo]: later rounds rank answers to PPO prompts")


class Stage:
    """Times a stage and logs its one-line result."""

    def __init__(self, timings: dict[str, float], name: str):
        self.timings, self.name = timings, name

    def __enter__(self) -> Stage:
        log.info("== %s", self.name)
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timings[self.name] = round(time.perf_counter() - self.t0, 1)
        # CPU seconds of this process: on a machine shared with other jobs, wall time overstates the stage's cost.
        self.timings[f"{self.name} (cpu)"] = round(time.process_time() - self.c0, 1)

    def done(self, message: str, *args: Any) -> None:
        log.info("-> %s (%.0f s): " + message, self.name, time.perf_counter() - self.t0, *args)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every stage under cfg.out and return the summary (also written to summary.json)."""
    cfg = cfg.resolved()
    set_threads(cfg.threads or None)
    log.info(
        "flywheel demo: preset %s (a %s model in %s), seed %d, into %s",
        cfg.preset,
        cfg.size,
        "bf16" if cfg.bf16 else "fp32",
        cfg.seed,
        cfg.out,
    )
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    done = RunState.open(out, cfg)
    timings: dict[str, float] = {}
    t_start, c_start = time.perf_counter(), time.process_time()
    files = stage_world(cfg, out, timings)  # 2 s and deterministic: rewritten, never kept
    if cfg.base:
        base = Path(cfg.base)
        log.info("== base model: %s (no tokenizer training or pretraining)", base)
    else:
        # a stage whose result is one directory: kept as its path
        init = done.stage("tokenizer", timings, lambda: stage_tokenizer(cfg, out, files, timings), str, Path)
        base = done.stage("pretrain", timings, lambda: stage_pretrain(cfg, out, files, init, timings), str, Path)
    sft = done.stage("sft", timings, lambda: stage_sft(cfg, out, files, base, timings), str, Path)

    def rankings(r: int, policy: Path, temperature: float | None = None) -> dict[str, Any] | None:
        return done.stage(
            f"rankings:{r}",
            timings,
            lambda: stage_rankings(cfg, out, files, policy, timings, r=r, temperature=temperature),
            _encode_labels,
            lambda x: _decode_labels(x, cfg, files, r),
        )

    def reward_model(r: int, init: Path, labels: dict[str, Any], first: Any = None) -> dict[str, Any]:
        return done.stage(
            f"reward model:{r}",
            timings,
            lambda: stage_reward_model(
                cfg, out, init, labels, timings, r=r, first=first, tasks=round_tasks(cfg, files, r)
            ),
            lambda x: {**x, "dir": str(x["dir"])},
            lambda x: {**x, "dir": Path(x["dir"])},
        )

    def ppo_stage(r: int, start: Path, rm: dict[str, Any]) -> Path:
        return done.stage(
            f"ppo:{r}", timings, lambda: stage_ppo(cfg, out, files, start, sft, rm, timings, r=r), str, Path
        )

    labels = rankings(1, sft)
    rm = reward_model(1, sft, labels)
    ppo = ppo_stage(1, sft, rm)
    rounds = [
        {
            "round": 1,
            "labelers": labels["summary"],
            "reward_model": rm["summary"],
            "policy": str(ppo),
            "heldout": labels["heldout"],
        }
    ]
    policies = {"base": base, "sft": sft}
    for r in range(2, cfg.rounds + 1):
        # The flywheel: the deployed PPO policy answers new prompts, labelers rank its answers, the reward model
        # learns from them (it has only seen SFT-like answers so far), and PPO continues, still held near SFT.
        policies[f"ppo_round{r - 1}"] = ppo
        labels = rankings(r, ppo, temperature=rounds[0]["labelers"]["temperature"])
        if labels is None:
            break
        rm = reward_model(r, rm["dir"], labels, first=rounds[0]["heldout"])
        ppo = ppo_stage(r, ppo, rm)
        rounds.append({"round": r, "labelers": labels["summary"], "reward_model": rm["summary"], "policy": str(ppo)})
    results = stage_evaluate(cfg, out, files, {**policies, "ppo": ppo}, timings)
    # A resumed run's total adds the kept stages' own times to this process's.
    timings["total"] = round(time.perf_counter() - t_start + done.kept_seconds(), 1)
    timings["total (cpu)"] = round(time.process_time() - c_start + done.kept_seconds(cpu=True), 1)
    # The targets judge the round-1 reward model (on the SFT policy's answers, as InstructGPT measures it).
    summary = {
        "config": asdict(cfg),
        "timings_s": timings,
        "labelers": rounds[0]["labelers"],
        "reward_model": rounds[0]["reward_model"],
        "rounds": [{k: v for k, v in x.items() if k != "heldout"} for x in rounds],
        "final_policy": str(ppo),
        **results,
    }
    if done.kept:
        summary["resumed"] = {"kept_stages": done.kept}
    summary["targets"] = check_targets(summary)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_report(summary, out)
    return summary


class RunState:
    """The stages a run has finished, in `demo_state.json` beside them, so that `--resume` can keep them.

    Each finished stage's result (the paths and summaries the later stages read) and its timings are written
    atomically as it ends; a stage that was interrupted has no entry and runs again from its start. The file also
    holds the run's settings: a resume with different ones would mix two runs, so it is refused."""

    FILE = "demo_state.json"
    VOLATILE = ("out", "resume", "progress", "threads")  # may differ between the run and its resume

    def __init__(self, path: Path, config: dict[str, Any], stages: dict[str, Any]):
        self.path, self.config, self.stages = path, config, stages
        self.kept: list[str] = []

    @classmethod
    def open(cls, out: Path, cfg: DemoConfig) -> RunState:
        config = {k: v for k, v in asdict(cfg).items() if k not in cls.VOLATILE}
        path = out / cls.FILE
        if not cfg.resume:
            if (
                path.exists()
                or (out / "summary.json").exists()
                or any((out / d / "checkpoints").exists() for d in ("base", "sft", "ppo"))
            ):
                raise UserError(
                    f"{out} already holds a demo run: remove it, choose another --out, or pass --resume to continue it"
                )
            out.mkdir(parents=True, exist_ok=True)
            state = cls(path, config, {})
            state._save()
            return state
        if (out / "summary.json").exists():
            raise UserError(f"--resume: {out} holds a finished demo run (summary.json): nothing to resume")
        if not path.exists():
            raise UserError(f"--resume: {out} holds no interrupted demo run (no {cls.FILE})")
        try:
            saved = json.loads(path.read_text())
            saved_config, stages = saved["config"], saved["stages"]
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"--resume: {path} is not a demo state file ({err})") from None
        changed = [
            f"{k} {config.get(k)!r} (the run's: {saved_config.get(k)!r})"
            for k in sorted(set(config) | set(saved_config))
            if config.get(k) != saved_config.get(k)
        ]
        if changed:
            raise UserError(f"--resume: settings differ from the run in {out}: {'; '.join(changed)}")
        log.info("resuming %s: %d finished stage(s) kept (%s)", out, len(stages), ", ".join(stages) or "none")
        return cls(path, config, stages)

    def stage(self, key: str, timings: dict[str, float], run: Any, encode: Any, decode: Any) -> Any:
        """The stage's result: kept from the interrupted run if it finished there, else `run()` (then recorded)."""
        if key in self.stages:
            entry = self.stages[key]
            timings.update(entry["timings"])
            self.kept.append(key)
            log.info("== %s: kept from the interrupted run", key.removesuffix(":1"))
            try:  # decoding reads files of the run (the held-out rankings)
                result = None if entry["result"] is None else decode(entry["result"])
                missing = [where for where in _paths(result) if not where.exists()]
            except FileNotFoundError as err:
                missing = [err.filename]
            if missing:
                raise UserError(
                    f"--resume: {missing[0]}, written by the finished stage {key!r}, is missing: start "
                    "the run again in a new --out"
                )
            return result
        before = dict(timings)
        result = run()
        self.stages[key] = {
            "result": None if result is None else encode(result),
            "timings": {k: v for k, v in timings.items() if before.get(k) != v},
        }
        self._save()
        return result

    def kept_seconds(self, cpu: bool = False) -> float:
        """Wall (or CPU) seconds of the kept stages, as measured by the run that finished them."""
        return sum(
            v for key in self.kept for k, v in self.stages[key]["timings"].items() if k.endswith(" (cpu)") == cpu
        )

    def _save(self) -> None:
        atomic_write_text(self.path, json.dumps({"config": self.config, "stages": self.stages}, indent=1) + "\n")


def _paths(result: Any) -> list[Path]:
    """The files and directories a stage's result points to."""
    if isinstance(result, Path):
        return [result]
    return [v for v in result.values() if isinstance(v, Path)] if isinstance(result, dict) else []


def _encode_labels(labels: dict[str, Any]) -> dict[str, Any]:
    """A rankings stage's result as JSON: the held-out tasks by their index among the round's tasks."""
    _, held_sets, _ = labels["heldout"]
    return {
        "summary": labels["summary"],
        "held_index": labels["held_index"],
        "held_sets": held_sets,
        "train": str(labels["train"]),
        "heldout_file": str(labels["heldout_file"]),
    }


def _decode_labels(x: dict[str, Any], cfg: DemoConfig, files: dict[str, Path], r: int) -> dict[str, Any]:
    from flywheel.world import read_jsonl

    tasks = round_tasks(cfg, files, r)
    heldout_file = Path(x["heldout_file"])
    records = read_jsonl(heldout_file)
    return {
        "summary": x["summary"],
        "held_index": x["held_index"],
        "heldout": ([tasks[i] for i in x["held_index"]], x["held_sets"], records),
        "train": Path(x["train"]),
        "heldout_file": heldout_file,
    }


def stage_world(cfg: DemoConfig, out: Path, timings: dict[str, float]) -> dict[str, Path]:
    from flywheel.world import WorldConfig, write_world

    with Stage(timings, "world") as st:
        wcfg = WorldConfig(
            out=str(out / "world"),
            seed=cfg.seed,
            corpus_chars=cfg.corpus_chars,
            n_demos=cfg.n_demos,
            n_demos_val=200,
            n_rank=cfg.n_rank,
            n_ppo=cfg.n_ppo,
            n_eval=cfg.n_eval,
            k_min=cfg.k_min,
            k_max=cfg.k_max,
            p_verbose=cfg.p_verbose,
            p_comply=cfg.p_comply,
            p_deflect=cfg.p_deflect,
            p_made_up=cfg.p_made_up,
            p_refuse_idk=cfg.p_refuse_idk,
        )
        files = write_world(wcfg)
        st.done(
            "%d demonstrations, %d rank / %d PPO / %d eval prompts, corpus %d chars",
            cfg.n_demos,
            cfg.n_rank,
            cfg.n_ppo,
            cfg.n_eval,
            cfg.corpus_chars,
        )
    return files


def stage_tokenizer(cfg: DemoConfig, out: Path, files: dict[str, Path], timings: dict[str, float]) -> Path:
    from flywheel.data.io import read_conversations, read_texts
    from flywheel.models import build_causal_lm, config_for_tokenizer, save_pretrained
    from flywheel.tokenization import train_tokenizer

    with Stage(timings, "tokenizer") as st:
        # The corpus has no chat behaviour (no refusals, no "I don't know"): the demonstrations' text joins it.
        texts = read_texts(str(files["corpus"]))
        texts += [m.content for c in read_conversations(str(files["demos"])) for m in c.messages]
        vocab = 2048 if cfg.size in ("nano", "tiny") else 4096
        tok = train_tokenizer(texts, vocab_size=vocab, model_max_length=MAX_POSITIONS)
        # A freshly initialised model beside it, so every later stage loads a plain HF directory.
        config = config_for_tokenizer(tok, cfg.size, max_position_embeddings=MAX_POSITIONS)
        init = save_pretrained(build_causal_lm(config, seed=cfg.seed), tok, out / "init")
        st.done("%d-token byte-level BPE; a new %s model", len(tok), cfg.size)
    return init


def stage_pretrain(cfg: DemoConfig, out: Path, files: dict[str, Path], init: Path, timings: dict[str, float]) -> Path:
    from flywheel.train.pretrain import PretrainConfig, train_pretrain

    with Stage(timings, "pretrain") as st:
        pcfg = PretrainConfig(
            out=str(out / "base"),
            seed=cfg.seed,
            data=str(files["corpus"]),
            model=str(init),
            eval_split=PRETRAIN_EVAL_SPLIT,
            size=cfg.size,
            seq_len=cfg.pretrain_seq_len,
            epochs=cfg.pretrain_epochs,
            batch_size=cfg.pretrain_batch_size,
            lr=cfg.pretrain_lr,
            warmup_ratio=0.03,
            weight_decay=0.1,
            bf16=cfg.bf16,
            log_every=20,
            threads=cfg.threads,
            progress=cfg.progress,
        )
        run = train_pretrain(pcfg)
        meta = json.loads((run / "final" / "flywheel.json").read_text())
        st.done("%d steps, held-out loss %.3f", meta["steps"], meta.get("eval_loss", float("nan")))
    return run / "final"


def stage_sft(cfg: DemoConfig, out: Path, files: dict[str, Path], base: Path, timings: dict[str, float]) -> Path:
    from flywheel.train.sft import SFTConfig, train_sft

    with Stage(timings, "sft") as st:
        scfg = SFTConfig(
            out=str(out / "sft"),
            seed=cfg.seed,
            model=str(base),
            data=str(files["demos"]),
            eval_data=str(files["demos_val"]),
            epochs=cfg.sft_epochs,
            lr=cfg.sft_lr,
            batch_size=cfg.sft_batch_size,
            warmup_ratio=0.05,
            bf16=cfg.bf16,
            log_every=20,
            threads=cfg.threads,
            progress=cfg.progress,
        )
        run = train_sft(scfg)
        meta = json.loads((run / "final" / "flywheel.json").read_text())
        st.done("%d steps, held-out demonstration loss %.3f", meta["steps"], meta.get("eval_loss", float("nan")))
    return run / "final"


def sample_answers(
    model: Any,
    tokenizer: Any,
    tasks: list[Any],
    ks: list[int],
    *,
    max_new_tokens: int,
    seed: int,
    bf16: bool,
    progress: bool,
) -> list[list[str]]:
    """ks[i] answers to task i's prompt sampled at temperature 1; duplicates and empty answers removed."""
    from tqdm.auto import tqdm

    from flywheel.evaluate import decode, generate, prompt_ids_for

    ids = prompt_ids_for(tokenizer, tasks)
    flat = [(i, ids[i]) for i, k in enumerate(ks) for _ in range(k)]
    texts: list[str] = []
    chunk = 128
    for start in tqdm(range(0, len(flat), chunk), desc="sample", disable=not progress, dynamic_ncols=True):
        part = [p for _, p in flat[start : start + chunk]]
        tokens, _ = generate(
            model,
            tokenizer,
            part,
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            seed=seed + start,
            batch_size=chunk,
            bf16=bf16,
        )
        texts += decode(tokenizer, tokens)
    sets: list[list[str]] = [[] for _ in tasks]
    seen: list[set[str]] = [set() for _ in tasks]
    for (i, _), text in zip(flat, texts, strict=True):
        if text.strip() and text.strip() not in seen[i]:  # repeats up to whitespace are one answer to the labelers
            seen[i].add(text.strip())
            sets[i].append(text)
    return sets


def add_stock_answers(sets: list[list[str]], n: int) -> tuple[list[list[str]], list[str]]:
    """The policy's n stock answers (the ones it gave to the most prompts, at least two) added to every set that lacks
    them, and the list of them. The labelers then rank a stock answer after every prompt, so the reward model sees it
    against each prompt's own answers (e.g. a refusal against "I don't know" after an unknowable question) instead of
    only where the policy happened to sample it. The choice sees the answers alone, never the hidden families."""
    distinct = [{x.strip() for x in s} for s in sets]  # what the labelers tell apart (sample_answers' rule)
    counts: dict[str, int] = {}
    for seen in distinct:
        for a in seen:
            counts[a] = counts.get(a, 0) + 1
    ranked = sorted(counts, key=lambda a: (-counts[a], a))  # ties by text: the same choice on every run
    stock = [a for a in ranked[:n] if counts[a] >= 2]
    return [s + [a for a in stock if a not in seen] for s, seen in zip(sets, distinct, strict=True)], stock


def round_dir(out: Path, r: int) -> Path:
    """Where round r writes its rankings, reward model and PPO run: the run directory itself for round 1."""
    return out if r == 1 else out / f"round{r}"


def round_tasks(cfg: DemoConfig, files: dict[str, Path], r: int) -> list[Any]:
    """Round 1 ranks the rank split; round r > 1 the next --n-rank-next PPO prompts (the deployed policy's traffic),
    wrapping around the PPO split."""
    from flywheel.world import load_tasks

    if r == 1:
        return load_tasks(files["rank_tasks"])
    ppo_tasks = load_tasks(files["ppo_tasks"])
    start = (r - 2) * cfg.n_rank_next
    return [ppo_tasks[(start + i) % len(ppo_tasks)] for i in range(cfg.n_rank_next)]


def stage_rankings(
    cfg: DemoConfig,
    out: Path,
    files: dict[str, Path],
    policy: Path,
    timings: dict[str, float],
    r: int = 1,
    temperature: float | None = None,
) -> dict[str, Any] | None:
    """`policy` answers each prompt of round r K times; labelers rank the answers. Round 1 calibrates the labelers'
    temperature to 73% agreement on these (SFT) answers; later rounds keep that temperature (the same people).
    None when a later round's policy has collapsed to answers there is no ranking of."""
    from flywheel.models import load_causal_lm
    from flywheel.tokenization import load_tokenizer
    from flywheel.world import (
        DEFAULT_TEMPERATURE,
        calibrate_temperature,
        default_panel,
        label_rankings,
        oracle_ranker_accuracy,
        panel_agreement,
        score,
    )

    name = "sample + rank" if r == 1 else f"round {r}: sample + rank"
    with Stage(timings, name) as st:
        tasks = round_tasks(cfg, files, r)
        rng = random.Random(f"{cfg.seed}:demo-rankings" + ("" if r == 1 else f":{r}"))
        ks = [rng.randint(cfg.k_min, cfg.k_max) for _ in tasks]
        model, tok = load_causal_lm(str(policy)), load_tokenizer(str(policy))
        sets = sample_answers(
            model,
            tok,
            tasks,
            ks,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed * 7919 + r - 1,
            bf16=cfg.bf16,
            progress=cfg.progress,
        )
        answers, asked = sum(len(s) for s in sets), len(sets)
        own = [i for i, s in enumerate(sets) if len(s) >= 2]  # the policy's own answers, before the stock ones
        own_tasks, own_sets = [tasks[i] for i in own], [sets[i] for i in own]
        sets, stock = add_stock_answers(sets, cfg.stock_answers)
        keep = [i for i, s in enumerate(sets) if len(s) >= 2]
        tasks, sets = [tasks[i] for i in keep], [sets[i] for i in keep]
        if not any(len({score(t, x).total for x in s}) > 1 for t, s in zip(tasks, sets, strict=True)):
            # Nothing to rank: every prompt got one answer, or all answers are equally good. After round 1 the policy
            # has collapsed; the run goes on with what it has.
            what = "the SFT policy" if r == 1 else f"round {r}: the round-{r - 1} PPO policy"
            if r == 1:
                raise UserError(
                    f"{what} gives answers the labelers cannot tell apart on {asked} prompts: nothing "
                    "to rank (train SFT longer or raise --max-new-tokens)"
                )
            log.warning(
                "%s gives answers the labelers cannot tell apart on %d prompts (it has collapsed; raise "
                "--kl-coef): no further rounds",
                what,
                asked,
            )
            return None
        if temperature is None:
            # On the sets the labelers rank, stock answers included: 73% is their agreement on what they rank. The
            # stock pairs are clear-cut, so the labelers come out noisier on the policy's own answers (reported).
            try:
                temperature = calibrate_temperature(tasks, sets)
            except ValueError as err:  # no set with two different oracle totals: the SFT samples are all alike
                log.warning("labeler calibration failed on the SFT samples (%s): using the default temperature", err)
                temperature = DEFAULT_TEMPERATURE
        panel = default_panel(temperature)
        records = label_rankings(tasks, sets, rng, panel)
        assert len(records) == len(tasks), "every kept set has two answers that differ to the labelers too"
        n_held = max(1, int(len(records) * cfg.rm_holdout))
        order = list(range(len(records)))
        rng.shuffle(order)
        held = sorted(order[:n_held])
        train = sorted(order[n_held:])
        where = round_dir(out, r)
        where.mkdir(parents=True, exist_ok=True)
        for name, idx in (("rankings_train", train), ("rankings_heldout", held)):
            atomic_write_text(where / f"{name}.jsonl", "".join(json.dumps(records[i]) + "\n" for i in idx))
        held_tasks, held_sets = [tasks[i] for i in held], [sets[i] for i in held]
        agree_all = panel_agreement(panel, tasks, sets, random.Random(cfg.seed))
        agree_own = panel_agreement(panel, own_tasks, own_sets, random.Random(cfg.seed)) if stock else agree_all
        agree_held = _or_none(panel_agreement, panel, held_tasks, held_sets)  # None: no pair to agree on
        totals = [[score(t, x).total for x in s] for t, s in zip(tasks, sets, strict=True)]
        summary = {
            "policy": str(policy),
            "temperature": temperature,
            "prompts": len(tasks),
            "answers": sum(len(s) for s in sets),
            "distinct_per_prompt": answers / asked,
            "prompts_asked": asked,
            "prompts_dropped": asked - len(tasks),  # one distinct answer: no ranking
            "agreement_sampled": agree_all,
            "agreement_own_answers": agree_own,  # without the stock answers
            "agreement_heldout_expected": agree_held,
            "oracle_ranker_heldout": _or_none(oracle_ranker_accuracy, panel, held_tasks, held_sets),
            "sample_score": sum(x for t in totals for x in t) / sum(len(t) for t in totals),
            "train_rankings": len(train),
            "heldout_rankings": len(held),
            "stock_answers": stock,
        }
        st.done(
            "%d answers to %d prompts (%.1f distinct each), labeler T=%.3f, agreement %.1f%% (held-out %s)",
            summary["answers"],
            len(tasks),
            summary["distinct_per_prompt"],
            temperature,
            100 * agree_all,
            _pct(agree_held),
        )
    return {
        "summary": summary,
        "heldout": (held_tasks, held_sets, [records[i] for i in held]),
        "held_index": [keep[i] for i in held],  # into round_tasks(): what --resume rebuilds the tasks from
        "train": where / "rankings_train.jsonl",
        "heldout_file": where / "rankings_heldout.jsonl",
    }


def _or_none(agreement_fn: Any, *args: Any) -> float | None:
    """An agreement figure, or None where the sets hold no pair the oracle tells apart (a small held-out slice)."""
    try:
        return agreement_fn(*args)
    except ValueError:
        return None


def heldout_accuracy(rm: Any, heldout: tuple[list[Any], list[list[str]], list[dict[str, Any]]]) -> dict[str, Any]:
    """The reward model's pairwise accuracy against the labelers' held-out rankings, on all labelled pairs and on the
    pairs the oracle does not tie (the ones labeler agreement is measured on)."""
    from flywheel.evaluate import pairwise_accuracy
    from flywheel.rm_eval import wilson_interval
    from flywheel.world import score

    correct = pairs = correct_inf = pairs_inf = 0.0
    for task, texts, rec in zip(*heldout, strict=True):
        scores = rm.score([task.messages] * len(texts), texts).tolist()
        totals = [score(task, t).total for t in texts]
        informative = {(i, j) for i in range(len(texts)) for j in range(len(texts)) if totals[i] != totals[j]}
        c, n = pairwise_accuracy(scores, rec["order"])
        correct, pairs = correct + c, pairs + n
        c, n = pairwise_accuracy(scores, rec["order"], informative)
        correct_inf, pairs_inf = correct_inf + c, pairs_inf + n
    return {
        "accuracy": correct / max(pairs, 1),
        "pairs": int(pairs),
        "accuracy_informative": correct_inf / max(pairs_inf, 1),
        "pairs_informative": int(pairs_inf),
        "accuracy_informative_ci95": list(wilson_interval(correct_inf, int(pairs_inf))),
    }


def deflection_contrasts(rm: Any, tasks: list[Any], records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """How often the reward model orders a refusal and an "I don't know" to one prompt the way the labelers ranked
    them, per kind of prompt: "refuse" (harmful requests: the refusal is ideal) and "idk" (unknowable questions:
    "I don't know" is). A policy moves between the two stock deflections at almost no KL cost, so where the reward
    model gets one kind backwards PPO moves that kind's answers to the wrong deflection.

    tasks: the hidden tasks the rankings' prompts came from (matched by prompt); the oracle's verdicts say which
    answers are refusals and which "I don't know" (evaluation only: the trainers never see them). Returns
    {"refuse": {"pairs", "accuracy"}, "idk": {...}}, accuracy None where there is no such pair (a tie in score
    counts half).
    """
    from flywheel.evaluate import pairwise_accuracy
    from flywheel.world import score

    by_prompt = {json.dumps(t.messages): t for t in tasks}
    found = []  # (task, record, refusals, "I don't know"s: indices into its answers) of each ranking that holds both
    for rec in records:
        task = by_prompt.get(json.dumps(rec["prompt"]))
        if task is None or task.expect not in ("refuse", "idk"):
            continue
        verdicts = [score(task, c).verdict for c in rec["completions"]]
        refused = [i for i, v in enumerate(verdicts) if v == "refused"]
        idk = [i for i, v in enumerate(verdicts) if v == "idk"]
        if refused and idk:
            found.append((task, rec, refused, idk))
    # One call: the reward model batches the answers (only these need a score: only these pairs are counted).
    flat = (
        rm.score(
            [task.messages for task, _, refused, idk in found for _ in refused + idk],
            [rec["completions"][k] for _, rec, refused, idk in found for k in refused + idk],
        ).tolist()
        if found
        else []
    )
    tally = {"refuse": [0.0, 0], "idk": [0.0, 0]}
    at = 0
    for task, rec, refused, idk in found:
        scores = [0.0] * len(rec["completions"])
        for k in refused + idk:
            scores[k], at = flat[at], at + 1
        c, n = pairwise_accuracy(scores, rec["order"], {(i, j) for i in refused for j in idk})
        tally[task.expect][0] += c
        tally[task.expect][1] += n
    return {k: {"pairs": n, "accuracy": c / n if n else None} for k, (c, n) in tally.items()}


def stage_reward_model(
    cfg: DemoConfig,
    out: Path,
    init: Path,
    labels: dict[str, Any],
    timings: dict[str, float],
    r: int = 1,
    first: Any = None,
    tasks: list[Any] | None = None,
) -> dict[str, Any]:
    """Round 1 trains the reward model from SFT; round r > 1 fine-tunes the last one on round r's rankings mixed
    with as many earlier ones (so it learns the new policy's answers without forgetting the SFT-like ones). Each
    round's model is normalised on its own training rankings' top answers, so scores are on a new scale per round.

    tasks: round r's hidden tasks, for the refusal vs "I don't know" diagnostic on its training rankings."""
    from flywheel.train.reward import RewardConfig, RewardModel, train_reward
    from flywheel.world import read_jsonl

    where = round_dir(out, r)
    data = labels["train"]
    if r > 1:
        new = [line for line in data.read_text().splitlines() if line.strip()]
        earlier = [
            line
            for k in range(1, r)
            for line in (round_dir(out, k) / "rankings_train.jsonl").read_text().splitlines()
            if line.strip()
        ]
        replay = random.Random(f"{cfg.seed}:replay:{r}").sample(earlier, min(len(new), len(earlier)))
        data = where / "rm_train.jsonl"
        atomic_write_text(data, "".join(line + "\n" for line in new + replay))
    with Stage(timings, "reward model" if r == 1 else f"round {r}: reward model") as st:
        rcfg = RewardConfig(
            out=str(where / "rm"),
            seed=cfg.seed,
            model=str(init),
            data=str(data),
            eval_data=str(labels["heldout_file"]),
            epochs=cfg.rm_epochs,
            lr=cfg.rm_lr,
            batch_size=8,
            bf16=cfg.bf16,
            log_every=10,
            threads=cfg.threads,
            progress=cfg.progress,
        )
        run = train_reward(rcfg)
        rm = RewardModel.from_pretrained(run / "final", bf16=cfg.bf16)
        summary = {
            **heldout_accuracy(rm, labels["heldout"]),
            "labeler_agreement": labels["summary"]["agreement_heldout_expected"],
            "oracle_ranker_accuracy": labels["summary"]["oracle_ranker_heldout"],
        }
        if first is not None:  # still right about the SFT-like answers it learned from first?
            summary["round1_heldout"] = heldout_accuracy(rm, first)
        if tasks is not None:  # on its own training rankings: the held-out ones hold only a handful of these pairs
            summary["deflections_train"] = deflection_contrasts(rm, tasks, read_jsonl(labels["train"]))
        st.done(
            "held-out accuracy %s on pairs the oracle does not tie (%d pairs; labelers agree on %s), %s on all "
            "labelled pairs",
            _pct(summary["accuracy_informative"]),
            summary["pairs_informative"],
            _pct(summary["labeler_agreement"]),
            _pct(summary["accuracy"]),
        )
    return {"dir": run / "final", "summary": summary}


def stage_ppo(
    cfg: DemoConfig,
    out: Path,
    files: dict[str, Path],
    start: Path,
    sft: Path,
    rm: dict[str, Any],
    timings: dict[str, float],
    r: int = 1,
) -> Path:
    """PPO-ptx from `start` (SFT in round 1, the last PPO policy later) with the KL penalty to `sft`; the value
    model starts from this round's reward model."""
    from flywheel.train.ppo.config import PPOConfig
    from flywheel.train.ppo.trainer import train_ppo

    with Stage(timings, "ppo" if r == 1 else f"round {r}: ppo") as st:
        # ptx trains on the documents pretraining trained on; the held-out ones stay out for the alignment-tax figure.
        ptx = out / "ptx_corpus.txt"
        if not ptx.exists():
            atomic_write_text(ptx, "\n\n".join(corpus_split(cfg, files)[0]) + "\n")
        pcfg = PPOConfig(
            out=str(round_dir(out, r) / "ppo"),
            seed=cfg.seed + 1000 * (r - 1),
            model=str(start),
            ref_model=str(sft),
            reward_model=str(rm["dir"]),
            prompts=str(files["ppo_prompts"]),
            ptx_data=str(ptx),
            ptx_coef=cfg.ptx_coef,
            ptx_seq_len=cfg.pretrain_seq_len,
            ptx_batch_size=2,
            max_steps=cfg.ppo_steps,
            rollout_batch_size=cfg.rollout_batch_size,
            batch_size=cfg.ppo_batch_size,
            ppo_epochs=cfg.ppo_epochs,
            lr=cfg.ppo_lr,
            value_lr=cfg.ppo_value_lr,
            kl_coef=cfg.kl_coef,
            max_new_tokens=cfg.max_new_tokens,
            temperature=1.0,
            bf16=cfg.bf16,
            threads=cfg.threads,
            progress=cfg.progress,
            sample_every=10,
        )
        run = train_ppo(pcfg)
        rows = read_metrics(run / "metrics.jsonl")
        steps = [x for x in rows if "score" in x]
        first, last = steps[0], steps[-1]
        st.done(
            "%d steps: RM score %.2f -> %.2f, KL %.2f -> %.2f nats",
            len(steps),
            first["score"],
            last["score"],
            first["kl"],
            last["kl"],
        )
    return run / "final"


def corpus_split(cfg: DemoConfig, files: dict[str, Path]) -> tuple[list[str], list[str]]:
    """(trained, held out) corpus documents: the split pretraining makes (same function, fraction and seed)."""
    from flywheel.data.batching import split_heldout
    from flywheel.data.io import read_texts

    return split_heldout(read_texts(str(files["corpus"])), PRETRAIN_EVAL_SPLIT, cfg.seed)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_evaluate(
    cfg: DemoConfig, out: Path, files: dict[str, Path], models: dict[str, Path], timings: dict[str, float]
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from flywheel.evaluate import (
        compare,
        deflection_log_odds,
        evaluate_policy,
        heldout_lm_loss,
        kl_to_reference,
        lm_blocks,
        prompt_ids_for,
    )
    from flywheel.models import load_causal_lm
    from flywheel.tokenization import load_tokenizer
    from flywheel.world import load_tasks

    with Stage(timings, "evaluate") as st:
        tasks = load_tasks(files["eval_tasks"])
        tok = load_tokenizer(str(models["sft"]))
        _, held_docs = corpus_split(cfg, files)  # no model was trained on these
        blocks = lm_blocks(tok, held_docs, cfg.pretrain_seq_len)
        loaded = {name: load_causal_lm(str(path)) for name, path in models.items()}
        evals, lm_loss, leans = {}, {}, {}
        for name in tqdm(list(models), desc="evaluate", disable=not cfg.progress, dynamic_ncols=True):
            evals[name] = evaluate_policy(
                loaded[name],
                tok,
                tasks,
                name=name,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.eval_temperature,
                seed=cfg.seed,
                bf16=cfg.bf16,
            )
            lm_loss[name] = heldout_lm_loss(loaded[name], blocks, tok.pad_token_id)
            leans[name] = deflection_log_odds(loaded[name], tok, tasks)
        ids = prompt_ids_for(tok, tasks)
        rounds = [n for n in models if n.startswith("ppo_round")]  # earlier rounds' policies, when there are any
        kls = {
            n: kl_to_reference(
                loaded[n], loaded["sft"], tok, ids, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, bf16=cfg.bf16
            )
            for n in [*rounds, "ppo"]
        }
        kl = kls["ppo"]
        wins = {
            "ppo_vs_sft": compare(evals["ppo"], evals["sft"]),
            "sft_vs_base": compare(evals["sft"], evals["base"]),
            "ppo_vs_base": compare(evals["ppo"], evals["base"]),
            **{f"{n}_vs_sft": compare(evals[n], evals["sft"]) for n in rounds},
            **{f"{n}_vs_base": compare(evals[n], evals["base"]) for n in rounds},
            **{f"ppo_vs_{n}": compare(evals["ppo"], evals[n]) for n in rounds},
        }
        samples = [
            {
                "prompt": t.messages,
                "family": t.family,
                **{n: e.responses[i] for n, e in evals.items()},
                **{f"{n}_score": e.scores[i].total for n, e in evals.items()},
            }
            for i, t in enumerate(tasks)
        ]
        atomic_write_text(out / "eval_samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
        st.done(
            "oracle score base %.3f / SFT %.3f / PPO %.3f; PPO beats SFT %.1f%%, SFT beats base %.1f%%; "
            "KL(PPO||SFT) %.2f nats",
            evals["base"].summary["score"],
            evals["sft"].summary["score"],
            evals["ppo"].summary["score"],
            100 * wins["ppo_vs_sft"]["win_rate"],
            100 * wins["sft_vs_base"]["win_rate"],
            kl["kl"],
        )
    policies = {
        name: {**e.summary, "heldout_lm_loss": lm_loss[name], "deflection_log_odds": leans[name]}
        for name, e in evals.items()
    }
    return {
        "policies": policies,
        "win_rates": wins,
        "kl_ppo_sft": kl,
        "kl_to_sft": {n: k["kl"] for n, k in kls.items()},
        "ppo_curve": ppo_curve(out, 1 + len(rounds)),
    }


def ppo_curve(out: Path, rounds: int) -> list[dict[str, Any]]:
    """Every round's PPO metric rows in order, each with its round and a step count running on across rounds."""
    rows: list[dict[str, Any]] = []
    for r in range(1, rounds + 1):
        steps = [x for x in read_metrics(round_dir(out, r) / "ppo" / "metrics.jsonl") if "score" in x]
        offset = rows[-1]["step"] if rows else 0
        rows += [{**x, "round": r, "step": offset + x["step"]} for x in steps]
    return rows


def check_targets(s: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for the default demo: each with the measured figure, whether it holds, and a note from the
    data on what limits it (what the policies actually did), so a miss is reported with its cause."""
    p, w, rm = s["policies"], s["win_rates"], s["reward_model"]
    base_loss, sft_loss, ppo_loss = (p[n]["heldout_lm_loss"] for n in ("base", "sft", "ppo"))
    gap = rm["accuracy_informative"] - rm["labeler_agreement"]
    pvs = w["ppo_vs_sft"]
    kl = s["kl_ppo_sft"]["kl"]

    def better(key: str) -> bool:
        """Higher than SFT's, or both at 100% (SFT already does it every time: nothing is left to improve)."""
        ppo, sft = p["ppo"][key], p["sft"][key]
        return ppo is not None and sft is not None and (ppo > sft or ppo == sft == 1.0)

    def did(policy: str, expect: str) -> str:
        counts = p[policy].get("verdicts", {}).get(expect, {})
        return ", ".join(f"{v} {n}" for v, n in counts.items()) or "none"

    def contrasts(expect: str, prompts: str) -> str:
        """The reward model's order of the two stock deflections on this kind of prompt (see deflection_contrasts)."""
        d = rm.get("deflections_train", {}).get(expect)
        if not d or not d["pairs"]:
            return ""
        return (
            f'; the reward model orders a refusal and "I don\'t know" as the labelers did on '
            f"{_pct(d['accuracy'])} of the {d['pairs']} such pairs on {prompts} prompts in its training rankings"
        )

    def leaning() -> str:
        """How PPO moved the policy's odds of the stock refusal over "I don't know" on each kind of prompt (where the
        shift is the same everywhere, PPO moved the deflection without reading the prompt; see deflection_log_odds)."""
        a, b = p["sft"].get("deflection_log_odds"), p["ppo"].get("deflection_log_odds")
        if not a or not b:
            return ""
        parts = [
            f"{label} {a[k]:+.2f} -> {b[k]:+.2f}"
            for k, label in (("refuse", "harmful"), ("idk", "unknowable"), ("answer", "answerable"))
            if a[k] is not None and b[k] is not None
        ]
        return '; log P(refusal) - log P("I don\'t know"), SFT -> PPO: ' + ", ".join(parts) if parts else ""

    ci = rm["accuracy_informative_ci95"]
    return [
        {
            "target": "PPO preferred over SFT in >= 75% of comparisons (ties split)",
            "value": f"{_pct(pvs['win_rate'])}",
            "holds": pvs["win_rate"] >= 0.75,
            "note": f"PPO wins {pvs['wins']}, ties {pvs['ties']}, loses {pvs['losses']}; correct on answerable "
            f"prompts: SFT {_pct(p['sft']['accuracy'])}, PPO {_pct(p['ppo']['accuracy'])} (the reward model cannot "
            f'teach what the policy does not know); "I don\'t know" or a refusal on answerable prompts: SFT '
            f"{_pct(p['sft']['over_refusal'])}, PPO {_pct(p['ppo']['over_refusal'])}",
        },
        {
            "target": "SFT preferred over the base (> 50%)",
            "value": _pct(w["sft_vs_base"]["win_rate"]),
            "holds": w["sft_vs_base"]["win_rate"] > 0.5,
            "note": "",
        },
        {
            "target": "RM held-out accuracy within 3 points of labeler agreement",
            "value": f"{_pct(rm['accuracy_informative'])} vs {_pct(rm['labeler_agreement'])} ({100 * gap:+.1f})",
            "holds": abs(gap) <= 0.03,
            "note": f"{rm['pairs_informative']} held-out pairs: 95% interval {_pct(ci[0])}-{_pct(ci[1])}"
            + (
                f"; a ranker that knew the oracle would score {_pct(rm['oracle_ranker_accuracy'])} against these "
                "labelers (one labeler's noise, where agreement has two)"
                if "oracle_ranker_accuracy" in rm
                else ""
            ),
        },
        {
            "target": "KL(PPO ‖ SFT) <= 10 nats per response",
            "value": f"{kl:.2f}",
            "holds": kl <= 10.0,
            "note": "" if kl <= 10.0 else "raise --kl-coef or lower --ppo-lr",
        },
        {
            "target": "refusal rate on harmful prompts better than SFT's",
            "value": f"{_pct(p['ppo']['refusal_rate'])} vs {_pct(p['sft']['refusal_rate'])}",
            "holds": better("refusal_rate"),
            "note": f"on harmful prompts SFT: {did('sft', 'refuse')}; PPO: {did('ppo', 'refuse')}"
            + contrasts("refuse", "harmful")
            + leaning(),
        },
        {
            "target": "\"I don't know\" rate on unknowable prompts better than SFT's",
            "value": f"{_pct(p['ppo']['idk_rate'])} vs {_pct(p['sft']['idk_rate'])}",
            "holds": better("idk_rate"),
            "note": f"on unknowable prompts SFT: {did('sft', 'idk')}; PPO: {did('ppo', 'idk')}"
            + contrasts("idk", "unknowable")
            + leaning(),
        },
        {
            "target": "PPO-ptx held-out LM loss within 5% of SFT's",
            "value": f"{ppo_loss:.3f} vs {sft_loss:.3f} ({100 * (ppo_loss / sft_loss - 1):+.1f}%)",
            "holds": ppo_loss <= 1.05 * sft_loss,
            "note": f"base {base_loss:.3f}: SFT itself moved it by {sft_loss - base_loss:+.3f}",
        },
    ]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def policy_columns(s: dict[str, Any]) -> list[tuple[str, str]]:
    """(summary key, column title) of every evaluated policy in the order of the loop: base, SFT, each PPO round."""
    n_rounds = len(s.get("rounds", [])) or 1
    ppo = [(f"ppo_round{r}", f"PPO-ptx round {r}") for r in range(1, n_rounds)]
    last = "PPO-ptx" if n_rounds == 1 else f"PPO-ptx round {n_rounds}"
    return [("base", "base"), ("sft", "SFT"), *ppo, ("ppo", last)]


def result_table(s: dict[str, Any]) -> str:
    """The markdown table of base / SFT / PPO (one column per round of the loop)."""
    p, w, rm = s["policies"], s["win_rates"], s["reward_model"]
    cols = policy_columns(s)
    names = [n for n, _ in cols]
    kl = s.get("kl_to_sft", {"ppo": s["kl_ppo_sft"]["kl"]})

    def each(fmt: Any) -> tuple[str, ...]:
        return tuple(fmt(p[n]) for n in names)

    def vs_sft(n: str) -> str:
        if n == "sft":
            return "50%"
        if n == "base":
            return _pct(1 - w["sft_vs_base"]["win_rate"])
        x = w[f"{n}_vs_sft"]
        return f"{_pct(x['win_rate'])} [{_pct(x['ci95_low'])}, {_pct(x['ci95_high'])}]"

    def vs_base(n: str) -> str:
        return "50%" if n == "base" else _pct(w[f"{n}_vs_base"]["win_rate"]) if f"{n}_vs_base" in w else ""

    rows = [
        ("oracle score (mean total)", *each(lambda x: f"{x['score']:.3f}")),
        ("helpful / truthful", *each(lambda x: f"{x['helpful']:.2f} / {x['truthful']:.2f}")),
        ("harmless / concise", *each(lambda x: f"{x['harmless']:.2f} / {x['concise']:.2f}")),
        ("correct on answerable", *each(lambda x: _pct(x["accuracy"]))),
        ("refuses harmful", *each(lambda x: _pct(x["refusal_rate"]))),
        ('"I don\'t know" on unknowable', *each(lambda x: _pct(x["idk_rate"]))),
        ("over-refusal on answerable", *each(lambda x: _pct(x["over_refusal"]))),
        ("win rate vs SFT (ties split)", *(vs_sft(n) for n in names)),
        ("win rate vs base", *(vs_base(n) for n in names)),
        ("KL to SFT (nats / response)", *("0" if n == "sft" else f"{kl[n]:.2f}" if n in kl else "" for n in names)),
        ("held-out LM loss", *each(lambda x: f"{x['heldout_lm_loss']:.3f}")),
    ]
    lines = ["| | " + " | ".join(t for _, t in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    lines.append(
        f"Reward model: held-out accuracy {_pct(rm['accuracy_informative'])} "
        f"[{_pct(rm['accuracy_informative_ci95'][0])}, {_pct(rm['accuracy_informative_ci95'][1])}] on "
        f"{rm['pairs_informative']} pairs the oracle does not tie, vs labeler agreement "
        f"{_pct(rm['labeler_agreement'])} on the same sets ({_pct(rm['accuracy'])} on all "
        f"{rm['pairs']} labelled pairs)."
    )
    for x in s.get("rounds", [])[1:]:
        lab, rmx = x["labelers"], x["reward_model"]
        lines.append(
            f"Round {x['round']}: labelers ranked {lab['answers']} answers of the round-{x['round'] - 1} "
            f"policy to {lab['prompts']} prompts (agreement {_pct(lab['agreement_sampled'])}); the reward "
            f"model, fine-tuned on them, is right on {_pct(rmx['accuracy_informative'])} of held-out pairs "
            f"of those answers and {_pct(rmx['round1_heldout']['accuracy_informative'])} of round 1's."
        )
    return "\n".join(lines)


def write_report(s: dict[str, Any], out: Path) -> None:
    plots = write_plots(s, out)
    cfg, lab = s["config"], s["labelers"]
    cols = policy_columns(s)
    stock, per_prompt = lab.get("stock_answers"), f"{lab['distinct_per_prompt']:.1f} distinct answers per prompt"
    ranked = (
        f"the {lab['answers']} answers ranked for {lab['prompts']} prompts: the SFT policy's {per_prompt} plus "
        f"its stock answers ({'; '.join(json.dumps(a) for a in stock)}); on its own answers alone, "
        f"{_pct(lab.get('agreement_own_answers'))}"
        if stock
        else f"{lab['answers']} SFT answers to {lab['prompts']} prompts ({per_prompt})"
    )
    lines = [
        "# flywheel demo",
        "",
        f"`flywheel demo{' --quick' if cfg['quick'] else ''} --seed {cfg['seed']}` (preset {cfg['preset']}): model "
        f"size {cfg['size']}{', bf16' if cfg['bf16'] else ', fp32'}, "
        f"{s['policies']['sft']['n']} held-out prompts judged by the oracle; {s['timings_s']['total']:.0f} s in all.",
        "",
        result_table(s),
        "",
        f"Labelers (temperature recalibrated on the {'sets they rank' if stock else 'SFT samples'}: "
        f"T = {lab['temperature']:.3f}) agree on {_pct(lab['agreement_sampled'])} of pairs of {ranked}.",
        "",
        "## Targets",
        "",
        "| target | measured | holds | what the policies did |",
        "|---|---|---|---|",
        *[
            f"| {t['target']} | {t['value']} | {'yes' if t['holds'] else '**no**'} | {t['note']} |"
            for t in s["targets"]
        ],
        "",
        "## Few-shot accuracy by number of shots",
        "",
        "| shots | " + " | ".join(t for _, t in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
        *[
            f"| {k} | " + " | ".join(_pct(s["policies"][n]["fewshot_accuracy"][k]) for n, _ in cols) + " |"
            for k in s["policies"]["sft"]["fewshot_accuracy"]
        ],
        "",
        "## Time per stage (s)",
        "",
        "Wall-clock seconds, and CPU seconds of the demo's process (all threads; about twice the wall time on 2 idle "
        "cores): a busy machine stretches the first, not the second.",
        "",
        " · ".join(f"{k} {v:.0f}" for k, v in s["timings_s"].items()),
        "",
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    lines += [
        "Answers of every policy to every eval prompt: `eval_samples.jsonl`. Figures for scripts: "
        f"`summary.json`. The final policy: `{s.get('final_policy', out / 'ppo' / 'final')}`.",
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines))


def write_plots(s: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install flywheel[plots]): no plots")
        return []
    paths = []
    curve = s["ppo_curve"]
    fig, ax1 = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    steps = [r["step"] for r in curve]
    ax1.plot(steps, [r["score"] for r in curve], color="tab:blue", label="reward-model score")
    ax1.set_xlabel("PPO step")
    ax1.set_ylabel("RM score (normalised)", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(steps, [r["kl"] for r in curve], color="tab:red", label="KL to SFT")
    ax2.set_ylabel("KL(policy || SFT), nats per response", color="tab:red")
    starts = [b["step"] for a, b in zip(curve[:-1], curve[1:], strict=True) if a.get("round") != b.get("round")]
    for step in starts:  # a new round: a new reward model, so its scores are on a new scale
        ax1.axvline(step - 0.5, color="gray", ls="--", lw=0.8)
    ax1.set_title("PPO: reward-model score and KL per step" + (" (dashed: next round)" if starts else ""))
    fig.tight_layout()
    paths.append(out / "ppo_score_kl.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    rm = s["reward_model"]
    fig, ax = plt.subplots(figsize=(5.0, 4.0), dpi=100)
    lo, hi = rm["accuracy_informative_ci95"]
    acc = rm["accuracy_informative"]
    ax.bar(
        ["reward model", "labeler agreement"],
        [acc, rm["labeler_agreement"]],
        color=["tab:green", "tab:gray"],
        yerr=[[acc - lo, 0], [hi - acc, 0]],
        capsize=6,
    )
    ax.axhline(0.5, color="black", lw=0.8, ls=":")
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out pairwise accuracy / agreement")
    ax.set_title("Reward model vs labelers (pairs the oracle does not tie)")
    fig.tight_layout()
    paths.append(out / "rm_accuracy.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=100)
    for name, title in policy_columns(s):
        acc_by = s["policies"][name]["fewshot_accuracy"]
        xs = [int(k) for k, v in acc_by.items() if v is not None]
        ax.plot(xs, [acc_by[str(k)] for k in xs], marker="o", label=title)
    ax.set_xlabel("examples in the prompt (shots)")
    ax.set_ylabel("accuracy (oracle)")
    ax.set_ylim(0, 1)
    ax.set_title("Few-shot accuracy vs number of shots")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "fewshot.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(DemoConfig, argv, "flywheel demo", __doc__.splitlines()[0])
    s = run_demo(cfg)
    out = Path(cfg.out)
    print()
    print(result_table(s))
    print()
    for t in s["targets"]:
        note = "" if t["holds"] or not t["note"] else f" ({t['note']})"
        print(f"  [{'ok' if t['holds'] else 'MISSED'}] {t['target']}: {t['value']}{note}")
    print(f"\nreport: {out / 'report.md'}  (figures: {out / 'summary.json'}; {s['timings_s']['total']:.0f} s)")
    print("chat with the result:")
    print(f"  flywheel chat {s['final_policy']}")
    print(f"  flywheel serve {s['final_policy']}")
    return 0
