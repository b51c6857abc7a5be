"""Plan a run's length from a wall-clock budget, so its schedule ends where it was planned.

Lightning's ``max_time`` stops a run wherever the clock runs out: a cosine schedule set to
``max_steps`` is then cut off part-way (at 15-40% of its peak in the first quality runs), and
EMA / final-lr effects never happen. :class:`TimeBudget` times a window of steps after the
warm-up (compilation, caches), then sets ``max_steps`` to the steps that fit in what is left
of the budget. The module's lr horizon follows ``trainer.max_steps``, so the schedule decays
to its end exactly at the last step. The plan is stored in checkpoints: a resumed run keeps it.

The first window is short and can be unrepresentative: on a shared host it overlapped another
run's compilation and timed 0.109 s a step against the run's 0.090 s average, and the run
stopped after 77% of its 8 minutes. So the plan is re-timed at fixed fractions of the budget
(``replan_at``) from the mean step time since the previous plan, which also carries the
validation and checkpoint pauses of that stretch; the cosine's horizon moves with it, a small
step in lr while the schedule is still early.

The planned end is rarely a multiple of a ``ModelCheckpoint``'s interval, and Lightning keeps
``last.ckpt`` at the last interval (its end-of-training save only runs when no ``last.ckpt`` was
written at all), so the run's final, fully decayed weights would be lost: the callback writes
``last.ckpt`` once more at the end when the last save was at an earlier step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from lightning_vigu.loggers import host_number, log_step_values


class TimeBudget(L.Callback):
    """Set ``trainer.max_steps`` so that training fits in ``minutes`` of wall clock.

    Args:
        minutes: the training budget (from the start of ``fit``; the time of earlier runs that a
            resumed run continues is counted from its checkpoint).
        skip_steps: steps not timed (compilation, allocator warm-up).
        measure_steps: steps timed to estimate the cost of one step.
        margin: fraction of the remaining time planned for (the rest absorbs checkpoint
            writes and the end of training).
        replan_at: fractions of the budget at which the plan is re-timed (empty: plan once).
    """

    def __init__(
        self,
        minutes: float,
        skip_steps: int = 30,
        measure_steps: int = 50,
        margin: float = 0.95,
        replan_at: Sequence[float] = (0.1, 0.25, 0.5),
    ) -> None:
        if minutes <= 0 or skip_steps < 0 or measure_steps < 1 or not 0 < margin <= 1:
            raise ValueError(
                "TimeBudget needs minutes > 0, skip_steps >= 0, measure_steps >= 1 and "
                f"0 < margin <= 1; got {minutes}, {skip_steps}, {measure_steps}, {margin}"
            )
        if any(not 0 < f < 1 for f in replan_at):
            raise ValueError(f"TimeBudget replan_at fractions must lie in (0, 1); got {replan_at}")
        self.budget_s = minutes * 60.0
        self.skip_steps, self.measure_steps, self.margin = skip_steps, measure_steps, margin
        self.replan_at = sorted(replan_at)
        self.replanned = 0  # how many of replan_at have been applied
        self.planned_steps: int | None = None
        self.spent_before = 0.0  # seconds trained by the runs this one resumes
        self._start: float | None = None
        self._first_step = 0
        self._window: float | None = None
        self._window_step = 0  # the step at which the timing window opened (the last plan)
        self._limit = -1  # the trainer's own max_steps, which no plan exceeds
        self.first_step_s: float | None = None  # from the start of training to its first step's end
        self._saved_at: int | None = None  # the step of the latest checkpoint written

    def elapsed(self) -> float:
        """Seconds of training so far, earlier runs included."""
        return self.spent_before + (0.0 if self._start is None else time.time() - self._start)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.time()
        self._first_step = trainer.global_step
        self._window = None
        self._limit = trainer.max_steps
        if self.planned_steps is not None:
            trainer.fit_loop.epoch_loop.max_steps = self.planned_steps

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        done = trainer.global_step - self._first_step
        if done == 1 and self._start is not None:  # compilation and the first batch included
            self.first_step_s = time.time() - self._start
        if done == self.skip_steps:  # a resumed run times its own steps again
            self._window, self._window_step = time.time(), trainer.global_step
        elif self._window is not None and done >= self.skip_steps + self.measure_steps:
            # fractions of the budget spent (a long start-up or a resumed run passes several)
            passed = sum(self.elapsed() >= f * self.budget_s for f in self.replan_at)
            if self.planned_steps is None or passed > self.replanned:
                verb = "planned" if self.planned_steps is None else "re-planned"
                self.replanned = passed
                self._plan(trainer, verb)
        planned = host_number(self.planned_steps or trainer.max_steps)
        log_step_values(pl_module, {"train/planned_steps": planned})

    def _plan(self, trainer: L.Trainer, verb: str) -> None:
        """Set ``max_steps`` to the steps that fit in what is left of the budget at the mean step
        time since the timing window opened; the next window opens here."""
        now = time.time()
        per_step = (now - self._window) / max(1, trainer.global_step - self._window_step)
        self._window, self._window_step = now, trainer.global_step
        left = self.budget_s - self.elapsed()
        planned = trainer.global_step + max(0, int(self.margin * left / per_step))
        self.planned_steps = min(planned, self._limit) if self._limit > 0 else planned
        trainer.fit_loop.epoch_loop.max_steps = self.planned_steps
        rank_zero_info(
            f"[TimeBudget] {per_step:.3f} s per step: {verb} {self.planned_steps} steps in "
            f"{self.budget_s / 60:.1f} min; the schedule ends there"
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is None:
            return
        first = "" if self.first_step_s is None else f"{self.first_step_s:.1f}"
        rank_zero_info(
            f"[TimeBudget] trained {trainer.global_step - self._first_step} steps in "
            f"{time.time() - self._start:.1f} s; first step after {first} s"
        )

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
        return {
            "planned_steps": self.planned_steps,
            "elapsed": self.elapsed(),
            "replanned": self.replanned,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.planned_steps = state_dict.get("planned_steps")
        self.replanned = int(state_dict.get("replanned", len(self.replan_at)))
        self.spent_before = float(state_dict.get("elapsed", 0.0))
