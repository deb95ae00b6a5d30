"""The toy-world base models that ship with flywheel, and the command that made each.

Like ChatGPT, which started from a pretrained GPT-3.5, `flywheel demo` starts from a pretrained base, pretrained once
for four times as long as a run could (12 epochs of the default preset's 1.2M-character corpus instead of 3) and kept
in the package with its tokenizer:

- `shipped` (`flywheel/demo/base_model/`): 5M parameters ("small"), the `default` and `fp32` presets' base, made
  with the default preset's tokenizer and pretraining settings (~12 min on 2 cores with native bf16);
- `shipped-tiny` (`flywheel/demo/base_model_tiny/`): 0.8M parameters ("tiny"), the `quick` preset's base, made
  with the quick preset's (~3.5 min on 2 cores).

A run that pretrains its own base (`flywheel demo --from-scratch`) gets one that knows far fewer of the world's facts
(docs/demo.md, "The shipped bases"). To make one again (`--install` replaces the shipped one):

    python -m flywheel.demo.base --out runs/base [--base shipped-tiny] [--install]

It is the demo's own world, tokenizer and pretraining stages with the settings of `flywheel demo --from-scratch --seed
271828 --pretrain.epochs 12 --pretrain.log-every 10` (`shipped`) and `flywheel demo --quick
--from-scratch --seed 271828 --world.corpus-chars 1200000 --pretrain.epochs 12 --pretrain.log-every 10`
(`shipped-tiny`), as `SHIPPED_BASES` records them: the world of seed `BASE_SEED` (no demo seed anyone uses by habit: a
run with that seed would hold out corpus documents the base was trained on), a byte-level BPE on its corpus and
demonstrations, and the preset's pretraining for 12 epochs (bf16 where the CPU multiplies it natively and the model is
"small"). A shipped model's `flywheel.json` records its first logged training losses (`fingerprint`);
`tests/test_demo_base.py` trains the same first steps again and checks them, and checks that the tokenizer comes out
identical. No seed's eval problems are in the corpus (`flywheel.world.tasks.eval_only`), so every seed evaluates the
base on problems it has never seen.
"""

from __future__ import annotations

import argparse
import json
import shutil
from importlib import resources
from pathlib import Path

from flywheel.demo.config import SHIPPED, SHIPPED_BASES, DemoConfig
from flywheel.errors import UserError

BASE_SEED = 271828
FINGERPRINT_STEPS = 4  # logged losses (every 10 steps) the shipped model records and the test trains again
# What a pretraining run's final/ holds, and so what ships.
_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "flywheel.json",
)


def _package_dir(name: str) -> Path:
    return Path(str(resources.files("flywheel.demo") / SHIPPED_BASES[name].directory))


def shipped_base(name: str = SHIPPED) -> Path:
    """The directory of a shipped base model (`SHIPPED_BASES`: a plain Hugging Face model directory with its
    tokenizer)."""
    path = _package_dir(name)
    if not (path / "model.safetensors").is_file():
        raise UserError(
            f"the shipped base model '{name}' is missing from {path}: reinstall flywheel, build it with "
            f"`python -m flywheel.demo.base --out runs/base --base {name} --install`, or run `flywheel demo "
            "--from-scratch`"
        )
    return path


def base_config(out: str | Path, name: str = SHIPPED, *, progress: bool = True, threads: int = 0) -> DemoConfig:
    """The resolved `DemoConfig` whose world, tokenizer and pretraining stages make the shipped base `name`."""
    base = SHIPPED_BASES[name]
    return DemoConfig(
        out=str(out),
        seed=BASE_SEED,
        preset=base.preset,
        from_scratch=True,
        progress=progress,
        threads=threads,
        **{stage: dict(values) for stage, values in base.settings.items()},
    ).resolved()


def build_base(out: str | Path, name: str = SHIPPED, *, progress: bool = True, threads: int = 0) -> Path:
    """World -> tokenizer -> pretraining with the shipped base `name`'s settings; returns `out/base/final`, whose
    flywheel.json gains the `fingerprint` (the first logged losses) and the command."""
    from flywheel.demo.stages import read_metrics, stage_pretrain, stage_tokenizer, start_run
    from flywheel.utils import atomic_write_text, seed_everything, set_threads

    cfg = base_config(out, name, progress=progress, threads=threads)
    set_threads(cfg.threads or None)
    seed_everything(cfg.seed)
    timings: dict[str, float] = {}
    run = start_run(cfg, Path(out), timings)
    final = stage_pretrain(run, stage_tokenizer(run))
    losses = [r for r in read_metrics(Path(out) / "base" / "metrics.jsonl") if "loss" in r][:FINGERPRINT_STEPS]
    meta = json.loads((final / "flywheel.json").read_text())
    meta["fingerprint"] = {str(r["step"]): r["loss"] for r in losses}
    meta["command"] = "python -m flywheel.demo.base --out DIR" + (f" --base {name}" if name != SHIPPED else "")
    meta["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    atomic_write_text(final / "flywheel.json", json.dumps(meta, indent=2) + "\n")
    return final


def install(final: Path, name: str = SHIPPED) -> Path:
    """Copy a built base (`build_base`'s result) over the shipped one of that name."""
    dest = _package_dir(name)
    dest.mkdir(exist_ok=True)
    for file in _FILES:
        if (final / file).is_file():
            shutil.copyfile(final / file, dest / file)
    return dest


def main(argv: list[str] | None = None) -> int:
    import sys

    from flywheel.utils import setup_logging

    parser = argparse.ArgumentParser(prog="python -m flywheel.demo.base", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="run directory (world/, init/, base/)")
    parser.add_argument(
        "--base",
        default=SHIPPED,
        choices=list(SHIPPED_BASES),
        help="which shipped base: shipped (small, the default and fp32 presets') or shipped-tiny (the quick preset's)",
    )
    parser.add_argument("--install", action="store_true", help="copy base/final over the shipped base model")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0 = $FLYWHEEL_THREADS if set, else all cores)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        final = build_base(args.out, args.base, progress=not args.no_progress, threads=args.threads)
    except UserError as err:
        print(f"python -m flywheel.demo.base: {err}", file=sys.stderr)
        return 2
    print(f"base model: {final}")
    if args.install:
        print(f"installed: {install(final, args.base)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
