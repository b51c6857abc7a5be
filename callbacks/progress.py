"""A progress bar that does not stop the host from running ahead of the GPU.

Lightning's bars read every metric logged with ``prog_bar=True`` after every training batch,
and reading a GPU tensor on the host waits until the GPU has finished all queued work: for a
small model, whose step is bound by how fast the host launches kernels, that wait is paid once
per step. :class:`ProgressBar` reads the metrics every ``metrics_every_n_steps`` training steps
(default: the trainer's ``log_every_n_steps``, when the loggers read them anyway) and shows the
last values in between; the bar itself still advances every step.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    """:class:`~lightning.pytorch.callbacks.RichProgressBar` whose metrics are read every
    ``metrics_every_n_steps`` training steps.

    The module and the callbacks of this project log a training step's values only on the
    steps the loggers write (:func:`lightning_vigu.loggers.log_step_values`), so reading more
    often than ``log_every_n_steps`` shows the same values; lower ``trainer.log_every_n_steps``
    to see them more often.

    Args:
        metrics_every_n_steps: training steps between two reads (``None``: the trainer's
            ``log_every_n_steps``; ``1``: every step, as Lightning's bar).
        **kwargs: :class:`~lightning.pytorch.callbacks.RichProgressBar`'s arguments.
    """

    def __init__(self, metrics_every_n_steps: int | None = None, **kwargs) -> None:
        if metrics_every_n_steps is not None and metrics_every_n_steps < 1:
            raise ValueError(
                f"metrics_every_n_steps must be >= 1 (or None), got {metrics_every_n_steps}"
            )
        super().__init__(**kwargs)
        self.metrics_every_n_steps = metrics_every_n_steps
        self._shown: dict | None = None

    def get_metrics(self, trainer, pl_module) -> dict:
        every = self.metrics_every_n_steps or max(1, trainer.log_every_n_steps)
        if trainer.training and self._shown is not None and trainer.global_step % every:
            return self._shown
        self._shown = super().get_metrics(trainer, pl_module)
        return self._shown
