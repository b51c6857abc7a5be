"""Experiment loggers: a Weights & Biases logger whose run continues when a fit resumes,
:func:`host_number` for logging numbers the host already has, and :func:`log_step_values` for
logging a training step's values on the steps the loggers write (and the last).

Lightning's ``WandbLogger`` starts a new W&B run at every ``fit`` unless it is given the id of
an earlier one. :class:`ResumableWandbLogger` keeps that id in its ``save_dir``
(``wandb_run_id``): the first fit writes it, a fit that resumes in the same folder
(``--ckpt_path``) reads it and continues the same W&B run (``resume="allow"``). Delete the file,
or give another ``save_dir``, to start a new run; an explicit ``id`` or ``WANDB_RUN_ID`` wins.
``wandb`` itself is imported only when the logger is created (``conf/wandb.yaml``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

RUN_ID_FILE = "wandb_run_id"


def host_number(value: float) -> Tensor:
    """``value`` as a CPU tensor, for ``LightningModule.log`` at every step.

    Lightning turns a logged Python number into a tensor on the module's device, a copy from
    the host that waits until the GPU has finished its queued work; a CPU tensor is logged as
    it is, and the loggers read it without waiting for anything.
    """
    return torch.tensor(float(value))


def logs_this_step(trainer: L.Trainer | None) -> bool:
    """Whether a training step's values are logged at this step: on the steps Lightning writes
    to its loggers (every ``trainer.log_every_n_steps``, and at a stop: its own
    ``should_update_logs`` test, as its ``LearningRateMonitor`` uses), and at the last step of
    the fit or of an epoch, so that ``trainer.callback_metrics`` ends with the last step's
    values. ``True`` outside a fit, with ``log_every_n_steps=0`` or ``fast_dev_run``, and where
    Lightning's test is missing: every step is logged then.

    The same answer in ``training_step`` and in ``on_train_batch_end``: both come before the
    loop counts the step (``_batches_that_stepped``).
    """
    if trainer is None or trainer.log_every_n_steps == 0 or trainer.fast_dev_run:
        return True
    writes = getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", None)
    stepped = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)
    if writes is None or stepped is None:
        return True
    last = trainer.max_steps > 0 and stepped + 1 >= trainer.max_steps
    return bool(writes) or last or trainer.is_last_batch


def log_step_values(module: L.LightningModule, values: dict, **kwargs) -> None:
    """``module.log_dict(values, **kwargs)`` on the training steps :func:`logs_this_step`
    chooses, and nothing on the others.

    Each ``LightningModule.log`` call walks Lightning's stored copy of the value
    (``_ResultMetric.to``) and clones it: about 1 ms of an H200 host's time a value under a
    sampling profiler, and a training step of the quality suite logged nine values, so a small
    model's step, which waits for the host, lost ~15% to values that no logger wrote
    (``benchmarks/results/ablation.md``, part 24). The loggers, the progress bar
    (:class:`callbacks.ProgressBar`) and ``trainer.callback_metrics`` see the same values as
    before on the steps the loggers write and at the end; in between, callbacks read the last
    values logged. Set ``trainer.log_every_n_steps=1`` for every step's values.
    """
    if logs_this_step(module._trainer):
        module.log_dict(values, **kwargs)


def persistent_run_id(folder: str | Path) -> str:
    """The W&B run id stored in ``folder`` (created on first use; safe when ranks race)."""
    folder = Path(folder)
    path = folder / RUN_ID_FILE
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{RUN_ID_FILE}.{uuid.uuid4().hex}"
        tmp.write_text(uuid.uuid4().hex[:12] + "\n")
        try:
            os.link(tmp, path)  # fails if another process wrote it first: keep theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    run_id = path.read_text().strip()
    if not run_id:
        raise ValueError(f"{path} is empty; delete it to start a new W&B run")
    return run_id


class ResumableWandbLogger(WandbLogger):
    """``WandbLogger`` whose run id lives in ``save_dir``, so a resumed fit continues the run.

    Args:
        save_dir: the run folder (the id file, W&B's local files and the samples go there).
        project: the W&B project.
        name: the run's display name.
        id: a W&B run id to continue (default: ``WANDB_RUN_ID`` or the id stored in
            ``save_dir``).
        resume: W&B's resume mode (``allow``: continue the id if it exists, else create it).
        **kwargs: further ``WandbLogger`` / ``wandb.init`` arguments (``entity``, ``tags``,
            ``log_model``...).
    """

    def __init__(
        self,
        save_dir: str = "runs/wandb",
        project: str = "lightning-vigu",
        name: str | None = None,
        id: str | None = None,
        resume: str = "allow",
        **kwargs,
    ) -> None:
        from lightning.pytorch.loggers.wandb import _WANDB_AVAILABLE

        if not _WANDB_AVAILABLE:  # say so before writing an id file
            raise ModuleNotFoundError(f"{_WANDB_AVAILABLE}; conf/wandb.yaml needs it")
        run_id = id or os.environ.get("WANDB_RUN_ID") or persistent_run_id(save_dir)
        super().__init__(
            save_dir=save_dir, project=project, name=name, id=run_id, resume=resume, **kwargs
        )
