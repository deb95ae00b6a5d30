"""`flywheel eval <what>`: the evaluation commands, one module with `main(argv) -> int` each.

flywheel eval rm --model runs/rm/final --data heldout.jsonl --out runs/rm/eval
"""

from __future__ import annotations

import importlib

# what -> (module with `main(argv) -> int`, one-line summary)
EVALUATIONS: dict[str, tuple[str, str]] = {
    "rm": ("flywheel.eval.reward", "reward model: pairwise accuracy (95% CI), Kendall tau, score histogram"),
}


def usage() -> str:
    lines = ["usage: flywheel eval <what> [flags]   (flywheel eval <what> --help for its flags)", "", "evaluations:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in EVALUATIONS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] not in EVALUATIONS:
        from flywheel.errors import UserError

        raise UserError(f"unknown evaluation '{argv[0]}' (choose from {', '.join(EVALUATIONS)})")
    return int(importlib.import_module(EVALUATIONS[argv[0]][0]).main(argv[1:]) or 0)
