"""Many processes, one run: torchrun's environment -> a process group, DDP / FSDP2 wrapping, rank-0 I/O, a launcher.

    torchrun --standalone --nproc_per_node 8 -m flywheel sft --model Qwen/Qwen2.5-0.5B --data d.jsonl --out runs/sft
    flywheel sft --nproc 8 --model Qwen/Qwen2.5-0.5B --data d.jsonl --out runs/sft      # launches the line above

Every rank runs the same program. `init()` reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and joins the group:
gloo on CPU, NCCL on GPU (one GPU per process, cuda:LOCAL_RANK). A run without WORLD_SIZE > 1 creates no process
group and no wrapper: every helper here is then a no-op, so single-process runs are exactly what they were.

Bad input under torchrun: each rank that raises a `UserError` writes its one-line message to the folder that
`flywheel <stage> --nproc N` names in $FLYWHEEL_ERROR_DIR (nothing is printed by the ranks) and exits 2, torchrun
stops the other ranks, and the launcher prints each distinct message once and exits 2, as one process would; torchrun's
own traceback and failure report are not shown.

`wrap(model, strategy)` returns a `Wrapped` module: DDP (every rank holds the whole model, gradients are averaged)
or FSDP2 (`fully_shard` on each decoder layer and on the whole: parameters, gradients and optimizer state are sharded).
The trainers' loss functions reach into the model (`model.base_model`, the score head) rather than calling its
forward, so the wrapper's forward takes a function: `wrapped(fn, *args)` runs `fn(model, *args)` inside the
wrapper's forward, where DDP prepares its gradient reduction and FSDP gathers the root's parameters.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flywheel.errors import ERROR_DIR_ENV, UserError
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
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        # Every rank past its last collective before any tears the group down (a rank destroying it while another
        # still waits on a collective can abort that one); bounded, so a rank that died cannot hang the others.
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=30))
        except Exception:  # noqa: BLE001 (exiting anyway: another rank failed or left)
            pass
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


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (in rank order); None on the other ranks."""
    if not active():
        return [obj]
    out: list[Any] | None = [None] * world() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


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
        # No buffers to sync (no batch norm); rotary tables are computed identically on every rank. Torch 2.13
        # renamed the switch (the old name warns).
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
        return Wrapped(DistributedDataParallel(inner, device_ids=ids, **no_sync), model, strategy)
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

    return get_optimizer_state_dict(
        wrapped.outer, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_model_state(wrapped: Wrapped | None, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    if wrapped is None or wrapped.strategy == "ddp":
        model.load_state_dict(state, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(
        wrapped.outer,
        {f"module.{k}": v for k, v in state.items()},
        options=StateDictOptions(full_state_dict=True, strict=False),
    )


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


def torchrun_args(stage: str, argv: Sequence[str], nproc: int) -> list[str]:
    """The arguments of `torchrun` that run `flywheel <stage> <argv>` on `nproc` local processes."""
    return ["--standalone", "--nproc_per_node", str(nproc), "-m", "flywheel", stage, *strip_nproc(argv)]


# torchrun without its traceback: `python -c _TORCHRUN <torchrun args>` (see `torchrun_main`).
_TORCHRUN = "import sys; from flywheel.distributed import torchrun_main; sys.exit(torchrun_main(sys.argv[1:]))"


def launch_command(stage: str, argv: Sequence[str], nproc: int) -> list[str]:
    return [sys.executable, "-c", _TORCHRUN, *torchrun_args(stage, argv, nproc)]


def torchrun_main(args: Sequence[str]) -> int:
    """`python -m torch.distributed.run ARGS` as a function that returns 0, or 1 when a rank failed. A failed rank
    has already said why (its one-line error went to the launcher, or its traceback is above), so torchrun's own
    traceback, failure table and 'sending SIGTERM' lines are replaced by one line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(parse_args(list(args)))
    except ChildFailedError as err:
        # A crash, not bad input: name the rank whose traceback to read.
        if not _error_reports(os.environ.get(ERROR_DIR_ENV)):
            r, failure = err.get_first_failure()
            how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
            print(f"flywheel: rank {r} failed ({how}); its output is above", file=sys.stderr)
        return 1
    return 0


def _error_reports(folder: str | None) -> dict[int, str]:
    """rank -> the message it reported (in rank order)."""
    if not folder:
        return {}
    reports = {int(f.stem.removeprefix("rank")): f.read_text() for f in Path(folder).glob("rank*.txt")}
    return dict(sorted(reports.items()))


def maybe_launch(stage: str, nproc: int, argv: Sequence[str] | None) -> int | None:
    """`flywheel <stage> --nproc N` (N > 1, not already under torchrun): run the stage under torchrun and return its
    exit code; None when this process should train itself. Raises the ranks' UserError (their distinct messages, in
    one line) when bad input stopped them."""
    if nproc <= 1 or launched():
        return None
    argv = list(sys.argv[2:] if argv is None else argv)
    log.info("launching %d processes: torchrun %s", nproc, " ".join(torchrun_args(stage, argv, nproc)))
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # N processes on a CPU box: split the cores instead of letting each one take all of them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    with tempfile.TemporaryDirectory(prefix="flywheel-errors-") as folder:
        env[ERROR_DIR_ENV] = folder
        code = subprocess.run(launch_command(stage, argv, nproc), env=env).returncode
        reports = _error_reports(folder)
    if reports:
        first = {m: r for r, m in reversed(reports.items())}  # each distinct message, with the first rank to say it
        if len(first) == 1:
            raise UserError(next(iter(first)))
        raise UserError("; ".join(f"rank {r}: {m}" for m, r in sorted(first.items(), key=lambda x: x[1])))
    return code


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
