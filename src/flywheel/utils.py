"""Small helpers shared by every stage: atomic writes, seeding, threads, logging set-up."""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("flywheel")


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's contents (a leading BOM dropped); one that is not UTF-8 is a UserError naming the file
    and the first bad byte."""
    from flywheel.errors import UserError

    try:
        return Path(path).read_text(encoding="utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise UserError(f"not valid UTF-8 (byte {err.start + 1})", path=str(path)) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that readers see the old content or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make the file private to this user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        files, dirs = 0o666 & ~_umask(), 0o777 & ~_umask()
        for item in [*tmp.rglob("*"), tmp]:  # mkdtemp's 0700 (and a temp file's 0600) would keep the model from others
            os.chmod(item, dirs if item.is_dir() else files)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_seconds() -> float:
    """CPU seconds of this process and of the child processes it has waited for (a reward-model ensemble's members
    trained side by side), all threads, user and system."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cpu_threads() -> int:
    """How many torch threads a process uses when not told: FLYWHEEL_THREADS, else every logical core."""
    return int(os.environ.get("FLYWHEEL_THREADS", 0)) or (os.cpu_count() or 1)


def set_threads(n: int | None = None) -> None:
    """Run torch on `n` threads, by default `cpu_threads()` (FLYWHEEL_THREADS, else os.cpu_count(): the logical
    cores); more threads than cores oversubscribe them (2 cores with 4 threads cost ~30% here)."""
    if n is None:
        n = cpu_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@cache
def bf16_is_fast(device_type: str = "cpu") -> bool:
    """Whether bf16 matmuls run natively on this machine's `device_type`: on a CPU, AVX-512-BF16 or AMX (oneDNN's
    check); on CUDA, compute capability 8 or more. Without it bf16 is emulated: on an AVX2-only CPU a bf16 matmul ran
    7x (F.linear at 1488 x 256 x 768) to 25x (a training step) slower than fp32, so bf16 is no speed-up there."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type != "cpu":
        return True  # other accelerators: their own business
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN
        return False


@cache
def warn_if_slow_bf16(device_type: str = "cpu") -> None:
    """Log once per process that bf16 was asked for where it is emulated (the run still does what was asked)."""
    if not bf16_is_fast(device_type):
        log.warning(
            "bf16 was asked for, but this %s has no native bf16 matmul (no AVX-512-BF16 / AMX): bf16 runs "
            "several times slower than fp32 here (drop --bf16)",
            device_type.upper(),
        )


def setup_logging() -> None:
    """CLI logging: our messages plain on stderr; transformers' per-load progress bars off (ours are enough)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
