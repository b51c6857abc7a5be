"""The training step never waits for the device: no tensor value is read on the host.

On a GPU, reading a tensor (``.item()``, ``bool(t)``, ``float(t)``) waits until every queued
kernel has run, so a small model's step, bound by how fast the host launches kernels, can no
longer overlap with the GPU's work. The reads are recorded here on the CPU, where the same
calls happen: every one dispatches to ``aten._local_scalar_dense``.
"""

from __future__ import annotations

import functools
from collections import Counter

import lightning as L
import pytest
import torch
from test_training import RandomVideoDataModule, tiny_module
from torch.utils._python_dispatch import TorchDispatchMode

from callbacks import EMA, ProgressBar


class HostReads(TorchDispatchMode):
    """Counts the tensor values read on the host while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class ReadsPerStep(L.Callback):
    """Host reads from the start of each training batch to the end of the previous one's
    callbacks (optimiser, EMA, progress bar and logging included), by step."""

    def __init__(self) -> None:
        self.reads: Counter[int] = Counter()
        self._mode: HostReads | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._mode = HostReads()
        self._mode.__enter__()
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mode.__exit__(None, None, None)
        self.reads[self._step] += self._mode.count


def test_a_training_step_reads_nothing_on_the_host_between_log_steps(tmp_path):
    """With fused AdamW (the GPU overlay's optimiser) the objective, the non-finite check, the
    EMA update and the progress bar read no tensor on the host; the loggers read the logged
    values every ``log_every_n_steps`` steps."""
    recorder = ReadsPerStep()
    trainer = L.Trainer(
        max_steps=8, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=4, limit_val_batches=0, enable_model_summary=False,
        default_root_dir=tmp_path, gradient_clip_val=1.0,
        callbacks=[EMA(0.99), ProgressBar(), recorder],  # the recorder last: it sees them all
    )  # fmt: skip
    module = tiny_module(optimizer=functools.partial(torch.optim.AdamW, fused=True))
    trainer.fit(module, RandomVideoDataModule())
    assert sorted(recorder.reads) == list(range(8))
    # the first step reads once what it shows first (the progress bar's first metrics)
    between = {step: n for step, n in recorder.reads.items() if step and (step + 1) % 4}
    assert between == dict.fromkeys(between, 0), recorder.reads


def test_the_progress_bar_reads_the_metrics_every_n_steps(monkeypatch):
    reads = []
    monkeypatch.setattr(
        L.pytorch.callbacks.RichProgressBar,
        "get_metrics",
        lambda self, trainer, module: (
            reads.append(trainer.global_step) or {"step": trainer.global_step}
        ),
    )

    class Trainer:
        training, log_every_n_steps = True, 50
        global_step = 0

    bar, trainer = ProgressBar(metrics_every_n_steps=3), Trainer()
    shown = []
    for step in range(7):
        trainer.global_step = step
        shown.append(bar.get_metrics(trainer, None)["step"])
    assert reads == [0, 3, 6] and shown == [0, 0, 0, 3, 3, 3, 6]
    trainer.training = False  # validation and tests read every time
    bar.get_metrics(trainer, None)
    assert reads[-1] == 6 and len(reads) == 4


def test_training_values_are_logged_on_the_steps_the_loggers_write(tmp_path, monkeypatch):
    """Lightning walks its stored copy of every logged value (~1 ms of host time a value on an
    H200's host), so a step's values are logged only on the steps the loggers write and at the
    last step: each written row holds that step's own loss, no other step calls ``log``, and
    the callback metrics end with the last step's loss."""
    import csv

    from lightning_vigu.module import UniViGU

    losses, logged = {}, []
    compute_loss = UniViGU.compute_loss

    def recording(self, batch, phase, generator):
        out = compute_loss(self, batch, phase, generator)
        if self.training:
            losses[self.global_step] = float(out.loss.detach())
        return out

    monkeypatch.setattr(UniViGU, "compute_loss", recording)
    log = L.LightningModule.log
    monkeypatch.setattr(
        L.LightningModule,
        "log",
        lambda self, name, *a, **k: (
            logged.append((self.global_step, name)) or log(self, name, *a, **k)
        ),
    )
    trainer = L.Trainer(
        max_steps=7, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=3, limit_val_batches=0, enable_model_summary=False,
        enable_progress_bar=False, default_root_dir=tmp_path,
        callbacks=[EMA(0.99)],
    )  # fmt: skip
    module = tiny_module(optimizer=functools.partial(torch.optim.AdamW, fused=True))
    trainer.fit(module, RandomVideoDataModule())
    # batches 3 and 6 ((step + 1) % 3 == 0) and the last, 7
    assert {step for step, _ in logged} == {2, 5, 6}
    assert {name for _, name in logged} >= {"train/loss", "train/skipped_steps"}
    path = next(tmp_path.rglob("metrics.csv"))
    rows = [r for r in csv.DictReader(path.open()) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [2, 5]
    for row in rows:
        assert float(row["train/loss"]) == pytest.approx(losses[int(row["step"])], rel=1e-6)
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(losses[6], rel=1e-6)
