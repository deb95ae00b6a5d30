"""The training loop every trainer shares.

AdamW, linear warmup + cosine decay, gradient accumulation, grad clipping, optional bf16 autocast, a progress bar with
loss and tokens/s, `metrics.jsonl` (+ TensorBoard when installed), and atomic checkpoints that resume bit-identically:
a checkpoint holds the model, optimizer, scheduler, every RNG state and the step; the data order is a pure function of
(seed, step), so the data position is the step itself.

A stage supplies the samples, a `collate(samples) -> batch` and a `loss_fn(model, batch) -> summed loss`. Each batch
carries `weight`, the number of loss terms in it (tokens for LMs, groups for reward models): the loop divides every
micro-batch's summed loss by the weight of the whole optimizer step, so batch 8 x accumulation 1 and batch 2 x
accumulation 4 compute the same gradient.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from flywheel.config import save_config
from flywheel.errors import UserError
from flywheel.utils import atomic_dir, atomic_write_text, log, seed_everything, set_threads


@dataclass
class TrainConfig:
    """Fields shared by every trainer (each stage's config inherits them)."""

    out: str = field(default="", metadata={"help": "run directory (config.yaml, metrics.jsonl, checkpoints/, final/)"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation, data order and sampling"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps (overrides --epochs)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training data"})
    batch_size: int = field(default=8, metadata={"help": "samples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to lr * min_lr_ratio"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "fraction of steps of linear warmup"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on norms and biases)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global grad norm (0 = off)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for forward passes (weights stay fp32)"})
    log_every: int = field(default=10, metadata={"help": "steps between metric lines"})
    eval_every: int = field(default=0, metadata={"help": "steps between validation passes (0 = only at the end)"})
    save_every: int = field(default=0, metadata={"help": "steps between checkpoints (0 = only the final model)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many recent checkpoints to keep"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in --out"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = all cores)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def validate(self) -> None:
        if not self.out:
            raise UserError("--out is required (the run directory)")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError("--max-steps must be >= 1")
        if self.epochs <= 0:
            raise UserError("--epochs must be > 0")
        if self.lr <= 0:
            raise UserError("--lr must be > 0")


def autocast(enabled: bool) -> Any:
    if not enabled:
        return nullcontext()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def lr_lambda(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel is ~3.5x faster than the default on CPU too (0.034 vs 0.12 s/step for 5M params here).
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=True)


def total_steps(cfg: TrainConfig, n_samples: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_samples / (cfg.batch_size * cfg.grad_accum)))


class DataOrder:
    """Sample indices of any step, from (seed, step) alone: epoch e is a fixed permutation, epochs are concatenated."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + count)]


class MetricsLogger:
    """Appends one JSON object per line to metrics.jsonl; mirrors scalars to TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():  # drop lines written after the checkpoint we resume from
            lines = self.path.read_text().splitlines()
            kept = [ln for ln in lines if ln and json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            pass

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(run_dir: Path, step: int, modules: dict[str, Any], extra: dict[str, Any], keep: int) -> Path:
    """Atomically write checkpoints/step-N: each module's state_dict, RNG states and `extra` (JSON)."""
    from safetensors.torch import save_model

    final = run_dir / "checkpoints" / f"step-{step}"
    with atomic_dir(final) as tmp:
        for name, obj in modules.items():
            if isinstance(obj, torch.nn.Module):
                save_model(obj, str(tmp / f"{name}.safetensors"))
            else:
                torch.save(obj.state_dict(), tmp / f"{name}.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **extra}))
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, modules: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_model

    for name, obj in modules.items():
        if isinstance(obj, torch.nn.Module):
            load_model(obj, str(ckpt / f"{name}.safetensors"))
        else:
            obj.load_state_dict(torch.load(ckpt / f"{name}.pt", weights_only=False))
    set_rng_state(torch.load(ckpt / "rng.pt", weights_only=False))
    return json.loads((ckpt / "trainer_state.json").read_text())


def prepare_run_dir(cfg: Any) -> Path:
    run_dir = Path(cfg.out)
    if not cfg.resume and checkpoint_dirs(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints: pass --resume to continue, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


@dataclass
class LoopResult:
    steps: int
    last_metrics: dict[str, float]
    eval_metrics: dict[str, float]


def train_loop(
    model: torch.nn.Module,
    cfg: TrainConfig,
    run_dir: Path,
    samples: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, Any]],
    loss_fn: Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, float]]],
    evaluate: Callable[[], dict[str, float]] | None = None,
    desc: str = "train",
) -> LoopResult:
    """Run the optimisation. `loss_fn` returns (summed loss over the batch's `weight` terms, extra metric sums)."""
    if not samples:
        raise UserError("no training samples")
    set_threads(cfg.threads or None)
    seed_everything(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.train()
    optimizer = build_optimizer(model, cfg)
    steps = total_steps(cfg, len(samples))
    warmup = int(cfg.warmup_ratio * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, steps, warmup, cfg.min_lr_ratio)
    )
    modules = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    start = 0
    ckpts = checkpoint_dirs(run_dir) if cfg.resume else []
    if ckpts:
        start = load_checkpoint(ckpts[-1], modules)["step"]
        log.info("resumed from %s (step %d of %d)", ckpts[-1], start, steps)
    logger = MetricsLogger(run_dir, start if ckpts else None)
    order = DataOrder(len(samples), cfg.seed)
    per_step = cfg.batch_size * cfg.grad_accum
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not cfg.progress, dynamic_ncols=True)
    last: dict[str, float] = {}
    window = {"loss": 0.0, "weight": 0.0, "tokens": 0, "time": 0.0}
    extras: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    for step in range(start, steps):
        t0 = time.perf_counter()
        idx = order.indices(step * per_step, per_step)
        chunks = [idx[j : j + cfg.batch_size] for j in range(0, per_step, cfg.batch_size)]
        micro = [collate([samples[i] for i in chunk]) for chunk in chunks]
        weight = float(sum(b["weight"] for b in micro))
        step_loss = 0.0
        for batch in micro:
            with autocast(cfg.bf16):
                loss_sum, more = loss_fn(model, batch)
            (loss_sum / weight).backward()
            step_loss += float(loss_sum.detach())
            for k, v in more.items():
                extras[k] = extras.get(k, 0.0) + float(v)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf")))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window["loss"] += step_loss
        window["weight"] += weight
        window["tokens"] += sum(int(b.get("tokens", 0)) for b in micro)
        window["time"] += time.perf_counter() - t0
        done = step + 1
        if not math.isfinite(step_loss):
            raise RuntimeError(f"loss is {step_loss} at step {done}: lower --lr or check the data")
        if done % cfg.log_every == 0 or done == steps:
            last = {
                "loss": window["loss"] / window["weight"],
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": window["tokens"] / max(window["time"], 1e-9),
                **{k: v / window["weight"] for k, v in extras.items()},
            }
            logger.log(done, last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
            window = {"loss": 0.0, "weight": 0.0, "tokens": 0, "time": 0.0}
            extras = {}
        if evaluate is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == steps):
            eval_metrics = _run_eval(model, evaluate, cfg.bf16)
            logger.log(done, eval_metrics)
            log.info("step %d: %s", done, "  ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
        if cfg.save_every and done % cfg.save_every == 0 and done < steps:
            save_checkpoint(run_dir, done, modules, {"total_steps": steps}, cfg.keep_checkpoints)
        bar.update(1)
    bar.close()
    logger.close()
    return LoopResult(steps=steps, last_metrics=last, eval_metrics=eval_metrics)


def _run_eval(model: torch.nn.Module, evaluate: Callable[[], dict[str, float]], bf16: bool) -> dict[str, float]:
    model.eval()
    with torch.no_grad(), autocast(bf16):
        out = evaluate()
    model.train()
    return out


def config_dict(cfg: Any) -> dict[str, Any]:
    return asdict(cfg)
