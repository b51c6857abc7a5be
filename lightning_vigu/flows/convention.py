"""The one boundary between flow time and the generator's timestep convention.

Flow time ``t`` (0 = noise/source, 1 = data) is what every flow, loss and sampler uses. The
transformer takes Wan's generator timestep ``1000 * (1 - t)``. What its video head predicts is
a choice made here and nowhere else (:data:`PREDICTIONS`):

* ``velocity`` -- Wan's velocity ``u = eps - x_data = -dx_t/dt`` (pretrained Wan weights);
* ``data`` -- the clean latents ``x_1`` themselves ("x-prediction", Li & He 2025, "Back to
  Basics: Let Denoising Generative Models Denoise"). The flows still receive a velocity,
  ``dx_t/dt = (x_1_hat - x_t) / (1 - t)``, so losses and samplers are unchanged; ``1 - t`` is
  clamped at ``data_min_noise`` so the conversion stays bounded next to the data end.

:class:`FlowTimeModel` converts times and predictions for every caller (objective, samplers).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

NUM_TRAIN_TIMESTEPS = 1000.0
PREDICTIONS = ("velocity", "data")


def flow_time_to_timestep(t: Tensor) -> Tensor:
    """Flow time ``t`` in [0, 1] -> generator timestep ``1000 * (1 - t)`` (noise level x 1000)."""
    return (1.0 - t) * NUM_TRAIN_TIMESTEPS


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
    """Wraps the unified transformer so that callers speak flow time and velocity.

    A plain callable (not an ``nn.Module``), so the wrapped model's weights are not registered
    twice when a LightningModule holds both.

    Args:
        model: a :class:`~lightning_vigu.model.UniViGUTransformer` (generator timesteps in).
        prediction: what the video head outputs, ``velocity`` (Wan) or ``data`` (see module
            docstring).
        data_min_noise: the smallest ``1 - t`` used to turn a data prediction into a velocity.
    """

    def __init__(
        self, model: nn.Module, prediction: str = "velocity", data_min_noise: float = 0.05
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(
                f"unknown video prediction '{prediction}'; choose one of {list(PREDICTIONS)} "
                "('velocity' for Wan checkpoints, 'data' for models trained on pixels)"
            )
        if not 0 < data_min_noise < 1:
            raise ValueError(f"data_min_noise must be in (0, 1), got {data_min_noise}")
        self.model = model
        self.prediction = prediction
        self.data_min_noise = data_min_noise

    def velocity(self, raw: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The network's video output ``raw`` ``(B, C, T, H, W)`` at ``x_t``, flow time ``t``
        ``(B,)`` -> ``dx_t/dt``."""
        if self.prediction == "velocity":
            return -raw  # Wan predicts eps - x_1 = -dx_t/dt
        noise = (1.0 - t).clamp_min(self.data_min_noise).reshape(-1, *([1] * (raw.ndim - 1)))
        return (raw - x_t.float()) / noise

    def video_memory(self, x_video: Tensor, t_video: Tensor, context: Tensor):
        """The model's :meth:`~lightning_vigu.model.UniViGUTransformer.video_memory` at flow
        time ``t_video`` ``(B,)``."""
        return self.model.video_memory(x_video, flow_time_to_timestep(t_video), context)

    def __call__(
        self,
        x_video: Tensor | None,
        t_video: Tensor | None,
        context: Tensor,
        x_text: Tensor | None = None,
        t_text: Tensor | None = None,
        memory=None,
        text_rows: Tensor | None = None,
    ) -> FlowPrediction:
        """Args are the model's, with ``t_video`` / ``t_text`` as ``(B,)`` flow times
        (``memory``: a video memory of :meth:`video_memory` read in place of the video;
        ``text_rows``: the video rows that hold the causal captions ``x_text``)."""
        tv = None if t_video is None else flow_time_to_timestep(t_video)
        tt = None if t_text is None else flow_time_to_timestep(t_text)
        if text_rows is not None:
            out = self.model(x_video, tv, context, text=x_text, t_text=tt, text_rows=text_rows)
        elif memory is None:
            out = self.model(x_video, tv, context, text=x_text, t_text=tt)
        else:  # eager: the memory is Python state that a compiled graph would break on
            out = self.model.forward(x_video, tv, context, text=x_text, t_text=tt, memory=memory)
        raw, logits = (out, None) if x_text is None else (out.velocity, out.text_logits)
        velocity = None if raw is None else self.velocity(raw, x_video, t_video)
        return FlowPrediction(velocity=velocity, text_logits=logits)
