"""Quadratic adaptation vs training from scratch, by accuracy against training compute.

Three runs through the shared engine, on bundled Animal-MNIST with one recipe (a YAML
preset) for all:
  (a) the first-order twin (convnet) trained for --epochs,
  (b) the QuadraNet of the same size trained from scratch for --epochs,
  (c) (a)'s final weights quadratized and fine-tuned for --adapt-epochs (once training
      everything, once in adapter mode where only the new A, B parts train).
Compute is counted as training images processed and training wall time (validation
excluded). Writes a Markdown table, a per-epoch CSV and a PNG to --output.

    OMP_NUM_THREADS=1 python benchmarks/adapt_experiment.py
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from quadranet.adapt import fine_tune, load_first_order, quadratize  # noqa: E402
from quadranet.engine import TrainConfig, TrainResult, evaluate, train  # noqa: E402

FIRST_ORDER, QUADRATIC = "convnet25_xxs", "quadranet25_xxs"
ADAPT_MODES = {"adapted": False, "adapted-adapter-only": True}  # run name -> adapter_only


def curve(result: TrainResult, batch_size: int) -> list[dict[str, Any]]:
    """Per epoch: cumulative training images and seconds, and validation top-1."""
    rows, seconds = [], 0.0
    for r in result.history:
        seconds += r["epoch_time_s"]
        rows.append(
            dict(
                epoch=r["epoch"] + 1,
                images=r["step"] * batch_size,
                train_s=seconds,
                val_top1=r["val_top1"],
                val_top1_ema=r.get("val_top1_ema"),
            )
        )
    return rows


def base_config(args: argparse.Namespace, model: str, run: str, epochs: int) -> TrainConfig:
    """The shared recipe with this run's model, budget and output folder."""
    return TrainConfig.from_yaml(
        args.config,
        model=model,
        model_kwargs=dict(
            stem_stride=args.stem_stride,
            depths=args.depths,
            dims=args.dims,
            layer_scale_init=args.layer_scale_init,
        ),
        dataset=args.dataset,
        epochs=epochs,
        seed=args.seed,
        max_samples=args.max_samples,
        output=str(args.runs / run),
        quiet=True,
    )


def run(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Train (a), (b) and the adapted runs; returns their curves by run name."""
    curves = {}
    for name, model in (("first-order", FIRST_ORDER), ("quadratic-scratch", QUADRATIC)):
        cfg = base_config(args, model, name, args.epochs)
        curves[name] = curve(train(cfg), cfg.batch_size)
        print(f"{name}: final top-1 {curves[name][-1]['val_top1']:.2f}", flush=True)
    source = args.runs / "first-order" / "last.safetensors"
    for name, adapter_only in ADAPT_MODES.items():
        cfg = base_config(args, FIRST_ORDER, name, args.adapt_epochs)
        converted = quadratize(load_first_order(cfg, source)[0], adapter_only=adapter_only)
        start = evaluate(cfg, model=converted)["top1"]  # the converted net, before any step
        result = fine_tune(cfg, source, adapter_only=adapter_only)
        first = dict(epoch=0, images=0, train_s=0.0, val_top1=start, val_top1_ema=start)
        curves[name] = [first, *curve(result, cfg.batch_size)]
        print(f"{name}: at conversion {start:.2f}, final {curves[name][-1]['val_top1']:.2f}")
    return curves


METRICS = {"val_top1": "with the trained weights", "val_top1_ema": "with the EMA weights"}


def first_reaching(rows: list[dict[str, Any]], metric: str, target: float) -> dict | None:
    """The first epoch whose `metric` reaches `target`, or None."""
    return next((r for r in rows if r[metric] >= target), None)


def reach_line(rows: list[dict[str, Any]], metric: str, a: dict, b: dict) -> str:
    """How much compute an adapted run needed to reach (b)'s final value of `metric`."""
    target = b[metric]
    hit = first_reaching(rows, metric, target)
    head = f"{METRICS[metric]} ({target:.2f}%): "
    if hit is None:
        best = max(r[metric] for r in rows)
        return head + f"not reached in {rows[-1]['epoch']} epochs (best {best:.2f}%)"
    return head + (
        f"reached after {hit['epoch']} epochs, {hit['images']:,} images "
        f"({100 * hit['images'] / b['images']:.0f}% of (b)'s) and {hit['train_s']:.0f} s "
        f"({100 * hit['train_s'] / b['train_s']:.0f}% of (b)'s); counting (a)'s training too, "
        f"{(a['images'] + hit['images']) / b['images']:.2f}x (b)'s images"
    )


def write(curves: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    """CSV of every epoch, Markdown summary, accuracy-vs-compute plot."""
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "adapt_experiment.csv", "w", newline="") as f:
        keys = ["run", "epoch", "images", "train_s", "val_top1", "val_top1_ema"]
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for name, rows in curves.items():
            writer.writerows({"run": name, **r} for r in rows)

    a, b = curves["first-order"][-1], curves["quadratic-scratch"][-1]
    lines = [
        f"{args.dataset}, recipe {args.config}, depths {args.depths}, dims {args.dims}, "
        f"stem stride {args.stem_stride}, layer scale {args.layer_scale_init}, seed {args.seed}; "
        f"(a), (b): {args.epochs} epochs, (c): {args.adapt_epochs} epochs from (a). "
        "Top-1 of the trained weights (EMA in brackets); compute = training images and "
        "training seconds (validation excluded), wall time measured on a shared 2-core CPU.",
        "",
        "| run | epochs | final top-1 (EMA) | train images | train time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rows in curves.items():
        r = rows[-1]
        lines.append(
            f"| {name} | {r['epoch']} | {r['val_top1']:.2f} ({r['val_top1_ema']:.2f}) | "
            f"{r['images']:,} | {r['train_s']:.0f} |"
        )
    lines += [
        "",
        f"Target: (b)'s final top-1, {b['val_top1']:.2f}% after {b['images']:,} images "
        f"({b['train_s']:.0f} s). (a) reached {a['val_top1']:.2f}% with {a['images']:,} images. "
        "One point per epoch; (c) fine-tunes with the same recipe (its own warm-up and cosine).",
        "",
    ]
    for name in ADAPT_MODES:
        rows = curves[name]
        lines.append(
            f"- {name}: {rows[0]['val_top1']:.2f}% right after conversion ((a) final: "
            f"{a['val_top1']:.2f}%). Reaching (b)'s final top-1 "
        )
        lines[-1] += "; ".join(reach_line(rows, m, a, b) for m in METRICS) + "."
    text = "\n".join(lines) + "\n"
    (out / "adapt_experiment.md").write_text(text)
    print(text)
    plot(curves, out / "adapt_experiment.png", b["val_top1"])


def plot(curves: dict[str, list[dict[str, Any]]], path: Path, target: float) -> None:
    """Val top-1 against training images and training seconds; (c) starts where (a) ends."""
    offset = curves["first-order"][-1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in (
        (axes[0], "images", "training images"),
        (axes[1], "train_s", "training seconds"),
    ):
        for name, rows in curves.items():
            shift = offset[key] if name in ADAPT_MODES else 0
            xs = [shift + r[key] for r in rows]
            ax.plot(xs, [r["val_top1"] for r in rows], "-o", ms=3, label=name)
        ax.axhline(target, color="gray", ls=":", label="(b) final")
        ax.set_xlabel(f"cumulative {label} (adapted runs start after (a))")
        ax.set_ylabel("val top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Quadratic adaptation vs training from scratch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="src/quadranet/configs/demo_mnist.yaml")
    p.add_argument("--dataset", default="animal-mnist")
    p.add_argument("--epochs", type=int, default=10, help="budget of (a) and (b)")
    p.add_argument("--adapt-epochs", type=int, default=4, help="budget of (c)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depths", type=int, nargs="+", default=[2, 2, 2])
    p.add_argument("--dims", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--stem-stride", type=int, default=4)
    p.add_argument("--layer-scale-init", type=float, default=1.0)
    p.add_argument("--max-samples", type=int, help="images per split (quick checks only)")
    p.add_argument("--runs", type=Path, default=Path("runs/adapt_experiment"))
    p.add_argument("--output", type=Path, default=Path("results/adapt"))
    args = p.parse_args()
    write(run(args), args)


if __name__ == "__main__":
    main()
