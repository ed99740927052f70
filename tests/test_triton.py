"""Triton kernels of the depthwise quadratic conv: parity with float64 references, through
the custom op (layer scale, residual, kept branches) and in a block, and half precision.

On a CUDA machine the kernels are compiled and run on the GPU. Without one (CI) the same
tests run them on CPU tensors in Triton's interpreter (`TRITON_INTERPRET=1` while this
module's tests run), so the kernels' indexing, masking and sums are checked everywhere.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from quadranet import ops
from quadranet.blocks import QuadraBlock

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
CL = torch.channels_last


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(CUDA or INTERPRETED, reason="the kernels run directly here")
@pytest.mark.filterwarnings("ignore")
def test_kernels_in_triton_interpreter():
    """Without a GPU, run this module's tests again in a process with Triton's interpreter
    on (it must be set before Triton is first imported)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-o",
        "addopts=",
        "-p",
        "no:cacheprovider",
        __file__,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


@pytest.fixture(scope="module")
def tk():
    """The kernels module (compiled on a GPU, interpreted on CPU)."""
    if not (CUDA or INTERPRETED):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 (test_kernels_in_triton_interpreter)")
    return importlib.import_module("quadranet.ops.triton_kernels")


@pytest.fixture
def triton_path(tk):
    """Every quadratic conv on DEVICE through the Triton kernels (an error where they do
    not apply)."""
    with ops.kernels("require", backend="triton"):
        yield


def inputs(n, c, h, w, k, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    weight = torch.randn(3 * c, 1, k, k, generator=gen, dtype=dtype) / k
    bias = torch.randn(3 * c, generator=gen, dtype=dtype)
    grad = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    return x, weight, bias, grad


def branches(x, weight, bias):
    """a, b, c by three float64 depthwise convs (the definition)."""
    c, k = x.shape[1], weight.shape[-1]
    w, b = weight.view(c, 3, 1, k, k), bias.view(c, 3)
    return [F.conv2d(x, w[:, i], b[:, i], padding=k // 2, groups=c) for i in range(3)]


def on_device(t, dtype=torch.float32):
    return t.to(DEVICE, dtype).contiguous(memory_format=CL) if t.dim() == 4 else t.to(DEVICE, dtype)


def close(actual, expected, rtol=1e-5):
    """Agreement relative to the reference's scale (sums run in another order)."""
    expected = expected.to(torch.float64)
    scale = expected.abs().max().item() + 1e-12
    torch.testing.assert_close(actual.cpu().double(), expected.cpu(), rtol=rtol, atol=rtol * scale)


SHAPES = [  # n, c, h, w, k: partial tiles, two channel blocks, k = 3 ... 9
    (1, 1, 1, 1, 3),
    (2, 5, 9, 11, 7),
    (1, 40, 5, 17, 3),
    (1, 8, 8, 8, 5),
    (1, 6, 4, 3, 9),
]
IDS = ["x".join(map(str, s)) for s in SHAPES]


def scaled(x, weight, bias, gamma):
    """(y, a kept with gamma folded in, b) of y = gamma (a b + c), float64 definition."""
    a, b, c = branches(x, weight, bias)
    g = gamma.view(1, -1, 1, 1)
    return g * (a * b + c), g * a, b


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_forward_matches_three_convs(tk, shape):
    x, weight, bias, residual = inputs(*shape)
    gamma = torch.rand(x.shape[1], dtype=x.dtype) + 0.5
    args = [on_device(t) for t in (x, weight, bias, gamma)]
    y, ya, yb = tk.quadratic_forward(*args, True, True)
    for got, want in zip((y, ya, yb), scaled(x, weight, bias, gamma), strict=True):
        assert got.shape == x.shape and got.is_contiguous(memory_format=CL)
        close(got, want)
    (y_res,) = tk.quadratic_forward(*args, True, False, on_device(residual))
    close(y_res, residual + scaled(x, weight, bias, gamma)[0])
    a, b = tk.quadratic_forward(args[0], args[1], None, None, False, True)
    close(a, branches(x, weight, torch.zeros_like(bias))[0])
    close(b, branches(x, weight, torch.zeros_like(bias))[1])


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("with_scale", [True, False], ids=["gamma", "no-gamma"])
def test_backward_matches_autograd(tk, shape, with_scale):
    x, weight, bias, grad = inputs(*shape, seed=1)
    gamma = torch.rand(x.shape[1], dtype=x.dtype) + 0.5 if with_scale else None
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    if with_scale:
        leaves.append(gamma.clone().requires_grad_())
    y, a, b = scaled(*leaves[:3], leaves[3] if with_scale else torch.ones_like(bias[::3]))
    expected = torch.autograd.grad(y, leaves, grad)
    args = [on_device(t) for t in (x, weight, bias)]
    args += [on_device(gamma) if with_scale else None]
    args += [on_device(t.detach()) for t in (a, b, grad)]
    got = tk.quadratic_backward(*args, True, True, True, True)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        close(g, e)
    # any subset of the gradients, in the order [dx, dweight, dbias, dgamma]
    for i in range(len(expected)):
        needs = [j == i for j in range(4)]
        (g,) = tk.quadratic_backward(*args, *needs)
        close(g, expected[i])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_maps_with_float32_weights(tk, dtype):
    """Half-precision maps with float32 weight, bias and layer scale (what autocast gives):
    maps keep their dtype, parameter gradients the parameters'."""
    x, weight, bias, grad = inputs(2, 12, 9, 9, 7, seed=2)
    gamma = torch.rand(12, dtype=x.dtype) + 0.5
    x, grad = (t.to(dtype).double() for t in (x, grad))
    params = [on_device(t) for t in (weight, bias, gamma)]
    y, ya, yb = tk.quadratic_forward(on_device(x, dtype), *params, True, True)
    assert y.dtype == ya.dtype == dtype
    close(y, scaled(x, weight, bias, gamma)[0], rtol=1e-2)  # one rounding of the output
    dx, dw, db, dg = tk.quadratic_backward(
        on_device(x, dtype), *params, ya, yb, on_device(grad, dtype), True, True, True, True
    )
    assert dx.dtype == dtype and dw.dtype == db.dtype == dg.dtype == torch.float32
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, gamma)]
    expected = torch.autograd.grad(scaled(*leaves)[0], leaves, grad)
    for got, want in zip((dx, dw, db, dg), expected, strict=True):
        close(got, want, rtol=3e-2)  # a and b are rounded to the half type


def test_empty_batch_and_bad_input(tk):
    x, weight, bias, grad = (on_device(t) for t in inputs(0, 5, 4, 4, 3))
    gamma = torch.ones(5, device=DEVICE)
    y, a, b = tk.quadratic_forward(x, weight, bias, gamma, True, True)
    assert y.shape == x.shape
    dx, dw, db, dg = tk.quadratic_backward(
        x, weight, bias, gamma, a, b, grad, True, True, True, True
    )
    assert dx.shape == x.shape and not dw.any() and not db.any() and not dg.any()
    nchw = torch.randn(1, 5, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="channels-last"):
        tk.quadratic_forward(nchw, weight, bias, None, True, False)
    with pytest.raises(ValueError, match="odd k"):
        tk.quadratic_forward(x, weight[:, :, :2, :2], None, None, True, False)


def block_step(block, x, grad):
    x = x.clone().requires_grad_()
    y = block(x)
    y.backward(grad)
    grads = [x.grad] + [p.grad for p in block.parameters()]
    block.zero_grad(set_to_none=True)
    return [y.detach(), *grads]


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("shape", SHAPES[1:3], ids=IDS[1:3])
def test_op_with_layer_scale_and_residual_matches_the_definition(triton_path, shape, keep):
    from test_ops import definition, grads_of, make_inputs

    *dims, k = shape
    tensors = [on_device(t) for t in make_inputs(*dims, k)]

    def run(x, w, b, g, r):
        return ops.quadratic_dwconv(x, w, b, g, r, keep_branches=keep)

    y, grads = grads_of(run, tensors)
    y_ref, grads_ref = grads_of(
        lambda *t: definition(*t, k // 2), [t.cpu().double() for t in tensors]
    )
    close(y, y_ref, rtol=1e-4)
    for got, want in zip(grads, grads_ref, strict=True):
        close(got, want, rtol=1e-4)


@pytest.mark.skipif(not CUDA, reason="Triton's interpreter cannot run on fake tensors")
def test_opcheck_through_triton(triton_path):
    from test_ops import make_inputs

    x, w, b, g, r = (on_device(t) for t in make_inputs(2, 8, 6, 7, 3))
    x.requires_grad_()
    for keep in (True, False):
        args = (x, w, b, g, r, [1, 1], [1, 1], [1, 1], keep)
        torch.library.opcheck(torch.ops.quadranet.quadratic_dwconv, args)


@pytest.mark.parametrize("recompute", ["none", "cheap", "full"])
def test_block_matches_pytorch_path(tk, recompute):
    """A QuadraBlock's training step and inference through the kernels match PyTorch's ops."""
    torch.manual_seed(0)
    block = QuadraBlock(16, layer_scale_init=0.5, recompute=recompute)
    block = block.to(DEVICE).to(memory_format=CL)
    x = torch.randn(2, 16, 9, 10, device=DEVICE).contiguous(memory_format=CL)
    grad = torch.randn_like(x)
    with ops.kernels("off"):
        expected = block_step(block, x, grad)
        block.eval()
        with torch.no_grad():
            expected_eval = block(x)
        block.train()
    with ops.kernels("require", backend="triton"):
        convs = {k: v for k, v in ops.explain(block, x).backends().items() if "mlp" not in k}
        assert set(convs.values()) == {"triton"}
        actual = block_step(block, x, grad)
        block.eval()
        with torch.no_grad():
            actual_eval = block(x)
    for a, e in zip(actual, expected, strict=True):
        close(a, e, rtol=1e-4)
    close(actual_eval, expected_eval, rtol=1e-4)


def test_choice_on_other_dtypes_and_devices(tk):
    x = torch.randn(1, 4, 5, 5, device=DEVICE).contiguous(memory_format=CL)
    w = torch.randn(12, 1, 3, 3, device=DEVICE)
    with ops.kernels("auto", backend="triton"):
        assert ops.choose(x, w).backend == "triton"
        assert ops.choose(x.double(), w.double()).backend == "reference"  # float64
    with ops.kernels("off", backend="triton"):
        assert ops.choose(x, w).backend == "reference"


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_model_uses_kernels_under_bf16_autocast():
    from quadranet.models import create_model

    model = create_model("quadranet25_xxs", num_classes=10).cuda().to(memory_format=CL)
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=CL)
    convs = {k: v for k, v in ops.explain(model, x).backends().items() if "mlp" not in k}
    assert set(convs.values()) == {"triton"}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), torch.arange(4, device="cuda"))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
