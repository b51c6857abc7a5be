"""Step-based phase switching (Knowledge Recall -> Capability Refinement).

Lightning's ``BaseFinetuning`` is epoch-based, which does not fit streaming data trained by
``max_steps``; this callback switches at optimiser steps instead. It keeps no state of its
own: the phase of a step follows from the global step, and the module records the phase it
trains in its checkpoint (the one record), so a resumed run lands in the same phase.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lightning_vigu.loggers import host_number, log_step_values
from lightning_vigu.phases import Phase, get_phase


class PhaseSchedule(L.Callback):
    """Switch the module's :class:`~lightning_vigu.phases.Phase` at given global steps.

    Args:
        phases: phase presets (names) or dicts, in order.
        switch_steps: the global step at which each phase after the first begins
            (``len(phases) - 1`` increasing steps).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: callbacks.PhaseSchedule
              init_args: {phases: [recall, refine], switch_steps: [600]}
    """

    def __init__(self, phases: list[str | dict], switch_steps: list[int]) -> None:
        if len(switch_steps) != len(phases) - 1:
            raise ValueError(
                f"PhaseSchedule needs len(phases) - 1 = {len(phases) - 1} switch steps, got {switch_steps}"
            )
        if any(b <= a for a, b in zip(switch_steps, switch_steps[1:])) or any(
            s <= 0 for s in switch_steps
        ):
            raise ValueError(f"switch_steps must be positive and increasing, got {switch_steps}")
        self.phases: list[Phase] = [get_phase(p) for p in phases]
        self.switch_steps = list(switch_steps)
        self.current = 0

    def phase_index_at(self, step: int) -> int:
        """Index of the phase active at a global step."""
        return sum(step >= s for s in self.switch_steps)

    def _apply(self, pl_module: L.LightningModule, index: int, step: int) -> None:
        self.current = index
        phase = self.phases[index]
        pl_module.apply_phase(phase)
        rank_zero_info(
            f"[PhaseSchedule] step {step}: phase '{phase.name}' (trainable: {', '.join(phase.trainable)}; caption target: {phase.caption_target})"
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(pl_module, self.phase_index_at(trainer.global_step), trainer.global_step)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        index = self.phase_index_at(trainer.global_step)
        if index != self.current:
            self._apply(pl_module, index, trainer.global_step)
        log_step_values(pl_module, {"train/phase": host_number(self.current)})
