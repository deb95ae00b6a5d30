"""The run's state on disk (`demo_state.json`): which stages finished, so `--resume` keeps them; and stage timing."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, TypeVar

from flywheel.errors import UserError
from flywheel.utils import atomic_write_text, cpu_seconds, log


class StageResult(Protocol):
    """A stage's typed result: written to the state file as JSON when the stage ends, read back by a resume.

    Each path in it is written as `rel(path)` and read back as `at(text)`; the state file passes functions that
    name the run's files relative to the run directory: a run resumes from any working directory, and can be moved."""

    def to_json(self, rel: Callable[[Path], str] = str) -> dict[str, Any]: ...

    @classmethod
    def from_json(cls, data: dict[str, Any], at: Callable[[str], Path] = Path) -> StageResult: ...

    def paths(self) -> list[Path]: ...  # the files and directories a later stage reads


R = TypeVar("R")

# The first stage, in run order, whose result each setting of a run changes; a setting not named here (the seed,
# the world, the base, the dtype, ...) changes every stage. `flywheel sweep --reuse-from` keeps the stages before it.
FIRST_STAGE_CHANGED: dict[str, str | None] = {
    "pretrain": "pretrain",
    "sft": "sft",
    "stock_answers": "rankings:1",
    "off_topic_answers": "rankings:1",
    "rm_holdout": "rankings:1",
    "max_new_tokens": "rankings:1",  # sampling for the rankings, then PPO, the gate and the evaluation
    "rm": "reward model:1",
    "ppo": "ppo:1",
    "gate_every": "ppo:1",  # PPO saves a policy for the gate every N steps
    "gate_max_deflection": "gate:1",
    "gate_max_over_refusal": "gate:1",
    "rounds": "rankings:2",
    "n_rank_next": "rankings:2",
    "eval_temperature": None,  # the evaluation only, which is not a kept stage: every run does it again
}
_FIRST_STAGES = ("tokenizer", "pretrain", "sft")
_ROUND_STAGES = ("rankings", "reward model", "ppo", "gate")


_TITLES = {"rankings": "sample + rank"}  # a stage's key -> the name its log line gives it when it runs


def stage_title(key: str) -> str:
    """How the log names the stage of `key` when it runs: "rankings:2" is "round 2: sample + rank"."""
    if not is_stage(key) or ":" not in key:
        return key
    name, _, r = key.rpartition(":")
    title = _TITLES.get(name, name)
    return title if r == "1" else f"round {r}: {title}"


def is_stage(key: str) -> bool:
    """Whether `key` names a demo stage ("sft", "ppo:2", ...), not another command's ("method:grpo")."""
    name, _, r = key.rpartition(":")
    return key in _FIRST_STAGES or (name in _ROUND_STAGES and r.isdigit())


def _inside(run: Path, path: Path) -> Path | None:
    """A relative `path` that a run in `run` recorded from its own working directory ("runs/sweep/seed1/sft/final";
    state files written before FORMAT 2), found under `run` when read from another one: the part after a directory
    named as the run's, if it exists."""
    parts = path.parts
    for i in range(1, len(parts)):
        if parts[i - 1] == run.name and _exists(run / Path(*parts[i:])):
            return run / Path(*parts[i:])
    return None


def stage_order(key: str) -> tuple[int, int]:
    """Where a stage ("sft", "ppo:2", ...) runs: (round, place in the round), the stages before round 1 in round 0."""
    if key in _FIRST_STAGES:
        return 0, _FIRST_STAGES.index(key)
    name, _, r = key.rpartition(":")
    return int(r), _ROUND_STAGES.index(name)


class Stage:
    """Times a stage (wall and CPU seconds into `timings`) and logs its one-line result."""

    def __init__(self, timings: dict[str, float], name: str):
        self.timings, self.name = timings, name

    def __enter__(self) -> Stage:
        log.info("== %s", self.name)
        self.t0, self.c0 = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timings[self.name] = round(time.perf_counter() - self.t0, 1)
        # CPU seconds of this process and its children: on a machine shared with other jobs, wall time overstates
        # the stage's cost.
        self.timings[f"{self.name} (cpu)"] = round(cpu_seconds() - self.c0, 1)

    def done(self, message: str, *args: Any) -> None:
        log.info("-> %s (%.0f s): " + message, self.name, time.perf_counter() - self.t0, *args)


class RunState:
    """The stages a run has finished, in `demo_state.json` beside them, so that `--resume` can keep them.

    Each finished stage's result (the paths and summaries the later stages read) and its timings are written
    atomically as it ends; a stage that was interrupted has no entry and runs again from its start. The file also
    holds the run's settings: a resume with different ones would mix two runs, so it is refused. The results name the
    run's own files relative to the run directory (FORMAT 2), so the run resumes from any working directory, and a
    run directory that was moved or copied resumes there."""

    FILE = "demo_state.json"
    # 2: stage results name the run's files relative to the run directory. Files without "format" (written before)
    # name them as the run's working directory saw them; they are rewritten in format 2 when read.
    FORMAT = 2
    # May differ between the run and its resume. Not --threads: the number of threads changes the last bits of every
    # sum, and so, through PPO's sampling, a run's figures.
    VOLATILE = ("out", "resume", "progress")

    def __init__(self, path: Path, config: dict[str, Any], stages: dict[str, Any], reused_from: str | None = None):
        self.path, self.config, self.stages = path, config, stages
        self.root = path.parent  # the run directory, as this process names it
        self.reused_from = reused_from  # the finished run whose stages this one started from (--reuse-from)
        self.kept: list[str] = []

    @classmethod
    def _settings(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The settings that decide what a run computes: `config` less the volatile ones."""
        return {k: v for k, v in config.items() if k not in cls.VOLATILE}

    @classmethod
    def changed_settings(cls, cfg: Any, saved: dict[str, Any]) -> list[str]:
        """Each setting of `cfg` (a resolved DemoConfig) that differs from a run's recorded `saved` config (its
        demo_state.json or summary.json), with both values; the volatile ones are not compared."""
        out = []
        for k, new, old in cls._changed(cfg, saved):
            if isinstance(new, dict) and isinstance(old, dict):  # a stage's settings: each one that differs
                keys = sorted(set(new) | set(old))
                out += [f"--{k}.{f.replace('_', '-')} {new.get(f)!r} (the run's: {old.get(f)!r})"
                        for f in keys if new.get(f) != old.get(f)]  # fmt: skip
            else:
                out.append(f"--{k.replace('_', '-')} {new!r} (the run's: {old!r})")  # as the user writes it
        return out

    @classmethod
    def _changed(cls, cfg: Any, saved: dict[str, Any]) -> list[tuple[str, Any, Any]]:
        """(name, value, the run's value) of each setting of `cfg` that differs from a run's `saved` config."""
        # Through JSON, as the run's file was written: a tuple setting equals the list it was saved as.
        config, saved = cls._settings(json.loads(json.dumps(asdict(cfg)))), cls._settings(saved)
        return [
            (k, config.get(k), saved.get(k)) for k in sorted(set(config) | set(saved)) if config.get(k) != saved.get(k)
        ]

    @classmethod
    def _read(cls, path: Path, flag: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """A state file's (whole content, settings, finished stages, in FORMAT 2); a file that is not one is a
        one-line error."""
        try:
            saved = json.loads(path.read_text())
            config, stages, version = saved["config"], saved["stages"], saved.get("format", 1)
            if version not in (1, cls.FORMAT):
                raise ValueError(f"format {version!r}, not one this version of flywheel reads")
            if version == 1:
                root = path.parent.resolve()
                stages = {k: {**v, "result": _run_relative(v["result"], root)} for k, v in stages.items()}
            return saved, config, stages
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{flag}: {path} is not a demo state file ({err})") from None

    @classmethod
    def open(cls, out: Path, cfg: Any) -> RunState:
        config = cls._settings(asdict(cfg))
        path = out / cls.FILE
        if not cfg.resume:
            if (out / "summary.json").exists():
                raise UserError(f"{out} already holds a finished demo run: remove it, or choose another --out")
            if path.exists() or any((out / d / "checkpoints").exists() for d in ("base", "sft", "ppo")):
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
        saved, saved_config, stages = cls._read(path, "--resume")
        changed = cls.changed_settings(cfg, saved_config)
        if changed:
            raise UserError(f"--resume: settings differ from the run in {out}: {'; '.join(changed)}")
        log.info("resuming %s: %d finished stage(s) kept (%s)", out, len(stages), ", ".join(stages) or "none")
        state = cls(path, config, stages, saved.get("reused_from"))
        state._save()  # a file of an earlier format is rewritten in the current one
        return state

    @classmethod
    def reuse(cls, src: Path, out: Path, cfg: Any, before: str | None = None) -> list[str]:
        """Start the run `cfg` in `out` (which must not hold one) from the finished stages of the run in `src` that
        its settings leave unchanged (FIRST_STAGE_CHANGED), and that run before the stage `before` where given
        (`flywheel compare` keeps the stages up to the reward model): their files are copied into `out` and recorded
        there as finished, so that `--resume` runs only the later stages. Returns the stages kept (none: `out` is
        left untouched). The kept stages' timings are the source run's; stages of other commands (compare's
        methods) are never kept."""
        path = src / cls.FILE
        if not path.is_file():
            raise UserError(f"--reuse-from: {src} holds no demo run (no {cls.FILE})")
        _, saved_config, stages = cls._read(path, "--reuse-from")
        changed = [k for k, _, _ in cls._changed(cfg, saved_config)]
        firsts = [FIRST_STAGE_CHANGED.get(k, "tokenizer") for k in changed]  # an unnamed setting: every stage
        cut = min((stage_order(f) for f in [*firsts, before] if f is not None), default=None)
        kept = {k: v for k, v in stages.items() if is_stage(k) and (cut is None or stage_order(k) < cut)}
        if not kept:
            return []
        out.mkdir(parents=True, exist_ok=True)
        copied: list[Path] = []
        for key, entry in kept.items():
            result = None if entry["result"] is None else _decode(entry["result"], result_type(key), Path)
            for rel in _paths(result):  # relative to the run directory
                if rel.is_absolute():
                    continue  # outside the run: nothing to copy
                # The whole stage directory (sft/, rm/, round2/ppo/...): later stages read more than the final model.
                top = Path(*rel.parts[: 2 if rel.parts[0].startswith("round") else 1])
                if any(top.is_relative_to(c) for c in copied):
                    continue
                if (src / top).is_dir():
                    shutil.copytree(src / top, out / top, dirs_exist_ok=True)
                else:
                    (out / top).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src / top, out / top)
                copied.append(top)
        # The results name the files relative to the run directory: the same names hold in the copy.
        state = cls(out / cls.FILE, cls._settings(asdict(cfg)), kept, str(src))
        state._save()
        log.info(
            "%s: %d stage(s) of %s kept (%s); settings changed: %s",
            out,
            len(kept),
            src,
            ", ".join(kept),
            ", ".join(changed) or "none",
        )
        return list(kept)

    def stage(self, key: str, timings: dict[str, float], run: Callable[[], R]) -> R:
        """The stage's result: kept from the interrupted run if it finished there, else `run()` (then recorded).

        The result's type follows from the key (`result_type`); a stage may also return None (nothing came of it),
        which is kept as such."""
        if key in self.stages:
            entry = self.stages[key]
            timings.update(entry["timings"])
            self.kept.append(key)
            log.info("== %s: kept from %s", stage_title(key), self.reused_from or "the interrupted run")
            try:  # decoding reads files of the run (the held-out rankings)
                result = None if entry["result"] is None else _decode(entry["result"], result_type(key), self._at)
                missing = [where for where in _paths(result) if not where.exists()]
            except FileNotFoundError as err:
                missing = [err.filename]
            if missing:
                raise UserError(
                    f"--resume: {missing[0]}, written by the finished stage {key!r}, is missing: start "
                    "the run again in a new --out"
                )
            return result  # type: ignore[return-value]
        before = dict(timings)
        result = run()
        if result is not None and not isinstance(result, result_type(key)):
            raise TypeError(f"stage {key!r} returned a {type(result).__name__}; result_type says {result_type(key)}")
        self.stages[key] = {
            "result": None if result is None else _encode(result, self._rel),
            "timings": {k: v for k, v in timings.items() if before.get(k) != v},
        }
        self._save()
        return result

    def kept_seconds(self, cpu: bool = False) -> float:
        """Wall (or CPU) seconds of the kept stages, as measured by the run that finished them."""
        return sum(
            v for key in self.kept for k, v in self.stages[key]["timings"].items() if k.endswith(" (cpu)") == cpu
        )

    def _rel(self, path: Path | str) -> str:
        """How the state file names `path`: relative to the run directory if inside it, else absolute."""
        where, root = Path(path).resolve(), self.root.resolve()
        return where.relative_to(root).as_posix() if where.is_relative_to(root) else str(where)

    def _at(self, name: str) -> Path:
        """The path the state file's `name` stands for, as this process reaches it."""
        return self.root / name

    def _save(self) -> None:
        saved: dict[str, Any] = {"format": self.FORMAT, "config": self.config, "stages": self.stages}
        if self.reused_from:
            saved["reused_from"] = self.reused_from
        atomic_write_text(self.path, json.dumps(saved, indent=1) + "\n")


def _encode(result: Any, rel: Callable[[Path], str]) -> Any:
    return rel(result) if isinstance(result, Path) else result.to_json(rel)


def _decode(data: Any, kind: type, at: Callable[[str], Path]) -> Any:
    return at(data) if kind is Path else kind.from_json(data, at)  # type: ignore[attr-defined]


def result_type(key: str) -> type:
    """The type of the result of the stage `key` ("sft", "rankings:2", "method:grpo", ...): `Path` (one directory)
    unless the stage's name is one of those below, whose results are `StageResult`s. The one place a new kind of
    stage result is declared: `RunState.stage` records and reads a stage's result with it, and `--reuse-from` copies
    the directories the result names."""
    from flywheel.demo.gate import GateResult  # not at import: these modules import this one
    from flywheel.demo.rankings import Rankings
    from flywheel.demo.stages import RewardModelResult

    name = key.rpartition(":")[0] or key
    return {"rankings": Rankings, "reward model": RewardModelResult, "gate": GateResult}.get(name, Path)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # not a path (too long, a NUL byte): an answer's text
        return False


def _run_relative(value: Any, root: Path) -> Any:
    """A stage result of a state file written before FORMAT 2, its paths into the run (`root`, resolved) named
    relative to it: a path as the run's working directory saw it (or, read from elsewhere, found by `_inside`).
    Stage results name no file outside their run; any other string is left as it is."""
    if isinstance(value, dict):
        return {k: _run_relative(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_run_relative(v, root) for v in value]
    if not isinstance(value, str) or not value:
        return value
    where = Path(value)
    if not where.is_absolute() and not _exists(where):
        where = _inside(root, where) or where
    if not _exists(where):
        return value
    where = where.resolve()
    return where.relative_to(root).as_posix() if where.is_relative_to(root) and where != root else value


def _paths(result: Any) -> list[Path]:
    if result is None:
        return []
    return [result] if isinstance(result, Path) else result.paths()
