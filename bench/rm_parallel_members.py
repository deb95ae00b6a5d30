"""A reward-model ensemble's members one after another vs side by side (`flywheel rm --parallel-members`), in one run.

The demo's setting: N reward models from the shipped 5M base on the toy world's ranked answers (K = 4..9), trained
for --steps steps each. "one after another" is `--rm-ensemble N --threads T` (each member with all T threads);
"side by side" is the same with `--parallel-members N` (each member in its own process with T / N threads, at least
one). The two alternate --repeats times and the best of each is kept; the script prints both times and the ratio.
A process start (imports) is inside the side-by-side time, as it is in a real run.

    python bench/rm_parallel_members.py                    # 3 members x 60 steps, bf16 where native, all cores
    python bench/rm_parallel_members.py --members 2 --steps 40 --dtype float32 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from flywheel.demo.base import shipped_base
from flywheel.train.reward import RewardConfig, member_threads, train_reward
from flywheel.utils import bf16_is_fast, cpu_threads
from flywheel.world.generate import WorldConfig, write_world


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=3, help="--rm-ensemble N")
    ap.add_argument("--steps", type=int, default=60, help="training steps of each member")
    ap.add_argument("--threads", type=int, default=0, help="--threads T (0 = all cores)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 where native")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    bf16 = bf16_is_fast() if args.dtype == "auto" else args.dtype == "bfloat16"
    threads = args.threads or cpu_threads()
    root = Path(tempfile.mkdtemp(prefix="rm-parallel-"))
    try:
        files = write_world(WorldConfig(out=str(root / "world"), seed=0, corpus_chars=20_000, n_rank=400))
        base = shipped_base()
        common = dict(
            model=str(base),
            data=str(files["rankings"]),
            rm_ensemble=args.members,
            max_steps=args.steps,
            batch_size=8,
            lr=2e-4,
            bf16=bf16,
            threads=threads,
            progress=False,
            eval_every=0,
            log_every=1000,
        )
        runs = {"one after another": dict(parallel_members=1), "side by side": dict(parallel_members=args.members)}
        best = {name: float("inf") for name in runs}
        for r in range(args.repeats):
            for name, extra in runs.items():
                out = root / f"run{r}-{name.replace(' ', '-')}"
                cfg = RewardConfig(**common, **extra, out=str(out))
                cfg.validate()
                t0 = time.perf_counter()
                train_reward(cfg)
                best[name] = min(best[name], time.perf_counter() - t0)
                shutil.rmtree(out)
        per = member_threads(threads, args.members)
        print(
            f"{args.members} reward models x {args.steps} steps from the shipped base ({base.name}), "
            f"{'bf16' if bf16 else 'fp32'}, {threads} threads, {os.cpu_count()} CPUs"
        )
        print(f"  one after another ({threads} threads each)  {best['one after another']:7.1f} s")
        print(f"  side by side ({per} thread{'s' if per > 1 else ''} each)  {best['side by side']:12.1f} s")
        print(f"  side by side is {best['one after another'] / best['side by side']:.2f}x faster")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
