"""Shared machinery of the benchmarks: child processes, allocators, peak memory, timing, outputs.

Every measurement that times or weighs something runs in a fresh child process
(`ChildProcesses`) with the chosen malloc and thread settings, so one model or block cannot
warm up, fragment or pollute the memory of the next. A child runs a job function named
`"module:function"` and hands its JSON result back through a temporary file.

Counting (params, MACs, saved bytes) is not done here: it is `quadranet.bench.measure`."""

from __future__ import annotations

import argparse
import csv
import glob
import importlib
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import quadranet

# --- allocators --------------------------------------------------------------------------

ALLOCATORS = ("retained", "jemalloc", "default", "mmap")
# retained: glibc keeps freed memory instead of returning it to the OS after every large
# tensor (no mmap'd chunks, no trimming below 100 GiB): steady-state steps do no page faults.
RETAINED_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=107374182400"
# mmap: every block of 128 KiB or more is its own mapping, unmapped when freed (a fixed
# threshold turns off glibc's dynamic one), so the RSS follows the live tensors.
MMAP_TUNABLES = "glibc.malloc.mmap_threshold=131072"
JEMALLOC_PATTERNS = ("/usr/lib/*/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2")


def find_jemalloc(patterns: Sequence[str] | None = None) -> str:
    """Path of the system's libjemalloc.so.2; FileNotFoundError saying how to install it."""
    patterns = JEMALLOC_PATTERNS if patterns is None else patterns
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"--allocator jemalloc needs libjemalloc.so.2 but none was found (looked for "
        f"{', '.join(patterns)}); install it with `apt-get install libjemalloc2`, "
        "or use --allocator retained"
    )


def allocator_env(
    allocator: str, threads: int | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for a child process using `allocator` and `threads` intra-op threads."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"unknown allocator {allocator!r}; choose one of {', '.join(ALLOCATORS)}")
    env = dict(os.environ if base is None else base)
    if allocator in ("retained", "mmap"):
        ours = RETAINED_TUNABLES if allocator == "retained" else MMAP_TUNABLES
        tunables = env.get("GLIBC_TUNABLES")
        env["GLIBC_TUNABLES"] = f"{tunables}:{ours}" if tunables else ours
    elif allocator == "jemalloc":
        preload = env.get("LD_PRELOAD")
        lib = find_jemalloc()
        env["LD_PRELOAD"] = f"{lib}:{preload}" if preload else lib
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    # The child imports this package from where the parent did, installed or not.
    src = str(Path(quadranet.__file__).resolve().parents[1])
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{src}{os.pathsep}{path}" if path else src
    return env


# --- child processes ---------------------------------------------------------------------

USER_ERRORS = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}


class ChildProcesses:
    """Runs each job in a fresh process, forked from a server that has imported torch once.

    The server starts with the allocator's environment and `threads`, imports `preload`
    and runs no torch op itself (no thread pool, no CUDA context), so forking it is safe.
    Each job ("module:function" with JSON keyword arguments) gets its own new process:
    nothing a job allocated is alive in the next one, and no job pays for importing
    torch and timm. The job's JSON result comes back through a file.

    A ValueError or FileNotFoundError in a job is raised again here with its message;
    any other failure is a RuntimeError showing the end of the job's output.
    """

    def __init__(
        self, allocator: str = "default", threads: int | None = None, preload: Sequence[str] = ()
    ) -> None:
        if not hasattr(os, "fork"):
            raise OSError("the benchmarks need os.fork (Linux or macOS)")
        self.env = allocator_env(allocator, threads)
        self.threads = threads
        self.preload = list(preload)
        self._tmp = tempfile.TemporaryDirectory(prefix="quadranet-bench-")
        self._jobs = 0
        self._server: subprocess.Popen | None = None  # started by the first job

    def start(self) -> ChildProcesses:
        """Start the server now (the first job does it otherwise); it imports in the background."""
        if self._server is None:
            self._server = subprocess.Popen(
                [sys.executable, "-m", "quadranet.bench.runner", json.dumps(self.preload)],
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        return self

    def run(self, target: str, kwargs: Mapping[str, Any]) -> Any:
        """Run `target(**kwargs)` in a new process and return its JSON result."""
        self.start()
        self._jobs += 1
        base = Path(self._tmp.name) / f"job{self._jobs}"
        job = dict(
            target=target,
            kwargs=dict(kwargs),
            threads=self.threads,
            result=f"{base}.json",
            log=f"{base}.log",
        )
        self._server.stdin.write(json.dumps(job) + "\n")
        self._server.stdin.flush()
        reply = self._server.stdout.readline()
        if not reply:
            raise RuntimeError(
                f"the benchmark server process ended (exit code {self._server.wait()})"
            )
        exit_code = json.loads(reply)["exit_code"]
        result_path, log_path = Path(job["result"]), Path(job["log"])
        result = json.loads(result_path.read_text()) if result_path.is_file() else None
        if isinstance(result, dict) and "error_type" in result:
            raise USER_ERRORS[result["error_type"]](result["error"])
        if exit_code != 0 or result is None:
            log = log_path.read_text() if log_path.is_file() else ""
            tail = "\n".join(log.strip().splitlines()[-25:])
            hint = " (killed: out of memory? lower the batch)" if exit_code == -9 else ""
            raise RuntimeError(
                f"benchmark job {target} failed (exit code {exit_code}){hint}:\n{tail}"
            )
        return result["result"]

    def close(self, kill: bool = False) -> None:
        """Stop the server (at once with `kill`) and remove the job files."""
        server, self._server = self._server, None
        if server is not None:
            server.stdin.close()
            if kill:
                server.kill()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            server.stdout.close()
        self._tmp.cleanup()

    def __enter__(self) -> ChildProcesses:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.close(kill=exc_type is not None)  # after an error, do not wait for the server


def _run_job(job: Mapping[str, Any]) -> None:
    """Set the threads, run the job, write its result (or the user error) as JSON."""
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    module, func = job["target"].split(":")
    fn = getattr(importlib.import_module(module), func)
    try:
        result: dict[str, Any] = dict(result=fn(**job["kwargs"]))
    except tuple(USER_ERRORS.values()) as err:
        result = dict(error=str(err), error_type=type(err).__name__)
    Path(job["result"]).write_text(json.dumps(result))


def _run_forked(job: Mapping[str, Any]) -> None:
    """In a forked child: send output to the job's log, run the job, exit (never returns)."""
    code = 1
    try:
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)  # stdout is the server's reply pipe: keep the job's prints off it
        os.dup2(log, 2)
        _run_job(job)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve(preload: Sequence[str]) -> int:
    """The server: import `preload`, then fork one child per job line read on stdin."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends it quietly with the parent
    for name in preload:
        importlib.import_module(name)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_forked(job)
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(json.dumps(dict(exit_code=os.waitstatus_to_exitcode(status))) + "\n")
        sys.stdout.flush()
    return 0


# --- memory ------------------------------------------------------------------------------


def _status_bytes(field_name: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def current_rss() -> int:
    """Resident set size of this process, in bytes."""
    rss = _status_bytes("VmRSS")
    if rss is None:
        raise OSError("reading the resident set size needs Linux's /proc/self/status")
    return rss


def peak_rss() -> int:
    """High-water mark of this process's resident set size, in bytes."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """Peak memory above the baseline taken when tracking began, in bytes."""

    device: str
    baseline: int = 0
    bytes: int = 0
    exact_reset: bool = True


@contextmanager
def track_peak_memory(device: str | torch.device = "cpu") -> Iterator[PeakMemory]:
    """Measure the peak memory of the enclosed code above what was in use when it began.

    CPU: process RSS high-water mark minus the RSS at entry (the mark is reset at entry;
    where the kernel refuses, the mark since process start is used and `exact_reset` is
    False). CUDA: `torch.cuda.max_memory_allocated` minus the allocated bytes at entry.
    """
    device = torch.device(device)
    peak = PeakMemory(str(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        peak.baseline = torch.cuda.memory_allocated(device)
        yield peak
        torch.cuda.synchronize(device)
        peak.bytes = torch.cuda.max_memory_allocated(device) - peak.baseline
    else:
        peak.baseline = current_rss()
        peak.exact_reset = reset_peak_rss()
        yield peak
        peak.bytes = max(0, peak_rss() - peak.baseline)


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where unknown."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


# --- timing ------------------------------------------------------------------------------


@dataclass
class Stats:
    """Median, min and max of some repeated measurements."""

    median: float
    min: float
    max: float
    values: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        values = [float(v) for v in values]
        if not values:
            raise ValueError("no measurements to summarise")
        return cls(statistics.median(values), min(values), max(values), values)

    def as_dict(self) -> dict[str, Any]:
        return dict(median=self.median, min=self.min, max=self.max, values=self.values)


def check_device(device: str) -> str:
    """`device` (cpu, cuda or cuda:N) as torch names it; ValueError if this machine lacks it.

    Asks `torch.cuda.device_count`, which uses NVML where it can and so leaves this process
    without a CUDA context (the jobs, in their own processes, start CUDA themselves).
    """
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cpu":
        return "cpu"
    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError(
            f"--device {device} was asked for but torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA {torch.version.cuda}); use --device cpu"
        )
    if (dev.index or 0) >= count:
        raise ValueError(
            f"--device {device} was asked for but torch sees {count} CUDA device(s): "
            f"use cuda:0 to cuda:{count - 1}"
        )
    return str(dev)


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def minor_page_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage is missing)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


SETTLED_FAULTS = 1000  # page faults per call below which the allocator counts as settled


def time_fn(
    fn: Callable[[], Any],
    warmup: int = 1,
    repeats: int = 5,
    sync: Callable[[], None] | None = None,
    settle: int = 0,
) -> Stats:
    """Seconds per call of `fn`: `warmup` untimed calls, then `repeats` timed ones.

    `settle` allows up to that many more untimed calls while the allocator is still growing
    its pool: while the last call took over `SETTLED_FAULTS` page faults and fewer than the
    call before it. (A memory-retaining allocator reaches a fault-free steady state after a
    few training steps; plain glibc faults the same amount every step, which is its steady
    state, so it is not waited for.)
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    sync = sync or (lambda: None)
    faults: list[int] = []  # page faults of each untimed call

    def untimed() -> None:
        before = minor_page_faults()
        fn()
        sync()
        faults.append(minor_page_faults() - before)

    for _ in range(warmup):
        untimed()
    for _ in range(settle):  # only after a warm-up call, while its faults still fall
        if not faults or faults[-1] <= SETTLED_FAULTS:
            break
        if len(faults) >= 2 and faults[-1] >= faults[-2]:
            break
        untimed()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return Stats.of(times)


GEMM_SIZE = 2048


def matmul_gflops(
    size: int = GEMM_SIZE,
    dtype: str = "float32",
    warmup: int = 2,
    repeats: int = 5,
    device: str = "cpu",
) -> dict[str, Any]:
    """This process's dense matmul rate: GFLOP/s of a size x size @ size x size product.

    On CUDA the result also names the GPU and torch's TF32 settings (left as they are).
    """
    dev = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator(dev).manual_seed(0)
    a = torch.randn(size, size, generator=gen, device=dev).to(torch_dtype)
    b = torch.randn(size, size, generator=gen, device=dev).to(torch_dtype)
    out = torch.empty(size, size, dtype=torch_dtype, device=dev)
    stats = time_fn(lambda: torch.matmul(a, b, out=out), warmup, repeats, synchronizer(dev))
    flops = 2 * size**3
    result = dict(
        gflops=flops / stats.median / 1e9,
        seconds=stats.as_dict(),
        size=size,
        dtype=dtype,
        threads=torch.get_num_threads(),
        device=str(dev),
    )
    if dev.type == "cuda":
        result.update(
            device_name=torch.cuda.get_device_name(dev),
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        )
    return result


# --- command-line values ---------------------------------------------------------------


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers, e.g. `1,32`."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,32, got {text!r}") from None


def choice_list(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """argparse type: comma-separated names, each one of `choices`."""

    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {unknown}; choose from {', '.join(choices)}"
            )
        return names

    return parse


# --- reporting ---------------------------------------------------------------------------


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, or None when either is missing or the reference is zero."""
    if value is None or not reference:
        return None
    return value / reference


def machine_info(threads: int | None = None, allocator: str | None = None) -> str:
    """One line naming the CPU, torch, threads and allocator a benchmark ran with."""
    cpu = "unknown CPU"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    parts = [f"{cpu} ({os.cpu_count()} logical cores)", f"torch {torch.__version__}"]
    if threads is not None:
        parts.append(f"{threads} threads")
    if allocator is not None:
        parts.append(f"allocator {allocator}")
    return ", ".join(parts)


@dataclass
class Column:
    """A table column: row key, header, and how a value is written in Markdown."""

    key: str
    header: str
    fmt: str = "{}"
    align: str | None = None  # "left" or "right"; None: right for numbers, left for text

    def format(self, value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, float) and value != value:  # NaN
            return "–"
        return self.fmt.format(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table; text columns left-aligned, numbers right-aligned."""
    right = [
        c.align == "right"
        if c.align
        else all(isinstance(r.get(c.key), (int, float)) or r.get(c.key) is None for r in rows)
        for c in columns
    ]
    lines = [
        "| " + " | ".join(c.header for c in columns) + " |",
        "|" + "|".join("---:" if r else "---" for r in right) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(c.format(r.get(c.key)) for c in columns) + " |")
    return "\n".join(lines)


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> Path:
    """Rows as CSV with raw (unformatted) values; missing values are empty."""
    path = Path(path)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(keys), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in keys})
    path.write_text(buf.getvalue())
    return path


@dataclass
class Panel:
    """One bar chart: a value per category for each series (e.g. per block, per width).

    `errors` optionally gives, per series, (low, high) lists drawn as error bars.
    """

    title: str
    ylabel: str
    categories: list[str]
    series: dict[str, list[float | None]]
    errors: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)


def bar_chart(path: str | Path, panels: Sequence[Panel], title: str = "") -> Path:
    """Grouped bar charts, one panel per metric, side by side, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.8 * len(panels), 4.6), squeeze=False, layout="constrained"
    )
    for ax, panel in zip(axes[0], panels):
        n = max(1, len(panel.series))
        width = 0.8 / n
        for i, (name, values) in enumerate(panel.series.items()):
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(panel.categories))]
            heights = [float("nan") if v is None else v for v in values]
            yerr = None
            if name in panel.errors:
                lo, hi = panel.errors[name]
                yerr = [
                    [max(0.0, h - low) for h, low in zip(heights, lo)],
                    [max(0.0, high - h) for h, high in zip(heights, hi)],
                ]
            ax.bar(xs, heights, width, label=name or None, yerr=yerr, capsize=3)
        ax.set_xticks(range(len(panel.categories)))
        ax.set_xticklabels(panel.categories, rotation=35, ha="right", fontsize=8)
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylabel(panel.ylabel)
        ax.grid(axis="y", alpha=0.3)
        if any(panel.series):
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(
    output: str | Path,
    stem: str,
    title: str,
    notes: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    csv_keys: Sequence[str],
    panels: Sequence[Panel],
) -> dict[str, Path]:
    """Write `<stem>.md` (title, notes, table), `<stem>.csv` and `<stem>.png` under `output`."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    md = f"# {title}\n\n" + "".join(f"- {n}\n" for n in notes)
    md += "\n" + markdown_table(rows, columns) + "\n"
    paths = dict(md=out / f"{stem}.md", csv=out / f"{stem}.csv", png=out / f"{stem}.png")
    paths["md"].write_text(md)
    write_csv(paths["csv"], rows, csv_keys)
    bar_chart(paths["png"], panels, title)
    return paths


def progress(message: str) -> None:
    """A progress line on stderr (stdout carries the tables)."""
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(_serve(json.loads(sys.argv[1])))
