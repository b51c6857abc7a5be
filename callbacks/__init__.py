"""Lightning callbacks of lightning_vigu: phase switching, sample logging, evaluation."""

from callbacks.phases import PhaseSchedule
from callbacks.samples import SampleLogger

__all__ = ["PhaseSchedule", "SampleLogger"]
