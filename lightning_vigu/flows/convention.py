"""The one boundary between flow time and the generator's timestep convention.

Flow time ``t`` (0 = noise/source, 1 = data) is what every flow, loss and sampler uses. The
transformer takes Wan's generator timestep ``1000 * (1 - t)`` and predicts Wan's velocity
``u = eps - x_data = -dx_t/dt``. :class:`FlowTimeModel` converts both, here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

NUM_TRAIN_TIMESTEPS = 1000.0


def flow_time_to_timestep(t: Tensor) -> Tensor:
    """Flow time ``t`` in [0, 1] -> generator timestep ``1000 * (1 - t)`` (noise level x 1000)."""
    return (1.0 - t) * NUM_TRAIN_TIMESTEPS


def timestep_to_flow_time(timestep: Tensor) -> Tensor:
    """Generator timestep (0...1000) -> flow time."""
    return 1.0 - timestep / NUM_TRAIN_TIMESTEPS


@dataclass
class FlowPrediction:
    """What the flows consume.

    Attributes:
        velocity: ``(B, C, T, H, W)`` ``dx_t/dt`` of the video latents, or ``None``.
        text_logits: ``(B, L, V)`` logits of the caption posterior ``p(x_1 | x_t)``, or ``None``.
    """

    velocity: Tensor | None
    text_logits: Tensor | None


class FlowTimeModel:
    """Wraps the unified transformer so that callers speak flow time.

    A plain callable (not an ``nn.Module``), so the wrapped model's weights are not registered
    twice when a LightningModule holds both.

    Args:
        model: a :class:`~lightning_vigu.model.UniViGUTransformer` (generator timesteps in,
            Wan velocity out).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(
        self,
        x_video: Tensor | None,
        t_video: Tensor | None,
        context: Tensor,
        x_text: Tensor | None = None,
        t_text: Tensor | None = None,
    ) -> FlowPrediction:
        """Args are the model's, with ``t_video`` / ``t_text`` as ``(B,)`` flow times."""
        tv = None if t_video is None else flow_time_to_timestep(t_video)
        tt = None if t_text is None else flow_time_to_timestep(t_text)
        out = self.model(x_video, tv, context, text=x_text, t_text=tt)
        if x_text is None:
            return FlowPrediction(velocity=-out, text_logits=None)
        velocity = None if out.velocity is None else -out.velocity
        return FlowPrediction(velocity=velocity, text_logits=out.text_logits)
