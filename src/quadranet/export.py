"""Deployment: export a model to ONNX and check it against PyTorch in ONNX Runtime.

Exporter: PyTorch's current one, `torch.onnx.export(..., dynamo=True)` (torch.export, then
ONNX Script), followed by constant folding of the weight slices, so each depthwise
quadratic conv appears as three depthwise (grouped) Conv nodes, one Mul and one Add. If it
fails (a model torch.export cannot trace), the TorchScript exporter (`dynamo=False`,
opset at most 20) is tried instead; `ExportResult.exporter` says which one wrote the file.

The model is exported in eval mode under `torch.no_grad()` with the kernels off
(`quadranet.ops.kernels("off")`): the quadratic conv then runs its ATen reference instead
of the custom operator, so the graph holds only standard ONNX ops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from quadranet import ops
from quadranet.data import DataError, build_dataset, dataset_info
from quadranet.engine.checkpoint import safe_model_kwargs, write_error_message
from quadranet.engine.config import TrainConfig
from quadranet.engine.train import (
    build_model,
    checkpoint_config,
    load_eval_weights,
    resolve_eval_checkpoint,
)
from quadranet.models import list_models

INPUT_NAME = "image"
OUTPUT_NAME = "output"
BATCH_DIM = "batch"
MIN_OPSET = 18  # the oldest opset the dynamo exporter writes
DEFAULT_OPSET = 20  # the first with a Gelu op
MAX_OPSET = 23  # the newest opset ONNX Script's torch library and ONNX Runtime both run
MAX_TORCHSCRIPT_OPSET = 20
DEFAULT_TOLERANCE = 1e-4  # max |onnx - torch| / max |torch| for fp32
DEFAULT_IMG_SIZE = 224
Exporter = Literal["auto", "dynamo", "torchscript"]
EXPORTERS = ("auto", "dynamo", "torchscript")


class ExportError(ValueError):
    """A model could not be exported or does not match PyTorch; the message says why."""


# OS errors of a failed write (not of tracing): they end the export instead of a fallback
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EACCES, errno.EPERM, errno.EROFS}
)


# --- building the model to export ------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready to export, with the input it expects."""

    model: nn.Module
    name: str
    in_chans: int
    img_size: int
    num_classes: int
    dataset: str | None  # the dataset of its checkpoint, when known


def load_model(
    name: str | None = None,
    *,
    arch: str | Mapping[str, Any] | None = None,
    checkpoint: str | Path | None = None,
    use_ema: bool = False,
    img_size: int | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Build a model by name or NAS architecture, optionally with a checkpoint's weights.

    A checkpoint written by `quadranet train` stores its model, kwargs and dataset, so
    `load_model(checkpoint=run_dir)` needs nothing else; explicit arguments must agree.
    """
    weights, settings = None, {}
    if checkpoint is not None:
        path = resolve_eval_checkpoint(checkpoint, use_ema)
        weights, _ = load_eval_weights(path, use_ema)
        settings = checkpoint_config(path)
    if arch is not None:
        if name not in (None, "quadranet_nas"):
            raise ValueError(f"--arch builds quadranet_nas; drop the model name {name!r}")
        name = "quadranet_nas"
    saved_name = settings.get("model")
    if name is None:
        if saved_name is None:
            raise ValueError("give a model name, --arch, or a checkpoint that stores its model")
        name = saved_name
    elif saved_name is not None and saved_name != name:
        raise ValueError(
            f"the checkpoint was trained as {saved_name!r}, not {name!r}; drop the model name"
        )
    dataset = settings.get("dataset")
    info = dataset_info(dataset) if dataset is not None else None
    kwargs = {**safe_model_kwargs(settings.get("model_kwargs", {})), **(model_kwargs or {})}
    arch_path = settings.get("arch")
    if isinstance(arch, Mapping):
        kwargs["arch"] = dict(arch)
    elif arch is not None:
        arch_path = _arch_path(arch)
    size = img_size or settings.get("img_size") or (info.img_size if info else None)
    if size and name in list_models():  # the family's nominal size, recorded by timm on push
        kwargs.setdefault("img_size", size)
    cfg = TrainConfig(model=name, model_kwargs=kwargs, arch=arch_path, drop_path=0.0)
    trained = settings.get("num_classes") or (info.num_classes if info else 1000)
    classes = trained if num_classes is None else num_classes
    chans = in_chans if in_chans is not None else (info.in_chans if info else 3)
    # no classifier (0 classes): the trained model's, removed after its weights are loaded
    model = build_model(cfg, trained if classes == 0 and weights is not None else classes, chans)
    if weights is not None:
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise ValueError(
                f"the checkpoint does not fit {name} ({first}); pass the --model-kwargs, "
                "--num-classes and --in-chans it was trained with"
            ) from err
        if classes == 0:
            model.reset_classifier(0)
    size = size or _default_img_size(model)
    return LoadedModel(model.eval(), name, chans, size, classes, dataset)


def _arch_path(arch: str | Path) -> str:
    """An --arch file, which must exist."""
    if not Path(arch).is_file():
        raise FileNotFoundError(
            f"architecture file {arch} does not exist; pass the JSON written by `quadranet search`"
        )
    return str(arch)


def _default_img_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    return int(size[-1]) if size else DEFAULT_IMG_SIZE


# --- export ------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    """What was written and how."""

    path: Path
    exporter: str  # "dynamo" or "torchscript"
    opset: int
    dynamic_batch: bool
    fallback_reason: str | None = None  # why the dynamo exporter was not used


def check_opset(opset: int | None, exporter: Exporter = "auto") -> int:
    """The opset to write; a ValueError naming the supported range otherwise."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    low = 7 if exporter == "torchscript" else MIN_OPSET
    high = MAX_TORCHSCRIPT_OPSET if exporter == "torchscript" else MAX_OPSET
    if opset is None:
        return min(DEFAULT_OPSET, high)
    if not low <= opset <= high:
        raise ValueError(
            f"opset {opset} is not supported by the {exporter} exporter; use {low} to {high}"
        )
    return opset


def example_input(in_chans: int, img_size: int, dynamic_batch: bool, seed: int = 0) -> torch.Tensor:
    """A random image batch for tracing (batch 2 when dynamic: torch.export fixes size 1)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2 if dynamic_batch else 1, in_chans, img_size, img_size, generator=gen)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    in_chans: int,
    img_size: int,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    exporter: Exporter = "auto",
) -> ExportResult:
    """Export `model` (eval, no grad) to one ONNX file taking (batch, C, S, S) float32 images.

    The file is written atomically (`atomic_output`): a failed export or write leaves an
    existing file at `path` as it was.
    """
    opset = check_opset(opset, exporter)
    path = check_output(path)
    model = model.eval()
    x = example_input(in_chans, img_size, dynamic_batch)
    with torch.no_grad():
        model(x)  # a wrong size or channel count fails here with the model's own message
    with atomic_output(path) as tmp:
        result = _export(model, x, tmp, opset, dynamic_batch, exporter)
    return dataclasses.replace(result, path=path)


def _export(
    model: nn.Module, x: torch.Tensor, path: Path, opset: int, dynamic_batch: bool, exporter: str
) -> ExportResult:
    """Write `path` with the dynamo exporter or, for "auto" when it fails, TorchScript."""
    reason = None
    if exporter in ("auto", "dynamo"):
        try:
            _export_dynamo(model, x, path, opset, dynamic_batch)
            return ExportResult(path, "dynamo", opset, dynamic_batch)
        except Exception as err:  # torch.export raises many kinds; the fallback handles all
            _raise_write_error(err)  # the disk, not the exporter: no fallback
            if exporter == "dynamo":
                raise ExportError(f"the dynamo exporter failed: {_short(err)}") from err
            reason = _short(err)
    opset = min(opset, MAX_TORCHSCRIPT_OPSET)
    try:
        _export_torchscript(model, x, path, opset, dynamic_batch)
    except Exception as err:
        _raise_write_error(err)
        before = f"the dynamo exporter failed ({reason}), then " if reason else ""
        raise ExportError(f"{before}the TorchScript exporter failed: {_short(err)}") from err
    return ExportResult(path, "torchscript", opset, dynamic_batch, reason)


def _raise_write_error(err: Exception) -> None:
    """Re-raise `err` when it is a failed write (disk full, no permission)."""
    if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
        raise err


def check_output(path: str | Path) -> Path:
    """`path` as a Path when a file can be written there; an ExportError saying why not."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a folder; pass a file name, e.g. -o {path / 'model.onnx'}")
    folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not folder.is_dir():
        raise ExportError(
            f"cannot write {path}: {folder} is a file, not a folder; nothing was written; "
            "pass an -o inside a folder"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(
            f"cannot write {path}: {folder} is not writable; nothing was written; "
            "pass an -o in a folder you can write to"
        )
    return path


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A path to write instead of `path`, in a hidden folder beside it; on success the files
    written there (the model and any external data) replace those beside `path`, the model
    last. An OSError becomes an ExportError naming `path` and saying the old file is kept."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as err:
        raise ExportError(write_error_message(path, err)) from err
    try:
        tmp = folder / path.name
        yield tmp
        if not tmp.is_file():
            raise ExportError(f"the exporter wrote no file for {path}; nothing was written")
        for file in sorted(folder.iterdir(), key=lambda f: f == tmp):
            os.replace(file, path.parent / file.name)
    except OSError as err:
        raise ExportError(write_error_message(path, err)) from err
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _short(err: Exception, lines: int = 3) -> str:
    text = " ".join(line.strip() for line in str(err).strip().splitlines()[:lines] if line.strip())
    return f"{type(err).__name__}: {text}"


@contextlib.contextmanager
def _tracing():
    """No grad, no C++ CPU kernels (exporters see only standard ops), no progress prints."""
    with torch.no_grad(), ops.kernels("off"), contextlib.redirect_stdout(io.StringIO()):
        with warnings.catch_warnings():
            # the TorchScript tracer warns about every Python check on a traced size
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's
            yield


def _export_dynamo(
    model: nn.Module, x: torch.Tensor, path: Path, opset: int, dynamic_batch: bool
) -> None:
    import onnxscript.optimizer

    dynamic_shapes = ({0: torch.export.Dim(BATCH_DIM)},) if dynamic_batch else None
    with _tracing():
        program = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    # The default size limit leaves slices of big weights (each quadratic conv's three
    # branch kernels) as Gather nodes on the fused weight; fold them into initializers.
    onnxscript.optimizer.fold_constants(
        program.model, input_size_limit=2**62, output_size_limit=2**62
    )
    program.save(path)


def _export_torchscript(
    model: nn.Module, x: torch.Tensor, path: Path, opset: int, dynamic_batch: bool
) -> None:
    axes = {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}} if dynamic_batch else None
    with _tracing():
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            do_constant_folding=True,
        )


# --- running an exported model -----------------------------------------------------------------

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


class OnnxModel:
    """An ONNX Runtime session of a one-input model that checks each input before running.

    A batch of the wrong rank, size or dtype raises a ValueError saying what the graph
    expects, instead of ONNX Runtime's internal error.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file {path} does not exist; export one first")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{path} has {len(inputs)} inputs; OnnxModel runs one-input models")
        self.input_name = inputs[0].name
        self.input_shape: list[int | str] = [
            d if isinstance(d, int) else (d or "?") for d in inputs[0].shape
        ]
        self.input_dtype = np.dtype(_ORT_DTYPES.get(inputs[0].type, np.float32))

    def expected(self) -> str:
        """The input the graph takes, e.g. '(batch, 1, 28, 28) float32'."""
        return f"({', '.join(map(str, self.input_shape))}) {self.input_dtype}"

    def check_input(self, x: np.ndarray) -> None:
        """Raise a ValueError when `x` does not fit the graph's input."""
        if x.dtype != self.input_dtype:
            raise ValueError(
                f"input dtype is {x.dtype} but {self.path.name} expects {self.expected()}; "
                f"convert it with .astype(np.{self.input_dtype})"
            )
        fixed = [d if isinstance(d, int) else None for d in self.input_shape]
        fits = x.ndim == len(fixed) and all(f is None or f == s for f, s in zip(fixed, x.shape))
        if not fits:
            raise ValueError(
                f"input has shape {tuple(x.shape)} but {self.path.name} expects "
                f"{self.expected()}; resize the images or re-export with --img-size/--in-chans"
            )

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """The model's output for one batch."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        self.check_input(x)
        return self.session.run(None, {self.input_name: x})[0]


# --- parity with PyTorch -----------------------------------------------------------------------


@dataclass
class Parity:
    """Largest difference between ONNX Runtime and PyTorch on one set of inputs."""

    inputs: str
    batch: int
    max_abs: float
    max_rel: float  # max |onnx - torch| / max |torch|
    tolerance: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.max_rel) and self.max_rel <= self.tolerance

    def line(self) -> str:
        verdict = "ok" if self.ok else f"ABOVE tolerance {self.tolerance:g}"
        return (
            f"parity on {self.inputs} (batch {self.batch}): max abs err {self.max_abs:.3g}, "
            f"max rel err {self.max_rel:.3g} ({verdict})"
        )


def compare(
    model: nn.Module,
    onnx_model: OnnxModel,
    batches: Mapping[str, torch.Tensor],
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[Parity]:
    """ONNX Runtime vs PyTorch (eval, no grad, fp32) on each named batch."""
    out = []
    model = model.eval()
    for label, x in batches.items():
        with torch.no_grad():
            ref = model(x).float().numpy()
        arr = x.numpy().astype(onnx_model.input_dtype)
        step = onnx_model.input_shape[0]  # a file with a fixed batch takes that many at a time
        step = step if isinstance(step, int) and step > 0 else len(arr)
        got = np.concatenate([onnx_model(arr[i : i + step]) for i in range(0, len(arr), step)])
        err = float(np.abs(got.astype(np.float64) - ref).max())
        scale = float(np.abs(ref).max())
        rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
        out.append(Parity(label, len(x), err, rel, tolerance))
    return out


def real_images(
    dataset: str, in_chans: int, img_size: int, count: int, split: str = "val", seed: int = 0
) -> torch.Tensor | None:
    """`count` images of a dataset as the model's transform makes them (resized, normalised).

    Grayscale images are repeated over 3 channels for RGB models; None when the channels
    cannot be matched.
    """
    info = dataset_info(dataset)
    if info.in_chans != in_chans and not (info.in_chans == 1 and in_chans == 3):
        return None
    data = build_dataset(dataset, split, img_size=img_size)
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data), generator=gen)[:count].tolist()
    x = torch.stack([data[i][0] for i in index])
    return x.expand(-1, in_chans, -1, -1).contiguous() if x.shape[1] != in_chans else x


def parity_batches(
    in_chans: int,
    img_size: int,
    dataset: str | None,
    samples: int = 16,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random images and, where a bundled dataset fits, real ones."""
    gen = torch.Generator().manual_seed(seed)
    batches = {"random inputs": torch.randn(samples, in_chans, img_size, img_size, generator=gen)}
    name = dataset or ("mnist" if in_chans == 1 else "animal-mnist")
    try:
        real = real_images(name, in_chans, img_size, samples, seed=seed)
    except DataError:
        real = None  # a dataset that is not available here: random inputs only
    if real is not None:
        batches[f"{name} val images"] = real
    return batches


def check_parity(
    model: nn.Module,
    path: str | Path,
    in_chans: int,
    img_size: int,
    dataset: str | None = None,
    samples: int = 16,
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[Parity]:
    """Compare an exported file with its model; ExportError when above tolerance."""
    results = compare(
        model, OnnxModel(path), parity_batches(in_chans, img_size, dataset, samples), tolerance
    )
    bad = [r for r in results if not r.ok]
    if bad:
        raise ExportError(
            "ONNX Runtime disagrees with PyTorch: "
            + "; ".join(r.line() for r in bad)
            + ". Re-export with --exporter torchscript or another --opset, or report the model"
        )
    return results


def graph_op_counts(path: str | Path) -> dict[str, int]:
    """How many nodes of each op type the exported graph holds."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
