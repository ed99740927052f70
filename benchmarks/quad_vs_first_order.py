"""Quadratic vs first-order neurons at equal width and depth (the paper's Table V claim).

Trains a small QuadraNet and its first-order twin (the same network with one depthwise
conv in place of the quadratic one) on bundled Animal-MNIST with the same budget and
recipe, for several seeds, through the shared engine. Writes a Markdown table, a CSV and
a PNG to --output.

    python benchmarks/quad_vs_first_order.py --epochs 10 --seeds 0 1
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from quadranet.engine import TrainConfig, train  # noqa: E402

# The pair: identical skeleton, only the spatial mixer differs.
PAIR = {"quadratic": "quadranet25_xxs", "first-order": "convnet25_xxs"}


def run(args: argparse.Namespace) -> list[dict]:
    """Train every (model, seed) pair and collect its summary."""
    rows = []
    for seed in args.seeds:
        for kind, model in PAIR.items():
            cfg = TrainConfig.from_yaml(
                args.config,
                model=model,
                model_kwargs=dict(
                    stem_stride=args.stem_stride,
                    depths=args.depths,
                    dims=args.dims,
                    layer_scale_init=args.layer_scale_init,
                ),
                dataset=args.dataset,
                epochs=args.epochs,
                seed=seed,
                output=str(args.output / f"{kind}-seed{seed}"),
                quiet=True,
            )
            result = train(cfg)
            s = result.summary
            rows.append(
                dict(
                    kind=kind,
                    model=model,
                    seed=seed,
                    params=s["params"],
                    macs=s["macs"],
                    best_top1=s["best_top1"],
                    final_top1=s["final_top1"],
                    images_per_s=s["images_per_s"],
                    wall_time_s=s["wall_time_s"],
                    curve=[r.get("val_top1") for r in result.history],
                )
            )
            print(
                f"{kind:12s} seed {seed}: final top-1 {s['final_top1']:.2f}  "
                f"best {s['best_top1']:.2f}  {s['wall_time_s']:.0f}s",
                flush=True,
            )
    return rows


def write(rows: list[dict], args: argparse.Namespace) -> None:
    """Markdown summary (mean over seeds), per-run CSV and a curve plot."""
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    keys = ["kind", "model", "seed", "params", "macs", "best_top1", "final_top1"]
    keys += ["images_per_s", "wall_time_s"]
    with open(out / "quad_vs_first_order.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"Animal-MNIST, {args.epochs} epochs, seeds {', '.join(map(str, args.seeds))}, "
        f"depths {args.depths}, dims {args.dims}, stem stride {args.stem_stride}, "
        f"recipe {args.config}",
        "",
        "| neurons | model | params | MMACs | final top-1 per seed | mean final top-1 "
        "| mean best top-1 | train img/s |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for kind in PAIR:
        rs = [r for r in rows if r["kind"] == kind]
        finals = [r["final_top1"] for r in rs]
        lines.append(
            f"| {kind} | {rs[0]['model']} | {rs[0]['params']:,} | {rs[0]['macs'] / 1e6:.1f} | "
            f"{', '.join(f'{v:.2f}' for v in finals)} | {statistics.mean(finals):.2f} | "
            f"{statistics.mean(r['best_top1'] for r in rs):.2f} | "
            f"{statistics.mean(r['images_per_s'] for r in rs):.0f} |"
        )
    (out / "quad_vs_first_order.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        style = "-" if r["kind"] == "quadratic" else "--"
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], style, label=f"{r['kind']} s{r['seed']}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("Animal-MNIST: quadratic vs first-order")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "quad_vs_first_order.png", dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="src/quadranet/configs/demo_mnist.yaml")
    p.add_argument("--dataset", default="animal-mnist")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--depths", type=int, nargs="+", default=[2, 2, 2])
    p.add_argument("--dims", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--stem-stride", type=int, default=2)
    p.add_argument("--layer-scale-init", type=float, default=1.0)
    p.add_argument("--output", type=Path, default=Path("results/quad_vs_first_order"))
    args = p.parse_args()
    write(run(args), args)


if __name__ == "__main__":
    main()
