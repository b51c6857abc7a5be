"""Lightning callbacks of lightning_vigu: phase switching, sample logging, evaluation.

EMA weights use Lightning's own ``lightning.pytorch.callbacks.EMAWeightAveraging`` (it swaps
the averaged weights in for validation and stores them as the checkpoint's weights).
"""

from callbacks.evaluation import Evaluation, evaluate
from callbacks.phases import PhaseSchedule
from callbacks.samples import SampleLogger

__all__ = ["Evaluation", "PhaseSchedule", "SampleLogger", "evaluate"]
