"""Samplers for the three tasks of the unified model, in flow time.

* text -> video: Euler on the shifted grid (or DDIM with ``video_eta > 0``, which re-draws part
  of the noise at every step), CFG on the video velocity; the caption stream is
  absent or holds a clean canvas (``t_text = 1``): the prompt in the conditional branch, the
  empty canvas in the unconditional one (a true null: no prompt anywhere).
* video -> text: the video is clean (``t_video = 1``); the caption canvas starts at the source
  and follows the mixture-path jump sampler (causal captions: one token per pass, left to
  right).
* joint: both streams start from their sources and advance together, each on its own time grid
  (causal captions: the video first, then its caption, since the video never reads it).

All randomness comes from one ``torch.Generator``, or from one per batch row
(:class:`~lightning_vigu.flows.draws.RowGenerators`: a sample then depends on its row's seed
alone, not on its batch); when they live on another device than the model, generators on the
model's device are seeded from them once (:func:`~lightning_vigu.flows.draws.on_device`), so
results are deterministic under a seed on a given device and no large tensor leaves the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_vigu.flows import continuous, discrete, draws
from lightning_vigu.flows.convention import FlowTimeModel


@dataclass
class SamplerConfig:
    """Sampling options.

    Attributes:
        video_steps: Euler steps for the video (Uni-ViGU: 50-100).
        text_steps: jump-sampler steps for the caption.
        shift: Wan's timestep shift for the video grid (3.0 in the reference).
        guidance_scale: CFG scale on the video velocity (5.0 in the reference; 1 = off).
        temperature: caption sampling temperature (0 = argmax draws).
        unmasking: mask source only: which masked tokens a step fills, ``random`` (the exact
            path sampler) or ``confidence`` (the surest first).
        video_eta: noise re-drawn at each video step (:func:`continuous.ddim_step`): 0 = the
            deterministic Euler sampler (Wan's), 1 = as much as DDPM's ancestral sampler.
    """

    video_steps: int = 50
    text_steps: int = 50
    shift: float = 3.0
    guidance_scale: float = 5.0
    temperature: float = 1.0
    unmasking: str = "random"
    video_eta: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.video_eta <= 1.0:
            raise ValueError(f"sampler.video_eta must be in [0, 1], got {self.video_eta}")


class UnifiedSampler:
    """Runs the unified model's three sampling tasks.

    Args:
        model: a :class:`FlowTimeModel` (flow time in, ``dx/dt`` and logits out).
        path: the caption stream's :class:`~lightning_vigu.flows.discrete.MixtureDiscretePath`
            or :class:`~lightning_vigu.flows.causal.CausalCaptions`.
        config: step counts, shift, guidance, temperature.
    """

    def __init__(
        self,
        model: FlowTimeModel,
        path: discrete.MixtureDiscretePath,
        config: SamplerConfig | None = None,
    ) -> None:
        self.model = model
        self.path = path
        self.config = config or SamplerConfig()

    def _velocity(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        uncond: Tensor | None,
        text: Tensor | None,
        t_text: Tensor | None,
        uncond_text: Tensor | None = None,
    ):
        """Guided video velocity and the conditional caption logits (``uncond_text``: the
        caption canvas of the unconditional branch, default ``text``)."""
        scale = self.config.guidance_scale
        if uncond is None or scale == 1.0:
            out = self.model(x, t, context, text, t_text)
            return out.velocity, out.text_logits
        null_text = text if uncond_text is None else uncond_text
        both = self.model(
            torch.cat([x, x]),
            torch.cat([t, t]),
            torch.cat([context, uncond]),
            None if text is None else torch.cat([text, null_text]),
            None if t_text is None else torch.cat([t_text, t_text]),
        )
        v_cond, v_uncond = both.velocity.chunk(2)
        logits = None if both.text_logits is None else both.text_logits.chunk(2)[0]
        return continuous.guided_velocity(v_cond, v_uncond, scale), logits

    @torch.no_grad()
    def generate_video(
        self,
        context: Tensor,
        latent_shape: tuple[int, int, int, int],
        uncond_context: Tensor | None = None,
        text: Tensor | None = None,
        generator: draws.Generators = None,
        uncond_text: Tensor | None = None,
    ) -> Tensor:
        """Text -> video latents ``(B, *latent_shape)``.

        Args:
            context: ``(B, Lc, D)`` prompt condition.
            latent_shape: ``(c, t, h, w)``.
            uncond_context: the empty-prompt condition for CFG (``None`` = no guidance).
            text: optional clean caption canvas ``(B, L)`` held at ``t_text = 1``.
            uncond_text: the caption canvas of the unconditional branch (the empty prompt's;
                default ``text``).
            generator: one ``torch.Generator``, or :class:`~lightning_vigu.flows.draws.RowGenerators`
                (one per row of ``context``).
        """
        b, device = context.shape[0], context.device
        generator = draws.on_device(generator, device)
        x = draws.randn((b, *latent_shape), generator, device)
        grid = continuous.time_grid(self.config.video_steps, self.config.shift, device)
        t_text = None if text is None else torch.ones(b, device=device)
        for t, t_next in zip(grid[:-1], grid[1:]):
            v, _ = self._velocity(
                x, t.expand(b), context, uncond_context, text, t_text, uncond_text
            )
            x = self._video_step(x, v, t, t_next, generator)
        return x

    def _video_step(
        self, x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, generator: draws.Generators
    ) -> Tensor:
        """Euler, or DDIM with fresh noise when ``video_eta > 0``."""
        eta = self.config.video_eta
        noise = draws.randn(x.shape, generator, x.device, x.dtype) if eta > 0 else None
        return continuous.ddim_step(x, v, t, t_next, eta, noise)

    @torch.no_grad()
    def caption(
        self,
        latents: Tensor,
        context: Tensor,
        length: int,
        generator: draws.Generators = None,
    ) -> Tensor:
        """Video -> caption tokens ``(B, length)`` from clean latents ``(B, c, t, h, w)``.

        ``context`` is the condition the captioner sees: the empty prompt in Uni-ViGU.
        """
        b, device = latents.shape[0], latents.device
        generator = draws.on_device(generator, device)
        ones = torch.ones(b, device=device)
        if self.path.causal:  # the video is read once, then each step passes the caption
            memory = self.model.video_memory(latents, ones, context)
            return self.path.decode(
                lambda canvas: self.model(None, None, context, canvas, ones, memory).text_logits,
                b, length, device, self.config.temperature, generator,
            )  # fmt: skip
        x_t = self.path.start(b, length, device, generator)
        grid = torch.linspace(0, 1, self.config.text_steps + 1, device=device)
        for t, t_next in zip(grid[:-1], grid[1:]):
            logits = self.model(latents, ones, context, x_t, t.expand(b)).text_logits
            x_t = self._jump(x_t, logits, t.expand(b), t_next.expand(b), generator)
        return x_t

    @torch.no_grad()
    def generate_joint(
        self,
        context: Tensor,
        latent_shape: tuple[int, int, int, int],
        length: int,
        uncond_context: Tensor | None = None,
        generator: draws.Generators = None,
    ) -> tuple[Tensor, Tensor]:
        """Video latents and caption tokens generated together from noise.

        Both streams take ``video_steps`` steps; the video follows the shifted grid and the
        caption a uniform grid, each with its own time. With causal captions the video is
        generated first and captioned under ``uncond_context`` (the empty prompt; ``context``
        when there is none).
        """
        b, device = context.shape[0], context.device
        generator = draws.on_device(generator, device)
        if self.path.causal:  # the video never reads the caption: generate it, then caption it
            x = self.generate_video(context, latent_shape, uncond_context, None, generator)
            reader = uncond_context if uncond_context is not None else context
            return x, self.caption(x, reader, length, generator)
        x = draws.randn((b, *latent_shape), generator, device)
        x_t = self.path.start(b, length, device, generator)
        n = self.config.video_steps
        grid_v = continuous.time_grid(n, self.config.shift, device)
        grid_x = torch.linspace(0, 1, n + 1, device=device)
        for i in range(n):
            tv, tx = grid_v[i].expand(b), grid_x[i].expand(b)
            v, logits = self._velocity(x, tv, context, uncond_context, x_t, tx)
            x = self._video_step(x, v, grid_v[i], grid_v[i + 1], generator)
            x_t = self._jump(x_t, logits, tx, grid_x[i + 1].expand(b), generator)
        return x, x_t

    def _jump(
        self,
        x_t: Tensor,
        logits: Tensor,
        t: Tensor,
        t_next: Tensor,
        generator: draws.Generators,
    ) -> Tensor:
        c = self.config
        return self.path.step(x_t, logits, t, t_next, c.temperature, generator, c.unmasking)
