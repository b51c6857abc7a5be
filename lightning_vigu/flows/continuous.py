"""Continuous flow matching for video latents (rectified flow, flow-time notation).

Path: ``x_t = t * x_1 + (1 - t) * x_0`` with ``x_0 ~ N(0, I)`` (noise) and ``x_1`` (data);
target velocity ``dx_t/dt = x_1 - x_0``. Wan's "shift" reparameterises the noise level
``sigma = 1 - t`` as ``shift * sigma / (1 + (shift - 1) * sigma)``, spending more steps at high
noise; it is applied to training-time sampling (optionally) and to the sampler's grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ContinuousPathSample:
    """A point on the rectified-flow path.

    Attributes:
        x_0: ``(B, ...)`` noise.
        x_1: ``(B, ...)`` data.
        t: ``(B,)`` flow time.
        x_t: ``(B, ...)`` the interpolant.
        dx_t: ``(B, ...)`` the target velocity ``x_1 - x_0``.
    """

    x_0: Tensor
    x_1: Tensor
    t: Tensor
    x_t: Tensor
    dx_t: Tensor


def _expand(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def sample_path(
    x_1: Tensor, t: Tensor, x_0: Tensor | None = None, generator: torch.Generator | None = None
) -> ContinuousPathSample:
    """Sample ``x_t`` on the rectified-flow path between noise and ``x_1`` ``(B, ...)``."""
    if x_0 is None:
        x_0 = torch.randn(x_1.shape, generator=generator, device=x_1.device, dtype=x_1.dtype)
    te = _expand(t, x_1).to(x_1.dtype)
    return ContinuousPathSample(
        x_0=x_0, x_1=x_1, t=t, x_t=te * x_1 + (1 - te) * x_0, dx_t=x_1 - x_0
    )


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Apply Wan's timestep shift in flow time: ``sigma' = s*sigma / (1 + (s-1)*sigma)``."""
    sigma = 1.0 - t
    return 1.0 - shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sample_time(
    batch: int,
    scheme: str = "uniform",
    shift: float = 1.0,
    mean: float = 0.0,
    std: float = 1.0,
    eps: float = 1e-3,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Training times ``(batch,)`` in ``[eps, 1 - eps]``.

    Args:
        scheme: ``uniform`` or ``logit_normal`` (SD3's: ``sigmoid(N(mean, std))``).
        shift: Wan's shift applied after sampling (1 = none).
    """
    if scheme == "uniform":
        t = torch.rand(batch, device=device, generator=generator)
    elif scheme == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(batch, device=device, generator=generator))
    else:
        raise ValueError(
            f"unknown time sampling scheme '{scheme}'; choose 'uniform' or 'logit_normal'"
        )
    return shift_time(t, shift).clamp(eps, 1 - eps)


def velocity_loss(
    pred: Tensor, target: Tensor, t: Tensor | None = None, weighting: str = "none"
) -> Tensor:
    """Per-example mean-squared velocity error ``(B,)``.

    Args:
        weighting: ``none`` (plain rectified flow), ``snr`` (``t / (1 - t)`` clipped to
            [0, 5], emphasising low noise) or ``data`` (``(1 - t)^2``: the squared error of
            the implied data ``x_t + (1 - t) v``, since ``x1_hat - x1 = (1 - t)(v_hat - v)``;
            it drops the velocity loss's ``1 / (1 - t)^2`` emphasis on nearly clean inputs).
    """
    per = (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    if weighting == "none":
        return per
    if weighting == "snr":
        if t is None:
            raise ValueError("snr weighting needs the flow times t")
        return per * (t / (1 - t)).clamp(0, 5)
    if weighting == "data":
        if t is None:
            raise ValueError("data weighting needs the flow times t")
        return per * (1 - t.float()).pow(2)
    raise ValueError(f"unknown loss weighting '{weighting}'; choose 'none', 'snr' or 'data'")


def time_grid(num_steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> Tensor:
    """``num_steps + 1`` flow times from 0 (noise) to 1 (data) on Wan's shifted schedule."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(0.0, 1.0, num_steps + 1, device=device, dtype=torch.float64)
    return shift_time(t, shift).float()


def euler_step(x_t: Tensor, velocity: Tensor, t: float | Tensor, t_next: float | Tensor) -> Tensor:
    """One Euler step ``x_{t+h} = x_t + h * v``."""
    h = t_next - t
    if isinstance(h, Tensor):
        h = _expand(h, x_t)
    return x_t + h * velocity


def ddim_step(
    x_t: Tensor,
    velocity: Tensor,
    t: float | Tensor,
    t_next: float | Tensor,
    eta: float,
    noise: Tensor | None = None,
) -> Tensor:
    """One DDIM step on the rectified-flow path (``alpha_t = t``, ``sigma_t = 1 - t``), which
    re-draws part of the noise.

    The velocity implies the data ``x1 = x_t + (1 - t) v`` and the noise ``x0 = x_t - t v``;
    the next point is ``t' x1 + sqrt(sigma'^2 - s^2) x0 + s eps`` with fresh noise ``eps`` and
    ``s = eta * sigma' * sqrt(1 - (t sigma' / (t' sigma))^2)`` (Song et al. 2021, "Denoising
    Diffusion Implicit Models", their sigma(eta) for a general Gaussian path). Every ``eta``
    keeps the path's marginals given the data; ``eta = 0`` is the Euler step of
    :func:`euler_step` (the probability-flow ODE), ``eta = 1`` re-draws as much noise as DDPM's
    ancestral sampler.

    Args:
        noise: ``eps`` (shaped like ``x_t``); required when ``eta > 0``.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"the sampler's eta must be in [0, 1], got {eta}")
    if eta == 0.0:
        return euler_step(x_t, velocity, t, t_next)
    t, t_next = (_expand(torch.as_tensor(v, device=x_t.device), x_t) for v in (t, t_next))
    data = x_t + (1 - t) * velocity
    source = x_t - t * velocity
    sigma, sigma_next = 1 - t, 1 - t_next
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs the fresh noise")
    ratio = (t * sigma_next / (t_next * sigma).clamp_min(1e-12)).clamp(0, 1)
    s = eta * sigma_next * (1 - ratio**2).sqrt()
    return t_next * data + (sigma_next**2 - s**2).clamp_min(0).sqrt() * source + s * noise


def guided_velocity(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ``v_uncond + scale * (v_cond - v_uncond)``."""
    return v_uncond + scale * (v_cond - v_uncond)
