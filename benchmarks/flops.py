"""Analytic model FLOPs of the unified transformer (for MFU), cross-checked with torch's counter.

Counts matrix multiplies only (2 FLOPs per multiply-add), per forward pass:

* self-attention: q, k, v, o projections ``8 d^2`` per token, scores and weighted sum
  ``4 S d`` per token (``S`` = video + caption tokens);
* cross-attention: q, o projections ``4 d^2`` per token, k, v of the ``Lc`` prompt tokens
  ``4 Lc d^2`` per sample, scores and sum ``4 Lc d`` per token;
* FFN ``4 d f`` per token (the caption expert's width for caption tokens);
* patch embedding, output projection, prompt projection, text head.

A training step (forward + backward) is 3x the forward. Recomputation by gradient
checkpointing is hardware work, not model FLOPs, so it is not counted (that is MFU's definition).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightning_vigu.model import UniViGUConfig


def forward_flops(
    cfg: UniViGUConfig, video_tokens: int, text_tokens: int, context_len: int, batch: int = 1
) -> float:
    """Model FLOPs of one forward pass."""
    d, f = cfg.dim, cfg.ffn_dim
    ft = cfg.text_ffn_dim or f
    s = video_tokens + text_tokens
    per_layer = (
        s * (8 * d * d + 4 * s * d)  # self-attention
        + s * (4 * d * d + 4 * context_len * d)
        + 4 * context_len * d * d  # cross-attention
        + video_tokens * 4 * d * f
        + text_tokens * 4 * d * ft  # routed FFN experts
    )
    patch = math.prod(cfg.patch_size)
    io = video_tokens * 2 * d * cfg.in_channels * patch * 2  # patch embedding + proj_out
    io += context_len * (2 * cfg.text_dim * d + 2 * d * d)  # prompt projection
    if text_tokens and cfg.vocab_size:
        io += text_tokens * 2 * d * cfg.num_embeddings  # text head
    return float(batch * (cfg.num_layers * per_layer + io))


def train_flops(
    cfg: UniViGUConfig, video_tokens: int, text_tokens: int, context_len: int, batch: int = 1
) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward)."""
    return 3.0 * forward_flops(cfg, video_tokens, text_tokens, context_len, batch)


def clip_train_flops(
    cfg: UniViGUConfig,
    latent_shape: Sequence[int],
    text_tokens: int,
    context_len: int,
    batch: int = 1,
) -> float:
    """Model FLOPs of one training step on clips whose latents are ``(c, t, h, w)``
    (``codec.latent_shape``), patched into video tokens by ``cfg.patch_size``."""
    video = math.prod(n // p for n, p in zip(latent_shape[1:], cfg.patch_size))
    return train_flops(cfg, video, text_tokens, context_len, batch)


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
