"""Optional C++ CPU kernels (depthwise quadratic conv, GELU), compiled on first use.

The source `csrc/quadratic_cpu.cpp` is built with `torch.utils.cpp_extension.load` into a
cache folder keyed by the source, torch (version and install folder), Python and the CPU's
instruction-set flags, so a stale build is never reused and two virtual environments do
not rebuild over each other's module. `QUADRANET_CPU_KERNELS=0` disables the kernels,
`=1` makes a failed build an error; unset, a failed build warns once and the PyTorch path
is used.
The cache lives in `$QUADRANET_CACHE/cpu_kernels` (default `~/.cache/quadranet/cpu_kernels`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

ENV_VAR = "QUADRANET_CPU_KERNELS"
CACHE_ENV_VAR = "QUADRANET_CACHE"
SOURCE = Path(__file__).with_name("csrc") / "quadratic_cpu.cpp"
CFLAGS = ["-O3", "-march=native", "-fopenmp"]

_lock = threading.Lock()
_loaded = False
_module: object | None = None
_override: bool | None = None  # set by `cpu_kernels(...)`


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (Linux), else the machine name."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    return platform.machine() + platform.processor()


def build_key() -> str:
    """Hash of everything the compiled module depends on."""
    parts = [SOURCE.read_bytes().decode(), torch.__version__, sys.version, _cpu_flags()]
    # the build links against this torch's headers and libraries by absolute path
    parts += [str(Path(torch.__file__).resolve().parent), " ".join(CFLAGS)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]) / "cpu_kernels"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "quadranet" / "cpu_kernels"


def _mode() -> str:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("0", "false", "off", "no"):
        return "off"
    if value in ("1", "true", "on", "yes"):
        return "force"
    return "auto"


def _build() -> object:
    # Importing cpp_extension logs a warning about CUDA_HOME on CUDA builds without a GPU;
    # it is irrelevant to this CPU-only build.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)

    key = build_key()
    build_dir = _cache_dir() / key
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=f"quadranet_cpu_{key}",
        sources=[str(SOURCE)],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.quadranet_cpu


def load() -> object | None:
    """The compiled ops (`torch.ops.quadranet_cpu`), or None when disabled or unbuildable."""
    global _loaded, _module
    mode = _mode()
    if mode == "off":
        return None
    if not _loaded:
        with _lock:
            if not _loaded:
                try:
                    _module = _build()
                except Exception as err:  # no compiler, no ninja, compile error, ...
                    text = str(err).strip()
                    reason = text.splitlines()[0] if text else repr(err)
                    if mode == "force":
                        raise RuntimeError(
                            f"{ENV_VAR}=1 but the QuadraNet CPU kernels could not be built: "
                            f"{reason}"
                        ) from err
                    warnings.warn(
                        f"QuadraNet CPU kernels unavailable ({type(err).__name__}: {reason}); "
                        f"using the PyTorch path. Set {ENV_VAR}=0 to skip building them.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                finally:
                    _loaded = True
    if _module is None and mode == "force":
        raise RuntimeError(f"{ENV_VAR}=1 but the QuadraNet CPU kernels failed to build")
    return _module


def kernels() -> object | None:
    """The module to dispatch to now: None when turned off by `cpu_kernels(False)`."""
    if _override is False:
        return None
    return load()


@contextlib.contextmanager
def cpu_kernels(enabled: bool) -> Iterator[None]:
    """Turn the CPU kernels on or off inside a block (tests, benchmarks)."""
    global _override
    previous, _override = _override, enabled
    try:
        yield
    finally:
        _override = previous


def usable(*tensors: torch.Tensor | None) -> bool:
    """True for float32 CPU tensors in eager mode, outside a non-fp32 autocast region.

    Tracing (torch.compile, torch.export, ONNX export, TorchScript) keeps the PyTorch path:
    the kernels have no meta implementation and no ONNX equivalent.
    """
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return False
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype != torch.float32:
            return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.float32:
        return False
    return True


def contiguous_kernels(x: torch.Tensor, *tensors: torch.Tensor | None) -> object | None:
    """The ops when the row-wise kernels (GELU, LayerNorm) apply: x non-empty, and x and the
    other tensors (None skipped) contiguous float32 CPU tensors (see `usable`); else None."""
    if x.numel() == 0 or not usable(x, *tensors):
        return None
    if not all(t is None or t.is_contiguous() for t in (x, *tensors)):
        return None
    return kernels()
