"""Embeddings of the unified transformer: time, prompt projection, 3-D and 1-D rotary positions.

Parameter names follow diffusers' ``WanTransformer3DModel`` (``condition_embedder.time_embedder
.linear_1`` ...), so a diffusers state dict loads without conversion.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of generator timesteps, ``[cos | sin]`` order (Wan's convention).

    Args:
        timesteps: ``(B,)`` generator timesteps (0...1000), any float dtype.
        dim: feature width (even).

    Returns:
        ``(B, dim)`` float32 features.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(
        half, dtype=torch.float32, device=timesteps.device
    )
    freqs = torch.exp(exponent / half)  # (half,)
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class TimestepEmbedding(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` over sinusoidal features."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class PromptProjection(nn.Module):
    """Projects prompt-encoder features to the model width: ``linear_1 -> GELU(tanh) -> linear_2``."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class TimeEmbedding(nn.Module):
    """Generator timestep -> ``temb`` ``(B, D)`` and the 6-way block modulation ``(B, 6, D)``.

    Runs in float32 (an fp32 island under autocast), like Wan's ``time_embedder``.
    """

    def __init__(self, dim: int, freq_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = TimestepEmbedding(freq_dim, dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, 6 * dim)

    def forward(self, timestep: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(device_type=timestep.device.type, enabled=False):
            return self.modulation(self.embed_time(timestep))

    def embed_time(self, timestep: Tensor) -> Tensor:
        """``temb`` ``(B, D)`` of the generator timestep (call under disabled autocast)."""
        feats = sinusoidal_embedding(timestep, self.freq_dim)  # (B, freq_dim)
        return self.time_embedder(feats.to(self.time_embedder.linear_1.weight.dtype))

    def modulation(self, temb: Tensor) -> tuple[Tensor, Tensor]:
        """``temb`` -> ``(temb, the 6-way block modulation (B, 6, D))`` in float32."""
        proj = self.time_proj(self.act_fn(temb))  # (B, 6 * D)
        return temb.float(), proj.float().unflatten(1, (6, -1))  # (B, D), (B, 6, D)


class ConditionEmbedder(TimeEmbedding):
    """Wan's ``condition_embedder``: the video time embedding plus the prompt projection, and
    with ``pooled`` the prompt's mean feature projected onto the time embedding (SD3's pooled
    text vector, ``pooled_embedder``; not in Wan)."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int, pooled: bool = False) -> None:
        super().__init__(dim, freq_dim)
        self.text_embedder = PromptProjection(text_dim, dim)
        self.pooled_embedder = nn.Linear(text_dim, dim) if pooled else None

    def forward(self, timestep: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``timestep`` ``(B,)``; ``context`` ``(B, Lc, text_dim)`` prompt features, whose mean
        over the non-padding tokens (padding rows are zeros) joins ``temb`` when
        ``pooled_embedder`` exists."""
        with torch.autocast(device_type=timestep.device.type, enabled=False):
            temb = self.embed_time(timestep)
            if self.pooled_embedder is not None:
                if context is None:
                    raise ValueError("a pooled-prompt condition embedder needs the prompt features")
                ctx = context.float()
                keep = (ctx.abs().amax(-1, keepdim=True) > 0).float()  # (B, Lc, 1)
                mean = (ctx * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # (B, text_dim)
                temb = temb + self.pooled_embedder(mean.to(temb.dtype))
            return self.modulation(temb)


def sincos_3d(
    frames: int, height: int, width: int, dim: int, device: torch.device | None = None
) -> Tensor:
    """Fixed 3-D sine-cosine positions ``(frames * height * width, dim)``, row-major in
    ``(t, h, w)``: ``2 * (dim // 6)`` channels each for ``h`` and ``w``, the rest for ``t``.

    Rope only rotates queries and keys, so a token's *value* never says where it is; with
    ``(1, 1, L)`` these are the caption canvas positions added by
    :attr:`UniViGUConfig.text_absolute_positions`.
    """
    if dim % 2:
        raise ValueError(f"sine-cosine positions need an even width, got {dim}")
    d_hw = 2 * (dim // 6)
    grid = torch.meshgrid(
        *(torch.arange(n, device=device, dtype=torch.float32) for n in (frames, height, width)),
        indexing="ij",
    )
    parts = []
    for pos, d in zip(grid, (dim - 2 * d_hw, d_hw, d_hw)):
        omega = 10000.0 ** (-torch.arange(d // 2, device=device, dtype=torch.float32) / (d // 2))
        angle = pos.reshape(-1, 1) * omega  # (N, d/2)
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=-1)  # (N, dim)


def _rope_frequencies(
    dim: int, positions: int, theta: float, device: torch.device | None = None
) -> Tensor:
    """``(positions, dim // 2)`` rotation angles ``p * theta^(-2i/dim)`` in float64."""
    inv = 1.0 / theta ** (
        torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
    )  # (dim/2,)
    return torch.outer(
        torch.arange(positions, dtype=torch.float64, device=device), inv
    )  # (P, dim/2)


_CPU = torch.device("cpu")  # angle tables are made here, also under a meta-device context


class _RopeTables(nn.Module):
    """cos/sin of a float64 angle table, kept as float32 buffers (``cos``, ``sin``).

    A forward only gathers rows of the tables. Computing cos/sin from the angles inside the
    forward let the compiler fuse them into every rotation, so each ``(B, S, H, D)`` element
    evaluated float64 transcendentals: 17% of the GPU's work in a ``small`` training step on an H200
    (``benchmarks/results/train_loop_h200.md``). The tables are rebuilt in float32 whenever the
    module is moved or cast (:meth:`_apply`), so ``.to(torch.bfloat16)`` or ``bf16-true``
    training cannot round the positions, and ``to_empty`` leaves no uninitialised table. They
    are derived, not learned: not in the state dict.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    def angles(self) -> Tensor:
        """The ``(positions, n)`` float64 angle table, on the CPU."""
        raise NotImplementedError

    def _build(self, device: torch.device) -> None:
        angles = self.angles()  # float64 on the CPU (not every device has float64)
        self.cos = angles.cos().float().to(device)
        self.sin = angles.sin().float().to(device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._build(self.cos.device)
        return self


class VideoRope3D(_RopeTables):
    """Wan's 3-D rotary embedding: head channels split into (frame, height, width) parts.

    Channel pairs are interleaved (``(x0, x1), (x2, x3), ...``), as in Wan.
    """

    def __init__(
        self,
        head_dim: int,
        patch_size: tuple[int, int, int],
        max_seq_len: int = 1024,
        theta: float = 10000.0,
    ) -> None:
        super().__init__()
        h_dim = w_dim = 2 * (head_dim // 6)
        self.split = (head_dim - h_dim - w_dim, h_dim, w_dim)
        self.patch_size = patch_size
        self.max_seq_len = max_seq_len
        self.theta = theta
        self._build(_CPU)

    def angles(self) -> Tensor:
        """``(max_seq_len, head_dim / 2)``: the frame, height and width angles side by side."""
        return torch.cat(
            [_rope_frequencies(d, self.max_seq_len, self.theta, _CPU) for d in self.split], dim=1
        )

    def forward(self, grid: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        """cos/sin ``(1, f*h*w, 1, head_dim)`` float32 for a post-patch grid ``(f, h, w)``."""
        if max(grid) > self.max_seq_len:
            raise ValueError(f"video grid {grid} exceeds the rope table length {self.max_seq_len}")
        return self._on_grid(self.cos, grid), self._on_grid(self.sin, grid)

    def _on_grid(self, table: Tensor, grid: tuple[int, int, int]) -> Tensor:
        f, h, w = grid
        t_t, t_h, t_w = table.split([d // 2 for d in self.split], dim=1)
        rows = torch.cat(
            [
                t_t[:f, None, None].expand(f, h, w, -1),
                t_h[None, :h, None].expand(f, h, w, -1),
                t_w[None, None, :w].expand(f, h, w, -1),
            ],
            dim=-1,
        ).reshape(1, f * h * w, 1, -1)  # (1, S, 1, head_dim / 2)
        return rows.repeat_interleave(2, dim=-1)  # (1, S, 1, head_dim), interleaved pairs


class VideoRopeMixed(_RopeTables):
    """A 3-D rotary embedding whose channel pairs turn along oblique directions of (frame, row,
    column), not along one axis each (RoPE-Mixed, Heo et al. 2024, "Rotary Position Embedding
    for Vision Transformer", here with fixed rather than learned frequencies; not in Wan).

    With Wan's axial split a head's attention logit is a frame term plus a row term plus a column
    term, so its attention factorises into a frame offset times a place offset and cannot follow
    an object along a diagonal track (place offset growing with frame offset). Here pair ``i``
    of head ``n`` rotates by ``omega_i * (u_ni . p)`` for a unit direction ``u_ni`` in
    (frame, row, column) space, so the logit can depend on ``place - v * frame`` for any speed
    ``v``. Magnitudes ``omega_i = theta^(-i / (head_dim / 2))`` span each head; directions are
    drawn once from a fixed seed (float64 on the CPU: derived, not learned, not in the state
    dict). On the motion probe this let the prompt steer which way an object moves
    (``benchmarks/results/ablation.md``, part 10).

    The angle is linear in the position, so the tables hold one angle per axis and position and
    a forward multiplies the three unit complex numbers of a token's frame, row and column:
    no transcendental in the graph.
    """

    SEED = 0

    def __init__(
        self, head_dim: int, num_heads: int, max_seq_len: int = 1024, theta: float = 100.0
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head width, got {head_dim}")
        self.head_dim, self.num_heads = head_dim, num_heads
        self.max_seq_len = max_seq_len
        self.theta = theta
        self._build(_CPU)

    def frequencies(self) -> Tensor:
        """``(3, num_heads * head_dim / 2)`` float64: each pair's angle per unit of frame, row
        and column (head-major)."""
        n = self.head_dim // 2
        gen = torch.Generator().manual_seed(self.SEED)
        u = torch.randn(self.num_heads, n, 3, generator=gen, dtype=torch.float64)
        u = u / u.norm(dim=-1, keepdim=True)
        omega = self.theta ** (-torch.arange(n, dtype=torch.float64) / n)  # (n,)
        return (u * omega[None, :, None]).reshape(-1, 3).T  # (3, H * n)

    def angles(self) -> Tensor:
        """``(max_seq_len, 3 * num_heads * head_dim / 2)``: the frame, row and column angles."""
        pos = torch.arange(self.max_seq_len, dtype=torch.float64)
        return torch.cat([torch.outer(pos, f) for f in self.frequencies()], dim=1)

    def forward(self, grid: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        """cos/sin ``(1, f*h*w, num_heads, head_dim)`` float32 for a post-patch grid."""
        if max(grid) > self.max_seq_len:
            raise ValueError(f"video grid {grid} exceeds the rope table length {self.max_seq_len}")
        f, h, w = grid
        cos, sin = (t.unflatten(1, (3, -1)) for t in (self.cos, self.sin))  # (P, 3, H * n)
        c_t, c_h, c_w = (cos[:f, 0, None, None], cos[None, :h, 1, None], cos[None, None, :w, 2])
        s_t, s_h, s_w = (sin[:f, 0, None, None], sin[None, :h, 1, None], sin[None, None, :w, 2])
        c_th, s_th = c_t * c_h - s_t * s_h, s_t * c_h + c_t * s_h  # frame + row
        c_all, s_all = c_th * c_w - s_th * s_w, s_th * c_w + c_th * s_w  # + column
        shape = (1, f * h * w, self.num_heads, -1)
        return tuple(
            t.reshape(shape).repeat_interleave(2, dim=-1) for t in (c_all, s_all)
        )  # (1, S, H, head_dim) each, interleaved pairs


class TextRope1D(_RopeTables):
    """1-D rotary embedding over caption positions, rotate-half pairing (``i, i + d/2``).

    Tables cover ``table_length`` positions; a longer canvas computes its own (no length limit,
    no state-dict entry).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, table_length: int = 1024) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.table_length = table_length
        self._build(_CPU)

    def angles(self) -> Tensor:
        """``(table_length, head_dim / 2)``."""
        return _rope_frequencies(self.head_dim, self.table_length, self.theta, _CPU)

    def forward(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos/sin ``(1, length, 1, head_dim)`` float32."""
        if length <= self.cos.shape[0] and self.cos.device == device:
            cos, sin = self.cos[:length], self.sin[:length]
        else:
            ang = _rope_frequencies(self.head_dim, length, self.theta, device)  # no host copy
            cos, sin = ang.cos().float(), ang.sin().float()
        cos, sin = (torch.cat([t, t], dim=-1)[None, :, None] for t in (cos, sin))
        return cos, sin  # (1, L, 1, head_dim) each


def _swap_pairs(x: Tensor) -> Tensor:
    """``(x0, x1, x2, x3, ...)`` -> ``(x1, x0, x3, x2, ...)`` along the last dim."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def _swap_halves(x: Tensor) -> Tensor:
    """``(a, b)`` -> ``(b, a)``: the two halves of the last dim exchanged."""
    return x.roll(x.shape[-1] // 2, dims=-1)


def _signed_pairs(sin: Tensor) -> Tensor:
    """An interleaved sine table ``(s0, s0, s1, s1, ...)`` as ``(-s0, s0, -s1, s1, ...)``."""
    s = sin[..., 0::2]
    return torch.stack([-s, s], dim=-1).flatten(-2)


def _signed_halves(sin: Tensor) -> Tensor:
    """A rotate-half sine table ``(s, s)`` as ``(-s, s)``."""
    first, second = sin.chunk(2, dim=-1)
    return torch.cat([-first, second], dim=-1)


# Each rotation is written as ``x * cos + swap(x) * signed_sin``: one elementwise expression
# whose partner channel is an index map of the same row, so a compiler fuses it with the q/k
# norm before it, for the video and the caption tokens of one sequence alike (no split and
# concatenation of the rotated parts). Every output element is the product-sum of the
# textbook form (x0 * c - x1 * s, x0 * s + x1 * c), in the same float32 arithmetic.


def apply_rope_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved channel pairs ``(x0, x1), (x2, x3), ...`` of ``x`` ``(B, S, H, D)``
    (Wan's video rope); ``cos``/``sin`` hold each pair's value twice."""
    xf = x.float()
    return (xf * cos + _swap_pairs(xf) * _signed_pairs(sin)).type_as(x)


def apply_rope_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``(B, S, H, D)`` with rotate-half pairing (channel ``i`` with ``i + D/2``)."""
    xf = x.float()
    return (xf * cos + _swap_halves(xf) * _signed_halves(sin)).type_as(x)


def apply_rope_joint(
    x: Tensor, rope_video: tuple[Tensor, Tensor], rope_text: tuple[Tensor, Tensor]
) -> Tensor:
    """Rotate ``x`` ``(B, Lv + Lt, H, D)``: the first ``Lv`` tokens (the length of the video
    tables ``(1, Lv, 1 or H, D)``) with interleaved pairs, the rest with the caption's
    rotate-half tables ``(1, Lt, 1, D)``. One elementwise pass over the whole sequence: each
    token's other pairing has a zero sine, so it adds exactly nothing (as
    :func:`apply_rope_interleaved` and :func:`apply_rope_half` of the two parts)."""
    (cos_v, sin_v), (cos_t, sin_t) = rope_video, rope_text
    if cos_v.shape[1] + cos_t.shape[1] != x.shape[1]:
        raise ValueError(
            f"rope tables for {cos_v.shape[1]} video and {cos_t.shape[1]} caption tokens, "
            f"but the sequence has {x.shape[1]}"
        )
    heads = max(cos_v.shape[2], cos_t.shape[2])
    sin_v, sin_t = _signed_pairs(sin_v), _signed_halves(sin_t)
    cos_v, sin_v, cos_t, sin_t = (t.expand(-1, -1, heads, -1) for t in (cos_v, sin_v, cos_t, sin_t))
    cos = torch.cat([cos_v, cos_t], dim=1)
    pairs = torch.cat([sin_v, torch.zeros_like(sin_t)], dim=1)
    halves = torch.cat([torch.zeros_like(sin_v), sin_t], dim=1)
    xf = x.float()
    return (xf * cos + _swap_pairs(xf) * pairs + _swap_halves(xf) * halves).type_as(x)
