"""Neuron level: quadratic linear/conv layers against independent references."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck

from quadranet.bench.measure import saved_tensor_bytes
from quadranet.nn import QuadraticConv2d, QuadraticLinear, quadratic_conv2d
from quadranet.nn.quadratic import _combine

CONV_CASES = [
    # in, out, k, stride, groups, H
    (8, 8, 7, 1, 8, 12),  # QuadraNet's depthwise case
    (6, 6, 3, 2, 6, 9),
    (4, 6, 5, 1, 2, 10),
    (3, 5, 3, 1, 1, 7),
    (4, 8, 3, 2, 4, 8),  # depthwise with channel multiplier 2
]


def naive_quadratic_conv(m: QuadraticConv2d, x: torch.Tensor) -> torch.Tensor:
    """Three separate convolutions, combined as a * b + c."""
    wa, wb, wc = m.branch_weights()
    ba, bb, bc = m.bias.view(m.groups, 3, -1).unbind(1)
    args = dict(stride=m.stride, padding=m.padding, groups=m.groups)
    ya = F.conv2d(x, wa, ba.reshape(-1), **args)
    yb = F.conv2d(x, wb, bb.reshape(-1), **args)
    yc = F.conv2d(x, wc, bc.reshape(-1), **args)
    return ya * yb + yc


@pytest.mark.parametrize("cin,cout,k,stride,groups,size", CONV_CASES)
def test_fused_conv_matches_three_convolutions(cin, cout, k, stride, groups, size):
    torch.manual_seed(0)
    m = QuadraticConv2d(cin, cout, k, stride=stride, groups=groups).double()
    with torch.no_grad():  # random, non-tiny values so the product term matters
        m.weight.normal_()
        m.bias.normal_()
    x = torch.randn(2, cin, size, size, dtype=torch.float64)
    ref = naive_quadratic_conv(m, x)
    out = m(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())


@pytest.mark.parametrize("cin,cout,k,stride,groups,size", CONV_CASES)
def test_full_recompute_gradcheck(cin, cout, k, stride, groups, size):
    torch.manual_seed(1)
    x = torch.randn(2, cin, size, size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3 * cout, cin // groups, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3 * cout, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return quadratic_conv2d(x, w, b, stride, k // 2, 1, groups, recompute="full")

    assert gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("recompute", ["cheap", "full"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cin,cout,k,stride,groups,size", CONV_CASES)
def test_gradients_equal_naive_autograd(
    cin, cout, k, stride, groups, size, channels_last, recompute
):
    """The layer's backward (custom depthwise op, recomputation) vs autograd on three convs."""
    torch.manual_seed(2)
    x = torch.randn(2, cin, size, size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    m = QuadraticConv2d(cin, cout, k, stride=stride, groups=groups, recompute=recompute).double()
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    results = []
    for forward in (m, lambda x: naive_quadratic_conv(m, x)):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        out = forward(xi)
        out.backward(torch.cos(out))
        results.append((out.detach(), xi.grad, m.weight.grad.clone(), m.bias.grad.clone()))
    for fast, naive in zip(*results):
        torch.testing.assert_close(fast, naive, rtol=1e-10, atol=1e-12)
    if channels_last and groups == cin == cout:
        assert results[0][0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("cin,cout,k,stride,groups,size", CONV_CASES)
def test_per_branch_path_equals_one_fused_call(cin, cout, k, stride, groups, size):
    """The depthwise fast path equals one grouped conv with 3x outputs, then a * b + c."""
    torch.manual_seed(3)
    m = QuadraticConv2d(cin, cout, k, stride=stride, groups=groups).double()
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = torch.randn(2, cin, size, size, dtype=torch.float64)
    y3 = F.conv2d(x, m.weight, m.bias, m.stride, m.padding, 1, groups)
    torch.testing.assert_close(m(x), _combine(y3, groups), rtol=1e-10, atol=1e-12)


def test_full_recompute_without_bias_and_input_grad_only():
    torch.manual_seed(4)
    m = QuadraticConv2d(4, 4, 3, groups=4, bias=False, recompute="full").double()
    m.weight.requires_grad_(False)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    assert gradcheck(m, (x,))
    assert m.weight.grad is None


@pytest.mark.parametrize("groups", [32, 4])
def test_full_recompute_saves_only_the_input(groups):
    torch.manual_seed(5)
    x = torch.randn(4, 32, 28, 28, requires_grad=True)
    saved = {}
    for recompute in ("cheap", "full"):
        m = QuadraticConv2d(32, 32, 7, groups=groups, recompute=recompute)
        saved[recompute] = saved_tensor_bytes(lambda m=m: m(x), exclude=(m.weight, m.bias))
    assert saved["full"] <= saved["cheap"] / 3
    assert saved["full"] == x.numel() * x.element_size()  # only the input


def test_full_recompute_runs_plain_under_no_grad():
    m = QuadraticConv2d(4, 4, 3, groups=4, recompute="full")
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        y = m(x)
    assert not y.requires_grad


def test_quadratic_linear_matches_formula():
    torch.manual_seed(6)
    m = QuadraticLinear(5, 3).double()
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = torch.randn(7, 5, dtype=torch.float64)
    a, b, c = m.branch_weights()
    ba, bb, bc = m.bias.view(3, -1)
    ref = (x @ a.T + ba) * (x @ b.T + bb) + (x @ c.T + bc)
    torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)


def test_default_init_is_truncated_normal_with_zero_bias():
    torch.manual_seed(7)
    m = QuadraticConv2d(64, 64, 7, groups=64)
    assert m.bias.abs().max() == 0
    assert abs(m.weight.std().item() - 0.02) < 0.003
    assert abs(m.weight.mean().item()) < 0.001


@pytest.mark.parametrize("groups", [1, 4])
def test_adapter_init_reproduces_the_first_order_conv(groups):
    torch.manual_seed(8)
    conv = nn.Conv2d(8, 8, 5, padding=2, groups=groups)
    q = QuadraticConv2d.from_conv(conv)
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(q(x), conv(x))
    wa, wb, _ = q.branch_weights()
    assert wa.abs().max() == 0 and wb.abs().max() > 0
    q(x).square().sum().backward()
    grad_a = q.weight.grad.view(groups, 3, -1)[:, 0]
    assert grad_a.abs().max() > 0  # the quadratic term still learns


def test_adapter_init_refuses_a_conv_it_cannot_reproduce():
    reflect = nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect")
    with pytest.raises(ValueError, match="zero-padded convs, got padding_mode='reflect'"):
        QuadraticConv2d.from_conv(reflect)


def test_adapter_init_linear():
    torch.manual_seed(9)
    lin = nn.Linear(6, 4)
    q = QuadraticLinear.from_linear(lin)
    x = torch.randn(3, 6)
    torch.testing.assert_close(q(x), lin(x))
    assert "init=adapter" in repr(q)


def test_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="even"):
        QuadraticConv2d(4, 4, 4, groups=4)
    with pytest.raises(ValueError, match="positive"):
        QuadraticConv2d(4, 4, 0, groups=4)
    with pytest.raises(ValueError, match="groups"):
        QuadraticConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="init"):
        QuadraticLinear(2, 2, init="kaiming")
    QuadraticConv2d(4, 4, 4, padding=1)  # even kernels work with explicit padding


def test_extra_repr_describes_the_layer():
    r = repr(QuadraticConv2d(16, 16, 7, groups=16, recompute="full"))
    assert "kernel_size=(7, 7)" in r and "groups=16" in r and "recompute=full" in r
    with pytest.raises(ValueError, match="recompute must be one of 'none', 'cheap', 'full'"):
        QuadraticConv2d(4, 4, 3, recompute="some")


def _train_xor(model: nn.Module, steps: int = 2000) -> float:
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([0.0, 1.0, 1.0, 0.0])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = (model(x).squeeze(-1) > 0).float()
    return (pred == y).float().mean().item()


def test_one_quadratic_neuron_learns_xor_one_linear_neuron_cannot():
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.no_grad():
            quad = QuadraticLinear(2, 1)
            quad.weight.normal_(std=0.5)  # break the near-linear start
        assert _train_xor(quad) == 1.0
        torch.manual_seed(seed)
        assert _train_xor(nn.Linear(2, 1)) <= 0.75
