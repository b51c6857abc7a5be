"""Lightning callbacks of lightning_vigu: phase switching, sample logging, evaluation, EMA,
time budgets.

EMA weights: :class:`EMA` (Lightning's weight averaging with a warm-up decay, so short runs
average their recent weights, not their initialisation).
"""

from callbacks.budget import TimeBudget
from callbacks.ema import EMA
from callbacks.evaluation import Evaluation, evaluate
from callbacks.phases import PhaseSchedule
from callbacks.samples import SampleLogger

__all__ = ["EMA", "Evaluation", "PhaseSchedule", "SampleLogger", "TimeBudget", "evaluate"]
