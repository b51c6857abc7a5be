"""What every LightningModule of the project shares (UniViGU and the autoregressive baseline):
the learning-rate schedule, hyper-parameters that keep injected parts when a config made them,
and an optimiser factory that is injected rather than built inside the module.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.cli import OptimizerCallable


def warmup_cosine(step: int, warmup_steps: int, horizon: int | None, min_ratio: float) -> float:
    """Learning-rate factor: linear warm-up over ``warmup_steps``, then cosine decay to
    ``min_ratio`` at ``horizon`` (constant when the horizon is unknown or inside the warm-up)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if horizon is None or horizon <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (horizon - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def save_config_hyperparameters(module: L.LightningModule, injected: Sequence[str]) -> None:
    """``save_hyperparameters`` that keeps injected parts when they come from a config.

    Under LightningCLI the hyper-parameters are the parsed config, where injected parts are
    ``class_path`` entries, so ``load_from_checkpoint`` rebuilds them. Instances passed from
    Python are not serialisable hyper-parameters and are left out (pass them again on load).

    Inside ``__init__`` both cases receive instances; only Lightning's private
    ``_given_hyperparameters`` context (set by LightningCLI around the call) tells them apart,
    and Lightning has no public equivalent (2.6). ``tests/test_configs.py`` pins both cases.
    """
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    from_cli = _given_hyperparameters.get() is not None
    module.save_hyperparameters(
        ignore=None if from_cli else list(injected), frame=inspect.currentframe().f_back
    )


class InjectedOptimizerModule(L.LightningModule):
    """A LightningModule whose optimiser factory is injected (``self._optimizer_factory``).

    Copies (EMA's ``AveragedModel`` deep-copies the module) leave the factory out: under
    LightningCLI it closes over the whole parsed config, DataModule and its shared-memory
    counters included, which cannot be copied.
    """

    _optimizer_factory: OptimizerCallable | None = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_optimizer_factory"] = None
        return state
