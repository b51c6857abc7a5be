"""Flows in flow time (0 = source, 1 = data): continuous (video), discrete (captions), samplers
and their random draws (one generator, or one per batch row); and the causal caption process,
the next-token alternative to the discrete flow.

Pure PyTorch, no Lightning. ``convention.FlowTimeModel`` is the single boundary to the
transformer's generator-timestep convention.
"""

from lightning_vigu.flows import causal, continuous, discrete, draws
from lightning_vigu.flows.convention import FlowPrediction, FlowTimeModel, flow_time_to_timestep
from lightning_vigu.flows.draws import RowGenerators
from lightning_vigu.flows.sampling import SamplerConfig, UnifiedSampler

__all__ = [
    "FlowPrediction",
    "FlowTimeModel",
    "RowGenerators",
    "SamplerConfig",
    "UnifiedSampler",
    "causal",
    "continuous",
    "discrete",
    "draws",
    "flow_time_to_timestep",
]
