"""Lightning callbacks of lightning_vigu: phase switching, sample logging, evaluation, EMA,
time budgets, skipped-sample counts, a progress bar that lets the host run ahead of the GPU.

EMA weights: :class:`EMA` (Lightning's weight averaging with a warm-up decay, so short runs
average their recent weights, not their initialisation).
"""

from callbacks.budget import TimeBudget
from callbacks.ema import EMA
from callbacks.evaluation import EvalResult, Evaluation, evaluate
from callbacks.phase_schedule import PhaseSchedule
from callbacks.progress import ProgressBar
from callbacks.sample_logger import SampleLogger
from callbacks.skips import SkippedSamples

__all__ = [
    "EMA",
    "EvalResult",
    "Evaluation",
    "PhaseSchedule",
    "ProgressBar",
    "SampleLogger",
    "SkippedSamples",
    "TimeBudget",
    "evaluate",
]
