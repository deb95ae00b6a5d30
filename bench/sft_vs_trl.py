"""Our SFT step vs TRL's SFTTrainer step on the identical model, data, batch and dtype, side by side in one run.

    python bench/sft_vs_trl.py                # tiny Llama h256 x 4 layers, batch 16 x 128 tokens, fp32 and bf16
    python bench/sft_vs_trl.py --steps 20 --dtype bf16
    python bench/sft_vs_trl.py --threads 1 --clock cpu   # on a busy machine: CPU time, not wall time

Both train a copy of the same initial weights on the same pre-tokenized conversations with the loss on completion
tokens only (TRL: prompt/completion data -> completion_mask). A step = forward + backward + clip + AdamW update,
timed with wall-clock after warm-up steps. Needs the `bench` extra (trl, datasets, accelerate).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import random
import statistics
import tempfile
import time

import torch

from flywheel.data.batching import collate_lm, lm_loss
from flywheel.models import build_causal_lm, config_for_tokenizer
from flywheel.tokenization import render_conversation, train_tokenizer
from flywheel.train.loop import TrainConfig, autocast, build_optimizer, prepare_model

CLOCK = time.perf_counter  # --clock cpu: process CPU time, robust when other jobs share the cores (use --threads 1)


def make_data(n: int, seq_len: int, seed: int = 0):
    rng = random.Random(seed)
    words = "the cat dog sat on a mat and ran to see big red blue small house tree river city".split()
    texts, convs = [], []
    for _ in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(20, 30)))
        a = " ".join(rng.choice(words) for _ in range(rng.randint(60, 80)))
        texts += [q, a]
        convs.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    tok = train_tokenizer(texts, vocab_size=4096)
    samples = []
    for conv in convs:
        ids, mask = render_conversation(tok, conv)
        samples.append({"input_ids": ids[:seq_len], "loss_mask": mask[:seq_len]})
    return tok, samples


def time_ours(model, samples, tok, batch: int, steps: int, warmup: int, bf16: bool) -> list[float]:
    cfg = TrainConfig(out="-", lr=1e-4, bf16=bf16)
    prepare_model(model, cfg)  # what every flywheel trainer does first (eager attention on CPU in bf16)
    opt = build_optimizer(model, cfg)
    model.train()
    times = []
    for step in range(warmup + steps):
        t0 = CLOCK()
        b = collate_lm(samples[(step * batch) % len(samples) :][:batch], tok.pad_token_id)
        with autocast(bf16):
            loss, _ = lm_loss(model, b)
        (loss / b["weight"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(CLOCK() - t0)
    return times


def time_trl(model, samples, tok, batch: int, steps: int, warmup: int, bf16: bool, seq_len: int) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [{"input_ids": s["input_ids"], "completion_mask": s["loss_mask"]} for s in samples]
    ds = Dataset.from_list(rows)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = CLOCK()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step > warmup:
                times.append(CLOCK() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=batch,
            max_steps=warmup + steps,
            learning_rate=1e-4,
            max_length=seq_len,
            bf16=bf16,
            use_cpu=True,
            report_to=[],
            logging_steps=10**6,
            save_strategy="no",
            dataloader_num_workers=0,
            completion_only_loss=True,
            packing=False,
            max_grad_norm=1.0,
            disable_tqdm=True,
            dataset_num_proc=None,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
        trainer.train()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu = process CPU time (with --threads 1: immune to other jobs on the machine)",
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]' (bench/README.md)")
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    tok, samples = make_data(args.batch * (args.steps + args.warmup), args.seq_len)
    lens = [len(s["input_ids"]) for s in samples]
    model = build_causal_lm(config_for_tokenizer(tok, "small", max_position_embeddings=args.seq_len), seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: Llama h256 x 4 layers, {n_params / 1e6:.1f}M params; batch {args.batch}, "
        f"sequence length {min(lens)}-{max(lens)} tokens; {args.steps} timed steps after {args.warmup} warm-up"
    )
    rows = []
    for dtype in ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]:
        bf16 = dtype == "bf16"
        ours, trl = [], []
        for _ in range(args.repeats):  # alternate, keep each side's best median: the machine's load varies
            ours.append(
                statistics.median(
                    time_ours(copy.deepcopy(model), samples, tok, args.batch, args.steps, args.warmup, bf16)
                )
            )
            trl.append(
                statistics.median(
                    time_trl(
                        copy.deepcopy(model), samples, tok, args.batch, args.steps, args.warmup, bf16, args.seq_len
                    )
                )
            )
        rows.append((dtype, min(ours), min(trl)))
    print(f"{'dtype':<6} {'ours s/step':>12} {'TRL s/step':>12} {'ours/TRL':>9}")
    for dtype, o, t in rows:
        print(f"{dtype:<6} {o:>12.4f} {t:>12.4f} {o / t:>9.2f}")


if __name__ == "__main__":
    main()
