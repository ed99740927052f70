"""Model level: the QuadraNet family, its first-order twins and HorNet, registered with timm."""

from __future__ import annotations

import difflib
from typing import Any

import timm
from torch import nn

from quadranet.models.quadranet import (
    FIRST_ORDER_MODELS,
    HORNET_MODELS,
    QUADRANET_MODELS,
    QuadraNet,
    QuadraStage,
)
from quadranet.models.quadranet_nas import QuadraNetNAS  # noqa: F401  (registers quadranet_nas)

__all__ = [
    "FIRST_ORDER_MODELS",
    "HORNET_MODELS",
    "QUADRANET_MODELS",
    "QuadraNet",
    "QuadraStage",
    "create_model",
    "list_models",
]


def list_models() -> list[str]:
    """Names of the models this package registers with timm."""
    return QUADRANET_MODELS + FIRST_ORDER_MODELS + HORNET_MODELS


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """`timm.create_model` with a helpful error for unknown names."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, list_models() + timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}{hint} (`quadranet models` lists the QuadraNet family)"
        )
    return timm.create_model(name, pretrained=pretrained, **kwargs)
