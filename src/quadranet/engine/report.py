"""Run outputs: metrics as JSON lines, a PNG of the learning curves and a markdown report."""

from __future__ import annotations

import io
import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from quadranet.bench import measure
from quadranet.engine.checkpoint import atomic_write

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "curves.png"
REPORT_NAME = "report.md"


def append_metrics(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete JSON lines of a metrics file (a torn last line is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: str | Path, before_epoch: int) -> list[dict[str, Any]]:
    """Keep only records of epochs < `before_epoch` (used on resume); returns them."""
    kept = [r for r in read_metrics(path) if r.get("epoch", 0) < before_epoch]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    atomic_write(path, lambda f: f.write(text.encode()))
    return kept


def plot_curves(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Plot train/val loss and top-1 per epoch to a PNG (None when there is nothing to plot);
    `title` names the run (model, data, device)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] + 1 for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label, ax in (
        ("train_loss", "train", ax_loss),
        ("val_loss", "val", ax_loss),
        ("train_top1", "train", ax_acc),
        ("val_top1", "val", ax_acc),
        ("val_top1_ema", "val (EMA)", ax_acc),
    ):
        points = [(e, r[key]) for e, r in zip(epochs, history) if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    from matplotlib.ticker import MaxNLocator

    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA allocator peak, or max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def count_macs(model: torch.nn.Module, img_size: int, in_chans: int) -> int | None:
    """MACs of one image through the model (None for a model the counter cannot trace)."""
    try:
        return int(measure.count_macs(model, img_size, in_chans))
    except Exception:  # a model the counter cannot trace: leave MACs out of the report
        return None


def _fmt(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    """A number formatted, or 'n/a'."""
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def write_report(path: str | Path, summary: dict[str, Any]) -> Path:
    """Write a short markdown report of a finished run."""
    s = summary
    macs = s.get("macs")
    kwargs = ", ".join(f"{k}={v}" for k, v in (s.get("model_kwargs") or {}).items())
    lines = [
        f"# Training report: {s['model']} on {s['dataset']}",
        "",
        "| item | value |",
        "|---|---|",
        f"| model | `{s['model']}`" + (f" ({kwargs})" if kwargs else "") + " |",
        f"| initial weights | {s.get('initial_weights', 'random initialisation')} |",
        f"| parameters | {s['params']:,} |",
        f"| MACs / image | {'n/a' if macs is None else f'{macs / 1e6:.2f} M'} |",
        f"| input | {s['in_chans']}x{s['img_size']}x{s['img_size']}, {s['num_classes']} classes |",
        f"| epochs | {s['epochs']} (global batch {s['global_batch']}, lr {s['lr']:.3g}) |",
        f"| best top-1 | {_fmt(s.get('best_top1'), '.2f', ' %')} (epoch {s.get('best_epoch')}"
        + (", EMA weights: `eval --ema`" if s.get("best_source") == "EMA" else "")
        + ") |",
        f"| final top-1 | {_fmt(s.get('final_top1'), '.2f', ' %')} |",
        f"| final top-1 (EMA) | {_fmt(s.get('final_top1_ema'), '.2f', ' %')} |",
        f"| final top-5 | {_fmt(s.get('final_top5'), '.2f', ' %')} |",
        f"| train throughput | {_fmt(s.get('images_per_s'), '.0f', ' images/s')} |",
        f"| peak memory | {_fmt(s.get('peak_memory_mb'), '.0f', ' MiB')} ({s['memory_kind']}) |",
        f"| wall time | {_fmt(s.get('wall_time_s'), '.1f', ' s')} |",
        f"| hardware | {s['device']} x{s['world_size']}, amp {s['amp']}, "
        f"channels-last {s['channels_last']}"
        + (", grad checkpointing" if s.get("grad_checkpointing") else "")
        + " |",
        f"| started / finished | {s.get('started', 'n/a')} / {s.get('finished', 'n/a')} |",
        f"| versions | {s.get('versions', 'n/a')} |",
        f"| source | {s.get('source', 'n/a')} |",
        "",
        f"Command: `{s.get('command', 'n/a')}`",
        "",
        f"Curves: `{PLOT_NAME}`; per-epoch metrics: `{METRICS_NAME}`; weights: "
        "`best.safetensors`, `last.safetensors`; training state: `last.pt`.",
        "",
    ]
    text = "\n".join(lines)
    return atomic_write(path, lambda f: f.write(text.encode()))


def run_provenance() -> dict[str, str]:
    """Versions, the source's git commit (when it is a checkout) and the command line."""
    import os
    import platform
    import shlex
    import subprocess

    import timm

    from quadranet import __version__

    versions = (
        f"quadranet {__version__}, torch {torch.__version__}, timm {timm.__version__}, "
        f"Python {platform.python_version()}"
    )
    source = "not a git checkout"
    try:
        here = Path(__file__).resolve().parent
        done = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
        if done.returncode == 0 and done.stdout.strip():
            source = f"git {done.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    prog = Path(sys.argv[0]).name  # a script's name; ours also under python -m and torchrun
    prog = "quadranet" if prog in ("quadranet", "cli.py", "__main__.py") else prog
    command = shlex.join([prog, *sys.argv[1:]])
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        module = "-m " if prog == "quadranet" else ""
        command = f"torchrun --nproc_per_node {processes} {module}{command}"
    return dict(versions=versions, source=source, command=command)
