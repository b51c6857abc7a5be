"""Plan a run's length from a wall-clock budget, so its schedule ends where it was planned.

Lightning's ``max_time`` stops a run wherever the clock runs out: a cosine schedule set to
``max_steps`` is then cut off part-way (at 15-40% of its peak in the first quality runs), and
EMA / final-lr effects never happen. :class:`TimeBudget` times a window of steps after the
warm-up (compilation, caches), then sets ``max_steps`` to the steps that fit in what is left
of the budget. The module's lr horizon follows ``trainer.max_steps``, so the schedule decays
to its end exactly at the last step. The plan is stored in checkpoints: a resumed run keeps it.

The planned end is rarely a multiple of a ``ModelCheckpoint``'s interval, and Lightning keeps
``last.ckpt`` at the last interval (its end-of-training save only runs when no ``last.ckpt`` was
written at all), so the run's final, fully decayed weights would be lost: the callback writes
``last.ckpt`` once more at the end when the last save was at an earlier step.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from lightning_vigu.loggers import host_number


class TimeBudget(L.Callback):
    """Set ``trainer.max_steps`` so that training fits in ``minutes`` of wall clock.

    Args:
        minutes: the training budget (from the start of ``fit``; the time of earlier runs that a
            resumed run continues is counted from its checkpoint).
        skip_steps: steps not timed (compilation, allocator warm-up).
        measure_steps: steps timed to estimate the cost of one step.
        margin: fraction of the remaining time planned for (the rest absorbs checkpoint
            writes and the end of training).
    """

    def __init__(
        self,
        minutes: float,
        skip_steps: int = 30,
        measure_steps: int = 50,
        margin: float = 0.95,
    ) -> None:
        if minutes <= 0 or skip_steps < 0 or measure_steps < 1 or not 0 < margin <= 1:
            raise ValueError(
                "TimeBudget needs minutes > 0, skip_steps >= 0, measure_steps >= 1 and "
                f"0 < margin <= 1; got {minutes}, {skip_steps}, {measure_steps}, {margin}"
            )
        self.budget_s = minutes * 60.0
        self.skip_steps, self.measure_steps, self.margin = skip_steps, measure_steps, margin
        self.planned_steps: int | None = None
        self.spent_before = 0.0  # seconds trained by the runs this one resumes
        self._start: float | None = None
        self._first_step = 0
        self._window: float | None = None
        self._saved_at: int | None = None  # the step of the latest checkpoint written

    def elapsed(self) -> float:
        """Seconds of training so far, earlier runs included."""
        return self.spent_before + (0.0 if self._start is None else time.time() - self._start)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.time()
        self._first_step = trainer.global_step
        if self.planned_steps is not None:
            trainer.fit_loop.epoch_loop.max_steps = self.planned_steps

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self.planned_steps is not None:
            return
        done = trainer.global_step - self._first_step
        if done == self.skip_steps:
            self._window = time.time()
        elif done == self.skip_steps + self.measure_steps and self._window is not None:
            per_step = (time.time() - self._window) / self.measure_steps
            left = self.budget_s - self.elapsed()
            planned = trainer.global_step + max(0, int(self.margin * left / per_step))
            self.planned_steps = min(
                planned, trainer.max_steps if trainer.max_steps > 0 else planned
            )
            trainer.fit_loop.epoch_loop.max_steps = self.planned_steps
            rank_zero_info(
                f"[TimeBudget] {per_step:.3f} s per step: {self.planned_steps} steps fit in "
                f"{self.budget_s / 60:.1f} min; the schedule ends there"
            )
        pl_module.log("train/planned_steps", host_number(self.planned_steps or trainer.max_steps))

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._saved_at = trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """At the run's last step, write ``last.ckpt`` of every ``ModelCheckpoint(save_last=True)``
        unless a checkpoint was written at this step. Here, after every batch-end hook (EMA's
        last update, the interval checkpoints) and before the end-of-training hooks (where EMA
        copies its average into the live weights)."""
        ends = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if not ends or self._saved_at in (None, trainer.global_step):
            return  # not the end; nothing saved yet (Lightning's own save at the end); saved
        at = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for cb in trainer.checkpoint_callbacks:
            # save_last="link" makes last.ckpt a link to an interval checkpoint: left alone
            if isinstance(cb, ModelCheckpoint) and cb.save_last is True and cb.dirpath:
                trainer.save_checkpoint(cb.format_checkpoint_name(at, cb.CHECKPOINT_NAME_LAST))

    def state_dict(self) -> dict[str, Any]:
        return {"planned_steps": self.planned_steps, "elapsed": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.planned_steps = state_dict.get("planned_steps")
        self.spent_before = float(state_dict.get("elapsed", 0.0))
