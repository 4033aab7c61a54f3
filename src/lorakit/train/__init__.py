"""Training: data readers, task specs, the trainer loop, callbacks and the high-level API."""

from .config import TrainConfig, TrainConfigError
from .state import BaseCallback, TrainState
from .trainer import Trainer, TrainingDiverged, TrainResult


def train(config, callbacks=None):
    """Fine-tune with LoRA; see `lorakit.train.api.train`."""
    from .api import train as _train

    return _train(config, callbacks)


__all__ = [
    "BaseCallback",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "TrainState",
    "Trainer",
    "TrainingDiverged",
    "train",
]
