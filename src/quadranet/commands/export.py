"""`quadranet export`: a model to ONNX, checked in ONNX Runtime, optionally quantized to int8."""

from __future__ import annotations

import argparse
from pathlib import Path

from quadranet.commands import at_least
from quadranet.data import dataset_info
from quadranet.engine.config import _KeyValueAction
from quadranet.export import (
    DEFAULT_TOLERANCE,
    EXPORTERS,
    MAX_OPSET,
    MIN_OPSET,
    atomic_output,
    check_opset,
    check_output,
    check_parity,
    export_onnx,
    graph_op_counts,
    load_model,
)

FORMATS = ("onnx",)
QUANTIZATIONS = ("int8",)


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _int8_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.int8{path.suffix}")


def _quantized_output(args: argparse.Namespace, fp32_path: Path) -> Path:
    """The int8 file to write, checked to be writable and not the fp32 file."""
    out = check_output(args.quantized_output or _int8_path(fp32_path))
    if out.resolve() == fp32_path.resolve():
        raise ValueError("the int8 output must not overwrite the fp32 model; pick another -o")
    return out


def _cmd_export(args: argparse.Namespace) -> int:
    if args.name is None and args.arch is None and args.checkpoint is None:
        raise ValueError("give a model NAME, --arch arch.json, or --checkpoint RUN")
    check_opset(args.opset, args.exporter)  # before any slow work
    for name in (args.parity_dataset, args.eval_dataset, args.calib_dataset):
        if name is not None:
            dataset_info(name)  # a misspelt dataset is an error now, not after the export
    out = check_output(args.output)
    if args.quantize:
        _quantized_output(args, out)
    loaded = load_model(
        args.name,
        arch=args.arch,
        checkpoint=args.checkpoint,
        use_ema=args.ema,
        img_size=args.img_size,
        num_classes=args.num_classes,
        in_chans=args.in_chans,
        model_kwargs=args.model_kwargs,
    )
    if args.evaluate and not loaded.num_classes:
        raise ValueError("--evaluate needs a classifier; drop --num-classes 0")
    classes = f"{loaded.num_classes} classes" if loaded.num_classes else "no classifier"
    print(
        f"exporting {loaded.name} ({loaded.in_chans}x{loaded.img_size}x{loaded.img_size} input, "
        f"{classes}) to {out}"
    )
    result = export_onnx(
        loaded.model,
        out,
        loaded.in_chans,
        loaded.img_size,
        dynamic_batch=args.dynamic_batch,
        opset=args.opset,
        exporter=args.exporter,
    )
    if result.fallback_reason:
        print(f"the dynamo exporter failed ({result.fallback_reason}); used the TorchScript one")
    batch = "dynamic batch" if result.dynamic_batch else "batch 1"
    ops = graph_op_counts(out)
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB) with the {result.exporter} exporter, "
        f"opset {result.opset}, {batch}; {sum(ops.values())} nodes: "
        + ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1]))
    )
    dataset = args.parity_dataset or loaded.dataset
    if args.check:
        for line in check_parity(
            loaded.model,
            out,
            loaded.in_chans,
            loaded.img_size,
            dataset,
            args.parity_samples,
            args.tolerance,
        ):
            print(line.line())
    eval_dataset = args.eval_dataset or loaded.dataset
    if args.evaluate and eval_dataset is None:
        raise ValueError("--evaluate needs --eval-dataset (the model has no checkpoint dataset)")
    if args.quantize:
        _quantize(args, loaded, out, eval_dataset)
    elif args.evaluate:
        _report_accuracy("fp32", out, eval_dataset, loaded.img_size, args.eval_samples)
    return 0


def _quantize(args: argparse.Namespace, loaded, fp32_path: Path, eval_dataset: str | None) -> None:
    from quadranet.quantize import OP_TYPE_CHOICES, calibration_images, quantize_int8

    calib = args.calib_dataset or loaded.dataset or ("mnist" if loaded.in_chans == 1 else None)
    if calib is None:
        raise ValueError("--quantize int8 needs --calib-dataset (e.g. mnist or animal-mnist)")
    images = calibration_images(calib, loaded.in_chans, loaded.img_size, args.calib_samples)
    out = _quantized_output(args, fp32_path)
    with atomic_output(out) as tmp:  # an existing int8 file survives a failed write
        result = quantize_int8(
            fp32_path,
            tmp,
            images,
            method=args.calib_method,
            quant_format=args.quant_format,
            activation_type=args.activation_type,
            reduce_range=args.reduce_range,
            op_types=OP_TYPE_CHOICES[args.quant_ops],
        )
    print(
        f"wrote {out}: int8 weights, {result.activation_type} activations of "
        f"{args.quant_ops} ops ({result.quant_format}, {result.method} calibration on "
        f"{result.calib_samples} {calib} training images), {result.int8_bytes / 2**20:.2f} MiB "
        f"= {100 * result.size_ratio:.0f}% of the fp32 file"
    )
    if args.evaluate:
        fp32 = _report_accuracy("fp32", fp32_path, eval_dataset, loaded.img_size, args.eval_samples)
        int8 = _report_accuracy("int8", out, eval_dataset, loaded.img_size, args.eval_samples)
        print(f"int8 - fp32 top-1: {int8 - fp32:+.2f} points")


def _report_accuracy(
    label: str, path: Path, dataset: str, img_size: int, limit: int | None
) -> float:
    from quadranet.quantize import evaluate_onnx

    result = evaluate_onnx(path, dataset, img_size, limit=limit)
    print(f"{label} ONNX top-1 on {dataset} val: {result['top1']:.2f}% ({result['count']} images)")
    return result["top1"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `quadranet export`."""
    p = sub.add_parser(
        "export",
        help="export a model to ONNX, check it in ONNX Runtime, optionally quantize to int8",
        description=(
            "Export with PyTorch's dynamo ONNX exporter (the TorchScript exporter if it fails), "
            "then compare ONNX Runtime with PyTorch on random and real images."
        ),
    )
    p.add_argument("name", nargs="?", help="model name (default: the checkpoint's model)")
    p.add_argument("--arch", help="architecture JSON from `quadranet search` (quadranet_nas)")
    p.add_argument("--checkpoint", help="run folder or .safetensors/.pt file to load weights from")
    p.add_argument("--ema", action="store_true", help="load the checkpoint's EMA weights")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="output format (onnx)")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument(
        "--dynamic-batch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="symbolic batch dimension (default on; off: the file takes batch 1 only)",
    )
    p.add_argument("--opset", type=int, help=f"ONNX opset ({MIN_OPSET}-{MAX_OPSET}; default 20)")
    p.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="auto",
        help="auto (default): dynamo, else TorchScript",
    )
    p.add_argument("--img-size", type=at_least(1), help="input side (default: checkpoint's or 224)")
    p.add_argument(
        "--num-classes",
        type=at_least(0),
        help="classes (default: checkpoint's or 1000; 0: no classifier, pooled features out)",
    )
    p.add_argument(
        "--in-chans", type=at_least(1), help="input channels (default: checkpoint's or 3)"
    )
    p.add_argument(
        "--model-kwargs",
        nargs="+",
        action=_KeyValueAction,
        default={},
        metavar="KEY=VALUE",
        help="extra create_model kwargs, e.g. stem_stride=2 depths=[1,1,1]",
    )
    p.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ONNX Runtime parity check (default on)",
    )
    p.add_argument("--parity-dataset", help="real images for the check (default: checkpoint's)")
    p.add_argument(
        "--parity-samples",
        type=at_least(1),
        default=16,
        help="images per parity batch (default 16)",
    )
    p.add_argument(
        "--tolerance",
        type=_tolerance,
        default=DEFAULT_TOLERANCE,
        help="max |onnx-torch|/max|torch| (default 1e-4)",
    )
    p.add_argument("--quantize", choices=QUANTIZATIONS, help="also write a quantized model")
    p.add_argument("--quantized-output", help="int8 file (default: <output>.int8.onnx)")
    p.add_argument("--calib-dataset", help="calibration images (default: checkpoint's dataset)")
    p.add_argument(
        "--calib-samples", type=at_least(1), default=256, help="calibration images (default 256)"
    )
    p.add_argument(
        "--calib-method",
        choices=("minmax", "entropy", "percentile"),
        default="minmax",
        help="how activation ranges are set (default minmax)",
    )
    p.add_argument(
        "--quant-format", choices=("qdq", "qoperator"), default="qdq", help="default qdq"
    )
    p.add_argument(
        "--activation-type",
        choices=("uint8", "int8"),
        default="uint8",
        help="activations (default uint8: ONNX Runtime's fast path on x86)",
    )
    p.add_argument(
        "--reduce-range",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="7-bit weights (default on): avoids int16 saturation of uint8 x int8 on x86 "
        "CPUs without VNNI",
    )
    p.add_argument(
        "--quant-ops",
        choices=("matmul-conv", "all"),
        default="matmul-conv",
        help="quantize Conv/MatMul/Gemm only (default), or every op ONNX Runtime can",
    )
    p.add_argument(
        "--evaluate", action="store_true", help="top-1 of the ONNX model(s) on the val split"
    )
    p.add_argument("--eval-dataset", help="dataset for --evaluate (default: checkpoint's)")
    p.add_argument(
        "--eval-samples", type=at_least(1), help="evaluate on the first N val images only"
    )
    p.set_defaults(func=_cmd_export)
