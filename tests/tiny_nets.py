"""Tiny timm-registered classifiers for the engine tests, in this process and in the child
processes the tests start (`driver_script` makes such a child import this module)."""

from __future__ import annotations

import os
import signal
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch
from timm.models import register_model
from torch import nn


class TinyNet(nn.Module):
    """A conv net without batch norm (timm's constructor conventions). `dropout` draws random
    numbers in training; `sleep` slows each training forward down, leaving a test time to
    kill or signal a run between two of its steps."""

    def __init__(
        self,
        num_classes: int = 4,
        in_chans: int = 1,
        drop_path_rate: float = 0.0,
        dropout: float = 0.0,
        sleep: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.sleep = sleep
        self.conv = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(8, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.sleep:
            time.sleep(self.sleep)
        return self.fc(self.drop(torch.relu(self.conv(x)).mean((2, 3))))


def _build(kwargs: dict, **fixed: float) -> TinyNet:
    keep = ("num_classes", "in_chans", "drop_path_rate")
    return TinyNet(**{k: v for k, v in kwargs.items() if k in keep}, **fixed)


@register_model
def engine_tiny_net(pretrained: bool = False, **kwargs) -> TinyNet:
    return _build(kwargs)


@register_model
def engine_other_net(pretrained: bool = False, **kwargs) -> TinyNet:
    """The same network under another name (a run resumed with another --model)."""
    return _build(kwargs)


@register_model
def engine_slow_net(pretrained: bool = False, **kwargs) -> TinyNet:
    """Dropout (random numbers to restore on resume) and a pause in each training step."""
    return _build(kwargs, dropout=0.2, sleep=0.03)


def driver_script(
    main: str = "from quadranet.cli import main\nsys.exit(main(sys.argv[1:]))",
) -> str:
    """A Python script that registers these models, then runs `main` (by default the
    `quadranet` command line with the script's arguments)."""
    head = f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nimport tiny_nets\n"
    return head + textwrap.dedent(main)


def signal_after_step(
    monkeypatch, when: int | Callable, signum: int = signal.SIGTERM
) -> Callable[[], None]:
    """Make every Trainer send `signum` to this process after its optimizer step number
    `when` (or the steps where `when(trainer)` holds), as a scheduler pre-empting the job
    would; returns a function that puts the plain step back."""
    from quadranet.engine import Trainer

    original = Trainer._optimizer_step

    def step(self, *args):
        out = original(self, *args)
        if when(self) if callable(when) else self.step == when:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(Trainer, "_optimizer_step", step)
    return lambda: monkeypatch.setattr(Trainer, "_optimizer_step", original)
