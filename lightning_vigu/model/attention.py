"""Attention of the unified block: one call over ``[video | caption]`` tokens (no mask, or the
causal-caption mask of ``UniViGUConfig.causal_captions``), or, for causal captions held by some
rows only, one call for the video and one for the captions (:meth:`WanAttention.forward_rows`).

Backends: PyTorch SDPA (default; on Hopper it dispatches to cuDNN / flash kernels) and xformers'
``memory_efficient_attention`` when the package imports and its kernels load (optional; its
0.0.35 wheels do not load against the CUDA 13 torch builds, so it is never required). With
``WanAttention.triton_kernels`` on, CUDA tensors take :mod:`lightning_vigu.model.kernels`' fused
q/k norm and rope, and its attention for a short key sequence (the prompt) where it applies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_vigu.model import kernels
from lightning_vigu.model.embeddings import (
    apply_rope_half,
    apply_rope_interleaved,
    apply_rope_joint,
)

BACKENDS = ("sdpa", "xformers")


def attention(
    q: Tensor, k: Tensor, v: Tensor, backend: str = "sdpa", mask: Tensor | None = None
) -> Tensor:
    """Multi-head attention on ``(B, S, H, D)`` tensors, returns ``(B, S, H, D)``. ``mask``:
    ``(S, S_kv)`` bool, True where a query may attend (always computed with SDPA)."""
    if backend == "sdpa" or mask is not None:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        return out.transpose(1, 2)  # (B, S, H, D)
    if backend == "xformers":
        import xformers.ops as xops

        return xops.memory_efficient_attention(q, k, v)
    raise ValueError(f"unknown attention backend '{backend}'; choose one of {BACKENDS}")


class VideoMemory:
    """The video's self-attention keys and values of every block, for decoding causal captions.

    With causal captions the video never reads the caption stream, so each block's video keys
    and values are the same at every decoding step. One video-only pass *records* them (one
    ``(k, v)`` per block, in block order); each later caption-only pass *reads* them, and every
    caption token attends to the video's keys before the caption's, as in the joint pass. A
    decoding step then costs a pass over the caption tokens instead of over video and caption.
    """

    def __init__(self) -> None:
        self.layers: list[tuple[Tensor, Tensor]] = []
        self.recording = True
        self._next = 0

    def exchange(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Record ``(k, v)`` ``(B, S, H, D)``, or return them after the recorded video's."""
        if self.recording:
            self.layers.append((k, v))
            return k, v
        vk, vv = self.layers[self._next]  # blocks run in order; each pass starts at read()
        self._next += 1
        return torch.cat([vk, k], dim=1), torch.cat([vv, v], dim=1)

    @property
    def num_video(self) -> int:
        """Video tokens recorded."""
        return self.layers[0][0].shape[1] if self.layers else 0

    def read(self) -> VideoMemory:
        """Stop recording: the following passes read (from the first block on)."""
        if not self.layers:
            raise ValueError("the video memory is empty: record a video-only pass first")
        self.recording, self._next = False, 0
        return self


class PackedRows:
    """Video tokens ``(B, Lv, dim)`` and the captions of some rows ``(Bt, Lt, dim)`` as one
    tensor ``(B * Lv + Bt * Lt, dim)`` (``UniViGUConfig.pack_caption_rows``): work that treats
    every token alike (norms, the attention's projections) runs once over both streams, and
    :meth:`split` gives each stream's tokens back as views."""

    def __init__(self, video: tuple[int, int], text: tuple[int, int]) -> None:
        self.video, self.text = video, text
        self.num_video = video[0] * video[1]

    def pack(self, video: Tensor, text: Tensor) -> Tensor:
        """``(B, Lv, ...)``, ``(Bt, Lt, ...)`` -> ``(B * Lv + Bt * Lt, ...)``."""
        return torch.cat([video.flatten(0, 1), text.flatten(0, 1)])

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`pack` (views of ``x``)."""
        n = self.num_video
        return x[:n].unflatten(0, self.video), x[n:].unflatten(0, self.text)


class WanAttention(nn.Module):
    """Self- or cross-attention with RMS-normalised q/k (over all heads), Wan's layout.

    Names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``norm_q``, ``norm_k``) match diffusers.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(inner, eps=eps)
        self.norm_k = nn.RMSNorm(inner, eps=eps)
        self.backend = "sdpa"
        self.triton_kernels = False  # the fused kernels of lightning_vigu.model.kernels on CUDA

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        rope_video: tuple[Tensor, Tensor] | None = None,
        rope_text: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        memory: VideoMemory | None = None,
    ) -> Tensor:
        """Attend ``x`` ``(B, S, dim)`` to itself (``context=None``) or to ``context``.

        For self-attention over ``[video | caption]``, the video tokens (as many as
        ``rope_video`` has rows) get the 3-D rope and the rest the 1-D caption rope. ``mask``: ``(S, S_kv)`` bool, True where a
        query may attend (``None``: everywhere). ``memory`` (self-attention only): record this
        layer's keys and values, or read the video's recorded ones and attend to them before
        ``x`` (see :class:`VideoMemory`).
        """
        if context is None and (rope_video is not None or rope_text is not None):
            q, k, v = self._qkv_rotated(*self._project(x), rope_video, rope_text)
        else:
            q, k, v = self._qkv(x, x if context is None else context)
        if memory is not None:
            k, v = memory.exchange(k, v)
        return self._out(self._attend(q, k, v, mask), x)

    def forward_rows(
        self,
        x_video: Tensor,
        x_text: Tensor,
        rows: Tensor,
        rope_video: tuple[Tensor, Tensor],
        rope_text: tuple[Tensor, Tensor],
        text_mask: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Causal-caption self-attention with the captions of some rows only: the video
        ``(B, Lv, dim)`` attends to itself (no mask), each caption ``(Bt, Lt, dim)`` to its
        row's video (``rows`` ``(Bt,)``: indices into the video's batch) and to itself under
        ``text_mask`` ``(Lt, Lv + Lt)``. With ``rows = arange(B)`` this is :meth:`forward`
        over ``[video | caption]`` with the causal mask, in two calls."""
        video = self._qkv_rotated(*self._project(x_video), rope_video, None)
        text = self._qkv_rotated(*self._project(x_text), None, rope_text)
        return self._attend_rows(video, text, rows, text_mask, x_video)

    def forward_packed(
        self,
        h: Tensor,
        rows: Tensor,
        packed: PackedRows,
        rope_video: tuple[Tensor, Tensor],
        rope_text: tuple[Tensor, Tensor],
        text_mask: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward_rows` with both streams packed in ``h`` (:class:`PackedRows`): the
        queries, keys and values of every token in one projection each; the attention per
        stream. Returns each stream's output, ``(B, Lv, dim)`` and ``(Bt, Lt, dim)``."""
        video, text = zip(*(packed.split(t) for t in self._project(h)))
        video = self._qkv_rotated(*video, rope_video, None)
        text = self._qkv_rotated(*text, None, rope_text)
        return self._attend_rows(video, text, rows, text_mask, h)

    def cross_packed(
        self, h: Tensor, rows: Tensor, packed: PackedRows, context: Tensor
    ) -> tuple[Tensor, Tensor]:
        """:meth:`cross_rows` with both streams packed in ``h``: every token's query in one
        projection; the attention per stream."""
        return self._attend_prompt(*packed.split(self._q(h)), rows, context, h)

    def cross_rows(
        self, x_video: Tensor, x_text: Tensor, rows: Tensor, context: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Cross-attention of the video ``(B, Lv, dim)`` and of the captions ``(Bt, Lt, dim)``
        of the video rows ``rows`` ``(Bt,)`` to the video rows' prompt ``context`` ``(B, Lc,
        dim)``. The prompt's keys and values are computed once, and each caption reads its
        row's. With ``rows = arange(B)`` this is :meth:`forward` with ``context`` for each."""
        return self._attend_prompt(self._q(x_video), self._q(x_text), rows, context, x_video)

    def _attend_rows(
        self,
        video: tuple[Tensor, Tensor, Tensor],
        text: tuple[Tensor, Tensor, Tensor],
        rows: Tensor,
        text_mask: Tensor,
        like: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward_rows` from each stream's rotated queries and keys, and values
        ``(B, S, H, D)``; the outputs projected in ``like``'s dtype."""
        (qv, kv, vv), (qt, kt, vt) = video, text
        k = torch.cat([kv.index_select(0, rows), kt], dim=1)
        v = torch.cat([vv.index_select(0, rows), vt], dim=1)
        out_video = self._out(self._attend(qv, kv, vv), like)
        return out_video, self._out(self._attend(qt, k, v, text_mask), like)

    def _attend_prompt(
        self, q_video: Tensor, q_text: Tensor, rows: Tensor, context: Tensor, like: Tensor
    ) -> tuple[Tensor, Tensor]:
        """:meth:`cross_rows` from each stream's queries ``(B, S, H, D)``."""
        k, v = self._kv(context)
        out_video = self._out(self._attend(q_video, k, v), like)
        k, v = k.index_select(0, rows), v.index_select(0, rows)
        return out_video, self._out(self._attend(q_text, k, v), like)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """:func:`attention` with this layer's backend, or the few-key kernel where it applies
        (``triton_kernels`` on, no mask, :func:`kernels.takes_few_keys`)."""
        if self.triton_kernels and mask is None and kernels.takes_few_keys(q, k, v):
            return kernels.few_key_attention(q, k, v)
        return attention(q, k, v, self.backend, mask)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The projected queries, keys and values ``(..., inner)`` of ``x`` ``(..., dim)``."""
        return self.to_q(x), self.to_k(x), self.to_v(x)

    def _qkv_rotated(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rope_video: tuple[Tensor, Tensor] | None,
        rope_text: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Projected ``q``, ``k``, ``v`` ``(B, S, inner)`` as RMS-normalised, rotated queries
        and keys, and values, ``(B, S, H, D)`` each: the norms and the rope in the fused kernel
        where ``triton_kernels`` is on and it runs, else the norms and :meth:`_rope` (the same
        values)."""
        q, k, v = (t.unflatten(-1, (self.heads, -1)) for t in (q, k, v))
        norms = (self.norm_q, self.norm_k)
        if self.triton_kernels and kernels.takes_norm_rope(q, k):
            q, k = kernels.qk_norm_rope(
                q, k, *(n.weight for n in norms), self.norm_q.eps, rope_video, rope_text
            )
            return q, k, v
        q, k = (n(t.flatten(-2)).unflatten(-1, (self.heads, -1)) for n, t in zip(norms, (q, k)))
        return self._rope(q, rope_video, rope_text), self._rope(k, rope_video, rope_text), v

    def _qkv(self, x: Tensor, kv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised queries of ``x``, keys and values of ``kv``, ``(..., H, D)`` each."""
        return self._q(x), *self._kv(kv)

    def _q(self, x: Tensor) -> Tensor:
        """Normalised queries ``(..., H, D)`` of ``x`` ``(..., dim)``."""
        return self.norm_q(self.to_q(x)).unflatten(-1, (self.heads, -1))

    def _kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised keys and values ``(..., H, D)`` of ``kv`` ``(..., dim)``."""
        k = self.norm_k(self.to_k(kv)).unflatten(-1, (self.heads, -1))
        return k, self.to_v(kv).unflatten(-1, (self.heads, -1))

    def _out(self, attended: Tensor, x: Tensor) -> Tensor:
        """The output projection of attended values ``(B, S, H, D)``, in ``x``'s dtype."""
        return self.to_out[1](self.to_out[0](attended.flatten(2, 3).type_as(x)))

    @staticmethod
    def _rope(
        t: Tensor,
        rope_video: tuple[Tensor, Tensor] | None,
        rope_text: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        if rope_text is None:
            return apply_rope_interleaved(t, *rope_video) if rope_video is not None else t
        if rope_video is None:
            return apply_rope_half(t, *rope_text)
        return apply_rope_joint(t, rope_video, rope_text)
