"""Table I over several runs of `quadranet bench throughput`, as tables for the docs.

One run on a shared CPU moves the ratios by several percent, so the README and
docs/benchmarks.md quote them over repeated runs of the same command. This script reads
each run's `throughput.csv` and writes, under `--output`:

- `ratios.md`: one column a run; the model's (`--model`) inference and training speed
  against each of `--against`, and its peak training RSS against the first of them;
- `summary.md`: the first run's img/s and peak training RSS of each model, and the
  model's speed and peak training RSS against each over all runs (lowest-highest).

    python benchmarks/throughput_runs.py results/bench_throughput_xeon \
        results/bench_throughput_xeon_b --output results/bench_throughput_xeon_runs

`benchmarks/docs_tables.py` then copies the tables into the documents that mark them.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
from pathlib import Path

AGAINST = ("hornet_t", "swin_tiny_patch4_window7_224", "convnext_tiny")
KINDS = (("inference", "infer_ips"), ("training", "train_ips"))


def read_run(folder: Path) -> dict[str, dict[str, float]]:
    """model -> its row of the run's throughput.csv (numbers as floats)."""
    path = folder / "throughput.csv"
    if not path.is_file():
        raise SystemExit(f"{path} not found: give folders written by quadranet bench throughput")
    with path.open(newline="") as f:
        return {row["model"]: {k: float(v or "nan") for k, v in row.items() if k != "model"}
                for row in csv.DictReader(f)}  # fmt: skip


def _range(values: list[float]) -> str:
    low, high = f"{min(values):.2f}", f"{max(values):.2f}"
    return f"{low}x" if low == high else f"{low}-{high}x"


def tables(runs: dict[str, dict], model: str, against: list[str]) -> tuple[list[str], list[str]]:
    """(ratios.md table lines, summary.md table lines) for runs {label: read_run(...)}."""
    for label, run in runs.items():
        missing = [m for m in (model, *against) if m not in run]
        if missing:
            raise SystemExit(f"run {label} has no row for {missing}")

    def speed(run: dict, other: str, key: str) -> float:
        return run[model][key] / run[other][key]

    labels = list(runs)
    ratios = [f"| {model} vs | " + " | ".join(f"run {i + 1} (`{label}`)"
                                               for i, label in enumerate(labels)) + " |",
              "|---|" + "---:|" * len(labels)]  # fmt: skip
    for kind, key in KINDS:
        for other in against:
            cells = [f"{speed(run, other, key):.2f}x" for run in runs.values()]
            ratios.append(f"| {other}, {kind} | " + " | ".join(cells) + " |")
    rss = [
        run[model]["peak_train_mib"] / run[against[0]]["peak_train_mib"] for run in runs.values()
    ]
    ratios.append(
        f"| peak training RSS / {against[0]} | " + " | ".join(f"{r:.2f}x" for r in rss) + " |"
    )

    first = runs[labels[0]]
    summary = [
        f"| model | inference img/s | training img/s | peak train RSS (MiB) | {model} inference"
        f" / model | {model} training / model | {model} peak train RSS / model |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in (model, *against):
        row = first[name]
        spans = [_range([speed(run, name, key) for run in runs.values()]) for _, key in KINDS]
        rss = [run[model]["peak_train_mib"] / run[name]["peak_train_mib"] for run in runs.values()]
        summary.append(
            f"| {name} | {row['infer_ips']:.1f} | {row['train_ips']:.1f} | "
            f"{row['peak_train_mib']:,.0f} | {spans[0]} | {spans[1]} | {_range(rss)} |"
        )
    return ratios, summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="folders of quadranet bench throughput")
    p.add_argument(
        "--model", default="quadranet36_t", help="the model compared (default %(default)s)"
    )
    p.add_argument(
        "--against", nargs="+", default=list(AGAINST), help="the models it is compared with"
    )
    p.add_argument("--output", type=Path, required=True, help="folder for ratios.md and summary.md")
    args = p.parse_args(argv)
    runs = {folder.name: read_run(folder) for folder in args.runs}
    if len(runs) < len(args.runs):
        raise SystemExit("two runs share a folder name, which labels them: rename one")
    ratios, summary = tables(runs, args.model, args.against)
    command = shlex.join(["python", "benchmarks/throughput_runs.py", *argv])
    args.output.mkdir(parents=True, exist_ok=True)
    for name, title, lines in (
        ("ratios.md", f"{args.model}'s speed against each model, run by run", ratios),
        (
            "summary.md",
            f"Table I: the first run's img/s, {args.model}'s ratios over all runs",
            summary,
        ),
    ):
        text = f"# {title}\n\nMade by `{command}`.\n\n" + "\n".join(lines) + "\n"
        (args.output / name).write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
