"""Exponential moving average of the weights with a warm-up, for runs of any length.

Lightning's ``EMAWeightAveraging`` keeps a fixed decay: at 0.999, a run of 1,500 steps still
carries a fifth of its random initial weights in the average. :class:`EMA` ramps the decay as
``min(decay, (1 + n) / (10 + n))`` over the ``n`` updates so far (the warm-up of diffusers'
``EMAModel`` and timm's ``ModelEmaV2``), so the average always covers roughly the last tenth of
training until ``decay`` takes over. Like Lightning's callback it swaps the averaged weights in
for validation and stores them as the checkpoint's weights (``current_model_state`` keeps the
live ones for resuming), so sampling from a checkpoint uses the EMA.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor


class WarmupEMA:
    """``multi_avg_fn`` of :class:`torch.optim.swa_utils.AveragedModel`: one warm-up EMA
    update of all tensors of a device and dtype at once (one ``_foreach_lerp_``, one read of the
    update count; a per-tensor ``avg_fn`` would launch a kernel and wait for the device once
    per parameter).

    Args:
        decay: the decay the warm-up ramps to.
        warmup: ramp the decay as ``(1 + n) / (10 + n)`` (``False``: fixed ``decay``).
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup

    def decay_at(self, num_averaged: int | Tensor) -> float:
        """The decay of the update after ``num_averaged`` earlier ones."""
        n = float(num_averaged)
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    def __call__(self, averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        # averaged <- decay * averaged + (1 - decay) * current, in place
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay_at(num_averaged))


class EMA(WeightAveraging):
    """EMA weights (warm-up decay) swapped in for validation, test and checkpoints.

    Args:
        decay: the final decay (0.999: the last ~1,000 steps once warmed up).
        warmup: ramp the decay over the first updates (see module docstring).
        update_every_n_steps: update the average every this many optimiser steps.
        device: where the averaged copy lives (default: the module's device).
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = True,
        update_every_n_steps: int = 1,
        device: str | None = None,
    ) -> None:
        if update_every_n_steps < 1:
            raise ValueError(f"update_every_n_steps must be >= 1, got {update_every_n_steps}")
        super().__init__(device=device, use_buffers=True, multi_avg_fn=WarmupEMA(decay, warmup))
        self.update_every_n_steps = update_every_n_steps

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0
