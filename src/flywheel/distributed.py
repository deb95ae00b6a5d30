"""Many processes, one run: torchrun's environment -> a process group, DDP / FSDP2 wrapping, rank-0 I/O, a launcher.

    torchrun --standalone --nproc_per_node 8 -m flywheel sft --model Qwen/Qwen2.5-0.5B --data d.jsonl --out runs/sft
    flywheel sft --nproc 8 --model Qwen/Qwen2.5-0.5B --data d.jsonl --out runs/sft      # launches the line above

Every rank runs the same program. `init()` reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and joins the group:
gloo on CPU, NCCL on GPU (one GPU per process, cuda:LOCAL_RANK). A run without WORLD_SIZE > 1 creates no process
group and no wrapper: every helper here is then a no-op, so single-process runs are exactly what they were.

`wrap(model, strategy)` returns a `Wrapped` module: DDP (every rank holds the whole model, gradients are averaged)
or FSDP2 (`fully_shard` on each decoder layer and on the whole: parameters, gradients and optimizer state are sharded).
The trainers' loss functions reach into the model (`model.base_model`, the score head) rather than calling its
forward, so the wrapper's forward takes a function: `wrapped(fn, *args)` runs `fn(model, *args)` inside the
wrapper's forward, where DDP prepares its gradient reduction and FSDP gathers the root's parameters.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from flywheel.errors import UserError
from flywheel.utils import log

STRATEGIES = ("ddp", "fsdp")


def launched() -> bool:
    """True inside a process started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group torchrun describes (idempotent); nothing at all in a single-process run."""
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    # Tear the group down at exit: a process that exits with gloo's threads still running aborts (SIGABRT,
    # "terminate called without an active exception"), failing the whole torchrun job after its work is done.
    atexit.register(_shutdown)
    log.debug("rank %d of %d joined (%s)", rank(), world(), dist.get_backend())


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def device() -> torch.device:
    """Where this rank trains: cuda:LOCAL_RANK when a GPU is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum each value over the ranks (float64; one collective for the whole list)."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over the ranks (a new tensor, on t's device)."""
    if not active():
        return t
    out = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (in rank order); None on the other ranks."""
    if not active():
        return [obj]
    out: list[Any] | None = [None] * world() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: Sequence[Any]) -> list[Any]:
    """This rank's contiguous share of `items` (len(items) must divide evenly by the world size)."""
    n, w = len(items), world()
    if n % w:
        raise UserError(f"{n} items cannot be split evenly over {w} processes")
    per = n // w
    return list(items[rank() * per : (rank() + 1) * per])


def _comm_device() -> torch.device:
    return device() if active() and dist.get_backend() == "nccl" else torch.device("cpu")


class _Call(torch.nn.Module):
    """The module DDP / FSDP2 wrap: its forward runs any function of the model, so their hooks see every pass."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.module, *args, **kwargs)


class Wrapped:
    """A model under DDP or FSDP2: `call(fn, *args)` runs `fn(model, *args)` through the wrapper."""

    def __init__(self, outer: torch.nn.Module, module: torch.nn.Module, strategy: str):
        self.outer = outer
        self.module = module
        self.strategy = strategy

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.outer(fn, *args, **kwargs)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.outer.parameters()

    @contextmanager
    def no_sync(self, enabled: bool = True) -> Iterator[None]:
        """Accumulate gradients locally (no all-reduce / reduce-scatter) inside the block when `enabled`."""
        if not enabled:
            yield
        elif self.strategy == "ddp":
            with self.outer.no_sync():
                yield
        else:
            self.outer.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.outer.set_requires_gradient_sync(True)


def wrap(model: torch.nn.Module, strategy: str = "ddp") -> Wrapped | None:
    """DDP or FSDP2 around `model` (already on `device()`); None in a single-process run (no wrapper at all)."""
    if not active():
        return None
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(STRATEGIES)}, got '{strategy}'")
    inner = _Call(model)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device().index] if device().type == "cuda" else None
        # No buffers to sync (no batch norm); rotary tables are computed identically on every rank.
        return Wrapped(DistributedDataParallel(inner, device_ids=ids, broadcast_buffers=False), model, strategy)
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(inner)
    return Wrapped(inner, model, strategy)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (each becomes one FSDP2 unit): HF's `_no_split_modules` classes."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"FSDP: cannot find the decoder layers of {type(model).__name__} (no _no_split_modules)")
    return layers


def full_state_dict(wrapped: Wrapped | None, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, keyed as `model.state_dict()`; under FSDP2 it is gathered (a collective:
    every rank calls it) and only rank 0 gets the tensors (the others get {})."""
    if wrapped is None or wrapped.strategy == "ddp":
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(wrapped.outer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("module."): v for k, v in sd.items()}


def optimizer_state(wrapped: Wrapped | None, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state for a checkpoint: as is (single process, DDP: the same on every rank), or under FSDP2
    gathered to full tensors on rank 0 (a collective)."""
    if wrapped is None or wrapped.strategy == "ddp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped.outer, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_model_state(wrapped: Wrapped | None, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    if wrapped is None or wrapped.strategy == "ddp":
        model.load_state_dict(state, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(wrapped.outer, {f"module.{k}": v for k, v in state.items()},
                         options=StateDictOptions(full_state_dict=True, strict=False))


def load_optimizer_state(wrapped: Wrapped | None, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if wrapped is None or wrapped.strategy == "ddp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(wrapped.outer, optimizer, state, options=StateDictOptions(full_state_dict=True))


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """argv without `--nproc N` / `--nproc=N`."""
    out: list[str] = []
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == "--nproc":
            skip = i + 1 < len(argv)
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch_command(stage: str, argv: Sequence[str], nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "flywheel", stage, *strip_nproc(argv)]


def maybe_launch(stage: str, nproc: int, argv: Sequence[str] | None) -> int | None:
    """`flywheel <stage> --nproc N` (N > 1, not already under torchrun): run the stage under torchrun and return its
    exit code; None when this process should train itself."""
    if nproc <= 1 or launched():
        return None
    argv = list(sys.argv[2:] if argv is None else argv)
    cmd = launch_command(stage, argv, nproc)
    log.info("launching %d processes: %s", nproc, " ".join(cmd))
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # N processes on a CPU box: split the cores instead of letting each one take all of them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(cmd, env=env).returncode


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the valid entries of every rank (unbiased variance, as `ppo.advantages.masked_whiten`,
    which is what a single process uses); padding stays 0. Every rank calls it."""
    m = mask.to(x.dtype)
    count, total = all_reduce_sum([float(m.sum()), float((x * m).sum())])
    mean = total / max(count, 1.0)
    sq = all_reduce_sum([float((((x - mean) ** 2) * m).sum())])[0]
    var = sq / max(count, 1.0)
    if count > 1:
        var = var * count / (count - 1)
    return (x - mean) * (var + eps) ** -0.5 * m
