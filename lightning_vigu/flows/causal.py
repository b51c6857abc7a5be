"""Causal captions: the caption stream trained by next-token prediction, an alternative to the
discrete flow of :mod:`lightning_vigu.flows.discrete` (``model.caption_objective:
autoregressive``; not Uni-ViGU's recipe).

Why it exists: on the synthetic world, the same unified transformer reads captions off a video
~5x faster per training step when its caption stream predicts the next token than when it
denoises the whole canvas (``benchmarks/results/ablation.md``, "Discrete flow or next token").

How: the model is built with ``causal_captions=True``: a caption token attends to every video
token and to the caption tokens up to itself, and no video token attends to a caption token, so
the video path computes exactly the generator's function whatever the caption stream holds. In
training the stream holds the caption shifted right behind a start token (the end-of-text id,
as in the autoregressive baseline), at flow time 1 (clean); the loss covers the caption's tokens
and its first end-of-text. Sampling writes one token per forward pass, left to right.

:class:`CausalCaptions` plays the role :class:`~lightning_vigu.flows.discrete.MixtureDiscretePath`
plays for the flow: built once by the module, handed to the objective and the samplers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_vigu.flows import draws
from lightning_vigu.flows.discrete import MixtureDiscretePath, posterior_logits, sample_categorical

CAPTION_OBJECTIVES = ("flow", "autoregressive")


class CausalCaptions:
    """Teacher forcing and left-to-right decoding of the caption stream.

    Args:
        vocab_size: data vocabulary (the tokenizer's ``vocab_size``).
        eos_id: the end-of-text id; it also starts every caption (the first input token).
    """

    causal = True
    kind = "autoregressive"
    mask_id: int | None = None

    def __init__(self, vocab_size: int, eos_id: int) -> None:
        self.vocab_size, self.eos_id = vocab_size, eos_id

    @property
    def num_embeddings(self) -> int:
        """Embedding rows the model needs: the vocabulary."""
        return self.vocab_size

    def inputs(self, target: Tensor) -> Tensor:
        """Teacher-forcing canvas ``(B, L)``: the start token, then ``target[:, :-1]``."""
        start = torch.full_like(target[:, :1], self.eos_id)
        return torch.cat([start, target[:, :-1]], dim=1)

    def loss_weight(self, target: Tensor) -> Tensor:
        """``(B, L)`` 1 on the caption's tokens and its first end-of-text, 0 on the fill after."""
        is_eos = (target == self.eos_id).long()
        return ((is_eos.cumsum(1) - is_eos) == 0).float()

    def posterior_logits(self, logits: Tensor) -> Tensor:
        """Head logits ``(B, L, V)`` -> next-token logits over the data vocabulary."""
        return posterior_logits(logits, self.vocab_size)

    def decode(
        self,
        logits_of: Callable[[Tensor], Tensor],
        b: int,
        length: int,
        device: torch.device,
        temperature: float = 0.0,
        generator: draws.Generators = None,
    ) -> Tensor:
        """Captions ``(B, length)``: ``logits_of(canvas)`` gives the head logits ``(B, L, V)``
        of a teacher-forcing canvas; one token per call, end-of-text after a caption ends.
        Stops early once every caption has ended (no key-value cache: each call re-reads the
        video, which the causal mask makes independent of the canvas)."""
        tokens = torch.full((b, length), self.eos_id, dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        for i in range(length):
            logits = self.posterior_logits(logits_of(self.inputs(tokens))[:, i : i + 1])
            token = sample_categorical(logits, temperature, generator)[:, 0]  # (B,)
            tokens[:, i] = token.masked_fill(done, self.eos_id)
            done |= token == self.eos_id
            if bool(done.all()):
                break
        return tokens


def make_caption_path(
    objective: str, source: str, vocab_size: int, exponent: float, eos_id: int
) -> MixtureDiscretePath | CausalCaptions:
    """The caption stream's process: the discrete flow (``objective="flow"``, with ``source``
    and ``exponent``) or :class:`CausalCaptions` (``"autoregressive"``)."""
    if objective == "flow":
        return MixtureDiscretePath(source, vocab_size, exponent)
    if objective == "autoregressive":
        return CausalCaptions(vocab_size, eos_id)
    raise ValueError(
        f"unknown caption_objective '{objective}'; choose 'flow' (Uni-ViGU's discrete flow) "
        "or 'autoregressive' (next-token prediction in the same stream)"
    )
