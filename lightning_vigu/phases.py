"""Phases of the bidirectional recipe: Knowledge Recall -> Capability Refinement.

A :class:`Phase` is the only thing a phase switch changes: the caption target, the loss
weights, which parameter groups train, the task mix and an lr scale. Presets live in
``phases.yaml`` (``generator``, ``recall``, ``refine``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

GROUPS = ("video", "text_experts", "text_embed", "prompt_encoder")
TASKS = ("t2v", "v2t", "joint")
TARGETS = ("prompt", "caption")


@dataclass
class Phase:
    """One phase of training.

    Attributes:
        name: phase name (logged, stored in checkpoints).
        caption_target: what the caption stream reconstructs: ``prompt`` (Knowledge Recall)
            or ``caption`` (the detailed caption, Capability Refinement).
        loss_weights: ``{"video": w_v, "text": w_x}``.
        trainable: parameter groups that train (see :data:`GROUPS`).
        task_mix: probabilities of ``t2v`` / ``v2t`` / ``joint`` per example (normalised).
        lr_scale: multiplies every group's learning rate during this phase.
        lr_groups: per-group multipliers on top of ``lr_scale`` during this phase, e.g.
            ``{"video": 0.1}`` to move the generator's weights gently while captions learn.
    """

    name: str
    caption_target: str = "prompt"
    loss_weights: dict[str, float] = field(default_factory=lambda: {"video": 1.0, "text": 1.0})
    trainable: list[str] = field(default_factory=lambda: list(GROUPS))
    task_mix: dict[str, float] = field(
        default_factory=lambda: {"t2v": 0.3, "v2t": 0.5, "joint": 0.2}
    )
    lr_scale: float = 1.0
    lr_groups: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.caption_target not in TARGETS:
            raise ValueError(
                f"phase '{self.name}': caption_target must be one of {TARGETS}, got '{self.caption_target}'"
            )
        for key, allowed, what in (
            (self.trainable, GROUPS, "trainable group"),
            (self.task_mix, TASKS, "task"),
            (self.loss_weights, ("video", "text"), "loss weight"),
            (self.lr_groups, GROUPS, "lr group"),
        ):
            bad = sorted(set(key) - set(allowed))
            if bad:
                raise ValueError(
                    f"phase '{self.name}': unknown {what}(s) {bad}; allowed: {list(allowed)}"
                )
        total = sum(self.task_mix.values())
        if total <= 0 or any(v < 0 for v in self.task_mix.values()):
            raise ValueError(
                f"phase '{self.name}': task_mix needs non-negative weights summing to > 0, got {self.task_mix}"
            )
        self.task_mix = {k: v / total for k, v in self.task_mix.items()}
        if self.lr_scale <= 0 or any(v <= 0 for v in self.lr_groups.values()):
            raise ValueError(
                f"phase '{self.name}': lr_scale and lr_groups must be > 0 (freeze a group by "
                f"leaving it out of 'trainable'), got {self.lr_scale} and {self.lr_groups}"
            )

    def group_lr(self, group: str) -> float:
        """This phase's lr multiplier for a parameter group."""
        return self.lr_scale * self.lr_groups.get(group, 1.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def uses_text(self) -> bool:
        """Whether this phase trains or feeds the caption stream at all."""
        return self.loss_weights.get("text", 0.0) > 0 or any(
            self.task_mix.get(t, 0) > 0 for t in ("v2t", "joint")
        )


PRESETS: dict[str, dict] = yaml.safe_load((Path(__file__).with_name("phases.yaml")).read_text())


def get_phase(phase: str | dict | Phase) -> Phase:
    """A :class:`Phase` from a preset name, a dict (``name`` + fields) or a Phase."""
    if isinstance(phase, Phase):
        return phase
    if isinstance(phase, str):
        if phase not in PRESETS:
            raise ValueError(
                f"unknown phase preset '{phase}'; choose one of {sorted(PRESETS)} or give a dict"
            )
        return Phase(name=phase, **PRESETS[phase])
    values = dict(phase)
    base = values.pop("preset", None)
    merged = {**(PRESETS[base] if base else {}), **values}
    merged.setdefault("name", base or "custom")
    return Phase(**merged)
