"""C++ CPU kernels: parity with the PyTorch path, dispatch rules and the fallback.

Float64 `gradcheck` of the quadratic ops stays on the PyTorch path (the kernels are float32
only; see tests/test_quadratic.py and tests/test_fused.py); here the kernels are compared
with that path in float32.
"""

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quadranet.blocks import QuadraBlock
from quadranet.models.quadranet import QuadraNet
from quadranet.nn import depthwise, ext, fused
from quadranet.nn.depthwise import branch_convs, depthwise_quadratic_conv2d
from quadranet.nn.fused import channel_mlp

CL = torch.channels_last


@pytest.fixture(scope="module")
def ops():
    module = ext.load()
    if module is None:
        pytest.skip("the C++ CPU kernels could not be built here (see the warning)")
    return module


class Spy:
    """Counts the calls that reach the compiled ops."""

    def __init__(self, ops):
        self.ops, self.calls = ops, []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            return getattr(self.ops, name)(*args)

        return call


@pytest.fixture
def spy(ops, monkeypatch):
    spy = Spy(ops)
    monkeypatch.setattr(ext, "_module", spy)
    return spy


def close(actual, expected, rtol=1e-4):
    """fp32 agreement relative to the tensor's scale (sums run in a different order)."""
    scale = expected.abs().max().item() + 1e-12
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def quad_inputs(n, c, h, w, k, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=CL)
    weight = torch.randn(3 * c, 1, k, k, generator=gen) / k
    b = torch.randn(3 * c, generator=gen) if bias else None
    grad = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=CL)
    return x, weight, b, grad


def quad_step(x, weight, bias, grad, memory_efficient):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    k = weight.shape[-1]
    y = depthwise_quadratic_conv2d(*leaves, 1, k // 2, 1, memory_efficient)
    y.backward(grad)
    return [y.detach()] + [t.grad for t in leaves if t is not None]


SHAPES = [  # n, c, h, w, k
    (1, 1, 1, 1, 3),
    (3, 3, 5, 7, 5),
    (1, 8, 9, 6, 7),
    (3, 13, 7, 7, 3),
    (1, 13, 11, 10, 7),
    (3, 64, 6, 5, 7),
    (1, 20, 3, 2, 9),
    (2, 9, 10, 27, 7),  # two input-gradient column strips, the last narrower than a tile
]


@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quadratic_conv_matches_pytorch(spy, shape, memory_efficient):
    x, weight, bias, grad = quad_inputs(*shape, bias=shape[1] != 8)
    with ext.cpu_kernels(False):
        expected = quad_step(x, weight, bias, grad, memory_efficient)
    assert not spy.calls
    with ext.cpu_kernels(True):
        actual = quad_step(x, weight, bias, grad, memory_efficient)
    assert "quadratic_forward" in spy.calls and "quadratic_backward" in spy.calls
    assert actual[0].is_contiguous(memory_format=CL)
    for a, e in zip(actual, expected, strict=True):
        close(a, e)


@pytest.mark.parametrize("batch", [1, 3])  # batch 1 also splits channels among threads
def test_two_threads_sum_partials_deterministically(ops, batch):
    x, weight, bias, grad = quad_inputs(batch, 24, 20, 9, 7, seed=1)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ext.cpu_kernels(True):
            first, second = (quad_step(x, weight, bias, grad, False) for _ in range(2))
        with ext.cpu_kernels(False):
            expected = quad_step(x, weight, bias, grad, False)
    finally:
        torch.set_num_threads(previous)
    for a, b, e in zip(first, second, expected, strict=True):
        assert torch.equal(a, b)
        close(a, e)


def test_empty_batch(ops):
    x, weight, bias, grad = quad_inputs(0, 5, 4, 4, 3)
    y, a, b = ops.quadratic_forward(x, weight, bias, True, True, True, False)
    assert y.shape == a.shape == x.shape
    dx, dw, db = ops.quadratic_backward(x, weight, a, b, grad, True, True, True)
    assert dx.shape == x.shape and not dw.any() and not db.any()


def test_branch_convs_and_inference_forward(ops):
    x, weight, bias, _ = quad_inputs(2, 11, 8, 9, 5, seed=2)
    args = ((1, 1), (2, 2), (1, 1))
    for branches in [(0, 1, 2), (0, 1), (2,), (1, 0)]:
        with ext.cpu_kernels(False):
            expected = branch_convs(x, weight, bias, args, branches)
        actual = branch_convs(x, weight, bias, args, branches)
        assert len(actual) == len(branches)
        for a, e in zip(actual, expected, strict=True):
            close(a, e, rtol=1e-5)
    with torch.no_grad():
        with ext.cpu_kernels(False):
            expected = depthwise_quadratic_conv2d(x, weight, bias, padding=2)
        close(depthwise_quadratic_conv2d(x, weight, bias, padding=2), expected, rtol=1e-5)


def test_inference_forward_adds_the_residual_in_the_kernel(spy):
    x, weight, bias, residual = quad_inputs(2, 13, 8, 9, 5, seed=4)
    args = ((1, 1), (2, 2), (1, 1))
    with ext.cpu_kernels(False):
        expected = depthwise.quadratic_product(x, weight, bias, args) + residual
    assert not spy.calls
    actual = depthwise.quadratic_product(x, weight, bias, args, residual=residual)
    assert spy.calls == ["quadratic_forward"]
    close(actual, expected, rtol=1e-5)
    # an NCHW residual takes the PyTorch path, with the same result
    actual = depthwise.quadratic_product(x, weight, bias, args, residual=residual.contiguous())
    close(actual, expected, rtol=1e-5)


def test_quadra_block_inference_matches_the_pytorch_path(spy):
    torch.manual_seed(5)
    block = QuadraBlock(16, kernel_size=5, drop_path=0.2, layer_scale_init=0.5).eval()
    x = torch.randn(2, 16, 7, 6).contiguous(memory_format=CL)
    with torch.no_grad():
        with ext.cpu_kernels(False):
            expected = block(x)
        actual = block(x)
        # drop-path active (training mode without grad) keeps the unfused residual
        block.train()
        assert block(x).shape == x.shape
    assert spy.calls[0] == "quadratic_forward"
    close(actual, expected, rtol=1e-5)


def test_dispatch_only_where_the_kernels_apply(ops):
    x, weight, bias, _ = quad_inputs(1, 4, 6, 6, 3)
    same = ((1, 1), (1, 1), (1, 1))
    assert depthwise._kernel_ops(x, weight, bias, same) is not None
    nchw = x.contiguous()
    assert depthwise._kernel_ops(nchw, weight, bias, same) is None
    assert depthwise._kernel_ops(x.double(), weight.double(), None, same) is None
    assert depthwise._kernel_ops(x, weight, bias, ((2, 2), (1, 1), (1, 1))) is None
    assert depthwise._kernel_ops(x, weight, bias, ((1, 1), (0, 0), (1, 1))) is None
    assert depthwise._kernel_ops(x, weight, bias, ((1, 1), (1, 1), (2, 2))) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert depthwise._kernel_ops(x, weight, bias, same) is None
    with ext.cpu_kernels(False):
        assert depthwise._kernel_ops(x, weight, bias, same) is None


def test_inplace_gelu_matches_float64(ops):
    u = torch.cat(
        [
            torch.randn(1003, generator=torch.Generator().manual_seed(6)) * 4,
            torch.linspace(-30, 30, 997),
            torch.tensor([0.0, -0.0, 1e-30, -1e-30]),
        ]
    )
    expected = F.gelu(u.double())
    out = u.clone()
    assert ops.gelu_(out).data_ptr() == out.data_ptr()
    fresh = ops.gelu(u)  # the same approximation into a new tensor (training forward)
    assert fresh.data_ptr() != u.data_ptr() and torch.equal(fresh, out)
    err = (out.double() - expected).abs()
    assert (err <= 4e-7 * u.double().abs().clamp_min(1.0)).all(), err.max()
    # beyond the clamp at |u| = 5.5, exactly u and 0 (as float32 exact GELU); NaN stays NaN
    tails = torch.cat([torch.linspace(5.5, 40, 301), torch.tensor([float("inf")])])
    assert torch.equal(ops.gelu(tails), tails) and (ops.gelu(-tails[:-1]) == 0).all()
    assert ops.gelu(torch.tensor([float("nan")])).isnan().all()
    for op in (ops.gelu_, ops.gelu):
        with pytest.raises(RuntimeError, match="contiguous float32"):
            op(u.double())


def test_channel_mlp_inference_uses_the_inplace_gelu(spy):
    torch.manual_seed(7)
    block = QuadraBlock(16, kernel_size=3, layer_scale_init=0.5).eval()
    x = torch.randn(2, 7, 6, 16)
    with torch.no_grad():
        with ext.cpu_kernels(False):
            expected = block.mlp(x)
        actual = block.mlp(x)
        assert spy.calls == ["gelu_"]
        block.mlp.act = torch.nn.GELU(approximate="tanh")  # not the erf GELU: torch's op
        spy.calls.clear()
        tanh = block.mlp(x)
    assert "gelu_" not in spy.calls
    close(actual, expected, rtol=1e-5)
    assert not torch.allclose(tanh, expected, rtol=0, atol=1e-7)


def test_gelu_and_grad_matches_float64(ops):
    gen = torch.Generator().manual_seed(3)
    u = torch.cat([torch.randn(1003, generator=gen) * 4, torch.linspace(-12, 12, 997)])
    u = torch.cat([u, torch.tensor([0.0, -0.0, 1e-30, 30.0, -30.0, 100.0, -100.0])])
    grad = torch.randn(u.shape, generator=gen)
    grad_u = grad.clone()
    (z,) = ops.gelu_and_grad(u, grad_u)
    # Z is the forward's GELU bit for bit, so fc2's weight gradient sees the forward's Z
    assert torch.equal(z, ops.gelu(u))
    u64 = u.double()
    derivative = torch.ops.aten.gelu_backward(torch.ones_like(u64), u64)
    torch.testing.assert_close(grad_u.double(), grad.double() * derivative, rtol=1e-5, atol=2e-6)
    # the derivative itself (grad = 1): within 4.5e-7 of float64, and exactly 1 (0) for
    # u >= 6 (u <= -6), as float32 rounds it there; NaN stays NaN
    ones = torch.ones_like(u)
    ops.gelu_and_grad(u, ones)
    assert (ones.double() - derivative).abs().max() <= 4.5e-7
    tails = torch.cat([torch.linspace(6, 40, 301), torch.tensor([float("inf")])])
    up, down = torch.ones_like(tails), torch.ones_like(tails)
    ops.gelu_and_grad(tails, up)
    ops.gelu_and_grad(-tails, down)
    assert (up == 1).all() and (down == 0).all()
    nan = torch.ones(1)
    ops.gelu_and_grad(torch.tensor([float("nan")]), nan)
    assert nan.isnan().all()
    empty = torch.empty(0, 4)
    assert ops.gelu_and_grad(empty, empty.clone())[0].numel() == 0
    assert torch.equal(ops.gelu_and_grad(empty, empty.clone(), True)[1], torch.zeros(4))


@pytest.mark.parametrize("cols", [13, 64])  # a partial vector per row; whole vectors
def test_gelu_and_grad_column_sums(ops, cols):
    """With want_sum, the bias gradient: the column sums of the new grad (rows over the
    threads' chunks and several row blocks)."""
    gen = torch.Generator().manual_seed(8)
    u = torch.randn(3, 301, cols, generator=gen) * 3
    grad = torch.randn(u.shape, generator=gen)
    grad_u = grad.clone()
    z, sums = ops.gelu_and_grad(u, grad_u, True)
    d64 = torch.ops.aten.gelu_backward(grad.double(), u.double())
    torch.testing.assert_close(grad_u.double(), d64, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(sums.double(), d64.sum((0, 1)), rtol=1e-5, atol=1e-4)
    assert sums.shape == (cols,) and z.shape == u.shape


@pytest.mark.parametrize("c", [20, 64])  # a partial vector per row; whole vectors
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_kernels_match_float64(ops, c, affine):
    """LayerNorm from saved statistics and its backward (plus a residual's gradient) against
    float64 autograd, over several row tasks per thread."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 7, 11, c, generator=gen) * 2 + 1
    w, b = (torch.randn(c, generator=gen) for _ in range(2)) if affine else (None, None)
    grad, res = torch.randn(x.shape, generator=gen), torch.randn(x.shape, generator=gen)
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, [c], w, b, 1e-6)
    leaves = [t.double().requires_grad_() if t is not None else None for t in (x, w, b)]
    y64 = F.layer_norm(leaves[0], (c,), leaves[1], leaves[2], 1e-6)
    y64.backward(grad.double())
    applied = ops.layer_norm_apply(x, mean, rstd, w, b).double()
    torch.testing.assert_close(applied, y64.detach(), rtol=1e-5, atol=1e-5)
    for residual in (None, res):
        grad_x, grad_w, grad_b = ops.layer_norm_backward(grad, x, mean, rstd, w, residual)
        expected_x = leaves[0].grad + (0 if residual is None else residual.double())
        torch.testing.assert_close(grad_x.double(), expected_x, rtol=1e-5, atol=1e-5)
    if affine:
        close(grad_w.double(), leaves[1].grad)
        close(grad_b.double(), leaves[2].grad)
    with pytest.raises(RuntimeError, match="gradients must be contiguous float32"):
        ops.layer_norm_backward(grad.transpose(1, 2), x, mean, rstd, w, None)


@pytest.mark.parametrize(("use_gamma", "threads"), [(True, 2), (False, 2), (True, 1)])
def test_channel_mlp_gelu_kernel_matches(spy, use_gamma, threads):
    """The MLP's backward with the kernels (the GELU pass, LayerNorm from the saved
    statistics, with two threads the grouped products) against plain autograd."""
    gen = torch.Generator().manual_seed(4)
    c, hidden = 6, 24
    shapes = [(2, 5, 3, c), (c,), (c,), (hidden, c), (hidden,), (c, hidden), (c,), (c,)]
    args = [torch.randn(s, generator=gen) for s in shapes]
    if not use_gamma:
        args[-1] = None
    grad = torch.randn(2, 5, 3, c, generator=gen)

    def step():
        leaves = [a.clone().requires_grad_() if a is not None else None for a in args]
        channel_mlp(*leaves).backward(grad)
        return [t.grad for t in leaves if t is not None]

    with ext.cpu_kernels(False):
        expected = step()
    assert not spy.calls
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        actual = step()
    finally:
        torch.set_num_threads(previous)
    for a, e in zip(actual, expected, strict=True):
        close(a, e)
    groups = ["matmul_groups"] if threads == 2 else []
    assert spy.calls == [
        "gelu",
        "gelu_and_grad",
        "layer_norm_apply",
        *groups,
        "layer_norm_backward",
    ]


@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_groups_match_mm(ops, threads):
    """Two groups of products side by side (each single-threaded) give torch.mm's results,
    into row slices of one output as the MLP's backward uses them."""
    gen = torch.Generator().manual_seed(11)
    a0, b0 = torch.randn(37, 50, generator=gen), torch.randn(50, 29, generator=gen)
    a1 = torch.randn(80, 50, generator=gen).t()  # a transposed view, as G^T
    b1 = torch.randn(80, 29, generator=gen).requires_grad_()  # a weight, as in backward
    c = torch.randn(16, 50, generator=gen)
    out0, out1 = torch.empty(37, 29), torch.empty(50, 29)
    rows = torch.empty(16, 29)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():  # as in a backward; the worker thread has its own grad mode
            ops.matmul_groups(
                [out0, rows[:7], out1, rows[7:]],
                [a0, c[:7], a1, c[7:]],
                [b0, b0, b1, b0],
                [0, 0, 1, 1],
            )
    finally:
        torch.set_num_threads(previous)
    close(out0, a0 @ b0, rtol=1e-5)
    close(out1, (a1 @ b1).detach(), rtol=1e-5)
    close(rows, c @ b0, rtol=1e-5)
    with pytest.raises(RuntimeError, match="group must be 0 or 1"):
        ops.matmul_groups([out0], [a0], [b0], [2])
    with pytest.raises(RuntimeError, match="do not match"):
        ops.matmul_groups([out1], [a0], [b0], [0])
    with pytest.raises(RuntimeError, match="float32"):
        ops.matmul_groups([out0.double()], [a0.double()], [b0.double()], [0])


def grads_after_step(model, x, memory_efficient, enabled):
    for m in model.modules():
        if hasattr(m, "memory_efficient"):
            m.memory_efficient = memory_efficient
    model.zero_grad()
    with ext.cpu_kernels(enabled):
        out = model(x)
        out.backward(torch.cos(out))
    return [out.detach()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_block_and_model_training_steps_match(spy, memory_efficient):
    torch.manual_seed(5)
    block = QuadraBlock(12, kernel_size=7, layer_scale_init=0.5)
    x = torch.randn(2, 12, 9, 9).contiguous(memory_format=CL)
    model = QuadraNet(num_classes=5, depths=(1, 1), dims=(8, 16), stem_stride=2)
    model = model.to(memory_format=CL)
    image = torch.randn(2, 3, 16, 16).contiguous(memory_format=CL)
    for net, inp in [(block, x), (model, image)]:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.2 * torch.randn_like(p))
        expected = grads_after_step(net, inp, memory_efficient, False)
        assert not spy.calls
        actual = grads_after_step(net, inp, memory_efficient, True)
        assert "quadratic_backward" in spy.calls
        assert ("gelu_and_grad" in spy.calls) == memory_efficient
        assert ("layer_norm_backward" in spy.calls) == memory_efficient
        spy.calls.clear()
        for a, e in zip(actual, expected, strict=True):
            close(a, e, rtol=2e-4)


def test_mlp_residual_joins_the_op_on_channels_last_maps(spy):
    """On contiguous NHWC maps the MLP's residual goes inside: in training the
    memory-efficient op adds it in fc2's product and its gradient in LayerNorm's backward,
    at inference fc2's product accumulates onto x. Both match the plain sum."""
    torch.manual_seed(6)
    block = QuadraBlock(16, kernel_size=5, layer_scale_init=0.5)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=CL)
    expected = grads_after_step(block, x, False, True)
    spy.calls.clear()
    actual = grads_after_step(block, x, "balanced", True)
    assert "layer_norm_backward" in spy.calls and "mlp_forward" not in spy.calls
    for a, e in zip(actual, expected, strict=True):
        close(a, e, rtol=2e-4)
    x_nhwc = x.permute(0, 2, 3, 1)
    with torch.no_grad():
        fused_out = block.mlp.fused_residual(x_nhwc)
        close(fused_out, x_nhwc + block.mlp(x_nhwc), rtol=1e-5)
        assert block.mlp.fused_residual(x.contiguous().permute(0, 2, 3, 1)) is None  # NCHW


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(ext.ENV_VAR, "0")
    assert ext.load() is None and ext.kernels() is None
    x, weight, bias, grad = quad_inputs(1, 5, 6, 6, 3)
    with ext.cpu_kernels(False):
        expected = quad_step(x, weight, bias, grad, False)
    for a, e in zip(quad_step(x, weight, bias, grad, False), expected, strict=True):
        assert torch.equal(a, e)


def test_triton_setting(monkeypatch):
    """QUADRANET_TRITON: 0 never, unset where Triton imports, 1 fails loudly where it does
    not (a GPU tensor; here the CPU stands in for one), anything else is refused."""
    import quadranet.nn

    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=CL)
    monkeypatch.setattr(depthwise, "TRITON_DEVICES", ("cpu",))
    monkeypatch.delattr(quadranet.nn, "triton_kernels", raising=False)
    monkeypatch.setitem(sys.modules, "quadranet.nn.triton_kernels", None)
    monkeypatch.delenv(depthwise.TRITON_ENV_VAR, raising=False)
    assert depthwise.triton_ops(x) is None  # no Triton: the PyTorch path
    monkeypatch.setenv(depthwise.TRITON_ENV_VAR, "1")
    with pytest.raises(RuntimeError, match="QUADRANET_TRITON=1 but the Triton kernels"):
        depthwise.triton_ops(x)
    monkeypatch.setenv(depthwise.TRITON_ENV_VAR, "0")
    assert depthwise.triton_ops(x) is None
    monkeypatch.setenv(depthwise.TRITON_ENV_VAR, "yes")
    with pytest.raises(ValueError, match="use 1"):
        depthwise.triton_ops(x)


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    def broken_build():
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(ext, "_build", broken_build)
    monkeypatch.setattr(ext, "_loaded", False)
    monkeypatch.setattr(ext, "_module", None)
    monkeypatch.delenv(ext.ENV_VAR, raising=False)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*QUADRANET_CPU_KERNELS=0"):
        assert ext.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ext.load() is None  # one warning per process
        x, weight, bias, grad = quad_inputs(1, 5, 6, 6, 3)
        quad_step(x, weight, bias, grad, True)  # the PyTorch path still runs
    monkeypatch.setenv(ext.ENV_VAR, "1")
    with pytest.raises(RuntimeError, match="QUADRANET_CPU_KERNELS=1"):
        ext.load()


def test_build_key_depends_on_source_and_torch(monkeypatch, tmp_path):
    key = ext.build_key()
    assert key == ext.build_key()
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    other_version = ext.build_key()
    assert other_version != key
    # the same version installed in another environment gets its own build
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "torch" / "__init__.py"))
    assert ext.build_key() not in (key, other_version)


def mlp_params(gen, c, hidden, affine):
    """(ln_w, ln_b, w1, b1, w2, b2) of a channel MLP; without `affine`, no LN affine or biases."""
    sizes = (c, c, hidden, c)
    ln_w, ln_b, b1, b2 = (torch.randn(n, generator=gen) if affine else None for n in sizes)
    w1 = torch.randn(hidden, c, generator=gen) / c**0.5
    w2 = torch.randn(c, hidden, generator=gen) / hidden**0.5
    return ln_w, ln_b, w1, b1, w2, b2


def mlp_reference(x, ln_w, ln_b, w1, b1, w2, b2, residual):
    """x (+ residual) + fc2(GELU(fc1(LN(x)))) in float64."""
    d = [None if t is None else t.double() for t in (x, ln_w, ln_b, w1, b1, w2, b2)]
    n = F.layer_norm(d[0], (x.shape[-1],), d[1], d[2], 1e-6)
    y = F.linear(F.gelu(F.linear(n, d[3], d[4])), d[5], d[6])
    return (d[0] + y if residual else y).float()


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize(
    "rows, c, hidden, chunk, affine, residual",
    [
        (37, 13, 52, 0, True, True),  # one chunk, channels not a multiple of 8
        (100, 16, 64, 7, True, True),  # a last chunk of 2 rows
        (64, 24, 40, 1, False, False),  # one row per chunk, no LN affine or biases
        (9, 8, 32, 500, True, False),  # chunk larger than the input
    ],
)
def test_chunked_inference_mlp_matches_float64(ops, rows, c, hidden, chunk, affine, residual, pack):
    gen = torch.Generator().manual_seed(rows + c)
    x = torch.randn(rows, c, generator=gen) * 3 + 1
    ln_w, ln_b, w1, b1, w2, b2 = mlp_params(gen, c, hidden, affine)
    out = ops.mlp_inference(x, ln_w, ln_b, 1e-6, w1, b1, w2, b2, residual, chunk, pack)
    close(out, mlp_reference(x, ln_w, ln_b, w1, b1, w2, b2, residual), rtol=1e-5)
    # any leading shape: rows are the product of all but the last dim
    out4 = ops.mlp_inference(x.view(1, rows, 1, c), ln_w, ln_b, 1e-6, w1, b1, w2, b2, residual)
    assert out4.shape == (1, rows, 1, c)
    close(out4.view(rows, c), out, rtol=1e-5)


def test_chunked_inference_mlp_rejects_bad_input(ops):
    x, w1, w2 = torch.randn(4, 8), torch.randn(32, 8), torch.randn(8, 32)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.mlp_inference(x.double(), None, None, 1e-6, w1, None, w2, None, True)
    with pytest.raises(RuntimeError, match="fc1"):
        ops.mlp_inference(x, None, None, 1e-6, w1.t(), None, w2, None, True)
    with pytest.raises(RuntimeError, match="fc1 bias"):
        ops.mlp_inference(x, None, None, 1e-6, w1, torch.randn(8), w2, None, True)
    empty = ops.mlp_inference(x[:0], None, None, 1e-6, w1, None, w2, None, True)
    assert empty.shape == (0, 8)


def test_block_inference_uses_the_chunked_mlp_on_large_maps(spy, monkeypatch):
    torch.manual_seed(8)
    block = QuadraBlock(16, kernel_size=3, drop_path=0.1, layer_scale_init=0.5).eval()
    x = torch.randn(2, 16, 9, 7).contiguous(memory_format=CL)
    with torch.no_grad():
        with ext.cpu_kernels(False):
            expected = block(x)
        block(x)  # a small map: the unchunked MLP (its in-place GELU)
        assert "mlp_inference" not in spy.calls and "gelu_" in spy.calls
        monkeypatch.setattr(fused, "CHUNKED_MLP_MIN_HIDDEN", 0)
        spy.calls.clear()
        actual = block(x)
        assert spy.calls == ["quadratic_forward", "mlp_inference"]
        close(actual, expected, rtol=1e-5)
        assert actual.is_contiguous(memory_format=CL)
        # not fused: drop-path active, gradients, a tanh GELU, more than 128 channels
        for case in ("train", "grad", "tanh"):
            spy.calls.clear()
            block.train(case == "train")
            with torch.set_grad_enabled(case == "grad"):
                if case == "tanh":
                    block.mlp.act = torch.nn.GELU(approximate="tanh")
                block(x)
            assert "mlp_inference" not in spy.calls, case
        wide = QuadraBlock(136, kernel_size=3).eval()
        spy.calls.clear()
        wide(torch.randn(1, 136, 3, 3).contiguous(memory_format=CL))
        assert "mlp_inference" not in spy.calls


def test_model_inference_with_the_chunked_mlp_matches(spy, monkeypatch):
    monkeypatch.setattr(fused, "CHUNKED_MLP_MIN_HIDDEN", 0)
    torch.manual_seed(9)
    model = QuadraNet(depths=(1, 1), dims=(16, 32), num_classes=5).eval()
    model = model.to(memory_format=CL)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
    with torch.no_grad():
        with ext.cpu_kernels(False):
            expected = model(x)
        actual = model(x)
    assert spy.calls.count("mlp_inference") == 2
    close(actual, expected, rtol=1e-4)


def test_kernel_benchmark_mlp_case_compares_equal_work(ops):
    """benchmarks/kernels.py times two implementations of the same result."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("kernel_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    old, new = bench.inference_mlp_case(2, 16, 5)
    close(new(), old(), rtol=1e-5)
    old, new = bench.training_mlp_case(2, 16, 5)
    close(new(), old(), rtol=1e-5)  # the input's gradient
    old, new = bench.layer_norm_case(2, 20, 5)
    for a, e in zip(new(), old(), strict=True):
        close(a, e, rtol=1e-5)


def mlp_float64_grads(x, params, grad, residual):
    """Output and gradients of x (+ residual) + fc2(GELU(fc1(LN(x)))) under float64 autograd;
    params = (ln_w, ln_b, w1, b1, w2, b2), any of ln_w, ln_b, b1, b2 may be None."""
    leaves = [t.double().requires_grad_() if t is not None else None for t in (x, *params)]
    x64, ln_w, ln_b, w1, b1, w2, b2 = leaves
    n = F.layer_norm(x64, (x.shape[-1],), ln_w, ln_b, 1e-6)
    y = F.linear(F.gelu(F.linear(n, w1, b1)), w2, b2)
    out = x64 + y if residual else y
    out.backward(grad.double())
    return out.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize(
    "rows, c, hidden, chunk, affine, residual",
    [
        (150, 13, 52, 0, True, True),  # channels not a multiple of 8, one chunk
        (150, 16, 64, 32, True, False),  # a last chunk of 22 rows
        (64, 24, 40, 1, False, True),  # one row per chunk, no LN affine or biases
    ],
)
def test_chunked_training_mlp_matches_float64(ops, rows, c, hidden, chunk, affine, residual):
    gen = torch.Generator().manual_seed(rows * c)
    x = torch.randn(rows, c, generator=gen) * 2 + 0.5
    ln_w, ln_b, w1, b1, w2, b2 = mlp_params(gen, c, hidden, affine)
    grad = torch.randn(rows, c, generator=gen)
    out, u, mean, rstd = ops.mlp_forward(x, ln_w, ln_b, 1e-6, w1, b1, w2, b2, residual, chunk)
    expected, grads = mlp_float64_grads(x, (ln_w, ln_b, w1, b1, w2, b2), grad, residual)
    close(out, expected.float(), rtol=1e-5)
    close(u, F.linear(F.layer_norm(x, (c,), ln_w, ln_b, 1e-6), w1, b1), rtol=1e-5)
    assert mean.shape == rstd.shape == (rows, 1)
    close(mean, x.mean(-1, keepdim=True), rtol=1e-5)
    back = ops.mlp_backward(x, mean, rstd, u, grad, ln_w, ln_b, w1, w2, residual, chunk)
    gx, glw, glb, gw1, gb1, m, g_sum = back
    close(gx, grads[0].float())
    close(gw1, grads[3].float())
    close(m, grads[5].float())  # fc2 weight gradient: G^T Z (no layer scale here)
    close(g_sum, grad.sum(0))
    if affine:
        for actual, expected_grad in zip((glw, glb, gb1), (grads[1], grads[2], grads[4])):
            close(actual, expected_grad.float())
    with pytest.raises(RuntimeError, match="do not match"):
        ops.mlp_backward(x, mean, rstd, u[:-1], grad, ln_w, ln_b, w1, w2, residual, chunk)


@pytest.mark.parametrize("use_gamma, residual", [(True, True), (False, False), (True, False)])
def test_channel_mlp_uses_the_chunked_kernels_on_large_maps(spy, monkeypatch, use_gamma, residual):
    torch.manual_seed(10)
    c, h = 12, 48
    args = [torch.randn(2, 5, 7, c), torch.randn(c), torch.randn(c), torch.randn(h, c) / 4]
    args += [torch.randn(h), torch.randn(c, h) / 7, torch.randn(c)]
    args.append(torch.rand(c) + 0.5 if use_gamma else None)
    grad = torch.randn(2, 5, 7, c)

    def step():
        leaves = [a.clone().requires_grad_() if a is not None else None for a in args]
        out = channel_mlp(*leaves, 1e-6, residual)
        out.backward(grad)
        return [out.detach()] + [t.grad for t in leaves if t is not None]

    expected = step()  # a small map: the whole-tensor path
    assert "mlp_forward" not in spy.calls
    monkeypatch.setattr(fused, "CHUNKED_MLP_MIN_HIDDEN", 0)
    spy.calls.clear()
    actual = step()
    assert spy.calls == ["mlp_forward", "mlp_backward"]
    for a, e in zip(actual, expected, strict=True):
        close(a, e, rtol=2e-5)
    monkeypatch.setattr(fused, "CHUNKED_MLP_MAX_DIM", c - 1)  # too many channels: not chunked
    spy.calls.clear()
    step()
    assert "mlp_forward" not in spy.calls


def test_training_steps_with_the_chunked_mlp_match(spy, monkeypatch):
    monkeypatch.setattr(fused, "CHUNKED_MLP_MIN_HIDDEN", 0)
    torch.manual_seed(11)
    model = QuadraNet(num_classes=5, depths=(1, 1), dims=(8, 16), stem_stride=2)
    model = model.to(memory_format=CL)
    image = torch.randn(2, 3, 16, 16).contiguous(memory_format=CL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    expected = grads_after_step(model, image, "balanced", False)
    actual = grads_after_step(model, image, "balanced", True)
    assert spy.calls.count("mlp_forward") == spy.calls.count("mlp_backward") == 2
    for a, e in zip(actual, expected, strict=True):
        close(a, e, rtol=2e-4)
