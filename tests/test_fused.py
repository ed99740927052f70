"""Memory-efficient branches: float64 gradcheck, equality with plain autograd, saved bytes."""

import pytest
import torch
from torch.autograd import gradcheck

from quadranet.bench.measure import saved_tensor_bytes
from quadranet.blocks import ConvBlock, HorBlock, QuadraBlock
from quadranet.nn.fused import channel_mlp, quadratic_mixer

D = torch.float64


def rand(*shape, grad=True):
    return torch.randn(*shape, dtype=D, requires_grad=grad)


@pytest.mark.parametrize("keep_branches", [False, True])
@pytest.mark.parametrize("use_gamma", [True, False])
@pytest.mark.parametrize("k", [3, 5])
def test_quadratic_mixer_gradcheck(use_gamma, k, keep_branches):
    torch.manual_seed(0)
    c = 5
    args = [rand(2, c, 6, 6), rand(c), rand(c), rand(3 * c, 1, k, k), rand(3 * c)]
    args.append(rand(c) if use_gamma else None)
    fn = lambda *a: quadratic_mixer(*a, 1e-6, k // 2, keep_branches)  # noqa: E731
    assert gradcheck(fn, tuple(args))
    with_x = lambda *a: quadratic_mixer(*a, 1e-6, k // 2, keep_branches, residual=True)  # noqa: E731
    assert gradcheck(with_x, tuple(args))
    torch.testing.assert_close(with_x(*args), args[0] + fn(*args))


@pytest.mark.parametrize("keep_branches", [False, True])
@pytest.mark.parametrize("frozen", ["conv_weight", "conv_bias", "gamma"])
def test_quadratic_mixer_gradcheck_with_frozen_or_missing_parts(frozen, keep_branches):
    # layer-scale gradient without conv bias, and with conv weight or bias frozen
    torch.manual_seed(2)
    c = 4
    x, ln_w, ln_b = rand(2, c, 5, 5), rand(c), rand(c)
    w, b, gamma = rand(3 * c, 1, 3, 3), rand(3 * c), rand(c)
    if frozen == "conv_bias":
        b = None
    else:
        {"conv_weight": w, "gamma": gamma}[frozen].requires_grad_(False)

    def fn(x, ln_w, ln_b, w, gamma):
        return quadratic_mixer(x, ln_w, ln_b, w, b, gamma, 1e-6, 1, keep_branches)

    assert gradcheck(fn, (x, ln_w, ln_b, w, gamma))


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("use_gamma", [True, False])
def test_channel_mlp_gradcheck(use_gamma, residual):
    torch.manual_seed(1)
    c, h = 4, 12
    args = [rand(2, 3, 3, c), rand(c), rand(c), rand(h, c), rand(h), rand(c, h), rand(c)]
    args.append(rand(c) if use_gamma else None)
    assert gradcheck(lambda *a: channel_mlp(*a, 1e-6, residual), tuple(args))
    # an NHWC view of an NCHW map (not contiguous), as NCHW models pass it
    args[0] = rand(2, c, 3, 3, grad=False).permute(0, 2, 3, 1).requires_grad_()
    assert gradcheck(lambda *a: channel_mlp(*a, 1e-6, residual), tuple(args))


def _run_block(block, x, memory_efficient):
    block.memory_efficient = memory_efficient
    block.mlp.memory_efficient = memory_efficient
    block.zero_grad()
    xi = x.clone().requires_grad_()
    out = block(xi)
    out.backward(torch.sin(out))
    return [out.detach(), xi.grad] + [p.grad.clone() for p in block.parameters()]


@pytest.mark.parametrize("level", [True, "balanced"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_memory_efficient_block_equals_plain_autograd(channels_last, level):
    torch.manual_seed(2)
    block = QuadraBlock(8, kernel_size=5, layer_scale_init=0.7).double()
    with torch.no_grad():  # non-trivial parameters everywhere
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 8, 9, 9, dtype=D)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    plain = _run_block(block, x, False)
    efficient = _run_block(block, x, level)
    for a, b in zip(plain, efficient):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_memory_efficient_level_is_checked():
    with pytest.raises(ValueError, match="balanced"):
        QuadraBlock(8, memory_efficient="fast")


def test_memory_efficient_block_with_drop_path_matches():
    block = QuadraBlock(8, drop_path=0.5, layer_scale_init=0.5).double()
    x = torch.randn(4, 8, 7, 7, dtype=D)
    torch.manual_seed(3)
    plain = _run_block(block, x, False)
    torch.manual_seed(3)
    efficient = _run_block(block, x, True)
    for a, b in zip(plain, efficient):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def _saved(block, x):
    return saved_tensor_bytes(lambda: block(x), exclude=tuple(block.parameters()))


def test_memory_efficient_block_saves_far_less():
    torch.manual_seed(4)
    x = torch.randn(2, 32, 14, 14, requires_grad=True)
    plain = _saved(QuadraBlock(32), x)
    efficient = _saved(QuadraBlock(32, memory_efficient=True), x)
    balanced = _saved(QuadraBlock(32, memory_efficient="balanced"), x)
    act = x.numel() * x.element_size()
    # Spatial branch: x only; MLP: its input and fc1's output (4C); plus LN statistics.
    assert efficient < 6.2 * act
    # balanced: the spatial branch also keeps the conv's branches a and b
    assert 7.9 * act < balanced < 8.2 * act
    assert efficient <= 0.65 * _saved(HorBlock(32, order=3), x)
    assert efficient <= _saved(ConvBlock(32), x)
    assert efficient < 0.4 * plain


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_bf16_autocast_training_step(memory_efficient):
    """CPU autocast: finite outputs and fp32 gradients close to the fp32 ones."""
    import timm

    torch.manual_seed(5)
    model = timm.create_model(
        "quadranet25_xxs", num_classes=10, memory_efficient=memory_efficient, layer_scale_init=1.0
    )
    x = torch.randn(2, 3, 64, 64) * 4  # realistic activation scale
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = model(x)
        assert torch.isfinite(out).all()
        out.float().square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[1].dtype == torch.float32 and torch.isfinite(grads[1]).all()
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.95
