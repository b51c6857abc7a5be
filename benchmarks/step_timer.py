"""A callback that times training steps of a ``fit`` run: the clock read at two steps only.

Self-contained (Lightning and torch only) so that :mod:`benchmarks.cli_loop` can hand it to the
CLI of another commit of the project, whose own packages would shadow this one's.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import lightning as L
import torch


class StepTimer(L.Callback):
    """Wall clock from the end of step ``first`` to the end of step ``last``, the device
    synchronised at both ends only; written with the run's shapes to ``out`` (JSON), with the
    garbage collector's collections in the same window (per generation: how many, and their
    seconds), host time that stops the loop from launching the next step.

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
        self._collections = [[0, 0.0] for _ in range(3)]  # per generation: count, seconds
        self._collecting: float | None = None

    def _on_gc(self, phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._collecting = now
        elif self._collecting is not None:
            counts = self._collections[min(info["generation"], 2)]
            counts[0] += 1
            counts[1] += now - self._collecting
            self._collecting = None

    def _stop_watching_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop_watching_gc()  # a run that ended before ``last``

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.first:
            self._sync()
            self._start = time.perf_counter()
            gc.callbacks.append(self._on_gc)
        elif step == self.last and self._start is not None:
            self._sync()
            seconds = (time.perf_counter() - self._start) / (self.last - self.first)
            self._stop_watching_gc()
            steps = self.last - self.first
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
                "gc": {
                    str(generation): {"collections": n, "seconds": t}
                    for generation, (n, t) in enumerate(self._collections)
                },
                "gc_ms_per_step": 1e3 * sum(t for _, t in self._collections) / steps,
            }
            if torch.cuda.is_available():
                record["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                record["device"] = torch.cuda.get_device_name()
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(record, indent=1, default=str))
