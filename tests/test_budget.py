"""callbacks.TimeBudget: the run's length planned from a wall-clock budget, the lr schedule
ending at the planned step, and last.ckpt holding that step."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_training import RandomVideoDataModule, _trainer, tiny_module

import callbacks.budget as budget
from benchmarks import quality
from callbacks import EMA, TimeBudget


class FakeClock:
    """``time.time`` that advances ``step`` seconds per training batch (set by the callback)."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 1000.0, step

    def __call__(self) -> float:
        return self.now


class Tick(L.Callback):
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, *args) -> None:
        self.clock.now += self.clock.step


class LrRecorder(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, *args) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit(tmp_path, monkeypatch, seconds_per_step: float, minutes: float, every: int, ema=False):
    clock = FakeClock(seconds_per_step)
    monkeypatch.setattr(budget.time, "time", clock)
    plan = TimeBudget(minutes, skip_steps=2, measure_steps=4, margin=1.0)
    lrs = LrRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=every, save_last=True)
    # EMA before the plan: its end-of-training copy of the average would run first
    callbacks = [Tick(clock), *([EMA(0.5)] if ema else []), plan, lrs, ckpt]
    trainer = _trainer(tmp_path, 1000, callbacks)
    module = tiny_module(warmup_steps=2, lr=1e-3)
    trainer.fit(module, datamodule=RandomVideoDataModule(num_clips=8, batch_size=4))
    return trainer, plan, lrs


def test_the_plan_fits_the_budget_and_the_schedule_decays_to_its_last_step(tmp_path, monkeypatch):
    # 1 s a step, a 0.5 minute budget: 6 steps timed, then (30 - 6) s / 1 s = 24 more
    trainer, plan, lrs = _fit(tmp_path, monkeypatch, 1.0, 0.5, every=1000)
    assert plan.planned_steps == trainer.global_step
    assert plan.planned_steps == pytest.approx(30, abs=1)
    # the cosine reaches its floor at the planned step (with the horizon at 1000 it would not)
    floor = trainer.lightning_module.hparams.min_lr_ratio * max(lrs.lrs)
    assert lrs.lrs[-1] == pytest.approx(floor, rel=0.05)
    with pytest.raises(ValueError, match="minutes > 0"):
        TimeBudget(0)


def test_the_end_of_training_says_where_the_time_went(tmp_path, monkeypatch, caplog):
    # the quality suite reads it from a stage's log: start-up vs steps (recall's half steps)
    with caplog.at_level(logging.INFO):
        trainer, plan, _ = _fit(tmp_path, monkeypatch, 1.0, 0.5, every=1000)
    line = next(r.getMessage() for r in caplog.records if "[TimeBudget] trained" in r.getMessage())
    log = tmp_path / "train.log"
    log.write_text(f"other output\n{line}\n")
    timing = quality.budget_timing(log)
    # the fake clock moves 1 s at each batch's start: the first step ends 1 s into training
    assert timing["first_step_seconds"] == pytest.approx(1.0)
    assert timing["fit_seconds"] == pytest.approx(trainer.global_step, abs=1)
    assert timing["seconds_per_step"] == pytest.approx(1.0, abs=0.05)
    assert quality.budget_timing(tmp_path / "missing.log") == {}


def test_last_checkpoint_holds_the_planned_end_between_intervals(tmp_path, monkeypatch):
    trainer, plan, _ = _fit(tmp_path, monkeypatch, 1.0, 0.5, every=4, ema=True)
    assert plan.planned_steps % 4 != 0  # the end falls between two interval checkpoints
    last = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    assert last["global_step"] == trainer.global_step == plan.planned_steps
    # saved before EMA copies its average into the live weights at the end of training: the
    # checkpoint holds the average as its weights and the live ones beside them
    live, average = last["current_model_state"], last["state_dict"]
    assert any(
        not torch.equal(live[k], average[k]) for k in average if average[k].is_floating_point()
    )
    saved = {p.name for p in (tmp_path / "ck").iterdir()}
    assert "last-v1.ckpt" not in saved  # written in place, no versioned copy


class SlowStart(Tick):
    """A clock whose first ``slow`` batches take ``factor`` times as long (another run's
    compilation sharing the host while the plan is first timed)."""

    def __init__(self, clock: FakeClock, slow: int, factor: float) -> None:
        super().__init__(clock)
        self.slow, self.factor, self.batches = slow, factor, 0

    def on_train_batch_start(self, *args) -> None:
        self.batches += 1
        self.clock.now += self.clock.step * (self.factor if self.batches <= self.slow else 1.0)


@pytest.mark.parametrize("replan_at", [(), (0.1, 0.25, 0.5)])
def test_a_slow_start_is_re_planned_so_the_run_uses_its_budget(tmp_path, monkeypatch, replan_at):
    # 2 s a step for the first 10 steps, then 1 s: a 1-minute budget holds about 55 steps
    clock = FakeClock(1.0)
    monkeypatch.setattr(budget.time, "time", clock)
    plan = TimeBudget(1.0, skip_steps=2, measure_steps=4, margin=1.0, replan_at=replan_at)
    lrs = LrRecorder()
    callbacks = [SlowStart(clock, slow=10, factor=2.0), plan, lrs]
    trainer = _trainer(tmp_path, 1000, callbacks)
    trainer.fit(
        tiny_module(warmup_steps=2, lr=1e-3),
        datamodule=RandomVideoDataModule(num_clips=8, batch_size=4),
    )
    used = plan.elapsed()
    if not replan_at:  # timed at 2 s a step: the plan stops at two thirds of the budget
        assert used < 45
        return
    assert 55 <= used <= 61 and plan.replanned == 3
    assert trainer.global_step == plan.planned_steps
    floor = trainer.lightning_module.hparams.min_lr_ratio * max(lrs.lrs)
    assert lrs.lrs[-1] == pytest.approx(floor, rel=0.05)  # the schedule still ends at the end
    with pytest.raises(ValueError, match="replan_at"):
        TimeBudget(1.0, replan_at=(0.5, 1.0))
