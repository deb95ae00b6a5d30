"""Where training metrics go besides `metrics.jsonl` (always written): `--report-to tensorboard wandb | none`.

    flywheel sft ... --report-to wandb                 # W&B (WANDB_PROJECT, WANDB_MODE=offline, ... as usual)
    flywheel sft ... --report-to tensorboard wandb     # both
    flywheel sft ... --report-to none                  # metrics.jsonl only

Without --report-to, TensorBoard events are written when `tensorboard` is installed (run_dir/tensorboard/). A
reporter the user asks for must be importable: a missing package is a one-line UserError saying what to install.
Each reporter receives the scalars of every metrics.jsonl line, at the same step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any, Protocol

from flywheel.errors import UserError

REPORTERS = ("tensorboard", "wandb")
NONE = "none"
ALL = "all"
REPORT_TO_HELP = (
    "where metrics go besides metrics.jsonl: tensorboard, wandb (several allowed), all (each that is installed), or "
    "none (default: tensorboard when it is installed)"
)
WANDB_ID_FILE = "wandb-run-id"  # the run's W&B id, so that --resume continues the same W&B run


def report_targets(report_to: list[str]) -> list[str] | None:
    """The reporters of --report-to, checked (commas split like spaces: TRL's `--report_to tensorboard,wandb`).
    None means the default: TensorBoard if it is installed."""
    names = [n.strip().lower() for item in report_to for n in str(item).split(",") if n.strip()]
    if not names:
        return None
    if ALL in names:  # TRL's `--report_to all`: every integration that is installed
        names = [n for n in names if n != ALL] + [n for n in REPORTERS if installed(_PACKAGES[n])]
    unknown = sorted(set(names) - {*REPORTERS, NONE})
    if unknown:
        raise UserError(f"--report-to: unknown {', '.join(unknown)} (choose from {', '.join(REPORTERS)}, or {NONE})")
    if NONE in names:
        if len(set(names)) > 1:
            raise UserError(f"--report-to {NONE} cannot be combined with {', '.join(sorted(set(names) - {NONE}))}")
        return []
    return list(dict.fromkeys(names))


_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def check_installed(report_to: list[str]) -> None:
    """A UserError now, before any work, if a reporter --report-to asks for cannot be imported."""
    for name in report_targets(report_to) or []:
        if not installed(_PACKAGES[name]):
            raise UserError(f"--report-to {name} needs the {_PACKAGES[name]} package: pip install {_PACKAGES[name]}")


class Reporter(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardReporter:
    def __init__(self, run_dir: Path, *, required: bool):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if not required:
                raise
            raise UserError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """One W&B run per run directory: named after --out, the resolved config attached, resumed by --resume. The
    usual W&B variables apply (WANDB_PROJECT, default `flywheel`; WANDB_MODE=offline; WANDB_DIR, default the run
    directory)."""

    def __init__(self, run_dir: Path, cfg: Any, *, resumed: bool):
        try:
            import wandb
        except ImportError:
            raise UserError("--report-to wandb needs the wandb package: pip install wandb") from None
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
        kwargs: dict[str, Any] = {
            "project": os.environ.get("WANDB_PROJECT") or "flywheel",
            "name": os.environ.get("WANDB_NAME") or str(getattr(cfg, "out", "") or run_dir),
            "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None,
            "settings": wandb.Settings(quiet=True),
        }
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        # Read here rather than left to wandb, which keeps the first value it saw for the whole process.
        kwargs["dir"] = os.environ.get("WANDB_DIR") or str(run_dir)
        try:
            self.run = wandb.init(**kwargs)
        except wandb.errors.Error as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"--report-to wandb: {first} (log in with `wandb login`, or set WANDB_MODE=offline)"
            ) from None
        id_file.write_text(self.run.id)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def open_reporters(run_dir: Path, report_to: list[str], cfg: Any, *, resumed: bool) -> list[Reporter]:
    """The reporters --report-to asks for, open; by default TensorBoard if it can be imported."""
    targets = report_targets(report_to)
    if targets is None:
        try:
            return [TensorBoardReporter(run_dir, required=False)]
        except ImportError:
            return []
    reporters: list[Reporter] = []
    try:
        for name in targets:
            if name == "tensorboard":
                reporters.append(TensorBoardReporter(run_dir, required=True))
            else:
                reporters.append(WandbReporter(run_dir, cfg, resumed=resumed))
    except UserError:
        for reporter in reporters:
            reporter.close()
        raise
    return reporters
