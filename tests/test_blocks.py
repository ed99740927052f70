"""Block level: the shared skeleton and the gnConv baseline."""

import pytest
import torch

from quadranet.blocks import ConvBlock, GnConv, HorBlock, QuadraBlock, SkipBlock, SwinBlock


@pytest.mark.parametrize(
    "block",
    [
        QuadraBlock(32),
        QuadraBlock(32, kernel_size=3, mlp_ratio=2.0, recompute="full"),
        ConvBlock(32),
        SkipBlock(32),
        HorBlock(32, order=3),
        SwinBlock(32, input_resolution=14),
        SwinBlock(32, shift=True, input_resolution=14),
    ],
    ids=lambda b: type(b).__name__,
)
def test_blocks_keep_shape_and_start_near_identity(block):
    x = torch.randn(2, 32, 14, 14)
    y = block(x)
    assert y.shape == x.shape
    if not isinstance(block, SwinBlock):  # layer scale 1e-6: the residual dominates
        assert (y - x).abs().max() < 1e-3


def test_quadrablock_formula():
    torch.manual_seed(0)
    block = QuadraBlock(8, kernel_size=3, layer_scale_init=0.5).double()
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64)
    n1 = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8,), eps=1e-6)
    n1 = n1 * block.norm1.weight + block.norm1.bias
    h = x + 0.5 * block.mixer(n1.permute(0, 3, 1, 2))
    z = block.mlp(h.permute(0, 2, 3, 1))  # includes its layer scale (0.5)
    torch.testing.assert_close(block(x), h + z.permute(0, 3, 1, 2))


def test_gnconv_widths_match_hornet():
    g = GnConv(64, order=4)
    assert g.dims == [8, 16, 32, 64]
    assert g.proj_in.out_channels == 128 and g.dwconv.in_channels == 120
    assert [pw.out_channels for pw in g.pws] == [16, 32, 64]


def test_gnconv_rejects_indivisible_width():
    with pytest.raises(ValueError, match="divisible"):
        GnConv(12, order=4)
