"""The demo's training stages: world -> tokenizer -> pretrain -> SFT, and each round's reward model and PPO.

Each stage takes the run's `DemoRun` (settings, directory, world files, timings) and returns a typed result: a model
directory, or a `RewardModelResult`. Trainer settings come from `DemoRun.cfg.stage_config(...)`, which lays the
preset's and the user's overrides onto the trainer's own config; a stage sets only what wires it to the others.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.data.batching import split_heldout
from flywheel.data.io import read_conversations, read_texts
from flywheel.demo.config import DemoConfig
from flywheel.demo.state import Stage
from flywheel.demo.summary import RewardModelSummary, _pct
from flywheel.eval.reward import deflection_contrasts, heldout_accuracy
from flywheel.models import build_causal_lm, config_for_tokenizer, save_pretrained
from flywheel.tokenization import train_tokenizer
from flywheel.train.ppo.trainer import train_ppo
from flywheel.train.pretrain import train_pretrain
from flywheel.train.reward import RewardModel, train_reward
from flywheel.train.sft import train_sft
from flywheel.utils import atomic_write_text
from flywheel.world import Task, WorldConfig, load_tasks, read_jsonl, write_world

MAX_POSITIONS = 512  # context of the demo's models (RoPE: no parameters depend on it)


@dataclass
class DemoRun:
    """What every stage of one run reads: its resolved settings, its directory, the world's files, the timings."""

    cfg: DemoConfig
    out: Path
    world: WorldConfig
    files: dict[str, Path]
    timings: dict[str, float]

    def round_dir(self, r: int) -> Path:
        """Where round r writes its rankings, reward model and PPO run: the run directory itself for round 1."""
        return self.out if r == 1 else self.out / f"round{r}"

    def round_tasks(self, r: int) -> list[Task]:
        """Round 1 ranks the rank split; round r > 1 the next --n-rank-next PPO prompts (the deployed policy's
        traffic), wrapping around the PPO split."""
        if r == 1:
            return load_tasks(self.files["rank_tasks"])
        ppo_tasks = load_tasks(self.files["ppo_tasks"])
        start = (r - 2) * self.cfg.n_rank_next
        return [ppo_tasks[(start + i) % len(ppo_tasks)] for i in range(self.cfg.n_rank_next)]

    def pretrain_config(self, **wired: Any) -> Any:
        """The pretraining stage's config: what it trains with, and the held-out split and block length that PPO-ptx
        and the evaluation read from it."""
        paths = {"out": str(self.out / "base"), "data": str(self.files["corpus"]), "size": self.cfg.size}
        return self.cfg.stage_config("pretrain", **paths, **wired)

    def ptx_corpus(self) -> Path:
        """The documents pretraining trained on, for PPO-ptx (the held-out ones stay out for the alignment tax)."""
        ptx = self.out / "ptx_corpus.txt"
        if not ptx.exists():
            atomic_write_text(ptx, "\n\n".join(self.corpus_split()[0]) + "\n")
        return ptx

    def corpus_split(self) -> tuple[list[str], list[str]]:
        """(trained, held out) corpus documents: the split pretraining makes (same function, fraction and seed)."""
        split = self.pretrain_config().eval_split
        return split_heldout(read_texts(str(self.files["corpus"])), split, self.cfg.seed)


def start_run(cfg: DemoConfig, out: Path, timings: dict[str, float]) -> DemoRun:
    """Write the toy world (2 s and deterministic: rewritten by every run, never kept) and return the run."""
    with Stage(timings, "world") as st:
        world = cfg.stage_config("world", out=str(out / "world"))
        files = write_world(world)
        st.done(
            "%d demonstrations, %d rank / %d PPO / %d eval prompts, corpus %d chars",
            world.n_demos,
            world.n_rank,
            world.n_ppo,
            world.n_eval,
            world.corpus_chars,
        )
    return DemoRun(cfg, out, world, files, timings)


def stage_tokenizer(run: DemoRun) -> Path:
    """A byte-level BPE trained on the corpus and the demonstrations, and a new model of --size beside it."""
    cfg = run.cfg
    with Stage(run.timings, "tokenizer") as st:
        # The corpus has no chat behaviour (no refusals, no "I don't know"): the demonstrations' text joins it.
        texts = read_texts(str(run.files["corpus"]))
        texts += [m.content for c in read_conversations(str(run.files["demos"])) for m in c.messages]
        vocab = 2048 if cfg.size in ("nano", "tiny") else 4096
        tok = train_tokenizer(texts, vocab_size=vocab, model_max_length=MAX_POSITIONS)
        # A freshly initialised model beside it, so every later stage loads a plain HF directory.
        config = config_for_tokenizer(tok, cfg.size, max_position_embeddings=MAX_POSITIONS)
        init = save_pretrained(build_causal_lm(config, seed=cfg.seed), tok, run.out / "init")
        st.done("%d-token byte-level BPE; a new %s model", len(tok), cfg.size)
    return init


def stage_pretrain(run: DemoRun, init: Path) -> Path:
    with Stage(run.timings, "pretrain") as st:
        final = train_pretrain(run.pretrain_config(model=str(init))) / "final"
        meta = json.loads((final / "flywheel.json").read_text())
        st.done("%d steps, held-out loss %.3f", meta["steps"], meta.get("eval_loss", float("nan")))
    return final


def stage_sft(run: DemoRun, base: Path) -> Path:
    with Stage(run.timings, "sft") as st:
        scfg = run.cfg.stage_config(
            "sft",
            out=str(run.out / "sft"),
            model=str(base),
            data=str(run.files["demos"]),
            eval_data=str(run.files["demos_val"]),
        )
        final = train_sft(scfg) / "final"
        meta = json.loads((final / "flywheel.json").read_text())
        st.done("%d steps, held-out demonstration loss %.3f", meta["steps"], meta.get("eval_loss", float("nan")))
    return final


@dataclass
class RewardModelResult:
    dir: Path
    summary: RewardModelSummary

    def to_json(self, rel: Callable[[Path], str] = str) -> dict[str, Any]:
        return {"dir": rel(self.dir), "summary": self.summary.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any], at: Callable[[str], Path] = Path) -> RewardModelResult:
        return cls(at(data["dir"]), RewardModelSummary.from_json(data["summary"]))

    def paths(self) -> list[Path]:
        return [self.dir]


def stage_reward_model(run: DemoRun, init: Path, labels: Any, r: int = 1, first: Any = None) -> RewardModelResult:
    """Round 1 trains the reward model from SFT; round r > 1 fine-tunes the last one on round r's rankings mixed
    with as many earlier ones (so it learns the new policy's answers without forgetting the SFT-like ones). Each
    round's model is normalised on its own training rankings' top answers, so scores are on a new scale per round.

    labels: the round's `Rankings`; first: round 1's held-out (tasks, sets, records), checked again in later rounds."""
    where = run.round_dir(r)
    data = labels.train
    if r > 1:
        new = [line for line in data.read_text().splitlines() if line.strip()]
        earlier = [
            line
            for k in range(1, r)
            for line in (run.round_dir(k) / "rankings_train.jsonl").read_text().splitlines()
            if line.strip()
        ]
        replay = random.Random(f"{run.cfg.seed}:replay:{r}").sample(earlier, min(len(new), len(earlier)))
        data = where / "rm_train.jsonl"
        atomic_write_text(data, "".join(line + "\n" for line in new + replay))
    with Stage(run.timings, "reward model" if r == 1 else f"round {r}: reward model") as st:
        rcfg = run.cfg.stage_config(
            "rm", out=str(where / "rm"), model=str(init), data=str(data), eval_data=str(labels.heldout_file)
        )
        final = train_reward(rcfg) / "final"
        rm = RewardModel.from_pretrained(final, bf16=run.cfg.bf16)
        summary = RewardModelSummary(
            **heldout_accuracy(rm, labels.heldout),
            labeler_agreement=labels.summary.agreement_heldout_expected,
            oracle_ranker_accuracy=labels.summary.oracle_ranker_heldout,
        )
        if first is not None:  # still right about the SFT-like answers it learned from first?
            summary.round1_heldout = heldout_accuracy(rm, first)
        # On its own training rankings: the held-out ones hold only a handful of refusal vs "I don't know" pairs.
        summary.deflections_train = deflection_contrasts(rm, run.round_tasks(r), read_jsonl(labels.train))
        st.done(
            "held-out accuracy %s on pairs the oracle does not tie (%d pairs; labelers agree on %s), %s on all "
            "labelled pairs",
            _pct(summary.accuracy_informative),
            summary.pairs_informative,
            _pct(summary.labeler_agreement),
            _pct(summary.accuracy),
        )
    return RewardModelResult(final, summary)


def stage_ppo(run: DemoRun, start: Path, sft: Path, rm: RewardModelResult, r: int = 1) -> Path:
    """PPO (PPO-ptx where ptx_coef > 0) from `start` (SFT in round 1, the last PPO policy later) with the KL penalty
    to `sft`; the value model starts from this round's reward model."""
    with Stage(run.timings, "ppo" if r == 1 else f"round {r}: ppo") as st:
        pcfg = run.cfg.stage_config(
            "ppo",
            out=str(run.round_dir(r) / "ppo"),
            seed=run.cfg.seed + 1000 * (r - 1),
            model=str(start),
            ref_model=str(sft),
            reward_model=str(rm.dir),
            prompts=str(run.files["ppo_prompts"]),
            ptx_data=str(run.ptx_corpus()),
            save_policy_every=run.cfg.gate_every,
        )
        done = train_ppo(pcfg)
        steps = [x for x in read_metrics(done / "metrics.jsonl") if "score" in x]
        first, last = steps[0], steps[-1]
        st.done(
            "%d steps: RM score %.2f -> %.2f, KL %.2f -> %.2f nats",
            len(steps),
            first["score"],
            last["score"],
            first["kl"],
            last["kl"],
        )
    return done / "final"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
