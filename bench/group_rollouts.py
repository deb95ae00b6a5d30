"""K samples per prompt from one prefill vs the prompt repeated K times, side by side in one run.

What GRPO / RLOO rollouts (`flywheel rl --num-generations K`) pay for sampling: the same engine, model, prompts and
seed; "repeated" generates for the list of prompts with each one repeated K times (K prefills of it), "grouped" calls
`Engine.generate(prompts, samples_per_prompt=K)` (one prefill, its KV cache copied to K rows). Both produce the same
tokens (checked). Long prompts and short answers show the prefill's share; each measurement alternates the two and
keeps the best of --repeats after a warm-up, and the script prints both times and the ratio.

    nice -n 10 python bench/group_rollouts.py              # small model, 8 prompts x K=8, 192-token prompts
    nice -n 10 python bench/group_rollouts.py --k 4 --prompt-len 64 --new-tokens 32 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch

from flywheel.engine import Engine, SamplingParams
from flywheel.models import tiny_llama_config

VOCAB = 4096


def build(size: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(VOCAB, size, pad_token_id=0, eos_token_id=None, max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval().to(dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", help="a models.TINY_SIZES name")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=8, help="samples per prompt")
    ap.add_argument("--prompt-len", type=int, default=192)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.size, getattr(torch, args.dtype))
    engine = Engine(model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, VOCAB, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    repeated = [p for p in prompts for _ in range(args.k)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=1, stop_token_ids=[])
    runs = {
        "repeated": lambda: engine.generate(repeated, params),
        "grouped": lambda: engine.generate(prompts, params, samples_per_prompt=args.k),
    }
    outputs = {name: run() for name, run in runs.items()}  # warm-up, and the equality check
    assert outputs["grouped"].tokens == outputs["repeated"].tokens, "grouped sampling must equal repeated prompts"
    best = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
    rows = args.prompts * args.k
    print(
        f"{args.size} {args.dtype}, {args.prompts} prompts x K={args.k} ({args.prompt_len}-token prompts, "
        f"{args.new_tokens} new tokens, {rows} rows, engine backend {engine.backend}, "
        f"{torch.get_num_threads()} threads)"
    )
    for name, t in best.items():
        print(f"  {name:<9} {t:7.3f} s  {rows * args.new_tokens / t:8.0f} generated tok/s")
    print(f"  grouped is {best['repeated'] / best['grouped']:.2f}x faster than repeated prompts")


if __name__ == "__main__":
    main()
