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

    With ``profile`` > 0 the ``profile`` steps after ``last`` run under pyinstrument's sampling
    profiler (wall clock of the loop's thread: Lightning's loop, the callbacks, the loader's
    hand-over and the step's host work, each by its call stack), written beside ``out`` as
    ``<stem>_profile.txt`` (the call tree) and ``<stem>_profile.json`` (the session, for
    ``pyinstrument --load``). Those steps are not in the timed window.

    Args:
        first: the step after which the clock starts (compilation and warm-up done).
        last: the step after which it stops.
        out: the JSON file to write.
        profile: steps after ``last`` to profile (0: none; needs ``pip install pyinstrument``).
    """

    def __init__(self, first: int, last: int, out: str, profile: int = 0) -> None:
        if not 0 <= first < last:
            raise ValueError(f"StepTimer needs 0 <= first < last; got {first}, {last}")
        if profile < 0:
            raise ValueError(f"StepTimer's profile is a number of steps >= 0; got {profile}")
        self.first, self.last, self.out = first, last, Path(out)
        self.profile = profile
        self._profiler = None
        if profile:
            try:  # fail at the start of the run, not after it
                from pyinstrument import Profiler
            except ImportError as exn:
                raise ImportError(
                    "StepTimer(profile=...) profiles with pyinstrument: pip install pyinstrument "
                    "(in requirements-dev.txt), or leave profile at 0"
                ) from exn
            self._profiler = Profiler(interval=0.0005, async_mode="disabled")
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
        if self._profiler is not None and self._profiler.is_running:
            self._write_profile(trainer.global_step - self.last)  # ended inside the window

    def _write_profile(self, steps: int) -> None:
        """Stop the profiler and write its call tree (text) and session (JSON) beside ``out``."""
        session = self._profiler.stop()
        stem = self.out.with_suffix("")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        session.save(f"{stem}_profile.json")
        text = self._profiler.output_text(unicode=False, color=False, show_all=False)
        header = f"# pyinstrument, steps {self.last + 1}-{self.last + steps} ({steps} steps)\n"
        Path(f"{stem}_profile.txt").write_text(header + text)

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        profiling = self._profiler is not None and self._profiler.is_running
        if profiling and step == self.last + self.profile:
            self._write_profile(self.profile)
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
        if self._profiler is not None and step == self.last:
            self._profiler.start()  # the next steps, after the timing above is written
