"""The unified block: shared attention, modality-routed FFN experts.

One block computes, for ``x = [video tokens | caption tokens]``::

    1. self-attention over all tokens (shared), each modality modulated by its own time
    2. cross-attention of all tokens to the prompt condition (shared)
    3. feed-forward: the :class:`ModalityRouter` sends video tokens to ``ffn`` (the generator's
       own FFN, the "video expert") and caption tokens to ``ffn_t`` (the "text expert")

With no caption tokens the block computes exactly Wan's block. Names match diffusers'
``WanTransformerBlock`` for the video path and the Uni-ViGU release for the caption parts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_vigu.model.attention import PackedRows, VideoMemory, WanAttention


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (an fp32 island under bf16 autocast)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            return nn.functional.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class GELUProj(nn.Module):
    """``proj`` followed by tanh-GELU (diffusers' ``GELU(approximate="tanh")``)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """``net.0.proj -> GELU(tanh) -> net.2``, diffusers' ``FeedForward`` layout."""

    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList(
            [GELUProj(dim, inner_dim), nn.Dropout(0.0), nn.Linear(inner_dim, dim)]
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class ModalityRouter:
    """Routes tokens to per-modality experts by position (no learned gate).

    The sequence is ``[video | caption]`` with the given lengths. Only modalities with tokens
    are *active*: a video-only sequence never touches the text expert, so the block computes
    exactly the generator's block.
    """

    def __init__(self, num_video: int, num_text: int) -> None:
        self.lengths = (int(num_video), int(num_text))
        self.active = [i for i, n in enumerate(self.lengths) if n > 0]
        if not self.active:
            raise ValueError("the unified model needs video tokens, caption tokens or both")

    def split(self, x: Tensor) -> list[Tensor]:
        """``(B, Lv + Lt, D)`` -> one view per active modality."""
        if x.shape[1] != sum(self.lengths):
            raise ValueError(f"router expected {sum(self.lengths)} tokens, got {x.shape[1]}")
        if len(self.active) == 1:
            return [x]
        return list(x.split(self.lengths, dim=1))

    def merge(self, parts: Sequence[Tensor]) -> Tensor:
        """Inverse of :meth:`split`."""
        return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=1)

    def pick(self, per_modality: Sequence) -> list:
        """Select the entries of a ``(video, text)`` pair that belong to active modalities."""
        return [per_modality[i] for i in self.active]


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class UnifiedBlock(nn.Module):
    """Wan's transformer block with a caption expert.

    Args:
        dim: model width.
        ffn_dim: width of the video FFN.
        heads: attention heads.
        head_dim: channels per head.
        text_ffn_dim: width of the caption expert, or ``None`` for a video-only block.
        cross_attn_norm: affine LayerNorm before cross-attention (Wan: True).
        eps: norm epsilon.
    """

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        heads: int,
        head_dim: int,
        text_ffn_dim: int | None = None,
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        # 1. self-attention
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, heads, head_dim, eps)
        # 2. cross-attention
        self.attn2 = WanAttention(dim, heads, head_dim, eps)
        self.norm2 = (
            FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        )
        # 3. feed-forward experts: ffn = video expert (the generator's), ffn_t = text expert
        self.ffn = FeedForward(dim, ffn_dim)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        if text_ffn_dim is not None:
            self.ffn_t = FeedForward(dim, text_ffn_dim)
            self.norm3_t = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    @property
    def has_text(self) -> bool:
        """Whether this block has a caption expert."""
        return hasattr(self, "ffn_t")

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        mods: Sequence[Tensor],
        router: ModalityRouter,
        rope_video: tuple[Tensor, Tensor] | None,
        rope_text: tuple[Tensor, Tensor] | None,
        mask: Tensor | None = None,
        memory: VideoMemory | None = None,
    ) -> Tensor:
        """One block.

        Args:
            x: ``(B, Lv + Lt, dim)`` tokens ``[video | caption]``.
            context: ``(B, Lc, dim)`` projected prompt condition.
            mods: time projections ``(B, 6, dim)`` of the active modalities (router order).
            router: the token split.
            rope_video: 3-D rope cos/sin for the video tokens.
            rope_text: 1-D rope cos/sin for the caption tokens.
            mask: ``(Lv + Lt, Lv + Lt)`` bool self-attention mask (True: may attend), or
                ``None`` (every token sees every token, Uni-ViGU's block).
            memory: the video's self-attention keys and values, recorded or read (causal
                captions only, see :class:`~lightning_vigu.model.attention.VideoMemory`).
        """
        dtype = x.dtype
        # per active modality: (shift, scale, gate) for attention, (shift, scale, gate) for FFN
        mod = [(self.scale_shift_table + m.float()).chunk(6, dim=1) for m in mods]
        # 1. self-attention: each modality modulated by its own time, one attention call
        parts = router.split(x)
        h = router.merge(
            [_modulate(self.norm1(p), m[0], m[1]).to(dtype) for p, m in zip(parts, mod)]
        )
        attn = self.attn1(h, rope_video=rope_video, rope_text=rope_text, mask=mask, memory=memory)
        attn_parts = router.split(attn)
        x = router.merge(
            [(p.float() + a * m[2]).to(dtype) for p, a, m in zip(parts, attn_parts, mod)]
        )
        # 2. cross-attention of all tokens to the prompt (shared)
        x = x + self.attn2(self.norm2(x).to(dtype), context)
        # 3. feed-forward, routed by modality
        experts = router.pick(
            [(self.norm3, self.ffn), (getattr(self, "norm3_t", None), getattr(self, "ffn_t", None))]
        )
        return router.merge(
            [self._feed_forward(p, e, m) for p, e, m in zip(router.split(x), experts, mod)]
        )

    def forward_rows(
        self,
        x_video: Tensor,
        x_text: Tensor,
        rows: Tensor,
        context: Tensor,
        mods: tuple[Tensor, Tensor],
        rope_video: tuple[Tensor, Tensor],
        rope_text: tuple[Tensor, Tensor],
        text_mask: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """One block over causal captions held by some rows of the batch only.

        The video ``(B, Lv, dim)`` never reads a caption, so a row without one need not carry
        any: the captions ``(Bt, Lt, dim)`` belong to the video rows ``rows`` ``(Bt,)`` and read
        their keys and values (:meth:`WanAttention.forward_rows`) and their prompt's
        (``context`` ``(B, Lc, dim)``, :meth:`WanAttention.cross_rows`). ``mods`` are the
        video's and the captions' (``(B, 6, dim)``, ``(Bt, 6, dim)``); ``text_mask`` ``(Lt, Lv +
        Lt)``. With every row's caption this computes :meth:`forward` under the causal mask.
        """
        dtype = x_video.dtype
        mod = [(self.scale_shift_table + m.float()).chunk(6, dim=1) for m in mods]
        xs = (x_video, x_text)
        h = [_modulate(self.norm1(x), m[0], m[1]).to(dtype) for x, m in zip(xs, mod)]
        attn = self.attn1.forward_rows(*h, rows, rope_video, rope_text, text_mask)
        xs = [(x.float() + a * m[2]).to(dtype) for x, a, m in zip(xs, attn, mod)]
        attn = self.attn2.cross_rows(*(self.norm2(x).to(dtype) for x in xs), rows, context)
        xs = [x + a for x, a in zip(xs, attn)]
        experts = [(self.norm3, self.ffn), (self.norm3_t, self.ffn_t)]
        video, text = (self._feed_forward(x, e, m) for x, e, m in zip(xs, experts, mod))
        return video, text

    def forward_packed(
        self,
        x: Tensor,
        packed: PackedRows,
        rows: Tensor,
        context: Tensor,
        mods: tuple[Tensor, Tensor],
        rope_video: tuple[Tensor, Tensor],
        rope_text: tuple[Tensor, Tensor],
        text_mask: Tensor,
    ) -> Tensor:
        """:meth:`forward_rows` with both streams packed in ``x`` ``(B * Lv + Bt * Lt, dim)``
        (:class:`~lightning_vigu.model.attention.PackedRows`): the norms and the attention's
        projections run once over every token, not once per stream (fewer, larger kernels);
        the modulation, the attention itself and the experts stay per stream. Computes what
        :meth:`forward_rows` computes."""
        dtype = x.dtype
        mod = [(self.scale_shift_table + m.float()).chunk(6, dim=1) for m in mods]
        # 1. self-attention
        normed = packed.split(self.norm1(x))
        h = packed.pack(*(_modulate(n, m[0], m[1]).to(dtype) for n, m in zip(normed, mod)))
        attn = self.attn1.forward_packed(h, rows, packed, rope_video, rope_text, text_mask)
        xs = packed.split(x)
        x = packed.pack(*((p.float() + a * m[2]).to(dtype) for p, a, m in zip(xs, attn, mod)))
        # 2. cross-attention of all tokens to their row's prompt
        attn = self.attn2.cross_packed(self.norm2(x).to(dtype), rows, packed, context)
        x = packed.pack(*(p + a for p, a in zip(packed.split(x), attn)))
        # 3. the experts: one norm for both streams (norm3 and norm3_t are the same function:
        # no weights, the same eps), then each stream's own FFN
        normed = packed.split(self.norm3(x))
        parts = zip(packed.split(x), normed, (self.ffn, self.ffn_t), mod)
        return packed.pack(*(self._expert(p, n, ffn, m) for p, n, ffn, m in parts))

    @staticmethod
    def _feed_forward(
        x: Tensor, expert: tuple[nn.Module, nn.Module], mod: Sequence[Tensor]
    ) -> Tensor:
        """The gated, modulated feed-forward of one modality's tokens (its norm and FFN)."""
        norm, ffn = expert
        return UnifiedBlock._expert(x, norm(x), ffn, mod)

    @staticmethod
    def _expert(x: Tensor, normed: Tensor, ffn: nn.Module, mod: Sequence[Tensor]) -> Tensor:
        """``x`` plus the gated FFN of its modulated norm ``normed``."""
        h = _modulate(normed, mod[3], mod[4]).to(x.dtype)
        return (x.float() + ffn(h).float() * mod[5]).to(x.dtype)
