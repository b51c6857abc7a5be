"""Evaluation noise: the paired bootstrap of a stage's difference from a baseline stage.

Each clip of an evaluation is sampled from a seed derived from its key
(:func:`callbacks.evaluation.clip_seeds`), so two checkpoints scored on one split see the same
prompts, the same real clips and the same initial noise: a paired design. The bootstrap draws
the clips with replacement -- the same draws for both stages -- and recomputes each stage's
score on every draw; the percentiles of the differences make the interval. It measures the
noise of the evaluation only (which clips were drawn, the sampling noise of each), not of
training: a stage trained again from another seed can move further.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from benchmarks.common import markdown_table
from lightning_vigu.metrics import frechet_distance_of_features

RESAMPLES, SEED, LEVEL = 2000, 0, 0.95
PER_CLIP = "_per_clip_t2v"  # the raw file's per-clip rows of a split (EvalResult.per_clip)
FVD_TOLERANCE = 1e-3  # relative: features that do not give back the recorded FVD are another run's
FORMAT = {"adherence": "+.3f", "fvd": "+.3g"}  # how quality.md writes the differences
Replicates = tuple[float, np.ndarray]  # the score on all clips, and on each draw


def bootstrap_draws(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``(resamples, n)`` clip indices drawn with replacement; a fixed seed gives every stage
    the same draws (the pairing)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def accuracy_replicates(
    correct: Sequence[int], checks: Sequence[int], draws: np.ndarray
) -> Replicates:
    """Accuracy as the ratio of sums (``mean_accuracy``'s), on all clips and on each draw."""
    correct, checks = np.asarray(correct, dtype=float), np.asarray(checks, dtype=float)
    return correct.sum() / checks.sum(), correct[draws].sum(1) / checks[draws].sum(1)


def _adherence(clips: dict, draws: np.ndarray) -> Replicates:
    return accuracy_replicates(clips["adherence_correct"], clips["adherence_checks"], draws)


def fvd_replicates(real: torch.Tensor, generated: torch.Tensor, draws: np.ndarray) -> Replicates:
    """FVD of ``(N, d)`` generated features against the real ones, on all clips and on each
    draw of the generated clips; the real set stays whole.

    FVD compares two sets and never pairs a generated clip with its own real clip: drawing the
    real clips with the same indices would (repeated clips in both sets then lower the FVD of a
    stage whose videos resemble their own clips'). The real set's own draw, shared by the
    stages compared, is left out of the noise.
    """
    index = torch.from_numpy(draws)
    every = frechet_distance_of_features(real, generated)
    each = [frechet_distance_of_features(real, generated[i]) for i in index.split(100)]
    return float(every), torch.cat(each).numpy()  # 100 draws at a time: (100, N, d) each


def difference(a: Replicates, b: Replicates, level: float = LEVEL) -> tuple[float, float, float]:
    """``a - b`` on all clips and the percentile interval of the paired differences."""
    tail = (1 - level) / 2
    low, high = np.quantile(a[1] - b[1], [tail, 1 - tail])
    return float(a[0] - b[0]), float(low), float(high)


def paired_bootstrap(
    a_correct: Sequence[int],
    a_total: Sequence[int],
    b_correct: Sequence[int],
    b_total: Sequence[int],
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[float, float, float]:
    """Accuracy of ``a`` minus that of ``b`` over the same clips (``correct`` of ``total``
    checks per clip, in the same clip order) and its 95% paired bootstrap interval:
    ``(difference, low, high)``."""
    if len(a_correct) != len(b_correct):
        raise ValueError(
            f"a paired bootstrap needs the same clips: {len(a_correct)} against {len(b_correct)}"
        )
    draws = bootstrap_draws(len(a_correct), resamples, seed)
    return difference(
        accuracy_replicates(a_correct, a_total, draws),
        accuracy_replicates(b_correct, b_total, draws),
    )


def _features(features: dict, stage: str, split: str, result: dict) -> dict | None:
    """The stage's kept FVD features of a split, when they are this run's: the same clips, and
    the FVD they give is the recorded one (else ``None``, said)."""
    kept = features.get(stage, {}).get(split)
    if kept is None or "t2v/fvd" not in result:
        return None
    recorded = result["t2v/fvd"]
    again = float(frechet_distance_of_features(kept["real"], kept["generated"]))
    same_clips = kept["key"] == result[PER_CLIP]["key"]
    if not same_clips or abs(again - recorded) > FVD_TOLERANCE * abs(recorded):
        print(
            f"warning: the kept FVD features of {stage}/{split} are not this run's: no FVD interval"
        )
        return None
    return kept


def versus_baseline(evals: dict[str, dict], features: dict, baseline: str = "twin") -> list[dict]:
    """Each stage's difference from ``baseline`` on the clips of each split, with intervals.

    Args:
        evals: ``{stage: {split: metrics}}`` (the raw file's ``eval`` entries, in report
            order); a split's metrics hold its per-clip rows under :data:`PER_CLIP`.
        features: ``{stage: {split: {"key", "real", "generated"}}}``, the kept FVD features
            (``{}``: adherence only).
        baseline: the stage the others are compared with.

    Returns:
        One row per stage and split with per-clip adherence on the baseline's clips:
        ``adherence_diff`` / ``_low`` / ``_high`` and, with features of both, ``fvd_*``.
    """
    base = {}
    for split, result in evals.get(baseline, {}).items():
        clips = result.get(PER_CLIP, {})
        if "adherence_correct" in clips:
            draws = bootstrap_draws(len(clips["key"]))
            kept = _features(features, baseline, split, result)
            fvd = None if kept is None else fvd_replicates(kept["real"], kept["generated"], draws)
            base[split] = (clips, draws, _adherence(clips, draws), fvd)
    rows = []
    for stage, splits in evals.items():
        for split, result in splits.items():
            clips = result.get(PER_CLIP, {})
            if stage == baseline or split not in base or "adherence_correct" not in clips:
                continue
            base_clips, draws, base_accuracy, base_fvd = base[split]
            if clips["key"] != base_clips["key"]:
                print(f"warning: {stage}/{split} was scored on other clips than {baseline}'s")
                continue
            row = {"stage": stage, "split": split, "clips": len(clips["key"])}
            diff = difference(_adherence(clips, draws), base_accuracy)
            row.update(zip(("adherence_diff", "adherence_low", "adherence_high"), diff))
            kept = _features(features, stage, split, result)
            if base_fvd is not None and kept is not None:
                fvd = fvd_replicates(kept["real"], kept["generated"], draws)
                row.update(zip(("fvd_diff", "fvd_low", "fvd_high"), difference(fvd, base_fvd)))
            rows.append(row)
    return rows


def markdown(rows: list[dict], baseline: str = "twin", explain: bool = True) -> str:
    """The section of ``quality.md``: what the intervals measure, and the table
    (``explain=False``: a line that points to the first section's explanation instead)."""
    if not rows:
        return (
            f"No evaluation-noise table: this run has no `{baseline}` or its raw file holds no "
            "per-clip adherence (scored before `evaluate` kept it)."
        )

    def interval(row: dict, name: str) -> str | None:
        if f"{name}_low" not in row:
            return None
        low, high = row[f"{name}_low"], row[f"{name}_high"]
        number = FORMAT[name]
        return f"[{low:{number}}, {high:{number}}]" + (" within noise" if low <= 0 <= high else "")

    table = [
        {
            "stage": r["stage"],
            "split": r["split"],
            f"Δ adherence vs {baseline}": f"{r['adherence_diff']:{FORMAT['adherence']}}",
            f"{LEVEL:.0%} interval": interval(r, "adherence"),
            f"Δ FVD vs {baseline}": f"{r['fvd_diff']:{FORMAT['fvd']}}" if "fvd_diff" in r else None,
            f"{LEVEL:.0%} interval (FVD)": interval(r, "fvd"),
        }
        for r in rows
    ]
    fvd = any("fvd_diff" in r for r in rows)
    columns = list(table[0])[: None if fvd else -2]
    if not explain:
        return (
            f"Intervals as in the evaluation-noise table above ({LEVEL:.0%}, paired bootstrap "
            f"over the same {rows[0]['clips']} clips).\n\n" + markdown_table(table, columns)
        )
    return (
        f"Evaluation noise: each stage's difference from `{baseline}` on the same "
        f"{rows[0]['clips']} clips of a split (the same prompts and the same initial noise: a "
        f"clip's seed comes from its key), with the {LEVEL:.0%} interval of a paired bootstrap "
        f"({RESAMPLES:,} draws of the clips with replacement, the same draws for both stages, "
        f"numpy seed {SEED}). A difference whose interval contains 0 is within evaluation "
        "noise. This is the noise of the evaluation only (the draw of the clips and the "
        "sampling noise), not of training: another training seed can move a stage further."
        + (
            " FVD draws the generated clips against the whole real set of the split (FVD "
            "never pairs a generated clip with its own real clip), so the noise of the real "
            "set's own draw, shared by both stages, is left out; FVD on a draw with repeated "
            "clips runs high, so its interval is the scale of the noise, not a corrected "
            "estimate."
            if fvd
            else " No FVD interval: no FVD features were kept for this run."
        )
        + "\n\n"
        + markdown_table(table, columns)
    )
