"""Deployment: ONNX export and parity, the exported graph, int8 quantization, bf16/fp16 autocast."""

import errno
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from quadranet.bench.latency import _rows, measure_latency, run_latency_bench
from quadranet.blocks import QuadraBlock
from quadranet.cli import main
from quadranet.engine.checkpoint import save_weights
from quadranet.export import (
    INPUT_NAME,
    OnnxModel,
    atomic_output,
    compare,
    export_onnx,
    graph_op_counts,
    load_model,
)
from quadranet.models import QUADRANET_MODELS, create_model
from quadranet.nn import QuadraticConv2d
from quadranet.quantize import quantize_int8

TINY = dict(stem_stride=2, depths=[1, 1, 1], dims=[8, 16, 32])  # 3 stages, 28x28 MNIST input
SMALLEST = 8  # stem stride 1 and three downsamples: 8x8 is the smallest 4-stage input
FP32_TOLERANCE = 1e-4
CONTROL_FLOW_OPS = {"Loop", "If", "Scan", "SequenceConstruct", "SplitToSequence"}


def random_images(batch: int, chans: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(seed))


def assert_parity(model, path, batches):
    for result in compare(model, OnnxModel(path), batches, FP32_TOLERANCE):
        assert result.ok, result.line()


def quadratic_patterns(graph: onnx.GraphProto) -> int:
    """Count Add(Mul(conv_a, conv_b), conv_c) where all three are grouped (depthwise) Convs."""
    producer = {out: node for node in graph.node for out in node.output}

    def grouped_conv(name: str) -> bool:
        node = producer.get(name)
        if node is None or node.op_type != "Conv":
            return False
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return group > 1

    count = 0
    for node in graph.node:
        if node.op_type != "Add":
            continue
        for mul_out, other in (node.input, node.input[::-1]):
            mul = producer.get(mul_out)
            if mul is not None and mul.op_type == "Mul" and grouped_conv(other):
                count += all(grouped_conv(i) for i in mul.input)
    return count


# --- export and parity -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """quadranet25_xxs at full depth (2, 3, 18, 2), exported once with a dynamic batch."""
    model = create_model("quadranet25_xxs", stem_stride=1, num_classes=10).eval()
    path = tmp_path_factory.mktemp("full") / "quadranet25_xxs.onnx"
    result = export_onnx(model, path, 3, SMALLEST, dynamic_batch=True)
    return model, result


def test_full_size_member_has_parity_at_batch_1_and_7_through_one_file(full_size):
    model, result = full_size
    assert result.exporter == "dynamo" and result.fallback_reason is None
    batches = {"batch 1": random_images(1, 3, SMALLEST), "batch 7": random_images(7, 3, SMALLEST)}
    assert_parity(model, result.path, batches)


def test_graph_keeps_quadratic_op_as_grouped_conv_mul_add(full_size):
    model, result = full_size
    graph = onnx.load(str(result.path)).graph
    ops = graph_op_counts(result.path)
    assert not CONTROL_FLOW_OPS & set(ops), ops
    blocks = sum(isinstance(m, QuadraBlock) for m in model.modules())
    assert blocks == 25
    assert quadratic_patterns(graph) == blocks
    # 3 depthwise branch convs per block + stem + 3 downsamples: nothing unrolled per channel
    assert ops["Conv"] == 3 * blocks + 4
    assert ops.get("Gather", 0) <= 1  # weight slices are folded into initializers
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    assert graph.input[0].name == INPUT_NAME


def test_wrong_input_shape_or_dtype_fails_clearly(full_size):
    onnx_model = OnnxModel(full_size[1].path)
    with pytest.raises(
        ValueError, match=r"shape \(2, 1, 8, 8\).*expects \(batch, 3, 8, 8\) float32"
    ):
        onnx_model(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"expects \(batch, 3, 8, 8\)"):
        onnx_model(np.zeros((3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="dtype is float64"):
        onnx_model(np.zeros((1, 3, 8, 8)))


@pytest.mark.slow
@pytest.mark.parametrize("name", QUADRANET_MODELS)
def test_every_family_member_exports_with_parity(name, tmp_path):
    # every member at full width and depth, at the smallest input it accepts (about 30 s for b)
    model = create_model(name, stem_stride=1, num_classes=10).eval()
    result = export_onnx(model, tmp_path / "m.onnx", 3, SMALLEST, dynamic_batch=False)
    assert result.exporter == "dynamo"
    blocks = int(name.removeprefix("quadranet").split("_")[0])  # quadranet36_t: 36 blocks
    assert quadratic_patterns(onnx.load(str(result.path)).graph) == blocks
    assert_parity(model, result.path, {"random": random_images(1, 3, SMALLEST)})


def test_torchscript_fallback_exporter_also_has_parity(tmp_path):
    model = create_model("quadranet25_xxs", in_chans=1, num_classes=10, **TINY).eval()
    result = export_onnx(model, tmp_path / "ts.onnx", 1, 28, exporter="torchscript")
    assert result.exporter == "torchscript" and result.opset == 20
    assert_parity(
        model, result.path, {"b1": random_images(1, 1, 28), "b3": random_images(3, 1, 28)}
    )


# --- quantization ------------------------------------------------------------------------------


def test_int8_quantization_is_smaller_and_close(tmp_path):
    model = create_model("quadranet25_xxs", in_chans=1, num_classes=10, **TINY).eval()
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", 1, 28).path
    calib = random_images(32, 1, 28, seed=1)
    result = quantize_int8(fp32, tmp_path / "int8.onnx", calib)
    assert result.int8_bytes < 0.5 * result.fp32_bytes
    ops = graph_op_counts(result.path)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    x = random_images(8, 1, 28, seed=2).numpy()
    ref, got = OnnxModel(fp32)(x), OnnxModel(result.path)(x)
    # relative RMS error, not the largest error against the largest output: that one
    # varies with the random weights; a wrong scale or zero point errs by whole outputs
    assert np.linalg.norm(got - ref) < 0.2 * np.linalg.norm(ref)
    with pytest.raises(ValueError, match="must not overwrite"):
        quantize_int8(fp32, fp32, calib)


# --- command line ------------------------------------------------------------------------------


def test_cli_exports_checkpoint_quantizes_and_evaluates(tmp_path, capsys):
    model = create_model("quadranet25_xxs", in_chans=1, num_classes=10, **TINY)
    config = dict(model="quadranet25_xxs", model_kwargs=TINY, dataset="mnist")
    ckpt = save_weights(tmp_path / "best.safetensors", model.state_dict(), dict(config=config))
    out = tmp_path / "model.onnx"
    args = ["export", "--checkpoint", str(ckpt), "-o", str(out), "--quantize", "int8"]
    args += ["--calib-samples", "16", "--evaluate", "--eval-samples", "50"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "quadranet25_xxs (1x28x28 input, 10 classes)" in text
    assert "with the dynamo exporter, opset 20, dynamic batch" in text
    assert "parity on random inputs (batch 16)" in text and "parity on mnist val images" in text
    assert "int8 ONNX top-1 on mnist val" in text and "(50 images)" in text
    assert (tmp_path / "model.int8.onnx").stat().st_size < out.stat().st_size
    loaded = load_model(checkpoint=ckpt)
    x = random_images(2, 1, 28)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    np.testing.assert_allclose(OnnxModel(out)(x), expected, atol=1e-4 * np.abs(expected).max())
    assert loaded.dataset == "mnist" and loaded.img_size == 28


def test_cli_exports_nas_architecture(tmp_path, capsys):
    pytest.importorskip("quadranet.models.quadranet_nas")
    arch = {
        "format": "quadranet-nas-arch/1",
        "space": "quadra",
        "stem_stride": 1,
        "dims": [8, 16, 24, 32],
        "stages": [
            ["quadra_k7_e4", "identity"],
            ["quadra_k3_e2"],
            ["quadra_k5_e4", "quadra_k3_e2"],
            ["quadra_k7_e2"],
        ],
    }
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(arch))
    out = tmp_path / "nas.onnx"
    args = ["export", "--arch", str(path), "-o", str(out), "--img-size", "8", "--num-classes", "4"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "exporting quadranet_nas" in text and "(ok)" in text and "ABOVE" not in text
    assert quadratic_patterns(onnx.load(str(out)).graph) == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["quadranet36_tt"], "unknown model 'quadranet36_tt'"),
        (["--checkpoint", "missing/best.safetensors"], "does not exist"),
        (["quadranet25_xxs", "--opset", "12"], "opset 12 is not supported by the auto exporter"),
        (["quadranet25_xxs", "--opset", "99", "--exporter", "torchscript"], "use 7 to 20"),
        (["--arch", "missing.json"], "architecture file missing.json does not exist"),
        (["quadranet36_xxs", "--img-size", "16"], "needs at least 32x32"),
        ([], "give a model NAME"),
        (["quadranet25_xxs", "--parity-dataset", "nosuchds"], "unknown dataset 'nosuchds'"),
        (["quadranet25_xxs", "--parity-samples", "0"], "must be at least 1, got 0"),
        (["quadranet25_xxs", "--img-size", "-1"], "must be at least 1, got -1"),
        (["quadranet25_xxs", "--in-chans", "0"], "must be at least 1, got 0"),
        (["quadranet25_xxs", "--eval-samples", "0"], "must be at least 1, got 0"),
        (["quadranet25_xxs", "--tolerance", "-1"], "must be above 0, got -1"),
        (["quadranet25_xxs", "--model-kwargs", "stem_stride=0"], "stem_stride must be 1, 2 or 4"),
        (["quadranet25_xxs", "--num-classes", "0", "--evaluate"], "--evaluate needs a classifier"),
    ],
)
def test_cli_bad_inputs_are_one_clear_line(args, message, tmp_path, capsys):
    try:
        status = main(["export", *args, "-o", str(tmp_path / "m.onnx")])
    except SystemExit as stop:  # argparse's own checks
        status = stop.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_exports_without_a_classifier_and_at_a_fixed_batch(tmp_path, capsys):
    """--num-classes 0 gives pooled features (from a checkpoint too: its classifier is
    dropped); a batch-1 file is checked one image at a time."""
    model = create_model("quadranet25_xxs", in_chans=1, num_classes=10, **TINY)
    config = dict(model="quadranet25_xxs", model_kwargs=TINY, dataset="mnist")
    ckpt = save_weights(tmp_path / "best.safetensors", model.state_dict(), dict(config=config))
    out = tmp_path / "features.onnx"
    args = ["export", "--checkpoint", str(ckpt), "-o", str(out), "--num-classes", "0"]
    assert main([*args, "--no-dynamic-batch", "--parity-samples", "3"]) == 0
    text = capsys.readouterr().out
    assert "(1x28x28 input, no classifier)" in text and "batch 1;" in text
    assert "parity on random inputs (batch 3)" in text and "ABOVE" not in text
    x = random_images(1, 1, 28)
    with torch.no_grad():
        expected = model.eval().forward_head(model.forward_features(x), pre_logits=True)
    got = OnnxModel(out)(x.numpy())
    assert got.shape == (1, 32)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4 * expected.abs().max().item())


# --- latency benchmark -------------------------------------------------------------------------


def test_latency_job_times_each_batch_and_reports_compile_failure(monkeypatch):
    result = measure_latency("quadranet25_xxs", "torch", [1, 2], 32, warmup=0, repeats=2)
    assert set(result["times"]) == {1, 2} and len(result["times"][2]["values"]) == 2
    assert result["setup_s"] is None

    def broken_compile(model, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken_compile)
    failed = measure_latency("quadranet25_xxs", "torch-compile", [1], 32, repeats=1)
    assert failed == {"error": "RuntimeError: no C++ compiler found"}


def test_latency_rows_have_ratios_and_notes():
    times = {"1": {"values": [0.02, 0.03]}}
    raw = {
        "quadranet36_t|torch": dict(times=times, setup_s=None),
        "hornet_t|torch": dict(times={"1": {"values": [0.04]}}, setup_s=None),
        "quadranet36_t|onnxruntime": dict(error="onnxruntime runs fp32 models only here"),
        "hornet_t|onnxruntime": dict(error="onnxruntime runs fp32 models only here"),
    }
    rows = _rows(["quadranet36_t", "hornet_t"], ["torch", "onnxruntime"], [1], raw)
    q, h = rows[0], rows[2]
    assert q["ms"] == pytest.approx(25.0) and h["vs_quadranet36_t"] == pytest.approx(1.6)
    assert q["vs_hornet_t"] == pytest.approx(0.625)
    assert rows[1]["note"].startswith("onnxruntime runs fp32") and "ms" not in rows[1]
    with pytest.raises(ValueError, match="unknown backend"):
        run_latency_bench(["quadranet36_t"], backends=["tensorrt"])


# --- bf16 / fp16 ---------------------------------------------------------------------------------


class LayerNormCalls(TorchDispatchMode):
    """Records (input, output) of every native_layer_norm call, also those inside the
    `quadranet::` ops (the channel MLP's LayerNorm)."""

    def __init__(self):
        super().__init__()
        self.calls = []
        from test_ops import op_bodies

        self.bodies = op_bodies()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        body = self.bodies.get(func)
        if body is not None:
            with self:
                return body(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.native_layer_norm.default:
            self.calls.append((args[0].detach().clone(), out[0].detach().clone(), args[2:4]))
        return out


def small_quadranet(recompute: str) -> torch.nn.Module:
    return create_model(
        "quadranet25_xxs",
        stem_stride=1,
        depths=(1, 1, 1, 1),
        num_classes=10,
        layer_scale_init=1.0,
        recompute=recompute,
    )


@pytest.mark.parametrize("recompute", ["none", "cheap"])
def test_bf16_autocast_forward_and_training_step_are_finite(recompute):
    torch.manual_seed(0)
    model = small_quadranet(recompute)
    x = 50 * random_images(4, 3, 16)  # un-normalised pixels: large residual-stream values
    with torch.no_grad():
        ref = model.eval()(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()

    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bf16_quadratic_product_beyond_fp16_range_stays_finite():
    torch.manual_seed(0)
    conv = QuadraticConv2d(8, 8, 3, groups=8)
    with torch.no_grad():
        conv.weight.mul_(50)  # |a|, |b| of a few hundred: a * b overflows fp16 (max 65504)
    x = 100 * torch.randn(2, 8, 12, 12)
    a, b, _ = (F.conv2d(x, w, None, padding=1, groups=8) for w in conv.branch_weights())
    assert torch.isinf(a.half() * b.half()).any()  # the scale is one that breaks fp16
    ref = conv(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.02 * ref.abs().max()
    assert torch.isfinite(conv.weight.grad).all()


@pytest.mark.parametrize("train", [False, True])
def test_layernorm_statistics_are_fp32_under_bf16_autocast(train):
    # A large mean over a small spread is where bf16 statistics would fail: mean and
    # variance must be accumulated in fp32 even when the LayerNorm input is bf16.
    torch.manual_seed(0)
    model = small_quadranet("cheap").train(train)
    x = 100 + random_images(2, 3, 16)
    with LayerNormCalls() as calls, torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert len(calls.calls) >= 10
    assert any(inp.dtype == torch.bfloat16 for inp, _, _ in calls.calls)
    for inp, out, (weight, bias) in calls.calls:
        c = inp.shape[-1]
        exact = F.layer_norm(inp.double(), (c,), weight.double(), bias.double(), 1e-6)
        tol = 2**-7 * exact.abs().max() if out.dtype == torch.bfloat16 else 1e-4
        assert (out.double() - exact).abs().max() <= tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_forward_and_step_are_finite(dtype):
    torch.manual_seed(0)
    model = small_quadranet(True).cuda()
    x = 50 * random_images(4, 3, 16).cuda()
    with torch.autocast("cuda", dtype=dtype):
        loss = F.cross_entropy(model(x), torch.arange(4, device="cuda"))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    block = QuadraBlock(16, layer_scale_init=1.0).cuda().eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        assert torch.isfinite(block(1e4 * torch.randn(2, 16, 8, 8, device="cuda"))).all()


# --- atomic, clearly failing writes ------------------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_export_below_a_file_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "model").write_text("a file")
    out = tmp_path / "model" / "x.onnx"
    assert main(["export", "quadranet25_xxs", "-o", str(out), "--img-size", "32"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out}: {tmp_path / 'model'} is a file, not a folder" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert (tmp_path / "model").read_text() == "a file"


def test_disk_full_keeps_the_previous_onnx_file(tmp_path, monkeypatch, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous export")

    def half_then_full(self, destination, **kwargs):
        with open(destination, "wb") as f:
            f.write(b"half a model")
        _no_space()

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", half_then_full)
    args = ["export", "quadranet25_xxs", "--in-chans", "1", "--num-classes", "10"]
    args += ["--img-size", "28", "-o", str(out), "--no-check"]
    args += ["--model-kwargs", *(f"{k}={json.dumps(v)}" for k, v in TINY.items())]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out}: No space left on device; the previous model.onnx is intact" in err
    assert "TorchScript" not in err and "Traceback" not in err  # no fallback for a full disk
    assert out.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_disk_full_while_quantizing_keeps_the_previous_int8_file(tmp_path, monkeypatch, capsys):
    import quadranet.quantize

    int8 = tmp_path / "model.int8.onnx"
    int8.write_bytes(b"the previous int8 model")

    def half_then_full(fp32_path, out_path, images, **kwargs):
        Path(out_path).write_bytes(b"half an int8 model")
        _no_space()

    monkeypatch.setattr(quadranet.quantize, "quantize_int8", half_then_full)
    monkeypatch.setattr(
        quadranet.quantize, "calibration_images", lambda *a: random_images(2, 1, 28)
    )
    model = create_model("quadranet25_xxs", in_chans=1, num_classes=10, **TINY)
    config = dict(model="quadranet25_xxs", model_kwargs=TINY, dataset="mnist")
    ckpt = save_weights(tmp_path / "best.safetensors", model.state_dict(), dict(config=config))
    out = tmp_path / "model.onnx"
    args = ["export", "--checkpoint", str(ckpt), "-o", str(out), "--no-check"]
    assert main([*args, "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {int8}: No space left on device; the previous model.int8.onnx" in err
    assert int8.read_bytes() == b"the previous int8 model" and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.safetensors",
        "model.int8.onnx",
        "model.onnx",
    ]


def test_atomic_output_replaces_only_on_success(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="exporter bug"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("exporter bug")
    assert target.read_bytes() == b"old"
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"new")
        (tmp.parent / "m.onnx.data").write_bytes(b"weights")  # external data moves along
    assert target.read_bytes() == b"new" and (tmp_path / "m.onnx.data").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_checkpoint_metadata_cannot_make_export_open_other_files(tmp_path):
    model = create_model("quadranet25_xxs", in_chans=1, num_classes=10, **TINY)
    missing = tmp_path / "elsewhere" / "weights.pth"
    kwargs = {**TINY, "checkpoint_path": str(missing), "pretrained_cfg_overlay": {"file": "x"}}
    config = dict(model="quadranet25_xxs", model_kwargs=kwargs, dataset="mnist")
    path = save_weights(tmp_path / "best.safetensors", model.state_dict(), dict(config=config))
    loaded = load_model(checkpoint=path)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value)


def test_export_refuses_non_finite_checkpoint_weights(tmp_path, capsys):
    model = create_model("quadranet25_xxs", in_chans=1, num_classes=10, **TINY)
    weights = model.state_dict()
    weights["head.fc.bias"] = torch.full_like(weights["head.fc.bias"], float("nan"))
    config = dict(model="quadranet25_xxs", model_kwargs=TINY, dataset="mnist")
    path = save_weights(tmp_path / "last.safetensors", weights, dict(config=config))
    assert main(["export", "--checkpoint", str(path), "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "tensor 'head.fc.bias' has NaN/Inf values" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()
