"""Exponential moving average of the weights with a warm-up, for runs of any length.

Lightning's ``EMAWeightAveraging`` keeps a fixed decay: at 0.999, a run of 1,500 steps still
carries a fifth of its random initial weights in the average. :class:`EMA` ramps the decay as
``min(decay, (1 + n) / (10 + n))`` over the ``n`` updates so far (the warm-up of diffusers'
``EMAModel`` and timm's ``ModelEmaV2``), so the average always covers roughly the last tenth of
training until ``decay`` takes over. Like Lightning's callback it swaps the averaged weights in
for validation and stores them as the checkpoint's weights (``current_model_state`` keeps the
live ones for resuming), so sampling from a checkpoint uses the EMA.

The update never reads a tensor on the host (:class:`WarmupAveragedModel`): torch's
``AveragedModel`` reads its update count twice per update, and on a GPU each read waits for
all queued work, which a small model's step cannot afford.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


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


class WarmupAveragedModel(AveragedModel):
    """The warm-up EMA of a module's parameters and buffers, updated without host reads.

    The update count is kept on the host beside the ``n_averaged`` buffer that checkpoints
    store; after :meth:`load_state_dict` it is read from the buffer once, at the next update.

    The pairing of averaged and live tensors (by device and dtype, for one ``_foreach_lerp_``
    each) is worked out once and kept: made anew at every update, its few dispatcher calls per
    tensor took an H200 host 3.1 ms an update for ``small`` against 1.9 ms kept, of which
    walking the two modules was 1.5 (``benchmarks/results/ema_update_h200.md``). Each update
    walks the live module once (:func:`module_tensors`: its parameters and buffers from one
    pass over its submodules, where ``parameters()`` and ``buffers()`` make two) and checks
    that every tensor is the one paired before, on the same device and dtype; any change (a
    parameter replaced, a module moved or cast) pairs them again. The averaged copy is this
    class's own, and its tensors are walked again only when the pairing is made anew (after
    :meth:`load_state_dict`, or a change on the live side): weight swaps copy values in place.

    Args:
        model: the module to average (deep-copied).
        average: the decay schedule.
        device: where the averaged copy lives (default: the module's).
    """

    def __init__(
        self, model: nn.Module, average: WarmupEMA, device: torch.device | str | None = None
    ) -> None:
        super().__init__(model, device=device, use_buffers=True)
        self.average = average
        self._count: int | None = 0
        self._plan: _UpdatePlan | None = None

    def load_state_dict(self, *args, **kwargs):
        out = super().load_state_dict(*args, **kwargs)
        self._count = None  # read from n_averaged at the next update
        self._plan = None  # ``assign=True`` replaces the averaged tensors
        return out

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self._count is None:
            self._count = int(self.n_averaged)
        current = module_tensors(model)
        if self._count == 0:  # the first update copies every tensor
            for averaged, live in zip(module_tensors(self.module), current, strict=True):
                averaged.detach().copy_(live.detach().to(averaged.device, averaged.dtype))
        else:
            if self._plan is None or not self._plan.fits(current):
                pairs = list(zip(module_tensors(self.module), current, strict=True))
                self._plan = _UpdatePlan(pairs)
            self._plan.apply(1.0 - self.average.decay_at(self._count))
        self.n_averaged += 1
        self._count += 1


def module_tensors(module: nn.Module) -> list[Tensor]:
    """``[*module.parameters(), *module.buffers()]``, in that order and without repeats, from
    one pass over the submodules (``parameters()`` and ``buffers()`` each walk them, with a
    Python-level hash per tensor: on an H200's host most of an EMA update's time)."""
    modules = list(module.modules())
    tensors, seen = [], set()
    for slot in ("_parameters", "_buffers"):
        for m in modules:
            for t in getattr(m, slot).values():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    tensors.append(t)
    return tensors


class _UpdatePlan:
    """Averaged and live tensors grouped for one ``_foreach_lerp_`` per device and dtype, with
    the tensors that are copied (counters) or converted (live tensor elsewhere) each update.
    It keeps the tensors themselves, not views of their data, so it follows in-place steps and
    ``.data`` swaps alike; it is used under ``torch.no_grad``."""

    def __init__(self, pairs: list[tuple[Tensor, Tensor]]) -> None:
        self.pairs = [(a, c, (a.device, a.dtype, c.device, c.dtype)) for a, c in pairs]
        self.copied: list[tuple[Tensor, Tensor]] = []
        self.converted: list[tuple[Tensor, Tensor]] = []
        self.groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        for averaged, current in pairs:
            if not averaged.is_floating_point():
                self.copied.append((averaged, current))
            elif (current.device, current.dtype) != (averaged.device, averaged.dtype):
                self.converted.append((averaged, current))
            else:
                group = self.groups.setdefault((averaged.device, averaged.dtype), ([], []))
                group[0].append(averaged)
                group[1].append(current)

    def fits(self, current: list[Tensor]) -> bool:
        """Whether ``current`` are the live tensors this plan was made for, and both sides are
        where they were."""
        return len(current) == len(self.pairs) and all(
            c is c0 and (a.device, a.dtype, c.device, c.dtype) == where
            for c, (a, c0, where) in zip(current, self.pairs)
        )

    def apply(self, weight: float) -> None:
        for averaged, current in self.copied:
            averaged.copy_(current.to(averaged.device))
        for averaged, current in self.converted:
            averaged.lerp_(current.to(averaged.device, averaged.dtype), weight)
        for averaged, current in self.groups.values():
            torch._foreach_lerp_(averaged, current, weight)


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
        super().__init__(device=device, use_buffers=True)
        self.average = WarmupEMA(decay, warmup)
        self.update_every_n_steps = update_every_n_steps
        self._live_state: dict | None = None  # the live weights once training has ended

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self._live_state = None
        if is_overridden("configure_model", pl_module):  # as Lightning's: build the layers first
            rank_zero_warn(
                "the EMA callback copies the whole model: a configure_model that shards layers "
                "is built unsharded for the average, which may run out of memory"
            )
            pl_module.configure_model()
        # Lightning's AveragedModel, without its host reads
        self._average_model = WarmupAveragedModel(
            pl_module, self.average, self._device or pl_module.device
        )

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0

    def on_train_end(self, trainer, pl_module) -> None:
        """Copy the average into the live weights (Lightning's end of training), keeping the
        live ones for the checkpoints written after this hook.

        ``ModelCheckpoint`` writes its end-of-training ``last.ckpt`` after every other callback's
        ``on_train_end``, i.e. after the average has replaced the live weights: without this,
        that checkpoint held the average twice (as ``state_dict`` and as
        ``current_model_state``), so the live weights were lost and a run resumed from it
        continued from the average. It happened to the quality suite's stages resumed near
        their end (no interval checkpoint in the resumed part).
        """
        # on the host: a copy of the model beside the average could not fit on a full GPU
        state = pl_module.state_dict()
        self._live_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._live_state is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._live_state
