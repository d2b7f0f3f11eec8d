"""Progress as plain log lines, for runs whose output goes to a file or a pipe.

Lightning's progress bars redraw one terminal line; written to a file, the Rich bar shows up only at the end and a
long run looks hung. :class:`LogProgress` prints one line every ``every`` seconds instead (stage, batches done,
elapsed time, an estimate of the time left); the command line attaches it when standard output is not a terminal.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["LogProgress"]


class LogProgress(Callback):
    """Print ``"<stage>: batch i/n (p%), elapsed h:mm:ss, about h:mm:ss left"`` every ``every`` seconds (rank zero).

    Args:
        every: Seconds between lines (the first comes ``every`` seconds into a stage).
    """

    def __init__(self, every: float = 30.0) -> None:
        if not every > 0:
            raise ValueError(f"every={every!r}: pass a positive number of seconds between progress lines")
        self.every = every
        self._start = 0.0
        self._last = 0.0

    def _begin(self) -> None:
        self._start = self._last = time.monotonic()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin()

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin()

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin()

    def _batch_end(self, trainer: Trainer, stage: str, batch_idx: int, total: Optional[float]) -> None:
        now = time.monotonic()
        if now - self._last < self.every or not trainer.is_global_zero:
            return
        self._last = now
        done, elapsed = batch_idx + 1, now - self._start
        line = f"{stage}: batch {done}"
        if total and total != float("inf"):
            left = elapsed / done * (total - done)
            line += f"/{int(total)} ({done / total:.0%}), elapsed {_clock(elapsed)}, about {_clock(left)} left"
        else:
            line += f", elapsed {_clock(elapsed)}"
        print(line, file=sys.stdout, flush=True)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._batch_end(trainer, "fit", args[-1], trainer.num_training_batches)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if not trainer.sanity_checking:
            self._batch_end(trainer, "validate", args[2], _total(trainer.num_val_batches, args))

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._batch_end(trainer, "test", args[2], _total(trainer.num_test_batches, args))

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._batch_end(trainer, "predict", args[2], _total(trainer.num_predict_batches, args))


def _total(counts: Any, args: tuple) -> Optional[float]:
    """Batches of the current dataloader (``args`` = outputs, batch, batch_idx[, dataloader_idx])."""
    index = args[3] if len(args) > 3 else 0
    return counts[index] if isinstance(counts, list) and index < len(counts) else None


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
