"""Lightning callbacks of lightning_vigu: phase switching, sample logging, evaluation, EMA,
time budgets, skipped-sample counts.

EMA weights: :class:`EMA` (Lightning's weight averaging with a warm-up decay, so short runs
average their recent weights, not their initialisation).
"""

from callbacks.budget import TimeBudget
from callbacks.ema import EMA
from callbacks.evaluation import EvalResult, Evaluation, evaluate
from callbacks.phase_schedule import PhaseSchedule
from callbacks.sample_logger import SampleLogger
from callbacks.skips import SkippedSamples

__all__ = [
    "EMA",
    "EvalResult",
    "Evaluation",
    "PhaseSchedule",
    "SampleLogger",
    "SkippedSamples",
    "TimeBudget",
    "evaluate",
]
