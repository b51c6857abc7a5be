"""Analytic model FLOPs of the unified transformer (for MFU), cross-checked with torch's counter.

Counts matrix multiplies only (2 FLOPs per multiply-add), per forward pass:

* self-attention: q, k, v, o projections ``8 d^2`` per token, scores and weighted sum
  ``4 S d`` per token (``S`` = video + caption tokens);
* cross-attention: q, o projections ``4 d^2`` per token, k, v of the ``Lc`` prompt tokens
  ``4 Lc d^2`` per sample, scores and sum ``4 Lc d`` per token;
* FFN ``4 d f`` per token (the caption expert's width for caption tokens);
* patch embedding, output projection, prompt projection, text head.

Where causal captions are held by some rows of the batch only (the next-token caption stream's
training step), every row's video counts as the generator's and each caption's tokens attend to
their row's video and the caption before them (:func:`caption_rows_forward_flops`).

A training step (forward + backward) is 3x the forward. Recomputation by gradient
checkpointing is hardware work, not model FLOPs, so it is not counted (that is MFU's definition).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightning_vigu.model import UniViGUConfig


def _layer_flops(cfg: UniViGUConfig, tokens: int, keys: int, ffn: int, context_len: int) -> float:
    """One block's matrix multiplies for ``tokens`` queries of one sample that attend to
    ``keys`` tokens and pass an FFN of width ``ffn`` (the prompt's keys and values excluded)."""
    d = cfg.dim
    self_attn = tokens * (8 * d * d + 4 * keys * d)
    cross_attn = tokens * (4 * d * d + 4 * context_len * d)
    return self_attn + cross_attn + tokens * 4 * d * ffn


def forward_flops(
    cfg: UniViGUConfig, video_tokens: int, text_tokens: int, context_len: int, batch: int = 1
) -> float:
    """Model FLOPs of one forward pass."""
    d, f = cfg.dim, cfg.ffn_dim
    s = video_tokens + text_tokens
    per_layer = (
        _layer_flops(cfg, video_tokens, s, f, context_len)
        + _layer_flops(cfg, text_tokens, s, cfg.text_ffn_dim or f, context_len)  # routed FFN
        + 4 * context_len * d * d  # the prompt's keys and values
    )
    patch = math.prod(cfg.patch_size)
    io = video_tokens * 2 * d * cfg.in_channels * patch * 2  # patch embedding + proj_out
    io += context_len * (2 * cfg.text_dim * d + 2 * d * d)  # prompt projection
    if text_tokens and cfg.vocab_size:
        io += text_tokens * 2 * d * cfg.num_embeddings  # text head
    return float(batch * (cfg.num_layers * per_layer + io))


def caption_rows_forward_flops(
    cfg: UniViGUConfig,
    video_tokens: int,
    text_tokens: int,
    context_len: int,
    batch: int,
    caption_rows: int,
) -> float:
    """Model FLOPs of one forward pass whose causal captions are held by ``caption_rows`` of
    the ``batch`` rows only (``UniViGUTransformer(..., text_rows=...)``): every row's video as
    the generator's, and each caption's tokens reading its row's video and the caption before
    them (the video reads no caption). Counts what runs, padding rows included."""
    d = cfg.dim
    # the prompt's keys and values are the video rows' (WanAttention.cross_rows), counted with
    # the video's
    caption = cfg.num_layers * _layer_flops(
        cfg, text_tokens, video_tokens + text_tokens, cfg.text_ffn_dim or cfg.ffn_dim, context_len
    )
    caption += text_tokens * 2 * d * cfg.num_embeddings if cfg.vocab_size else 0  # text head
    return forward_flops(cfg, video_tokens, 0, context_len, batch) + float(caption_rows * caption)


def train_flops(
    cfg: UniViGUConfig,
    video_tokens: int,
    text_tokens: int,
    context_len: int,
    batch: int = 1,
    caption_rows: int | None = None,
) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward); ``caption_rows``:
    the causal captions are held by that many rows only (:func:`caption_rows_forward_flops`)."""
    if caption_rows is None:
        return 3.0 * forward_flops(cfg, video_tokens, text_tokens, context_len, batch)
    args = (cfg, video_tokens, text_tokens, context_len, batch, caption_rows)
    return 3.0 * caption_rows_forward_flops(*args)


def clip_train_flops(
    cfg: UniViGUConfig,
    latent_shape: Sequence[int],
    text_tokens: int,
    context_len: int,
    batch: int = 1,
    caption_rows: int | None = None,
) -> float:
    """Model FLOPs of one training step on clips whose latents are ``(c, t, h, w)``
    (``codec.latent_shape``), patched into video tokens by ``cfg.patch_size``."""
    video = math.prod(n // p for n, p in zip(latent_shape[1:], cfg.patch_size))
    return train_flops(cfg, video, text_tokens, context_len, batch, caption_rows)


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a known GPU (datasheet numbers, no sparsity)."""
    for key, value in PEAK_BF16.items():
        if key in device_name:
            return value
    return None


def device_rates(flops: float, seconds: float) -> dict[str, float]:
    """Peak memory and MFU of a timed GPU step of ``flops`` model FLOPs (empty on the CPU)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    out = {"peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    peak = peak_flops(torch.cuda.get_device_name())
    if peak:
        out["mfu"] = flops / seconds / peak
    return out


def failure(exn: BaseException) -> str:
    """A failed measurement's row entry: the exception's type and first line (may be empty)."""
    return f"{type(exn).__name__}: {(str(exn).splitlines() or [''])[0][:160]}"
