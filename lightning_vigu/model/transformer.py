"""The Uni-ViGU transformer: Wan2.1's video DiT plus a routed caption stream.

Video path (names and maths of diffusers' ``WanTransformer3DModel``)::

    patch_embedding -> [UnifiedBlock] x N -> norm_out/scale_shift_table -> proj_out -> unpatchify

Caption stream (names of the Uni-ViGU release)::

    vocab_embed -> (the same blocks: shared attention, ffn_t expert) -> text_head -> logits

Time inputs are *generator timesteps* (noise level x 1000, Wan's convention); see the glossary
in :mod:`lightning_vigu` and :class:`lightning_vigu.flows.convention.FlowTimeModel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_vigu.model.attention import BACKENDS, PackedRows, VideoMemory
from lightning_vigu.model.blocks import FP32LayerNorm, ModalityRouter, UnifiedBlock
from lightning_vigu.model.embeddings import (
    ConditionEmbedder,
    TextRope1D,
    TimeEmbedding,
    VideoRope3D,
    VideoRopeMixed,
    sincos_3d,
)


@dataclass
class UniViGUConfig:
    """Sizes of the unified transformer (diffusers' Wan names + the caption stream's)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 8960
    num_layers: int = 30
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    # fixed sine-cosine positions added to the caption tokens (not in Uni-ViGU; see forward)
    text_absolute_positions: bool = False
    # fixed 3-D sine-cosine positions added to the video tokens after the patch embedding, as
    # in DiT (not in Wan, whose rope alone leaves a token's value blind to where it is)
    video_absolute_positions: bool = False
    # `axial`: Wan's 3-D rope (each channel pair turns with the frame, the row or the column);
    # `mixed`: pairs turn along oblique directions of (frame, row, column), so one head can follow
    # an object along a diagonal track (RoPE-Mixed with fixed frequencies; not in Wan); with the
    # pooled prompt it made the prompt steer which way an object moves (ablation.md, part 10)
    video_rope: str = "axial"
    # the prompt's mean feature, projected, added to the video time embedding (SD3's pooled text
    # vector; not in Wan): a multiplicative path from the prompt into every block's modulation.
    # Its projection starts at `pooled_prompt_gain` times the unit-variance scale: at 0 or 1 the
    # prompt's control of the layout (which way an object moves) is not learned in 600 steps of
    # the motion probe at pure noise, at 8 it is (benchmarks/results/ablation.md, part 8)
    pooled_prompt: bool = False
    pooled_prompt_gain: float = 8.0
    # caption tokens attend to the video and to earlier caption tokens only, and video tokens
    # never to captions (next-token captions, lightning_vigu.flows.causal; not in Uni-ViGU)
    causal_captions: bool = False
    # causal captions held by some rows (the training step): both streams as one tensor, so
    # the norms and the attention's projections run once over every token instead of once per
    # stream, in fewer and larger kernels (UnifiedBlock.forward_packed; the same function)
    pack_caption_rows: bool = False
    # caption stream; vocab_size=None builds the video-only generator
    vocab_size: int | None = 49408
    text_ffn_dim: int | None = None
    mask_token: bool = False

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_embeddings(self) -> int:
        """Rows of the token embedding / logits of the head (vocabulary + optional mask id)."""
        assert self.vocab_size is not None
        return self.vocab_size + int(self.mask_token)


class UniViGUOutput(NamedTuple):
    """``velocity`` ``(B, C, T, H, W)`` (Wan's ``eps - x``) and ``text_logits`` ``(B, Lt, V)``."""

    velocity: Tensor | None
    text_logits: Tensor | None


class UniViGUTransformer(nn.Module):
    """The unified video-generation / video-understanding transformer.

    Args:
        config: sizes; see :class:`UniViGUConfig` and ``sizes.yaml``.
    """

    def __init__(self, config: UniViGUConfig) -> None:
        super().__init__()
        c = self.config = config
        dim, head_dim = c.dim, c.attention_head_dim
        text_ffn = (c.text_ffn_dim or c.ffn_dim) if c.vocab_size is not None else None
        # video path (diffusers' names)
        if c.video_rope == "axial":
            self.rope = VideoRope3D(head_dim, tuple(c.patch_size), c.rope_max_seq_len)
        elif c.video_rope == "mixed":
            self.rope = VideoRopeMixed(head_dim, c.num_attention_heads, c.rope_max_seq_len)
        else:
            raise ValueError(f"video_rope must be 'axial' or 'mixed', got '{c.video_rope}'")
        self.patch_embedding = nn.Conv3d(
            c.in_channels, dim, kernel_size=c.patch_size, stride=c.patch_size
        )
        self.condition_embedder = ConditionEmbedder(dim, c.freq_dim, c.text_dim, c.pooled_prompt)
        self.blocks = nn.ModuleList(
            UnifiedBlock(
                dim, c.ffn_dim, c.num_attention_heads, head_dim, text_ffn, c.cross_attn_norm, c.eps
            )
            for _ in range(c.num_layers)
        )
        self.norm_out = FP32LayerNorm(dim, c.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, c.out_channels * math.prod(c.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        # caption stream (Uni-ViGU's names)
        if c.vocab_size is not None:
            self.vocab_embed = nn.Embedding(c.num_embeddings, dim)
            self.time_embedding_t = TimeEmbedding(dim, c.freq_dim)
            self.rope_text = TextRope1D(head_dim)
            self.scale_shift_table_t = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
            self.text_head = TextHead(dim, c.num_embeddings)
        self.gradient_checkpointing: int = 0
        self.initialize_weights()

    # ------------------------------------------------------------------ set-up
    @property
    def has_text(self) -> bool:
        """Whether the model has a caption stream."""
        return self.config.vocab_size is not None

    def initialize_weights(self) -> None:
        """Initialise for training from scratch (pretrained loaders overwrite the video path).

        1. Linear / conv weights: Xavier-uniform, biases zero (conv treated as a flat linear).
        2. ``time_proj``: zero, so every block's modulation starts at its ``scale_shift_table``
           (adaLN-Zero-like start with Wan's table parameterisation).
        3. ``proj_out``: zero (the velocity starts at 0, as in DiT).
        4. The caption stream: :meth:`initialize_caption_weights`.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embedding.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embedding.bias)
        nn.init.zeros_(self.condition_embedder.time_proj.weight)
        nn.init.zeros_(self.condition_embedder.time_proj.bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        pooled = self.condition_embedder.pooled_embedder
        if pooled is not None:
            nn.init.normal_(
                pooled.weight, std=self.config.pooled_prompt_gain / pooled.in_features**0.5
            )
        self.initialize_caption_weights()

    @torch.no_grad()
    def initialize_caption_weights(self) -> None:
        """Initialise the caption stream (also used after loading a pretrained video path).

        1. Caption linears: Xavier-uniform, zero biases; norm scales one.
        2. Token embedding: N(0, 1) like ``nn.Embedding``.
        3. Text head linear: zero (logits start uniform, as in the Uni-ViGU release).
        4. Then :meth:`init_caption_from_video`: text experts = copies of the video FFN (when
           widths match), text time embedding and final table = copies of the video ones.
        """
        if not self.has_text:
            return
        for part in [self.time_embedding_t, self.text_head, *(b.ffn_t for b in self.blocks)]:
            for m in part.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                    nn.init.ones_(m.weight)
        nn.init.normal_(self.vocab_embed.weight, std=1.0)
        nn.init.zeros_(self.text_head.linear.weight)
        nn.init.zeros_(self.text_head.linear.bias)
        self.init_caption_from_video()

    @torch.no_grad()
    def init_caption_from_video(self) -> None:
        """Initialise the caption stream from the video path, as the Uni-ViGU release does:
        text experts = copies of each block's FFN (when widths match), text time embedding and
        final modulation table = copies of the video ones. Call after loading generator weights."""
        if not self.has_text:
            return
        for block in self.blocks:
            if block.ffn_t.net[0].proj.weight.shape == block.ffn.net[0].proj.weight.shape:
                block.ffn_t.load_state_dict(block.ffn.state_dict())
        video_time = {
            k: v
            for k, v in self.condition_embedder.state_dict().items()
            if not k.startswith(("text_embedder", "pooled_embedder"))
        }
        self.time_embedding_t.load_state_dict(video_time)
        self.scale_shift_table_t.copy_(self.scale_shift_table)

    def set_attention_backend(self, backend: str) -> None:
        """Choose ``sdpa`` (default) or ``xformers`` for every attention layer."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend '{backend}'; choose one of {BACKENDS}")
        for m in self.modules():
            if hasattr(m, "backend"):
                m.backend = backend

    def set_triton_kernels(self, enabled: bool) -> None:
        """Use the fused Triton kernels of :mod:`lightning_vigu.model.kernels` (the q/k norm and
        rope, the attention to the prompt) in every attention layer where they run (CUDA);
        the same values as the PyTorch path within float rounding."""
        for m in self.modules():
            if hasattr(m, "triton_kernels"):
                m.triton_kernels = bool(enabled)

    def enable_gradient_checkpointing(self, num_blocks: int | bool = True) -> None:
        """Recompute the first ``num_blocks`` blocks in backward (``True`` = all, ``0`` = none)."""
        self.gradient_checkpointing = len(self.blocks) if num_blocks is True else int(num_blocks)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by trainable group: ``video`` (the generator), ``text_experts``
        (``ffn_t`` of every block) and ``text_embed`` (token embedding, text time embedding,
        text modulation table, text head)."""
        groups: dict[str, list[nn.Parameter]] = {"video": [], "text_experts": [], "text_embed": []}
        for name, p in self.named_parameters():
            groups[parameter_group(name)].append(p)
        return groups

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        video: Tensor | None,
        t_video: Tensor | float | None,
        context: Tensor,
        text: Tensor | None = None,
        t_text: Tensor | float | None = None,
        memory: VideoMemory | None = None,
        text_rows: Tensor | None = None,
    ) -> Tensor | UniViGUOutput:
        """Denoise video latents and/or caption tokens in one pass.

        Args:
            video: ``(B, in_channels, T, H, W)`` noisy latents, or ``None`` (caption only).
            t_video: ``(B,)`` or scalar generator timestep of the video (noise level x 1000).
            context: ``(B, Lc, text_dim)`` prompt-encoder features (zeros/empty prompt for none).
            text: ``(B, Lt)`` long noisy caption tokens, or ``None`` (video only).
            t_text: ``(B,)`` or scalar generator timestep of the caption.
            memory: causal captions only: a :class:`VideoMemory` from :meth:`video_memory`; the
                caption canvas (``video=None``) then reads the video from it.
            text_rows: causal captions only: ``(Bt,)`` indices of the video rows that hold a
                caption (a row may appear twice, e.g. as padding); ``text`` ``(Bt, Lt)`` and
                ``t_text`` ``(Bt,)`` are theirs, in that order. The video never reads a
                caption, so the rows without one cost what the generator's do (the training
                step of rows that only generate video); the logits are ``(Bt, Lt, V)``.

        Returns:
            With ``text=None``: the video velocity ``(B, out_channels, T, H, W)`` (same as
            diffusers' ``WanTransformer3DModel(...).sample``). Otherwise
            :class:`UniViGUOutput` ``(velocity or None, text_logits (B, Lt, V) float32)``.
        """
        if text_rows is not None:
            return self._forward_rows(video, t_video, context, text, t_text, text_rows)
        c = self.config
        self._check_inputs(video, context, text)
        if memory is not None and not memory.recording:
            if video is not None or text is None:
                raise ValueError("a read video memory takes the place of the video: pass text only")
            memory.read()  # from the first block again
        # 1. embed the streams
        tokens, mods, rope_video, rope_text, grid = [], [], None, None, None
        temb_v = temb_t = None
        if video is not None:
            x_v, grid, rope_video, temb_v, mod_v = self._embed_video(video, t_video, context)
            tokens.append(x_v)
            mods.append(mod_v)
        if text is not None:
            x_t, rope_text, temb_t, mod_t = self._embed_text(text, t_text)
            tokens.append(x_t.to(tokens[0].dtype if tokens else x_t.dtype))
            mods.append(mod_t)
        router = ModalityRouter(
            tokens[0].shape[1] if video is not None else 0, text.shape[1] if text is not None else 0
        )
        x = router.merge(tokens).contiguous()  # (B, Lv + Lt, D)
        ctx = self.condition_embedder.text_embedder(context.to(x.dtype))  # (B, Lc, D)
        prefix = 0 if memory is None or memory.recording else memory.num_video
        mask = (
            self._causal_mask(router, x.device, prefix)
            if c.causal_captions and text is not None
            else None
        )
        # 2. blocks
        for i, block in enumerate(self.blocks):
            args = (x, ctx, mods, router, rope_video, rope_text, mask, memory)
            if memory is not None:  # eager, once: a compiled block would break on the memory
                x = block.forward(*args)
            else:
                x = self._run_block(i, block, *args)
        # 3. heads
        parts = router.split(x)
        velocity = logits = None
        if video is not None:
            velocity = self._video_head(parts[0], temb_v, grid)
        if text is not None:
            logits = self.text_head(
                parts[-1], (self.scale_shift_table_t + temb_t.unsqueeze(1)).chunk(2, dim=1)
            )
        if text is None:
            return velocity
        return UniViGUOutput(velocity, logits)

    def _embed_video(
        self, video: Tensor, t_video: Tensor | float | None, context: Tensor
    ) -> tuple[Tensor, tuple[int, int, int], tuple[Tensor, Tensor], Tensor, Tensor]:
        """Video tokens ``(B, Lv, D)``, their grid, rope, time embedding and modulation."""
        c = self.config
        _, _, f, h, w = video.shape
        p_t, p_h, p_w = c.patch_size
        grid = (f // p_t, h // p_h, w // p_w)
        x_v = self.patch_embedding(video).flatten(2).transpose(1, 2)  # (B, Lv, D)
        if c.video_absolute_positions:  # a token's value says which frame and place it is
            x_v = x_v + sincos_3d(*grid, c.dim, video.device).to(x_v.dtype)
        t = _as_batch(t_video, video.shape[0], video.device)
        temb, mod = self.condition_embedder(t, context)
        return x_v, grid, self.rope(grid), temb, mod

    def _embed_text(
        self, text: Tensor, t_text: Tensor | float | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor, Tensor]:
        """Caption tokens ``(B, Lt, D)``, their rope, time embedding and modulation."""
        c = self.config
        x_t = self.vocab_embed(text)  # (B, Lt, D)
        if c.text_absolute_positions:  # a token's value says where on the canvas it is
            x_t = x_t + sincos_3d(1, 1, text.shape[1], c.dim, text.device).to(x_t.dtype)
        temb, mod = self.time_embedding_t(_as_batch(t_text, text.shape[0], text.device))
        return x_t, self.rope_text(text.shape[1], text.device), temb, mod

    def _forward_rows(
        self,
        video: Tensor,
        t_video: Tensor | float | None,
        context: Tensor,
        text: Tensor | None,
        t_text: Tensor | float | None,
        rows: Tensor,
    ) -> UniViGUOutput:
        """:meth:`forward` with ``text_rows``: the video stream over every row, the causal
        captions over theirs (:meth:`UnifiedBlock.forward_rows`)."""
        if not self.config.causal_captions:
            raise ValueError(
                "text_rows needs causal_captions: otherwise every video token reads the caption "
                "of its row, and a row without one is another model's input"
            )
        if video is None or text is None:
            raise ValueError("text_rows needs both a video and the captions of those rows")
        self._check_inputs(video, context, None)
        if rows.ndim != 1 or text.ndim != 2 or text.shape[0] != rows.shape[0]:
            raise ValueError(
                f"text must be (Bt, Lt) with Bt = len(text_rows) = {tuple(rows.shape)}, "
                f"got {tuple(text.shape)}"
            )
        x_v, grid, rope_video, temb_v, mod_v = self._embed_video(video, t_video, context)
        x_t, rope_text, temb_t, mod_t = self._embed_text(text, t_text)
        x_t = x_t.to(x_v.dtype)
        ctx = self.condition_embedder.text_embedder(context.to(x_v.dtype))  # (B, Lc, D)
        text_mask = self._caption_mask(x_v.shape[1], x_t.shape[1], x_v.device)  # (Lt, Lv + Lt)
        args = (rows, ctx, (mod_v, mod_t), rope_video, rope_text, text_mask)
        if self.config.pack_caption_rows:
            packed = PackedRows(x_v.shape[:2], x_t.shape[:2])
            x = packed.pack(x_v, x_t)
            for i, block in enumerate(self.blocks):
                x = self._run_block(i, block.forward_packed, x, packed, *args)
            x_v, x_t = packed.split(x)
        else:
            for i, block in enumerate(self.blocks):
                x_v, x_t = self._run_block(i, block.forward_rows, x_v, x_t, *args)
        velocity = self._video_head(x_v, temb_v, grid)
        logits = self.text_head(
            x_t, (self.scale_shift_table_t + temb_t.unsqueeze(1)).chunk(2, dim=1)
        )
        return UniViGUOutput(velocity, logits)

    def _run_block(self, i: int, fn, *args):
        """Block ``i``'s ``fn``, checkpointed when ``i`` is among the first
        ``gradient_checkpointing`` blocks and gradients are on."""
        if torch.is_grad_enabled() and i < self.gradient_checkpointing:
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    @staticmethod
    def _causal_mask(router: ModalityRouter, device: torch.device, prefix: int = 0) -> Tensor:
        """``(Lv + Lt, prefix + Lv + Lt)`` bool, True where a query may attend: video tokens
        see the video only, caption token ``i`` sees the video and caption tokens ``0..i``.
        ``prefix``: video keys read from a :class:`VideoMemory` before the sequence's own."""
        lv, lt = router.lengths
        video = torch.ones(lv, prefix + lv + lt, dtype=torch.bool, device=device)
        video[:, prefix + lv :] = False
        return torch.cat([video, UniViGUTransformer._caption_mask(lv, lt, device, prefix)])

    @staticmethod
    def _caption_mask(lv: int, lt: int, device: torch.device, prefix: int = 0) -> Tensor:
        """The caption rows of :meth:`_causal_mask`, ``(Lt, prefix + Lv + Lt)``: caption
        token ``i`` sees every video key and caption tokens ``0..i``."""
        mask = torch.ones(lt, prefix + lv + lt, dtype=torch.bool, device=device)
        mask[:, prefix + lv :] = torch.ones(lt, lt, dtype=torch.bool, device=device).tril()
        return mask

    @torch.no_grad()
    def video_memory(self, video: Tensor, t_video: Tensor | float, context: Tensor) -> VideoMemory:
        """One video-only pass that records every block's video keys and values, ready to be
        read by caption-only passes (``forward(None, None, context, text, t_text, memory=m)``):
        with ``causal_captions`` those passes give the joint pass's caption logits, at the cost
        of the caption tokens alone."""
        if not self.config.causal_captions:
            raise ValueError(
                "a video memory needs causal_captions: otherwise the video reads the caption "
                "and its keys change at every step"
            )
        memory = VideoMemory()
        self.forward(video, t_video, context, memory=memory)  # eager, like the reading passes
        return memory.read()

    def _video_head(self, x: Tensor, temb: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Final norm + modulation + ``proj_out``, then unpatchify to ``(B, C, T, H, W)``."""
        b = x.shape[0]
        f, h, w = grid
        p_t, p_h, p_w = self.config.patch_size
        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(
            2, dim=1
        )  # (B, 1, D) each
        x = (self.norm_out(x) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)  # (B, f*h*w, C*pt*ph*pw)
        x = x.reshape(b, f, h, w, p_t, p_h, p_w, -1)  # (B, f, h, w, pt, ph, pw, C)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, f, pt, h, ph, w, pw)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3).float()  # (B, C, T, H, W)

    def _check_inputs(self, video: Tensor | None, context: Tensor, text: Tensor | None) -> None:
        c = self.config
        if video is None and text is None:
            raise ValueError("forward needs a video, a caption canvas, or both")
        if context.ndim != 3 or context.shape[-1] != c.text_dim:
            raise ValueError(
                f"context must be (B, Lc, text_dim={c.text_dim}), got {tuple(context.shape)}"
            )
        b = context.shape[0]
        if video is not None:
            if video.ndim != 5 or video.shape[1] != c.in_channels or video.shape[0] != b:
                raise ValueError(
                    f"video must be (B={b}, in_channels={c.in_channels}, T, H, W), got {tuple(video.shape)}"
                )
            for name, size, p in zip("THW", video.shape[2:], c.patch_size):
                if size % p:
                    raise ValueError(
                        f"video {name}={size} is not divisible by the patch size {p} on that axis "
                        f"(patch_size={tuple(c.patch_size)}); resize/crop the latents or change frames"
                    )
        if text is not None:
            if not self.has_text:
                raise ValueError("this model was built without a caption stream (vocab_size=None)")
            if text.ndim != 2 or text.shape[0] != b or text.dtype != torch.long:
                raise ValueError(
                    f"text must be a long tensor (B={b}, Lt), got {tuple(text.shape)} {text.dtype}"
                )


class TextHead(nn.Module):
    """Caption logits: LayerNorm (learned scale, eps 1e-5 as in the Uni-ViGU release) +
    modulation + zero-initialised linear."""

    def __init__(self, dim: int, vocab: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm_final = FP32LayerNorm(dim, eps, elementwise_affine=True, bias=False)
        self.linear = nn.Linear(dim, vocab)

    def forward(self, x: Tensor, shift_scale: tuple[Tensor, Tensor]) -> Tensor:
        shift, scale = shift_scale
        h = (self.norm_final(x) * (1 + scale) + shift).type_as(x)
        return self.linear(h).float()  # (B, Lt, V)


_TEXT_EXPERT = ("ffn_t.", "norm3_t.")
_TEXT_EMBED = ("vocab_embed.", "time_embedding_t.", "scale_shift_table_t", "text_head.")


def parameter_group(name: str) -> str:
    """The trainable group of a parameter name of :class:`UniViGUTransformer`."""
    if any(f".{k}" in name or name.startswith(k) for k in _TEXT_EXPERT):
        return "text_experts"
    if name.startswith(_TEXT_EMBED):
        return "text_embed"
    return "video"


def _as_batch(t: Tensor | float | None, b: int, device: torch.device) -> Tensor:
    """A timestep argument as a ``(B,)`` float tensor."""
    if t is None:
        raise ValueError("a stream was given without its timestep")
    t = torch.as_tensor(t, device=device, dtype=torch.float32)
    if t.ndim == 0:
        t = t.expand(b)
    if t.shape != (b,):
        raise ValueError(f"timestep must be a scalar or (B={b},), got {tuple(t.shape)}")
    return t
