"""What the trainer tells the outside world: its state, and the callback protocol.

The trainer never prints; progress bars, JSONL/TensorBoard logs, plots and reports are
callbacks, so tests run it silently and other front ends (a notebook, a server) plug in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainState:
    """Where training is. Saved in every checkpoint (`to_dict`/`from_dict`) so resume is exact."""

    step: int = 0  # optimizer steps done
    max_steps: int = 0  # optimizer steps planned in all
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    examples_seen: int = 0
    tokens_seen: int = 0  # non-padding input tokens
    best_metric: float | None = None  # best eval value of `metric_name` so far
    best_step: int | None = None
    metric_name: str = "loss"
    greater_is_better: bool = False
    truncated: int = 0  # training sequences cut to max_length
    history: list[dict[str, Any]] = field(default_factory=list)  # every logged record

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**d)


class BaseCallback:
    """What the trainer reports, as no-op methods: subclass and override what you need.

    Records passed to `on_log` look like:
      {"step": 10, "loss": 0.61, "lr": 9.8e-4, "tokens_per_s": 5100.0, "grad_norm": 0.8, "epoch": 0}
    and to `on_evaluate`:
      {"step": 50, "eval_loss": 0.41, "eval_accuracy": 87.2, ...}   (metrics in percent)
    """

    def on_train_begin(self, state: TrainState, info: dict[str, Any]) -> None:
        pass

    def on_log(self, state: TrainState, record: dict[str, Any]) -> None:
        pass

    def on_evaluate(self, state: TrainState, record: dict[str, Any]) -> None:
        pass

    def on_save(self, state: TrainState, path: Path) -> None:
        pass

    def on_train_end(self, state: TrainState, summary: dict[str, Any]) -> None:
        pass
