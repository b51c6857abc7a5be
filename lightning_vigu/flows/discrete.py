"""Discrete flow matching for caption tokens: the mixture path (flow-time notation).

Each token of ``x_t`` is the data token ``x_1`` with probability ``kappa_t`` and a draw of the
source ``x_0`` otherwise; the source is uniform over the vocabulary (Uni-ViGU's default) or an
all-mask canvas. The network predicts the posterior ``p(x_1 | x_t)``; training minimises its
cross-entropy (or the generalized KL of Shaul et al., 2024). The sampler jumps each token to a
posterior draw with the exact mixture-path probability ``(kappa_{t+h} - kappa_t) / (1 - kappa_t)``
and never builds ``B x L x V`` one-hot tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


class PolynomialScheduler:
    """``kappa_t = t ** exponent`` (exponent 1 in Uni-ViGU)."""

    def __init__(self, exponent: float = 1.0) -> None:
        if exponent <= 0:
            raise ValueError(f"scheduler exponent must be > 0, got {exponent}")
        self.exponent = float(exponent)

    def kappa(self, t: Tensor) -> Tensor:
        return t**self.exponent

    def d_kappa(self, t: Tensor) -> Tensor:
        return self.exponent * t ** (self.exponent - 1)


class UniformSource:
    """Uniform over ``vocab_size`` ids."""

    masked = False

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def sample_like(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.randint(0, self.vocab_size, x.shape, device=x.device, generator=generator)


class MaskSource:
    """Every token is the mask id (an extra row of the embedding, ``vocab_size``)."""

    masked = True

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.mask_id = vocab_size

    def sample_like(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.full_like(x, self.mask_id)


def make_source(kind: str, vocab_size: int) -> UniformSource | MaskSource:
    """``uniform`` or ``mask`` source over a vocabulary."""
    sources = {"uniform": UniformSource, "mask": MaskSource}
    if kind not in sources:
        raise ValueError(f"unknown caption source '{kind}'; choose one of {sorted(sources)}")
    return sources[kind](vocab_size)


@dataclass
class DiscretePathSample:
    """A point on the mixture path: ``x_0``, ``x_1``, ``x_t`` ``(B, L)`` long, ``t`` ``(B,)``."""

    x_0: Tensor
    x_1: Tensor
    t: Tensor
    x_t: Tensor


def sample_path(
    x_1: Tensor,
    t: Tensor,
    source: UniformSource | MaskSource,
    scheduler: PolynomialScheduler,
    generator: torch.Generator | None = None,
) -> DiscretePathSample:
    """Draw ``x_t``: each token is ``x_1`` with probability ``kappa_t``, else the source's."""
    x_0 = source.sample_like(x_1, generator)
    keep = (
        torch.rand(x_1.shape, device=x_1.device, generator=generator) < scheduler.kappa(t)[:, None]
    )
    return DiscretePathSample(x_0=x_0, x_1=x_1, t=t, x_t=torch.where(keep, x_1, x_0))


def posterior_logits(logits: Tensor, source: UniformSource | MaskSource) -> Tensor:
    """Restrict raw head logits to the data vocabulary (drops the mask id's column)."""
    return logits[..., : source.vocab_size]


def cross_entropy_loss(logits: Tensor, x_1: Tensor, weight: Tensor | None = None) -> Tensor:
    """Per-example mean token cross-entropy ``(B,)`` of ``p(x_1 | x_t)``.

    Args:
        logits: ``(B, L, V)``.
        x_1: ``(B, L)`` data tokens.
        weight: optional ``(B, L)`` per-token weights (e.g. only masked positions).
    """
    ce = F.cross_entropy(logits.flatten(0, 1).float(), x_1.flatten(), reduction="none").view_as(x_1)
    if weight is None:
        return ce.mean(1)
    return (ce * weight).sum(1) / weight.sum(1).clamp_min(1)


def generalized_kl_loss(
    logits: Tensor, x_1: Tensor, x_t: Tensor, t: Tensor, scheduler: PolynomialScheduler
) -> Tensor:
    """Per-example generalized KL of the mixture path ``(B,)`` (Shaul et al., 2024, eq. for
    mixture paths): ``kappa_dot / (1 - kappa) * [ delta(x_t, x_1) - p(x_t|x_t) - (1 - delta) log p(x_1|x_t) ]``.

    The weight diverges as ``t -> 1``: sample ``t <= 1 - eps``.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, L, V)
    logp_x1 = logp.gather(-1, x_1.unsqueeze(-1)).squeeze(-1)  # (B, L)
    p_xt = logp.gather(-1, x_t.unsqueeze(-1)).squeeze(-1).exp()  # (B, L)
    same = (x_t == x_1).float()
    rate = (scheduler.d_kappa(t) / (1 - scheduler.kappa(t)))[:, None]  # (B, 1)
    return (rate * (same - p_xt - (1 - same) * logp_x1)).mean(1)


def sample_categorical(
    logits: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """One draw per position from ``softmax(logits / temperature)`` ``(..., V)``; argmax at 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, device=logits.device, generator=generator).clamp_min(1e-20)
    gumbel = -torch.log((-torch.log(u)).clamp_min(1e-20))  # (..., V) standard Gumbel noise
    return (logits.float() / temperature + gumbel).argmax(-1)


def jump_step(
    x_t: Tensor,
    logits: Tensor,
    t: Tensor,
    t_next: Tensor,
    scheduler: PolynomialScheduler,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One sampler step ``t -> t_next`` of the mixture path.

    Each token draws ``x_1 ~ p(x_1 | x_t)`` and jumps to it with probability
    ``(kappa(t_next) - kappa(t)) / (1 - kappa(t))`` -- the exact probability that a token not
    yet at data reaches it in this interval -- so the sampler is exact when the posterior is.

    Args:
        x_t: ``(B, L)`` current tokens.
        logits: ``(B, L, V)`` posterior logits (data vocabulary only).
        t, t_next: ``(B,)`` flow times.
    """
    k, k_next = scheduler.kappa(t), scheduler.kappa(t_next)
    p_jump = ((k_next - k) / (1 - k).clamp_min(1e-12)).clamp(0, 1)[:, None]  # (B, 1)
    x_1 = sample_categorical(logits, temperature, generator)  # (B, L)
    jump = torch.rand(x_t.shape, device=x_t.device, generator=generator) < p_jump
    return torch.where(jump, x_1, x_t)
