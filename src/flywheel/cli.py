"""The `flywheel` command: one subcommand per stage.

    flywheel pretrain --data corpus.txt --out runs/base --size small
    flywheel sft --model runs/base/final --data demos.jsonl --out runs/sft

Each subcommand lives in its own module as `main(argv) -> int`; modules are imported only when their command runs, so
`flywheel chat` does not pay for the trainers' imports. User errors print one line and exit 2; internal errors exit 1.
Under `--nproc N` the same holds: the ranks hand their message to the launcher, which prints it once.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flywheel.errors import UserError, report_user_error

# command -> (module with `main(argv) -> int`, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("flywheel.demo", "the whole loop on the toy world, judged by its oracle: runs/demo/report.md"),
    "compare": (
        "flywheel.demo.compare",
        "PPO, GRPO, RLOO, REINFORCE++, DPO, best-of-n, expert iteration on one world, judged by its oracle",
    ),
    "sweep": (
        "flywheel.demo.sweep",
        "flywheel demo on several seeds: mean ± sd of its figures (docs/demo.md's tables)",
    ),
    "world": ("flywheel.world.generate", "write the toy world's corpus, demonstrations, prompts and rankings"),
    "pretrain": ("flywheel.train.pretrain", "train a causal LM on a text corpus (with packing)"),
    "sft": ("flywheel.train.sft", "supervised fine-tuning on conversations (loss on assistant turns only)"),
    "chat": ("flywheel.chat", "chat with a model in the terminal (streaming), or answer --prompt / stdin"),
    "rm": ("flywheel.train.reward", "train a reward model on K-way rankings / comparisons (InstructGPT loss)"),
    "dpo": ("flywheel.train.dpo", "direct preference optimisation on rankings (expanded to pairs)"),
    "score": ("flywheel.score", "reward-model scores of conversations' final assistant turns (JSONL in, JSONL out)"),
    "sample": ("flywheel.sample", "sample answers to prompts; --best-of N keeps the reward model's favourite"),
    "eval": ("flywheel.eval.cli", "evaluations: `flywheel eval rm` (reward model accuracy, Kendall tau)"),
    "ppo": ("flywheel.train.ppo.trainer", "PPO / PPO-ptx against a reward model with a per-token KL penalty"),
    "rl": (
        "flywheel.train.ppo.rl",
        "policy gradient with K samples per prompt: --estimator ppo|grpo|rloo|reinforce++",
    ),
    "serve": ("flywheel.serve.cli", "OpenAI-compatible API + chat web app + labelers' workbench (docs/serve.md)"),
    "db": (
        "flywheel.feedback.cli",
        "feedback database: `db upgrade`, `db create-user NAME --role user|labeler|admin`, `db users`, "
        "`db revoke-token NAME`, `db rotate-token NAME`",
    ),
    "export": ("flywheel.feedback.export", "feedback database -> demos, rankings, prompts for sft/rm/dpo/ppo"),
    "round": ("flywheel.round", "the next round from an export: SFT -> RM -> PPO, then switch the live server"),
}


def run_trainer(
    stage: str, config_cls: type, train: Callable[[Any], Path], argv: list[str] | None, doc: str, what: str
) -> int:
    """The `main` of every trainer: config from flags/YAML, re-launch under torchrun for --nproc > 1, train, and
    print where the final model is (rank 0 only). Bad input (a UserError) leaves no run directory behind when this
    run created it and wrote no checkpoint or final model into it."""
    from flywheel import distributed
    from flywheel.config import parse_config
    from flywheel.train.loop import discard_run_dir

    cfg = parse_config(config_cls, argv, f"flywheel {stage}", doc.splitlines()[0])
    if distributed.launched() and cfg.nproc <= 1:
        # Under torchrun (the launcher strips --nproc): record how many processes run, so that the saved config.yaml
        # resumes the run as it ran.
        cfg.nproc = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ["WORLD_SIZE"])
    fresh = not Path(cfg.out).exists()
    try:
        code = distributed.maybe_launch(stage, cfg.nproc, argv)
        if code is not None:
            return code
        out = train(cfg)
    except UserError:
        if fresh and distributed.is_main():
            discard_run_dir(Path(cfg.out))
        raise
    if distributed.is_main():
        print(f"{what}: {out / 'final'}")
    return 0


def usage() -> str:
    lines = ["usage: flywheel <command> [flags]   (flywheel <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from flywheel import __version__

        print(f"flywheel {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"flywheel: unknown command '{argv[0]}'\n\n{usage()}", file=sys.stderr)
        return 2
    from flywheel.utils import setup_logging

    setup_logging()
    module = importlib.import_module(COMMANDS[argv[0]][0])
    try:
        return int(module.main(argv[1:]) or 0)
    except UserError as err:
        return _user_error(argv[0], str(err))
    except OSError as err:
        if err.filename is None:
            raise
        # A path that cannot be made, read or written (`--out` under a file, no permission, a full disk): the
        # system's reason, in one line.
        where = err.filename if err.filename2 is None else f"{err.filename} -> {err.filename2}"
        why = {
            FileExistsError: "a file is in the way of a directory",
            NotADirectoryError: "a part of the path is a file, not a directory",
        }.get(type(err), err.strerror or str(err))
        return _user_error(argv[0], f"{where}: {why}")
    except Exception as err:
        # safetensors and torch.save report a full disk as their own errors, not as an OSError
        if "No space left on device" not in str(err):
            raise
        return _user_error(argv[0], f"no space left on device ({str(err).strip().splitlines()[0]})")
    except KeyboardInterrupt:
        print(f"flywheel {argv[0]}: interrupted", file=sys.stderr)
        return 130


def _user_error(command: str, message: str) -> int:
    if not report_user_error(message):  # a rank of `--nproc N` tells the launcher, which prints it once
        print(f"flywheel {command}: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
