"""Training level: the one engine behind `quadranet train`, `eval` and `demo`."""

from quadranet.engine.config import ConfigError, TrainConfig
from quadranet.engine.train import (
    NonFiniteLossError,
    Trainer,
    TrainingError,
    TrainResult,
    evaluate,
    train,
)

__all__ = [
    "ConfigError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "evaluate",
    "train",
]
