"""INT8 post-training quantization of engine-trained models: size, accuracy and latency.

For each run folder written by `quadranet train` (e.g. the MNIST demo model): export the
best weights to ONNX (fp32), quantize to 8 bits with ONNX Runtime (static, QDQ, int8
per-channel weights of 7 bits, uint8 activations, calibrated on training images), then report both
files' size, their top-1 on
the whole val split next to PyTorch's, and their ONNX Runtime latency (median of repeats
after warm-up, in this process, `--threads` intra-op threads).

    python benchmarks/int8_experiment.py runs/int8-mnist runs/int8-animal --output results/int8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from quadranet.bench.runner import Column, Panel, machine_info, time_fn, write_report
from quadranet.engine.train import evaluate
from quadranet.export import OnnxModel, check_parity, export_onnx, load_model
from quadranet.quantize import (
    OP_TYPE_CHOICES,
    calibration_images,
    evaluate_onnx,
    quantize_int8,
)

MiB = 2**20


def run_one(
    run: str,
    out_dir: Path,
    calib_samples: int,
    method: str,
    variants: list[str],
    batches: list[int],
    threads: int,
    warmup: int,
    repeats: int,
) -> list[dict[str, Any]]:
    """Export, quantize (one row per set of quantized ops), evaluate and time one run."""
    loaded = load_model(checkpoint=run)
    if loaded.dataset is None:
        raise ValueError(f"{run} stores no dataset; pass a run folder written by quadranet train")
    stem = Path(run).name
    fp32_path = out_dir / f"{stem}.onnx"
    export_onnx(loaded.model, fp32_path, loaded.in_chans, loaded.img_size)
    check_parity(loaded.model, fp32_path, loaded.in_chans, loaded.img_size, loaded.dataset)
    images = calibration_images(loaded.dataset, loaded.in_chans, loaded.img_size, calib_samples)
    torch_top1 = evaluate(checkpoint=run)["top1"]
    fp32 = OnnxModel(fp32_path, threads)
    fp32_top1 = evaluate_onnx(fp32, loaded.dataset, loaded.img_size)["top1"]
    rng = np.random.default_rng(0)
    inputs = {
        b: rng.standard_normal((b, loaded.in_chans, loaded.img_size, loaded.img_size)).astype(
            np.float32
        )
        for b in batches
    }

    def latency(model: OnnxModel, batch: int) -> float:
        x = inputs[batch]
        return 1e3 * time_fn(lambda: model(x), warmup, repeats).median

    fp32_ms = {b: latency(fp32, b) for b in batches}
    rows = []
    for ops in variants:
        int8_path = out_dir / f"{stem}.{ops}.int8.onnx"
        quant = quantize_int8(
            fp32_path, int8_path, images, method=method, op_types=OP_TYPE_CHOICES[ops]
        )
        int8 = OnnxModel(int8_path, threads)
        int8_top1 = evaluate_onnx(int8, loaded.dataset, loaded.img_size)["top1"]
        row: dict[str, Any] = dict(
            run=stem,
            dataset=loaded.dataset,
            model=loaded.name,
            ops=ops,
            params_k=sum(p.numel() for p in loaded.model.parameters()) / 1e3,
            fp32_mib=quant.fp32_bytes / MiB,
            int8_mib=quant.int8_bytes / MiB,
            size_ratio=quant.size_ratio,
            torch_top1=torch_top1,
            fp32_top1=fp32_top1,
            int8_top1=int8_top1,
            drop=fp32_top1 - int8_top1,
        )
        for b in batches:
            row[f"fp32_ms_b{b}"] = fp32_ms[b]
            row[f"int8_ms_b{b}"] = latency(int8, b)
            row[f"speedup_b{b}"] = fp32_ms[b] / row[f"int8_ms_b{b}"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders of `quadranet train`")
    parser.add_argument("--calib-samples", type=int, default=256, help="calibration images")
    parser.add_argument("--method", default="minmax", help="minmax, entropy or percentile")
    parser.add_argument(
        "--ops",
        default="matmul-conv,all",
        help="comma-separated sets of quantized ops: matmul-conv (Conv/MatMul/Gemm), all",
    )
    parser.add_argument("--batches", default="1,64", help="batch sizes to time")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", default="results/int8", help="folder for the outputs")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    variants = [v.strip() for v in args.ops.split(",") if v.strip()]
    bad = [v for v in variants if v not in OP_TYPE_CHOICES]
    if bad:
        parser.error(f"--ops takes {', '.join(OP_TYPE_CHOICES)}, got {bad}")
    with tempfile.TemporaryDirectory(prefix="quadranet-int8-") as tmp:
        rows = [
            row
            for run in args.runs
            for row in run_one(
                run,
                Path(tmp),
                args.calib_samples,
                args.method,
                variants,
                batches,
                args.threads,
                args.warmup,
                args.repeats,
            )
        ]
    columns = [
        Column("dataset", "dataset"),
        Column("model", "model"),
        Column("ops", "quantized ops"),
        Column("params_k", "params (K)", "{:.0f}"),
        Column("fp32_mib", "fp32 MiB", "{:.3f}"),
        Column("int8_mib", "int8 MiB", "{:.3f}"),
        Column("size_ratio", "int8 / fp32 size", "{:.2f}x"),
        Column("torch_top1", "PyTorch top-1", "{:.2f}"),
        Column("fp32_top1", "ONNX fp32 top-1", "{:.2f}"),
        Column("int8_top1", "ONNX int8 top-1", "{:.2f}"),
        Column("drop", "drop (points)", "{:+.2f}"),
    ]
    for b in batches:
        columns += [
            Column(f"fp32_ms_b{b}", f"fp32 ms (b{b})", "{:.2f}"),
            Column(f"int8_ms_b{b}", f"int8 ms (b{b})", "{:.2f}"),
            Column(f"speedup_b{b}", f"speedup (b{b})", "{:.2f}x"),
        ]
    names = [f"{r['dataset']} ({r['ops']})" for r in rows]
    panels = [
        Panel(
            "top-1 (%)", "%", names, {k: [r[f"{k}_top1"] for r in rows] for k in ("fp32", "int8")}
        ),
        Panel(
            "file size", "MiB", names, {k: [r[f"{k}_mib"] for r in rows] for k in ("fp32", "int8")}
        ),
        *(
            Panel(
                f"latency, batch {b}",
                "ms",
                names,
                {k: [r[f"{k}_ms_b{b}"] for r in rows] for k in ("fp32", "int8")},
            )
            for b in batches
        ),
    ]
    notes = [
        "static post-training quantization (ONNX Runtime, QDQ, int8 weights per channel "
        "with a 7-bit range against int16 saturation on CPUs without VNNI, uint8 "
        f"activations), {args.method} calibration on {args.calib_samples} training "
        "images; quantized ops: matmul-conv = Conv/MatMul/Gemm (norms, GELU and the quadratic "
        "product stay fp32), all = every op ONNX Runtime quantizes",
        "top-1 on the whole val split (MNIST: the 10,000 test images; Animal-MNIST: the "
        "held-out 15%); PyTorch: the engine's `evaluate` of the same weights",
        f"latency: ONNX Runtime CPU, {args.threads} thread(s), median of {args.repeats} calls "
        f"after {args.warmup} warm-up calls",
        f"machine: {machine_info(args.threads)}",
    ]
    paths = write_report(
        args.output,
        "int8",
        "INT8 post-training quantization (ONNX Runtime)",
        notes,
        rows,
        columns,
        [c.key for c in columns],
        panels,
    )
    paths["json"] = Path(args.output) / "int8_raw.json"
    paths["json"].write_text(json.dumps(dict(settings=vars(args), rows=rows), indent=1))
    print(paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
