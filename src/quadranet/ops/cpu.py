"""The C++ CPU backend: `csrc/quadratic_dwconv_cpu.cpp`, compiled on first use.

The source is built with `torch.utils.cpp_extension.load` (needs a C++ compiler and ninja)
into a cache folder keyed by the source, the flags, torch (version and install folder) and
Python, so a stale build is never reused and two virtual environments do not rebuild over
each other's module. Flags are `-O3 -fopenmp` and instruction-set flags picked from the
CPU: none (portable), `-mavx2 -mfma` on x86 CPUs that have both, plus `-mavx512f` (16-float
vectors instead of 8) on those that also have it. `QUADRANET_CPU_FLAGS` replaces the picked
ones, e.g. `-march=native`, or `-mavx2 -mfma` for the 8-float build on an AVX-512 CPU.
A failed build is remembered in its cache folder (`FAILED`), so later processes do not
retry it; delete that folder to try again. The cache lives in `$QUADRANET_CACHE/cpu_kernels`
(default `~/.cache/quadranet/cpu_kernels`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path

import torch

CACHE_ENV_VAR = "QUADRANET_CACHE"
FLAGS_ENV_VAR = "QUADRANET_CPU_FLAGS"
SOURCE = Path(__file__).with_name("csrc") / "quadratic_dwconv_cpu.cpp"
FAILED = "FAILED"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops" (the loaded ops) or "error" (why there are none)


def _cpu_flags() -> set[str]:
    """The CPU's instruction-set flags (Linux), else an empty set."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    return set()


def cflags() -> list[str]:
    """Compiler flags of the build: the CPU's instruction sets, or QUADRANET_CPU_FLAGS."""
    flags = ["-O3", "-fopenmp"]
    if FLAGS_ENV_VAR in os.environ:
        return [*flags, *os.environ[FLAGS_ENV_VAR].split()]
    cpu = _cpu_flags() if platform.machine() in ("x86_64", "AMD64") else set()
    if {"avx2", "fma"} <= cpu:
        flags += ["-mavx2", "-mfma"] + (["-mavx512f"] if "avx512f" in cpu else [])
    return flags


def build_key() -> str:
    """Hash of everything the compiled module depends on."""
    parts = [SOURCE.read_bytes().decode(), torch.__version__, sys.version, " ".join(cflags())]
    parts.append(str(Path(torch.__file__).resolve().parent))  # linked by absolute path
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """Folder of this build (source, flags, torch and Python in its name)."""
    if os.environ.get(CACHE_ENV_VAR):
        base = Path(os.environ[CACHE_ENV_VAR])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quadranet"
    return base / "cpu_kernels" / build_key()


def _build() -> object:
    # cpp_extension logs a CUDA_HOME warning on CUDA builds without a GPU; irrelevant here.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=f"quadranet_cpu_{folder.name}",
        sources=[str(SOURCE)],
        extra_cflags=cflags(),
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
        is_python_module=False,
        verbose=False,
    )
    _register_fakes()
    return torch.ops.quadranet_cpu


def _register_fakes() -> None:
    """Meta implementations of the C++ ops, so torch.compile and export can trace them."""

    def like(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x, memory_format=torch.channels_last)

    @torch.library.register_fake("quadranet_cpu::quadratic_forward")
    def _forward(x, weight, bias, gamma, want_y, want_ab, residual=None):  # noqa: ANN001
        return [like(x) for want in (want_y, want_ab, want_ab) if want]

    @torch.library.register_fake("quadranet_cpu::quadratic_backward")
    def _backward(x, weight, bias, gamma, a, b, grad, need_dx, need_dw, need_db, need_dg):  # noqa: ANN001
        outs = [like(x)] if need_dx else []
        outs += [torch.empty_like(weight)] if need_dw else []
        outs += [weight.new_empty(weight.shape[0])] if need_db else []
        return outs + ([weight.new_empty(x.shape[1])] if need_dg and gamma is not None else [])

    @torch.library.register_fake("quadranet_cpu::mlp_inference")
    def _mlp_inference(x, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        return torch.empty_like(x)

    @torch.library.register_fake("quadranet_cpu::mlp_forward")
    def _mlp_forward(x, ln_w, ln_b, eps, w1, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        stats = x.new_empty(*x.shape[:-1], 1)
        return [torch.empty_like(x), x.new_empty(*x.shape[:-1], w1.shape[0]), stats, stats.clone()]

    @torch.library.register_fake("quadranet_cpu::mlp_backward")
    def _mlp_backward(x, mean, rstd, u, grad, ln_w, ln_b, w1, w2, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        c, hid = x.shape[-1], w1.shape[0]
        return [torch.empty_like(x), x.new_empty(c), x.new_empty(c), torch.empty_like(w1),
                x.new_empty(hid), x.new_empty(c, hid), x.new_empty(c)]  # fmt: skip


def load() -> tuple[object | None, str]:
    """(the compiled ops or None, why there are none); builds once per process."""
    if not _state:
        with _lock:
            if not _state:
                _state.update(_load_or_remember())
    return _state.get("ops"), str(_state.get("error", ""))


def _load_or_remember() -> dict[str, object]:
    marker = cache_dir() / FAILED
    if marker.exists():
        return {"error": f"{marker.read_text().strip()} (remembered in {marker}; delete it "
                "to retry the build)"}  # fmt: skip
    try:
        return {"ops": _build()}
    except Exception as err:  # no compiler, no ninja, compile error, ...
        lines = str(err).strip().splitlines() or [repr(err)]
        first_error = next((line for line in lines if ": error:" in line), lines[0])
        reason = f"the C++ build failed: {first_error.strip()[:500]}"
        with contextlib.suppress(OSError):
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(reason + "\n")
        return {"error": reason}
