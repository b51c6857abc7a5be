"""A callback that times training steps of a ``fit`` run: the clock read at two steps only.

Self-contained (Lightning and torch only) so that :mod:`benchmarks.cli_loop` can hand it to the
CLI of another commit of the project, whose own packages would shadow this one's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch


class StepTimer(L.Callback):
    """Wall clock from the end of step ``first`` to the end of step ``last``, the device
    synchronised at both ends only; written with the run's shapes to ``out`` (JSON).

    Args:
        first: the step after which the clock starts (compilation and warm-up done).
        last: the step after which it stops.
        out: the JSON file to write.
    """

    def __init__(self, first: int, last: int, out: str) -> None:
        if not 0 <= first < last:
            raise ValueError(f"StepTimer needs 0 <= first < last; got {first}, {last}")
        self.first, self.last, self.out = first, last, Path(out)
        self._start: float | None = None

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.first:
            self._sync()
            self._start = time.perf_counter()
        elif step == self.last and self._start is not None:
            self._sync()
            seconds = (time.perf_counter() - self._start) / (self.last - self.first)
            hparams = {
                k: v
                for k, v in dict(pl_module.hparams).items()
                if isinstance(v, (int, float, str, bool, list, tuple)) or v is None
            }
            record = {
                "first": self.first,
                "last": self.last,
                "seconds": seconds,
                "batch": int(batch["video"].shape[0]),
                "hparams": hparams,
                "torch": torch.__version__,
            }
            if torch.cuda.is_available():
                record["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                record["device"] = torch.cuda.get_device_name()
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(record, indent=1, default=str))
