"""The native decode step (`native_decode.c`): built with the system C compiler at first use, loaded with ctypes.

`CompactCausalLM.step` uses it for float32 models on the CPU (docs/engine.md, "The native decode step"): one call
runs every layer of a decode step inside one OpenMP region, instead of ~30 torch ops per layer. Everything else
(prefill, bf16, GPUs, other activations) stays on the torch path, and so does the decode step when no compiler is
available: the library is an accelerator, never a requirement.

The build goes to `$FLYWHEEL_CACHE_DIR/native` (default `~/.cache/flywheel/native`), named by a hash of the source,
the compiler's version and flags and the CPU, written atomically; `FLYWHEEL_NATIVE=0` turns it off.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_decode.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
ABI_VERSION = 2
PANEL = 16  # output columns per weight panel (NR in the C source)
# per-layer pointer slots, in the C source's order (enum P_*)
LAYER_SLOTS = (
    "ln1",
    "qkv",
    "qkv_bias",
    "o",
    "o_bias",
    "ln2",
    "gate_up",
    "gate_up_bias",
    "down",
    "down_bias",
    "q_norm",
    "k_norm",
)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_why = ""  # why the library is not loaded, once load() has failed


def cache_dir() -> Path:
    root = os.environ.get("FLYWHEEL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "flywheel")
    return Path(root) / "native"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor()


def build(compiler: str | None = None) -> Path:
    """Compile the library (or find it already built) and return its path. Raises RuntimeError with the compiler's
    message when it cannot be built."""
    cc = compiler or os.environ.get("CC") or "cc"
    exe = shutil.which(cc)
    if exe is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found on PATH)")
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"cannot run the C compiler {exe}: {e}") from e
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [source, version.encode(), " ".join(FLAGS).encode(), _cpu_id().encode(), platform.machine().encode()]
        )
    ).hexdigest()[:16]
    out = cache_dir() / f"decode-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".decode-", suffix=".so")
    os.close(fd)
    try:
        try:
            result = subprocess.run(
                [exe, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=120
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"{exe} failed to build {SOURCE.name}: {e}") from e
        if result.returncode != 0:
            raise RuntimeError(f"{exe} failed to build {SOURCE.name}: {result.stderr.strip()[-500:]}")
        os.replace(tmp, out)  # atomic: a concurrent build or load never sees half a library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.fw_abi_version.restype = i
    lib.fw_scratch_floats.argtypes = [p, i, i, i]
    lib.fw_scratch_floats.restype = ctypes.c_long
    lib.fw_step.argtypes = [p, f, f, p, p, p, p, p, p, p, p, p, i, p, i, p, i, i, p, p, i]
    lib.fw_step.restype = i
    return lib


def load() -> ctypes.CDLL | None:
    """The library, built on first call; None (and one warning) when it cannot be built or is turned off."""
    global _lib, _tried, _why
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("FLYWHEEL_NATIVE", "1") == "0":
            _why = "turned off (FLYWHEEL_NATIVE=0)"
            log.info("engine: native decode step %s", _why)
            return None
        try:
            path = build()
            lib = _declare(ctypes.CDLL(str(path)))
            if lib.fw_abi_version() != ABI_VERSION:
                raise RuntimeError(f"{path} has ABI {lib.fw_abi_version()}, expected {ABI_VERSION}")
        except (RuntimeError, OSError) as e:
            _why = f"the library could not be built or loaded: {e}"
            log.warning("engine: native decode step unavailable, using the torch path (%s)", e)
            return None
        _lib = lib
        return _lib


def unavailable_reason() -> str:
    """Why `load()` returned None (empty before it was called or when it succeeded)."""
    return _why


def reset() -> None:
    """Forget the loaded library, so that the next `load()` builds or loads it again (tests)."""
    global _lib, _tried, _why
    with _lock:
        _lib, _tried, _why = None, False, ""


def panels(w: torch.Tensor) -> torch.Tensor:
    """(N, K) weight -> (ceil(N/16), K, 16) float32 panels, zero-padded: the order the C GEMM reads them in."""
    n, k = w.shape
    n_pad = -n % PANEL
    w = w.detach().float()
    if n_pad:
        w = torch.cat([w, w.new_zeros(n_pad, k)])
    return w.view(-1, PANEL, k).transpose(1, 2).contiguous()


class NativeWeights:
    """The model's weights in the native step's layout, plus the pointer table it reads (one per weights snapshot)."""

    def __init__(
        self,
        layers: list[dict[str, torch.Tensor | None]],
        windows: list[int],
        embed: torch.Tensor,
        norm: torch.Tensor,
        lm_head: torch.Tensor,
        lm_bias: torch.Tensor | None,
        rope: torch.Tensor,
        dims: list[int],
        eps: float,
        scale: float,
    ):
        keep: list[torch.Tensor] = [embed, norm, lm_head, rope]
        pointers = []
        for layer in layers:
            for slot in LAYER_SLOTS:
                t = layer[slot]
                if t is not None:
                    keep.append(t)
                pointers.append(None if t is None else t.data_ptr())
        if lm_bias is not None:
            keep.append(lm_bias)
        self._keep = keep  # the tensors the pointers point into stay alive with this object
        self.table = (ctypes.c_void_p * len(pointers))(*pointers)
        self.windows = (ctypes.c_int * len(windows))(*windows)
        self.dims = (ctypes.c_int * len(dims))(*dims)
        self.embed, self.norm, self.lm_head, self.lm_bias, self.rope = embed, norm, lm_head, lm_bias, rope
        self.eps, self.scale, self.vocab = eps, scale, dims[-1]

    def with_rope(self, rope: torch.Tensor) -> NativeWeights:
        """The same weights with a longer RoPE table."""
        new = copy.copy(self)
        new.rope, new._keep = rope, [*self._keep, rope]
        return new


def step(
    lib: ctypes.CDLL,
    w: NativeWeights,
    tokens: torch.Tensor,
    pos: torch.Tensor,
    kv: torch.Tensor,
    bias: torch.Tensor,
    lo: int,
    n: int,
    scratch: dict[str, Any],
) -> torch.Tensor:
    """Append tokens (B,) at slot n and return the next-token logits (B, V) float32. kv: (B, L, 2*Hkv, S, D),
    bias: (B, S), pos: (B, 1) int64, all contiguous; no row attends to a slot before `lo`; scratch: a
    per-generation dict that keeps the work buffer."""
    b, s = int(tokens.shape[0]), int(kv.shape[3])
    threads = torch.get_num_threads()
    size = int(lib.fw_scratch_floats(w.dims, b, s, threads))
    buf = scratch.get("buf")
    if buf is None or buf.numel() < size:
        buf = scratch["buf"] = torch.empty(size, dtype=torch.float32)
    logits = torch.empty(b, w.vocab, dtype=torch.float32)
    tokens = tokens.contiguous()
    lib.fw_step(
        w.dims,
        w.eps,
        w.scale,
        w.table,
        w.windows,
        w.embed.data_ptr(),
        w.norm.data_ptr(),
        w.lm_head.data_ptr(),
        None if w.lm_bias is None else w.lm_bias.data_ptr(),
        w.rope.data_ptr(),
        tokens.data_ptr(),
        pos.data_ptr(),
        b,
        kv.data_ptr(),
        s,
        bias.data_ptr(),
        lo,
        n,
        buf.data_ptr(),
        logits.data_ptr(),
        threads,
    )
    return logits
