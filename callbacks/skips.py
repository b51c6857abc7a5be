"""Log the data's skipped samples by reason, and print a summary at the end of each run."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lightning_vigu.loggers import host_number, logs_this_step


class SkippedSamples(L.Callback):
    """Counts of skipped samples (``trainer.datamodule.skipped_counts()``) in the logs.

    Logs ``data/skipped`` (the total) and ``data/skipped_<reason>`` for every reason seen so
    far, as running totals of this process (rank 0's on several ranks), with the training
    metrics (every ``log_every_n_steps``: :func:`~lightning_vigu.loggers.logs_this_step`) and at
    the end of each validation; prints the counts when fit, validate or test ends. The CLI adds
    it whenever the DataModule has ``skipped_counts``
    (:class:`~datamodules.webvideo.WebVideoDataModule` and its subclasses).
    """

    @staticmethod
    def _counts(trainer: L.Trainer) -> dict[str, int] | None:
        counts = getattr(trainer.datamodule, "skipped_counts", None)
        return counts() if callable(counts) else None

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = self._counts(trainer)
        if counts is None:
            return
        values = {"data/skipped": host_number(sum(counts.values()))}
        values |= {f"data/skipped_{k}": host_number(v) for k, v in counts.items() if v}
        pl_module.log_dict(values, rank_zero_only=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if logs_this_step(trainer):
            self._log(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        counts = self._counts(trainer)
        if counts is None:
            return
        total = sum(counts.values())
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items() if v) or "none"
        rank_zero_info(f"data ({stage}): skipped {total} samples ({detail})")
