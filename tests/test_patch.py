"""Patchify convolution as a matrix product: equal to the strided convolution."""

import pytest
import torch
import torch.nn.functional as F

from quadranet.models import create_model
from quadranet.nn.patch import PatchConv2d, patch_conv2d

CL = torch.channels_last


@pytest.mark.parametrize("size", [(8, 8), (9, 11)])  # whole windows; a cropped remainder
@pytest.mark.parametrize("k", [2, 4])
def test_patch_conv_matches_strided_conv(k, size):
    torch.manual_seed(0)
    x = torch.randn(2, 5, *size, dtype=torch.float64).contiguous(memory_format=CL)
    conv = PatchConv2d(5, 7, k).double()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = conv(x1)
    expected = F.conv2d(x2, conv.weight, conv.bias, stride=k)
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=CL)
    grad = torch.randn_like(expected)
    gw, gb = torch.autograd.grad(out, (conv.weight, conv.bias), grad, retain_graph=True)
    out.backward(grad)
    ew, eb = torch.autograd.grad(expected, (conv.weight, conv.bias), grad, retain_graph=True)
    expected.backward(grad)
    for a, e in [(x1.grad, x2.grad), (gw, ew), (gb, eb)]:
        torch.testing.assert_close(a, e)


def test_patch_conv_keeps_the_convolution_elsewhere(monkeypatch):
    conv = PatchConv2d(3, 4, 2, bias=False)
    calls = []
    monkeypatch.setattr("quadranet.nn.patch.patch_conv2d", lambda *a: calls.append(1))
    x = torch.randn(1, 3, 6, 6)  # NCHW: the strided convolution
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, stride=2))
    assert not calls
    conv(x.contiguous(memory_format=CL))
    assert calls == [1]
    # the same parameters and state-dict keys as nn.Conv2d(3, 4, 2, stride=2)
    plain = torch.nn.Conv2d(3, 4, 2, stride=2, bias=False)
    assert conv.state_dict().keys() == plain.state_dict().keys()
    assert plain.load_state_dict(conv.state_dict()) is not None


def test_patch_conv_rejects_a_mismatched_weight():
    with pytest.raises(ValueError, match="square"):
        patch_conv2d(torch.randn(1, 3, 4, 4), torch.randn(2, 3, 2, 3), None)


def test_models_use_it_for_the_stem_and_downsamples():
    model = create_model("quadranet25_xxs")
    patch = [n for n, m in model.named_modules() if isinstance(m, PatchConv2d)]
    assert patch == ["stem.0", "stages.1.downsample.1", "stages.2.downsample.1",
                     "stages.3.downsample.1"]  # fmt: skip
    assert not isinstance(create_model("quadranet25_xxs", stem_stride=1).stem[0], PatchConv2d)
