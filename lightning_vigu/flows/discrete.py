"""Discrete flow matching for caption tokens: the mixture path (flow-time notation).

Each token of ``x_t`` is the data token ``x_1`` with probability ``kappa_t`` and a draw of the
source ``x_0`` otherwise. The source is uniform over the vocabulary (Uni-ViGU's default) or an
all-mask canvas (masked diffusion, as MDLM / LLaDA). The network predicts the posterior
``p(x_1 | x_t)``; training minimises its cross-entropy (or the generalized KL of Shaul et al.,
2024). The sampler jumps tokens to posterior draws with the exact mixture-path probability
``(kappa_{t+h} - kappa_t) / (1 - kappa_t)`` and never builds ``B x L x V`` one-hot tensors.

:class:`MixtureDiscretePath` is the one object that holds source and scheduler: the objective,
the samplers and the model's embedding rows (a mask id or not) all follow from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_vigu.flows import draws

SOURCES = ("uniform", "mask")
UNMASKING = ("random", "confidence")


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
    """Uniform over ``vocab_size`` ids; a noised token looks like any other token."""

    mask_id: int | None = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def sample_like(self, x: Tensor, generator: draws.Generators = None) -> Tensor:
        return draws.randint(self.vocab_size, x.shape, generator, x.device)


class MaskSource:
    """Every token is the mask id (an extra embedding row, ``vocab_size``); a noised token is
    recognisable, so once a token leaves the mask it is data."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.mask_id: int | None = vocab_size

    def sample_like(self, x: Tensor, generator: draws.Generators = None) -> Tensor:
        return torch.full_like(x, self.mask_id)


def make_source(kind: str, vocab_size: int) -> UniformSource | MaskSource:
    """``uniform`` or ``mask`` source over a vocabulary."""
    sources = {"uniform": UniformSource, "mask": MaskSource}
    if kind not in sources:
        raise ValueError(f"unknown caption source '{kind}'; choose one of {sorted(sources)}")
    return sources[kind](vocab_size)


@dataclass
class DiscretePathSample:
    """A point on the mixture path: ``x_0``, ``x_1``, ``x_t`` ``(B, L)`` long, ``t`` ``(B,)``,
    and ``from_source`` ``(B, L)`` bool (positions whose token came from the source)."""

    x_0: Tensor
    x_1: Tensor
    t: Tensor
    x_t: Tensor
    from_source: Tensor


def sample_path(
    x_1: Tensor,
    t: Tensor,
    source: UniformSource | MaskSource,
    scheduler: PolynomialScheduler,
    generator: torch.Generator | None = None,
) -> DiscretePathSample:
    """Draw ``x_t``: each token is ``x_1`` with probability ``kappa_t``, else the source's."""
    x_0 = source.sample_like(x_1, generator)
    noised = (
        torch.rand(x_1.shape, device=x_1.device, generator=generator) >= scheduler.kappa(t)[:, None]
    )
    return DiscretePathSample(
        x_0=x_0, x_1=x_1, t=t, x_t=torch.where(noised, x_0, x_1), from_source=noised
    )


def posterior_logits(logits: Tensor, vocab_size: int) -> Tensor:
    """Restrict raw head logits to the data vocabulary (drops a mask id's column)."""
    return logits[..., :vocab_size]


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


KL_MIN_REMAINING = 1e-6
"""The least ``1 - kappa(t)`` :func:`generalized_kl_loss` divides by: below any that training
draws (``t <= 1 - text_time_eps``, ``1 - kappa >= 1e-3`` at Uni-ViGU's linear scheduler)."""


def generalized_kl_loss(
    logits: Tensor, x_1: Tensor, x_t: Tensor, t: Tensor, scheduler: PolynomialScheduler
) -> Tensor:
    """Per-example generalized KL of the mixture path ``(B,)`` (Shaul et al., 2024, eq. for
    mixture paths): ``kappa_dot / (1 - kappa) * [ delta(x_t, x_1) - p(x_t|x_t) - (1 - delta) log p(x_1|x_t) ]``.

    The weight diverges as ``t -> 1``: sample ``t <= 1 - eps``. Its denominator is bounded
    below by :data:`KL_MIN_REMAINING` so that a row at ``t = 1`` (a ``t2v`` row holding the
    clean prompt, whose caption loss is masked out) gives a large finite value, not ``inf``,
    which a mask's zero weight would turn into NaN, and NaN gradients, for the whole batch.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, L, V)
    logp_x1 = logp.gather(-1, x_1.unsqueeze(-1)).squeeze(-1)  # (B, L)
    p_xt = logp.gather(-1, x_t.clamp_max(logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1).exp()
    p_xt = p_xt * (x_t < logits.shape[-1])  # a mask id has no posterior mass
    same = (x_t == x_1).float()
    remaining = (1 - scheduler.kappa(t)).clamp_min(KL_MIN_REMAINING)
    rate = (scheduler.d_kappa(t) / remaining)[:, None]  # (B, 1)
    return (rate * (same - p_xt - (1 - same) * logp_x1)).mean(1)


def sample_categorical(
    logits: Tensor, temperature: float = 1.0, generator: draws.Generators = None
) -> Tensor:
    """One draw per position from ``softmax(logits / temperature)`` ``(..., V)``; argmax at 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    u = draws.rand(logits.shape, generator, logits.device).clamp_min(1e-20)
    gumbel = -torch.log((-torch.log(u)).clamp_min(1e-20))  # (..., V) standard Gumbel noise
    return (logits.float() / temperature + gumbel).argmax(-1)


def jump_probability(t: Tensor, t_next: Tensor, scheduler: PolynomialScheduler) -> Tensor:
    """``(B, 1)`` probability that a token not yet at data reaches it between ``t`` and
    ``t_next``: ``(kappa(t_next) - kappa(t)) / (1 - kappa(t))``."""
    k, k_next = scheduler.kappa(t), scheduler.kappa(t_next)
    return ((k_next - k) / (1 - k).clamp_min(1e-12)).clamp(0, 1)[:, None]


def jump_step(
    x_t: Tensor,
    logits: Tensor,
    t: Tensor,
    t_next: Tensor,
    scheduler: PolynomialScheduler,
    temperature: float = 1.0,
    generator: draws.Generators = None,
    movable: Tensor | None = None,
) -> Tensor:
    """One sampler step ``t -> t_next`` of the mixture path.

    Each movable token draws ``x_1 ~ p(x_1 | x_t)`` and jumps to it with probability
    :func:`jump_probability`, so the sampler is exact when the posterior is.

    Args:
        x_t: ``(B, L)`` current tokens.
        logits: ``(B, L, V)`` posterior logits (data vocabulary only).
        t, t_next: ``(B,)`` flow times.
        movable: ``(B, L)`` bool, the tokens that may still jump (``None``: all of them, as
            for the uniform source, whose noised tokens cannot be told from data).
    """
    x_1 = sample_categorical(logits, temperature, generator)  # (B, L)
    u = draws.rand(x_t.shape, generator, x_t.device)
    jump = u < jump_probability(t, t_next, scheduler)
    if movable is not None:
        jump &= movable
    return torch.where(jump, x_1, x_t)


def confident_unmask_step(
    x_t: Tensor,
    logits: Tensor,
    t: Tensor,
    t_next: Tensor,
    scheduler: PolynomialScheduler,
    movable: Tensor,
    temperature: float = 0.0,
    generator: draws.Generators = None,
) -> Tensor:
    """A mask-source step that unmasks the tokens the model is surest of.

    As many tokens leave the mask as the path expects on average (``jump_probability`` times
    the masked count, rounded; all of them at the last step), but instead of a random subset,
    the masked positions with the highest posterior probability of their draw go first
    (MaskGIT, Chang et al. 2022; LLaDA's low-confidence remasking, Nie et al. 2025).
    """
    x_1 = sample_categorical(logits, temperature, generator)  # (B, L)
    prob = torch.softmax(logits.float(), -1).gather(-1, x_1[..., None]).squeeze(-1)  # (B, L)
    prob = prob.masked_fill(~movable, -1.0)  # (B, L) fixed tokens never rank
    count = (jump_probability(t, t_next, scheduler) * movable.sum(1, keepdim=True)).round()
    rank = prob.argsort(-1, descending=True).argsort(-1)  # (B, L) 0 = most confident
    jump = (rank < count) & movable
    return torch.where(jump, x_1, x_t)


class MixtureDiscretePath:
    """The caption stream's probability path: source + scheduler, built once and handed to the
    objective, the samplers and the loaders (like flow_matching's ``MixtureDiscreteProbPath``).

    Args:
        source: ``uniform`` (Uni-ViGU's default) or ``mask``.
        vocab_size: data vocabulary (the tokenizer's ``vocab_size``).
        exponent: ``kappa_t = t ** exponent``.
    """

    causal = False  # the caption stream denoises the whole canvas (see flows.causal)

    def __init__(self, source: str = "uniform", vocab_size: int = 1, exponent: float = 1.0) -> None:
        self.kind = source
        self.source = make_source(source, vocab_size)
        self.scheduler = PolynomialScheduler(exponent)
        self.vocab_size = vocab_size

    @property
    def mask_id(self) -> int | None:
        """The mask token's id (``vocab_size``), or ``None`` for the uniform source."""
        return self.source.mask_id

    @property
    def num_embeddings(self) -> int:
        """Embedding rows the model needs: the vocabulary, plus the mask id if there is one."""
        return self.vocab_size + int(self.mask_id is not None)

    def sample(
        self, x_1: Tensor, t: Tensor, generator: torch.Generator | None = None
    ) -> DiscretePathSample:
        """``x_t`` ``(B, L)`` on the path at flow times ``t`` ``(B,)`` (see :func:`sample_path`)."""
        return sample_path(x_1, t, self.source, self.scheduler, generator)

    def loss_weight(self, path: DiscretePathSample) -> Tensor | None:
        """Which positions the caption loss covers: with the mask source only the masked ones
        (the posterior of an unmasked token is that token), with the uniform source all."""
        return path.from_source.float() if self.mask_id is not None else None

    def start(
        self, b: int, length: int, device: torch.device, generator: draws.Generators = None
    ) -> Tensor:
        """A canvas ``(b, length)`` drawn from the source (the sampler's ``t = 0``)."""
        like = torch.zeros(b, length, dtype=torch.long, device=device)
        return self.source.sample_like(like, generator)

    def posterior_logits(self, logits: Tensor) -> Tensor:
        """Head logits ``(B, L, num_embeddings)`` -> posterior over the data vocabulary."""
        return posterior_logits(logits, self.vocab_size)

    def step(
        self,
        x_t: Tensor,
        logits: Tensor,
        t: Tensor,
        t_next: Tensor,
        temperature: float = 1.0,
        generator: draws.Generators = None,
        unmasking: str = "random",
    ) -> Tensor:
        """One sampler step from the head's logits; with the mask source a token that left the
        mask keeps its value (carry-over), and ``unmasking`` chooses which masked tokens move:
        ``random`` (the exact path sampler) or ``confidence`` (the surest first, same count)."""
        if unmasking not in UNMASKING:
            raise ValueError(f"unknown unmasking '{unmasking}'; choose one of {list(UNMASKING)}")
        post = self.posterior_logits(logits)
        if self.mask_id is None:
            return jump_step(x_t, post, t, t_next, self.scheduler, temperature, generator)
        movable = x_t == self.mask_id
        if unmasking == "confidence":
            return confident_unmask_step(
                x_t, post, t, t_next, self.scheduler, movable, temperature, generator
            )
        return jump_step(x_t, post, t, t_next, self.scheduler, temperature, generator, movable)
