"""Neuron level: quadratic linear and convolution layers, channels-first LayerNorm."""

from quadranet.nn.norm import LayerNorm2d, layer_norm_2d
from quadranet.nn.quadratic import (
    QuadraticConv2d,
    QuadraticLinear,
    quadratic_conv2d,
    quadratic_linear,
)

__all__ = [
    "LayerNorm2d",
    "QuadraticConv2d",
    "QuadraticLinear",
    "layer_norm_2d",
    "quadratic_conv2d",
    "quadratic_linear",
]
