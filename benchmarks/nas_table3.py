"""Table III analog: QuadraNet search vs MBConv (ProxylessNAS) search at equal latency targets.

For each space: profile a latency table on this machine (torch, batch 1, N threads), then for
three targets spanning both spaces search a network, retrain it from scratch with the same
budget, and measure its end-to-end latency, MACs, params and accuracy. Writes
`table3.md`, `table3.csv` and `pareto.png` (accuracy vs measured latency) under --out.

    OMP_NUM_THREADS=1 python benchmarks/nas_table3.py --threads 1 --out results/nas

Latency numbers are only meaningful on a quiet machine (no other process on the cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from quadranet.bench.measure import count_macs, count_params
from quadranet.bench.runner import Column, machine_info, markdown_table, progress, write_csv
from quadranet.data import dataset_info
from quadranet.engine import TrainConfig, train
from quadranet.models import create_model
from quadranet.nas.latency import LatencyTable, Runner, Setting, check, measure_arch, profile
from quadranet.nas.search import SearchOptions, search
from quadranet.nas.space import SearchSpace

SPACES = ("quadra", "mbconv")
RECIPE: dict[str, Any] = dict(
    batch_size=64,
    lr=2e-3,
    warmup_epochs=0,
    weight_decay=0.05,
    smoothing=0.0,
    mixup=0.0,
    cutmix=0.0,
    randaugment=None,
    reprob=0.0,
    hflip=0.0,
    ema=False,
    drop_path=0.0,
    workers=0,
    device="cpu",
    channels_last=False,
    quiet=True,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--dims", default="16,32,64,128")
    p.add_argument("--max-depths", default="2,2,4,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30, help="timed repeats per measurement")
    p.add_argument("--targets", default=None, help="comma-separated ms (default: spanning)")
    p.add_argument("--search-epochs", type=int, default=3)
    p.add_argument("--train-epochs", type=int, default=3)
    p.add_argument("--max-samples", type=int, default=4000, help="train images used")
    p.add_argument("--limit-val-batches", type=int, default=None)
    p.add_argument("--arch-lr", type=float, default=0.05)
    p.add_argument("--loss", choices=("hinge", "mul_log"), default="hinge")
    p.add_argument("--latency-lambda", type=float, default=2.0)
    p.add_argument("--layer-scale-init", type=float, default=0.1, help="QuadraBlocks in search")
    p.add_argument("--derive", choices=("argmax", "budget"), default="budget")
    p.add_argument("--statistic", choices=("median", "min"), default="median")
    p.add_argument("--check-samples", type=int, default=20)
    p.add_argument("--tables", default=None, help="folder with quadra.json/mbconv.json to reuse")
    p.add_argument("--out", default="results/nas")
    p.add_argument("--runs", default="runs/nas_table3", help="search and training run folders")
    return p.parse_args()


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def get_tables(args: argparse.Namespace, out: Path) -> dict[str, LatencyTable]:
    """Profile (or load) one table per space and check its prediction error."""
    info = dataset_info(args.dataset)
    setting = Setting(threads=args.threads, repeats=args.repeats, statistic=args.statistic)
    tables = {}
    for kind in SPACES:
        path = Path(args.tables) / f"{kind}.json" if args.tables else out / f"table_{kind}.json"
        if args.tables:
            tables[kind] = LatencyTable.load(path)
            continue
        space = SearchSpace(
            kind,
            ints(args.dims),
            ints(args.max_depths),
            img_size=args.img_size,
            in_chans=info.in_chans,
            num_classes=info.num_classes,
        )
        progress(f"profiling the {kind} space ...")
        tables[kind] = profile(space, setting)
        tables[kind].save(path)
    return tables


def latency_range(table: LatencyTable) -> tuple[float, float]:
    """Predicted ms of the cheapest and the most expensive architecture of the space."""
    space = table.space
    lo = hi = table.fixed_ms
    for stage, pos in space.positions():
        times = table.latency_vector(stage, space.choices(pos))
        lo, hi = lo + min(times), hi + max(times)
    return lo, hi


def spanning_targets(tables: dict[str, LatencyTable]) -> list[float]:
    """Three targets inside the latency range both spaces can reach."""
    ranges = [latency_range(t) for t in tables.values()]
    lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
    if hi <= lo:
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    return [round(lo + f * (hi - lo), 2) for f in (0.2, 0.45, 0.75)]


def run_one(
    args: argparse.Namespace, kind: str, table: LatencyTable, target: float, runs: Path
) -> dict[str, Any]:
    """Search under `target`, retrain the result, measure it."""
    name = f"{kind}-{target:g}ms"
    base = dict(
        RECIPE,
        dataset=args.dataset,
        img_size=args.img_size,
        max_samples=args.max_samples,
        limit_val_batches=args.limit_val_batches,
    )
    loss = args.loss if target > 1.0 else "hinge"
    options = SearchOptions(
        target_ms=target,
        loss=loss,
        latency_lambda=args.latency_lambda,
        arch_lr=args.arch_lr,
        arch_warmup_epochs=1,
        layer_scale_init=args.layer_scale_init,
        derive=args.derive,
    )
    start = time.perf_counter()
    cfg = TrainConfig.from_dict(
        {**base, "epochs": args.search_epochs, "output": str(runs / f"search-{name}")}
    )
    found = search(cfg, table, options, table_path=None)
    search_s = time.perf_counter() - start
    arch_path = found.arch_path
    cfg = TrainConfig.from_dict(
        {
            **base,
            "epochs": args.train_epochs,
            "arch": str(arch_path),
            "output": str(runs / f"train-{name}"),
        }
    )
    result = train(cfg)
    model = create_model(
        "quadranet_nas",
        arch=str(arch_path),
        num_classes=table.space.num_classes,
        in_chans=table.space.in_chans,
    )
    measured = measure_arch(found.arch, table.space, table.setting, Runner(table.setting))
    row = {
        "space": "QuadraNet" if kind == "quadra" else "MBConv (ProxylessNAS)",
        "target_ms": target,
        "predicted_ms": found.predicted_ms,
        "measured_ms": measured,
        "macs_m": count_macs(model, table.space.img_size, table.space.in_chans) / 1e6,
        "params_k": count_params(model) / 1e3,
        "top1": result.final.get("top1"),
        "depths": "-".join(map(str, found.arch.depths)),
        "search_s": search_s,
        "arch": str(arch_path),
    }
    progress(json.dumps(row))
    return row


COLUMNS = [
    Column("target_ms", "target (ms)", "{:.2f}"),
    Column("space", "space"),
    Column("measured_ms", "measured (ms)", "{:.3f}"),
    Column("predicted_ms", "table (ms)", "{:.3f}"),
    Column("macs_m", "MACs (M)", "{:.2f}"),
    Column("params_k", "params (k)", "{:.1f}"),
    Column("depths", "depths"),
    Column("top1", "top-1 (%)", "{:.2f}"),
]


def pareto_plot(rows: list[dict[str, Any]], targets: list[float], path: Path) -> None:
    """Accuracy vs measured latency, one series per space, the targets as dashed lines."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), layout="constrained")
    for space, marker in (("QuadraNet", "o"), ("MBConv (ProxylessNAS)", "s")):
        pts = sorted((r["measured_ms"], r["top1"]) for r in rows if r["space"] == space)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=space)
    for t in targets:
        ax.axvline(t, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("measured latency (ms, batch 1)")
    ax.set_ylabel("top-1 after retraining (%)")
    ax.set_title("searched networks under three latency targets (dashed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    tables = get_tables(args, out)
    notes = [f"machine: {machine_info(args.threads)}; torch backend, batch 1, fp32"]
    for kind, table in tables.items():
        result = check(table, args.check_samples, seed=0)
        (out / f"check_{kind}.json").write_text(json.dumps({"rows": result.rows}, indent=1))
        notes.append(f"{kind} table prediction: {result.summary()}")
        progress(notes[-1])
    targets = (
        [float(t) for t in args.targets.split(",")] if args.targets else spanning_targets(tables)
    )
    rows = [
        run_one(args, kind, tables[kind], target, runs) for target in targets for kind in SPACES
    ]
    notes.append(
        f"{args.dataset} at {args.img_size}px, {args.max_samples} train images (20% held out for "
        f"the architecture steps in search), search {args.search_epochs} epochs, retraining "
        f"{args.train_epochs} epochs, same recipe for both spaces; search loss {args.loss} "
        f"(lambda {args.latency_lambda:g}), arch lr {args.arch_lr:g}, QuadraBlock layer scale "
        f"{args.layer_scale_init:g} in the supernet, derivation {args.derive}; top-1 on "
        + (f"{args.limit_val_batches} val batches" if args.limit_val_batches else "the val split")
    )
    notes.append(f"latency statistic: {args.statistic} of {args.repeats} interleaved repeats")
    notes.append(f"total wall time {time.perf_counter() - wall:.0f} s")
    md = "# NAS Table III analog\n\n" + "".join(f"- {n}\n" for n in notes)
    md += "\n" + markdown_table(rows, COLUMNS) + "\n"
    (out / "table3.md").write_text(md)
    write_csv(out / "table3.csv", rows, [c.key for c in COLUMNS] + ["search_s", "arch"])
    pareto_plot(rows, targets, out / "pareto.png")
    print(md)


if __name__ == "__main__":
    main()
