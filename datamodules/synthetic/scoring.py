"""Attribute-by-attribute comparison of a found scene (detected or parsed) with a record.

A *scene description* is a dict ``{"background": str | None, "count": int | None,
"objects": [{"colour", "shape", "size", "start", "motion", "speed"}, ...]}`` where any value
may be ``None`` (not found / not stated). Records written by the world have this shape plus
extra fields. Found objects are matched to expected objects by the assignment that agrees on
the most attributes, so the order of objects in a caption or video does not matter.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from datamodules.synthetic.world import OBJECT_ATTRIBUTES

Scope = Literal["all", "prompt", "stated"]


@dataclass(frozen=True)
class AttributeScore:
    """Per-attribute correctness of one clip or text.

    Attributes:
        correct: ``{"background": bool, "count": bool, "objects.0.colour": bool, ...}``; an
            attribute that was not found or is wrong is ``False``.
    """

    correct: dict[str, bool]

    @property
    def accuracy(self) -> float:
        """Fraction of correct attributes (``nan`` when there is nothing to score)."""
        if not self.correct:
            return math.nan
        return sum(self.correct.values()) / len(self.correct)

    def by_attribute(self) -> dict[str, float]:
        """Accuracy per attribute kind (``colour``, ``motion``, ``background``...)."""
        groups: dict[str, list[bool]] = {}
        for key, ok in self.correct.items():
            groups.setdefault(key.rsplit(".", 1)[-1], []).append(ok)
        return {k: sum(v) / len(v) for k, v in groups.items()}


def expected_attributes(record: dict, scope: Scope = "all") -> tuple[dict, list[dict]]:
    """What a video or text should show, from a world record.

    Args:
        record: the clip's json record.
        scope: ``"all"`` -- every attribute (what a detailed caption states); ``"prompt"`` --
            only what the clip's prompt states (``prompt_objects`` / ``prompt_attributes``).

    Returns:
        ``(scene, objects)``: scene-level attributes (``background``, ``count``) and one
        ``{attribute: value}`` dict per expected object. ``speed`` is only expected of
        moving objects.
    """
    if scope == "all":
        scene = {"background": record["background"], "count": record["count"]}
        indices, attributes = range(len(record["objects"])), OBJECT_ATTRIBUTES
    elif scope == "prompt":
        scene = {}
        indices, attributes = record["prompt_objects"], record["prompt_attributes"]
    else:
        raise ValueError(f"unknown scope '{scope}'; use 'all' or 'prompt'")
    objects = []
    for i in indices:
        obj = record["objects"][i]
        keep = [a for a in attributes if a != "speed" or obj["motion"] != "still"]
        objects.append({a: obj[a] for a in keep})
    return scene, objects


def _agreement(expected: dict, found: dict | None) -> dict[str, bool]:
    return {a: found is not None and found.get(a) == v for a, v in expected.items()}


def score_stated(found: dict, record: dict) -> AttributeScore:
    """Score only what a description *states* (precision): each stated scene attribute, and
    each stated attribute of each found object, matched one-to-one to the record's objects by
    the assignment that agrees on the most; a found object with no counterpart is wrong in
    every attribute it states. A text that states nothing has nothing to score (``nan``)."""
    correct = {
        k: found[k] == record[k] for k in ("background", "count") if found.get(k) is not None
    }
    candidates = [{a: v for a, v in o.items() if v is not None} for o in found.get("objects", [])]
    actual = [{a: o[a] for a in OBJECT_ATTRIBUTES} for o in record["objects"]]
    best = _best_assignment(
        len(candidates),
        len(actual),
        lambda i, j: {a: j is not None and actual[j][a] == v for a, v in candidates[i].items()},
    )
    return AttributeScore(correct | best)


def score_scene(found: dict, record: dict, scope: Scope = "all") -> AttributeScore:
    """Score a found scene description against a record, attribute by attribute.

    Args:
        found: the detected or parsed scene description (see the module docstring).
        record: the clip's json record.
        scope: which attributes count (see :func:`expected_attributes`); ``"stated"``: only
            those the description states (see :func:`score_stated`).
    """
    if scope == "stated":
        return score_stated(found, record)
    scene, expected = expected_attributes(record, scope)
    correct = {k: found.get(k) is not None and found.get(k) == v for k, v in scene.items()}
    candidates = list(found.get("objects") or [])
    best = _best_assignment(
        len(expected),
        len(candidates),
        lambda i, j: _agreement(expected[i], None if j is None else candidates[j]),
    )
    return AttributeScore(correct | best)


def _best_assignment(
    num_items: int, num_slots: int, agreement: Callable[[int, int | None], dict[str, bool]]
) -> dict[str, bool]:
    """Match items to slots (each slot once, or an item to none) so that the most attributes
    agree; ``agreement(i, j)`` scores item ``i`` against slot ``j`` (``None``: no slot).
    Returns ``{"objects.<i>.<attribute>": ok}`` of the best match (the first of ties)."""
    slots = list(range(num_slots)) + [None] * num_items
    best: list[dict[str, bool]] | None = None
    for assignment in itertools.permutations(slots, num_items):
        scores = [agreement(i, j) for i, j in enumerate(assignment)]
        if best is None or sum(sum(s.values()) for s in scores) > sum(
            sum(s.values()) for s in best
        ):
            best = scores
    return {f"objects.{i}.{a}": ok for i, s in enumerate(best or []) for a, ok in s.items()}


def mean_accuracy(scores: list[AttributeScore]) -> dict[str, float]:
    """Aggregate many clips: overall attribute accuracy and accuracy per attribute kind."""
    totals: dict[str, list[bool]] = {}
    for s in scores:
        for key, ok in s.correct.items():
            totals.setdefault(key.rsplit(".", 1)[-1], []).append(ok)
    flat = [ok for v in totals.values() for ok in v]
    out = {"accuracy": sum(flat) / len(flat) if flat else math.nan}
    out.update({k: sum(v) / len(v) for k, v in sorted(totals.items())})
    return out
