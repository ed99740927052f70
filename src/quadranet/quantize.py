"""INT8 post-training static quantization of an exported ONNX model, and its accuracy.

ONNX Runtime's `quantize_static` stores weights (int8, per output channel) and
activations (uint8 by default) in 8 bits. Activation ranges come from running the fp32
model on calibration images, a few hundred training images of a bundled dataset fed by
`ImageCalibrationReader`. The QDQ format (QuantizeLinear/DequantizeLinear pairs around
each quantized op) is what ONNX Runtime fuses into integer kernels; QOperator writes the
integer ops directly.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from quadranet.data import build_dataset, dataset_info
from quadranet.export import OnnxModel, real_images

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
# uint8 activations with int8 weights (U8S8) is ONNX Runtime's fast path on x86: measured
# 2-4x faster than int8 activations on an AVX2 EPYC. Without VNNI its int16 intermediate
# sums saturate, so weights keep 7 bits (`reduce_range`): with 8-bit weights the
# Animal-MNIST model lost 15 points of top-1, with 7 bits none.
ACTIVATION_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
DEFAULT_CALIB_SAMPLES = 256
# The ops holding nearly all the MACs; norms, GELU and the element-wise quadratic product
# stay fp32 between them (ONNX Runtime dequantizes around them).
DEFAULT_OP_TYPES = ("Conv", "MatMul", "Gemm")
OP_TYPE_CHOICES = {"matmul-conv": DEFAULT_OP_TYPES, "all": None}


class ImageCalibrationReader(CalibrationDataReader):
    """Feeds calibration images to ONNX Runtime's calibrator, one batch per call."""

    def __init__(self, input_name: str, images: torch.Tensor, batch_size: int = 32) -> None:
        if len(images) == 0:
            raise ValueError("calibration needs at least one image")
        self.input_name = input_name
        self.batches = [b.numpy().astype(np.float32) for b in images.split(batch_size)]
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:  # noqa: D102
        if self._next >= len(self.batches):
            return None
        self._next += 1
        return {self.input_name: self.batches[self._next - 1]}

    def rewind(self) -> None:  # noqa: D102
        self._next = 0


def calibration_images(
    dataset: str, in_chans: int, img_size: int, samples: int = DEFAULT_CALIB_SAMPLES
) -> torch.Tensor:
    """`samples` training images of `dataset`, transformed as the model expects."""
    if samples < 1:
        raise ValueError(f"--calib-samples must be positive, got {samples}")
    images = real_images(dataset, in_chans, img_size, samples, split="train")
    if images is None:
        raise ValueError(
            f"dataset {dataset!r} has {dataset_info(dataset).in_chans} channel(s) but the model "
            f"takes {in_chans}; calibrate on a dataset with matching images (--calib-dataset)"
        )
    return images


@dataclass
class QuantizeResult:
    """The int8 file and what it saved."""

    path: Path
    fp32_bytes: int
    int8_bytes: int
    method: str
    quant_format: str
    activation_type: str
    calib_samples: int
    preprocessed: bool  # ONNX Runtime's shape inference + graph optimisation ran first

    @property
    def size_ratio(self) -> float:
        return self.int8_bytes / self.fp32_bytes


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    images: torch.Tensor,
    *,
    method: str = "minmax",
    quant_format: str = "qdq",
    per_channel: bool = True,
    activation_type: str = "uint8",
    reduce_range: bool = True,
    op_types: tuple[str, ...] | None = DEFAULT_OP_TYPES,
    batch_size: int = 32,
) -> QuantizeResult:
    """Quantize an fp32 ONNX model to 8-bit weights and activations, calibrated on `images`.

    `op_types=None` quantizes every op ONNX Runtime can (fewer float islands, less
    accurate); the default quantizes the convolutions and matmuls only.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}")
    if quant_format not in FORMATS:
        raise ValueError(f"quantization format must be one of {', '.join(FORMATS)}")
    if activation_type not in ACTIVATION_TYPES:
        raise ValueError(f"activation type must be one of {', '.join(ACTIVATION_TYPES)}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if out_path.resolve() == fp32_path.resolve():
        raise ValueError("the int8 output must not overwrite the fp32 model; pick another -o")
    input_name = OnnxModel(fp32_path).input_name  # also checks the file exists and loads
    with tempfile.TemporaryDirectory(prefix="quadranet-quant-") as tmp:
        source, preprocessed = _preprocess(fp32_path, Path(tmp) / "prepared.onnx")
        quantize_static(
            str(source),
            str(out_path),
            ImageCalibrationReader(input_name, images, batch_size),
            quant_format=FORMATS[quant_format],
            op_types_to_quantize=None if op_types is None else list(op_types),
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=ACTIVATION_TYPES[activation_type],
            weight_type=QuantType.QInt8,
            calibrate_method=CALIBRATION_METHODS[method],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    return QuantizeResult(
        out_path,
        fp32_path.stat().st_size,
        out_path.stat().st_size,
        method,
        quant_format,
        activation_type,
        len(images),
        preprocessed,
    )


def _preprocess(path: Path, out: Path) -> tuple[Path, bool]:
    """ONNX Runtime's recommended pre-quantization pass; the original file if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(path), str(out))
    except Exception:  # an optimisation it cannot do: quantize the exported graph as it is
        return path, False
    return out, True


def evaluate_onnx(
    model: OnnxModel | str | Path,
    dataset: str,
    img_size: int | None = None,
    *,
    split: str = "val",
    limit: int | None = None,
    batch_size: int = 250,
) -> dict[str, float]:
    """Top-1 accuracy (%) of a classifier ONNX file on a dataset split (MNIST val = test set)."""
    model = model if isinstance(model, OnnxModel) else OnnxModel(model)
    info = dataset_info(dataset)
    data = build_dataset(dataset, split, img_size=img_size or info.img_size)
    count = len(data) if limit is None else min(limit, len(data))
    in_chans = model.input_shape[1]
    correct = 0
    for start in range(0, count, batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, count))]
        x = torch.stack([img for img, _ in items])
        if isinstance(in_chans, int) and x.shape[1] != in_chans:
            x = x.expand(-1, in_chans, -1, -1)
        labels = np.array([label for _, label in items])
        logits = model(np.ascontiguousarray(x.numpy(), dtype=model.input_dtype))
        correct += int((logits.argmax(1) == labels).sum())
    return dict(top1=100.0 * correct / max(count, 1), count=count)
