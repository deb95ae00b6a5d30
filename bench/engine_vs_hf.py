"""flywheel's engine vs Hugging Face `generate`, side by side in one run.

Same model (random tiny Llamas of models.py's sizes, vocab 4096), same prompts (random ids, lengths 16..64, left
padded), same number of new tokens (no stop token, so both generate exactly max_new_tokens per row), same dtype and
sampling settings (PPO's: temperature 1, top_k 0, top_p 1). Each measurement alternates the two engines and keeps the
best of --repeats runs after a warm-up. It prints end-to-end generated tokens/s for both and the ratio, and the
prefill's throughput (the FLOPs the real prompt tokens need) as a fraction of the machine's matmul roof: its fastest
dtype's (bf16 where the CPU has native bf16, else fp32), measured at the start of the same run. "torch-step" is ours
with the decode step in torch ops instead of the native library (`Engine(native_step=False)`), timed in the same
alternation: what the native step adds.

    nice -n 10 python bench/engine_vs_hf.py                              # tiny, small, medium x batch 1, 16, 64
    nice -n 10 python bench/engine_vs_hf.py --sizes small --batches 16 --dtype bfloat16
    nice -n 10 python bench/engine_vs_hf.py --sizes small --batches 64 --compaction   # finished rows: drop or mask
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from flywheel.engine import Engine, SamplingParams
from flywheel.models import TINY_SIZES, count_parameters, tiny_llama_config
from flywheel.utils import bf16_is_fast

VOCAB = 4096
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


CLOCK = time.perf_counter  # --clock cpu: time.process_time, our process's CPU time (steadier on a busy machine)


def matmul_roof(
    dtype: torch.dtype = torch.bfloat16, n: int = 2048, repeats: int = 5, clock: Callable[[], float] | None = None
) -> float:
    """Best FLOPs per `clock` second (default: this script's --clock) of an n x n x n matmul: the most arithmetic this
    machine does in `dtype` at the current threads (n = 512 for a bf16 that the CPU only emulates: ~1 GFLOP/s on an
    AVX2-only CPU, where 2048^3 would take minutes)."""
    if dtype == torch.bfloat16 and not bf16_is_fast():
        n = min(n, 512)
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    return 2 * n**3 / min(timed(lambda: a @ b, clock) for _ in range(repeats))


def build(size: str, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(VOCAB, size, pad_token_id=0, eos_token_id=None))
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval().to(dtype)


def prompts(batch: int, lo: int = 16, hi: int = 64, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (batch,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def left_pad(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, batch))
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(batch):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def hf_generate(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, greedy: bool) -> None:
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
            **kw,
        )
    assert out.shape[1] == ids.shape[1] + new_tokens


def timed(fn, clock: Callable[[], float] | None = None) -> float:
    clock = clock or CLOCK
    t = clock()
    fn()
    return clock() - t


def backbone_flops(model, lengths: list[int]) -> int:
    """Matmul FLOPs of sequences of these lengths through a Llama's layers (no LM head): every linear layer on every
    token, and causal attention within each sequence."""
    cfg = model.config
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    linear = count_parameters(model.model.layers) - 2 * h * layers  # minus the RMSNorm weights
    attention = 2 * 2 * sum(t * (t + 1) // 2 for t in lengths) * h * layers  # q @ k^T and att @ v, causal
    return 2 * sum(lengths) * linear + attention


def prefill_flops(model, valid: torch.Tensor) -> float:
    """Matmul FLOPs a prefill of left-padded (B, P) prompts needs: the layers on every real token and the LM head on
    the last position only (work on padding is not counted)."""
    cfg = model.config
    return backbone_flops(model, valid.sum(-1).tolist()) + 2 * valid.shape[0] * cfg.hidden_size * cfg.vocab_size


def bench_one(size: str, batch: int, dtype: torch.dtype, new_tokens: int, repeats: int, greedy: bool) -> dict:
    model = build(size, dtype)
    engine = Engine(model)
    torch_step = Engine(model, native_step=False)  # ours with the decode step in torch ops (the ablation)
    batch_prompts = prompts(batch)
    ids, mask = left_pad(batch_prompts)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0 if greedy else 1.0, stop_token_ids=[], seed=0)

    def ours(e: Engine = engine) -> None:
        gen = e.generate(batch_prompts, params)
        assert all(len(row) == new_tokens for row in gen.tokens)

    def hf() -> None:
        hf_generate(model, ids, mask, new_tokens, greedy)

    ours(), ours(torch_step), hf()  # warm-up
    t_ours, t_torch, t_hf = [], [], []
    for _ in range(repeats):
        t_ours.append(timed(ours))
        t_torch.append(timed(lambda: ours(torch_step)))
        t_hf.append(timed(hf))

    forward = engine._forward  # prefill alone: our compact forward, and HF's forward as generate calls it
    valid = mask.bool()
    with torch.inference_mode():
        t_pre = min(timed(lambda: forward.start(ids, valid, ids.shape[1] + 1)) for _ in range(repeats + 1))
        t_pre_hf = min(
            timed(lambda: model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1))
            for _ in range(repeats + 1)
        )
    tokens = batch * new_tokens
    return dict(
        size=size,
        params=count_parameters(model),
        batch=batch,
        ours=tokens / min(t_ours),
        torch_step=tokens / min(t_torch),
        native=engine._forward.uses_native,
        hf=tokens / min(t_hf),
        spread=statistics.pstdev(t_ours) / min(t_ours),
        prefill_tok=int(valid.sum()) / t_pre,
        prefill_flops=prefill_flops(model, valid) / t_pre,
        prefill_flops_hf=prefill_flops(model, valid) / t_pre_hf,
    )


def bench_compaction(size: str, batch: int, dtype: torch.dtype, new_tokens: int, repeats: int) -> None:
    """Rows that finish early: keep them in the batch (masked) or drop them (copying the KV cache) — measured."""
    model = build(size, dtype)
    batch_prompts = prompts(batch)
    # stop on ~1 in 40 tokens: row lengths spread over the whole budget
    params = SamplingParams(
        max_new_tokens=new_tokens, temperature=1.0, stop_token_ids=list(range(3, VOCAB, 40)), seed=0
    )
    lengths = [len(r) for r in Engine(model).generate(batch_prompts, params).tokens]
    print(
        f"\ncompaction, {size} batch {batch} {dtype}: row lengths median {statistics.median(lengths)}, "
        f"max {max(lengths)}, {sum(lengths)} tokens"
    )
    for at in (1.0, 0.5, 0.25, 0.0):
        engine = Engine(model, compact_at=at)
        engine.generate(batch_prompts, params)
        best = min(timed(lambda e=engine: e.generate(batch_prompts, params)) for _ in range(repeats))
        label = "never (mask)" if at == 1.0 else f"at {at:.0%} finished"
        print(f"  drop finished rows {label:<18} {best * 1e3:8.1f} ms   {sum(lengths) / best:8.0f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,small,medium", help=f"comma-separated, from {', '.join(TINY_SIZES)}")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of temperature-1 sampling")
    parser.add_argument("--compaction", action="store_true", help="measure dropping finished rows instead")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu: time by this process's CPU time (use with --threads 1 on a shared machine)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    dtype = DTYPES[args.dtype]
    sizes, batches = args.sizes.split(","), [int(b) for b in args.batches.split(",")]
    if args.compaction:
        for size in sizes:
            for batch in batches:
                bench_compaction(size, batch, dtype, args.new_tokens, args.repeats)
        return
    roofs = {name: matmul_roof(dt) for name, dt in DTYPES.items()}
    roof = max(roofs.values())  # the most this machine's matmuls do, in its faster dtype
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {args.dtype}, "
        f"{'greedy' if args.greedy else 'sampling T=1'}, {args.new_tokens} new tokens, prompts 16-64 tokens, "
        f"{args.clock} clock, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        "matmul roof: "
        + ", ".join(f"{name} {r / 1e12:.3f} TFLOP/s" for name, r in roofs.items())
        + f" (bf16 native: {bf16_is_fast()}); % roof is of the faster one\n"
    )
    header = (
        f"{'model':<8}{'params':>8}{'batch':>6}{'HF tok/s':>11}{'ours tok/s':>12}{'ratio':>7}"
        f"{'torch-step tok/s':>18}{'ratio':>7}{'prefill tok/s':>15}{'ours % roof':>12}{'HF % roof':>11}"
    )
    print(header)
    print("-" * len(header))
    for size in sizes:
        for batch in batches:
            r = bench_one(size, batch, dtype, args.new_tokens, args.repeats, args.greedy)
            print(
                f"{size:<8}{r['params'] / 1e6:>7.1f}M{batch:>6}{r['hf']:>11,.0f}{r['ours']:>12,.0f}"
                f"{r['ours'] / r['hf']:>6.1f}x{r['torch_step']:>18,.0f}{r['torch_step'] / r['hf']:>6.1f}x"
                f"{r['prefill_tok']:>15,.0f}{r['prefill_flops'] / roof:>11.1%}{r['prefill_flops_hf'] / roof:>11.1%}"
                + ("" if r["native"] else "   (native step unavailable: ours = torch step)"),
                flush=True,
            )
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
