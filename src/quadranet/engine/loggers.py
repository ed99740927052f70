"""Optional run loggers: TensorBoard (`--log-tensorboard`) and Weights & Biases (`--log-wandb`).

Neither package is a dependency: asking for a logger whose package is missing is a one-line
ConfigError before any work starts. Only the main process logs.
"""

from __future__ import annotations

import importlib
import numbers
from pathlib import Path
from types import TracebackType
from typing import Any

from quadranet.engine.config import ConfigError, TrainConfig

TENSORBOARD_DIR = "tensorboard"  # inside the run folder
WANDB_PROJECT = "quadranet"

# flag -> (module that must import, what to install)
_NEEDS = {
    "log_tensorboard": (
        "torch.utils.tensorboard",
        "the tensorboard package: pip install tensorboard (or pip install 'quadranet[log]')",
    ),
    "log_wandb": (
        "wandb",
        "the wandb package: pip install wandb (or pip install 'quadranet[wandb]')",
    ),
}


def check_available(cfg: TrainConfig) -> None:
    """A ConfigError naming the package to install for each logger asked for but missing."""
    for flag, (module, package) in _NEEDS.items():
        if getattr(cfg, flag) and not _importable(module):
            raise ConfigError(f"--{flag.replace('_', '-')} needs {package}")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


class RunLoggers:
    """The loggers of one run (none unless asked for and `enabled`); a context manager that
    flushes and closes them."""

    def __init__(
        self, cfg: TrainConfig | None = None, output_dir: Path | None = None, enabled: bool = False
    ) -> None:
        self.tensorboard: Any = None
        self.wandb: Any = None
        if cfg is None or output_dir is None or not enabled:
            return
        check_available(cfg)
        if cfg.log_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(Path(output_dir) / TENSORBOARD_DIR))
        if cfg.log_wandb:
            import wandb

            self.wandb = wandb.init(
                project=WANDB_PROJECT,
                name=Path(output_dir).name,
                dir=str(output_dir),
                config=cfg.to_dict(),
            )

    def log(self, values: dict[str, Any], step: int) -> None:
        """Scalars at an optimizer step; keys like 'train/loss' (non-numbers are skipped)."""
        scalars = {
            k: float(v)
            for k, v in values.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool)
        }
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close every logger."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def __enter__(self) -> RunLoggers:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def epoch_scalars(record: dict[str, Any]) -> dict[str, Any]:
    """An epoch's metrics record as logger keys: train_loss -> train/loss, val_top1 ->
    val/top1, val_top1_ema -> val/top1_ema, plus 'epoch' (counted from 1)."""
    out: dict[str, Any] = {"epoch": record["epoch"] + 1}
    for key, value in record.items():
        split, _, name = key.partition("_")
        if split in ("train", "val") and name:
            out[f"{split}/{name}"] = value
        elif key in ("lr", "images_per_s", "epoch_time_s"):
            out[f"train/{key}"] = value
    return out
