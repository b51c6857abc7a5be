"""Triton kernels for two memory-bound parts of the attention, forward and backward.

- :func:`qk_norm_rope`: the RMS norm of a self-attention's queries and keys (over all heads,
  Wan's ``norm_q`` / ``norm_k``) and their rotary embedding over ``[video | caption]`` (the
  video's interleaved pairs, the caption's rotate-half), both tensors in one kernel. Written as
  PyTorch operations a compiler fuses the same work, but the partner channel of each rotation
  becomes an indexed load and the kernel ran at about 0.9 TB/s (benchmarks/results/ablation.md,
  part 25); here each row is read once and the partners are exchanged in registers.
- :func:`few_key_attention`: attention to a short key sequence (the prompt's 32 tokens, at most
  :data:`MAX_KEYS`): every key of a (batch, head) fits in one tile, so the softmax is exact in
  one pass, and the backward reads each query block once and sums the keys' gradients in
  registers. cuDNN's flash kernels spend a quarter of the attention's time on this
  cross-attention for 1/34 of its FLOPs (part 25).

Both are ``torch.library.triton_op`` s with their own backward, so ``torch.compile`` keeps them
as kernels in its graph (CUDA graphs included). They run on CUDA tensors (or on the CPU under
Triton's interpreter, ``TRITON_INTERPRET=1``, which the tests use); the callers fall back to
the PyTorch expressions elsewhere (:func:`usable`). Arithmetic: float32 inside, inputs and
outputs in the tensors' dtype; the attention's matrix products take bf16/fp16 operands with
float32 accumulation, as flash attention does.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - Triton ships with CUDA builds of torch
    HAS_TRITON = False

MAX_KEYS = 128  # few_key_attention holds all keys of a (batch, head) in one tile
ROPE_TUNING = dict(
    rows=8,  # tokens of a forward program
    warps=2,  # its warps
    backward_rows=4,  # tokens of a backward block
    backward_warps=4,
    backward_programs=1024,  # the backward's programs (each of q, k) loop over its blocks
)
"""Launch parameters of :func:`qk_norm_rope` (``python -m benchmarks.kernels --tune`` measures
them); read when the operator runs, so a compiled graph keeps those it was traced with."""
_ATTN_ROWS = 64  # queries of an attention program
_ATTN_BACKWARD_PROGRAMS = 1024  # (batch, head) pairs times query chunks in the backward


def usable(*tensors: Tensor) -> bool:
    """Whether the kernels can run on these tensors: Triton is importable and they are on a
    CUDA device (or on the CPU under Triton's interpreter)."""
    if not HAS_TRITON:
        return False
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return all(t.is_cuda or (interpreted and t.device.type == "cpu") for t in tensors)


def fits(head_dim: int) -> bool:
    """Whether the kernels take heads of this width (a power of two, at least 16)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def takes_norm_rope(q: Tensor, k: Tensor) -> bool:
    """Whether :func:`qk_norm_rope` runs on these ``(B, S, H, D)`` queries and keys."""
    return fits(q.shape[-1]) and usable(q, k)


def takes_few_keys(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether :func:`few_key_attention` runs on these ``(B, S, H, D)`` tensors: at most
    :data:`MAX_KEYS` keys, heads that :func:`fits`, contiguous channels, and one half-precision
    dtype (in float32 its matrix products would round to TF32, which SDPA's do not)."""
    return (
        k.shape[1] <= MAX_KEYS
        and fits(q.shape[-1])
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.dtype == k.dtype == v.dtype
        and usable(q, k, v)
    )


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if HAS_TRITON:

    @triton.jit
    def _rotated(x, PAIRS: tl.constexpr, BT: tl.constexpr, HP: tl.constexpr, D: tl.constexpr):
        """``x`` ``[BT, HP, D]`` with each rotation pair turned a quarter: ``(-x_j, x_i)`` for
        the pair ``(i, j)``, interleaved pairs ``(2m, 2m+1)`` (``PAIRS``, the video's) or
        halves ``(m, m + D/2)`` (the caption's). The rope is ``x * cos + rotated(x) * sin``."""
        if PAIRS:  # the partners are neighbours, which the register layout keeps together
            a, b = tl.split(tl.reshape(x, (BT, HP, D // 2, 2)))
            return tl.reshape(tl.join(-b, a), (BT, HP, D))
        else:
            lo, hi = tl.split(tl.permute(tl.reshape(x, (BT, HP, 2, D // 2)), (0, 1, 3, 2)))
            return tl.reshape(tl.permute(tl.join(-hi, lo), (0, 1, 3, 2)), (BT, HP, D))

    @triton.jit
    def _norm_rope_block(
        block, S, num_video, video_blocks, blocks,
        H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
    ):  # fmt: skip
        """Block ``block`` of the flattened ``(B, S)`` tokens: block ``block % blocks`` of batch
        item ``block // blocks``, whose first ``video_blocks`` blocks tile its video tokens and
        the rest its caption tokens (a block is all of one kind). Returns whether it is the
        video's, the offsets ``[BT, HP, D]`` of its rows (all heads), their mask, and each
        row's position within its part ``[BT, 1, 1]``."""
        b = block // blocks
        j = block % blocks
        video = j < video_blocks
        start = tl.where(video, j, j - video_blocks) * BT
        length = tl.where(video, num_video, S - num_video)
        first = tl.where(video, 0, num_video)
        t = start + tl.arange(0, BT)[:, None, None]
        h = tl.arange(0, HP)[None, :, None]
        d = tl.arange(0, D)[None, None, :]
        offs = (b.to(tl.int64) * S + first + t) * (H * D) + h * D + d
        return video, offs, (t < length) & (h < H), t

    @triton.jit
    def _table_offsets(t, HT: tl.constexpr, HP: tl.constexpr, D: tl.constexpr):
        """Offsets ``[BT, HP, D]`` into a rope table ``(L, HT, D)`` of positions ``t``: at the
        rows' full shape (for ``HT`` 1 the heads read the same entries), so that the compiler
        lays the float32 tables out as the rows; loaded as ``[BT, 1, D]`` they took another
        layout and the rows went through shared memory twice to match it (the PTX)."""
        h = tl.arange(0, HP)[None, :, None]
        d = tl.arange(0, D)[None, None, :]
        return t * (HT * D) + (h * D if HT > 1 else 0 * h) + d

    @triton.jit
    def _normalised(x, w, EPS: tl.constexpr, H: tl.constexpr, D: tl.constexpr):
        """The RMS norm over all heads of rows ``x`` ``[BT, HP, D]`` (weights ``w``), and the
        reciprocal RMS ``[BT, 1, 1]``."""
        r = tl.rsqrt(tl.sum(tl.sum(x * x, axis=2), axis=1) / (H * D) + EPS)[:, None, None]
        return x * r * w, r

    # Loads and stores stay in the kernels' bodies, not in helpers: torch.compile reads a
    # kernel's IR to learn which tensors it writes, and a load or store inside a called
    # function makes it assume every argument is written (copies of q, k, weights and tables;
    # in the packed caption rows' graph, a write-back that faulted on the GPU)

    @triton.jit
    def _norm_rope_fwd(
        xq_ptr, xk_ptr, wq_ptr, wk_ptr, yq_ptr, yk_ptr, cv_ptr, sv_ptr, ct_ptr, st_ptr,
        S, num_video, video_blocks, blocks, EPS: tl.constexpr,
        H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, HV: tl.constexpr, BT: tl.constexpr,
    ):  # fmt: skip
        """Program ``(i, 0 or 1)`` normalises and rotates block ``i`` of q or k
        (:func:`_norm_rope_block`)."""
        if tl.program_id(1) == 0:
            x_ptr, w_ptr, y_ptr = xq_ptr, wq_ptr, yq_ptr
        else:
            x_ptr, w_ptr, y_ptr = xk_ptr, wk_ptr, yk_ptr
        video, offs, mask, t = _norm_rope_block(
            tl.program_id(0), S, num_video, video_blocks, blocks, H, HP, D, BT
        )
        h = tl.arange(0, HP)[None, :, None]
        d = tl.arange(0, D)[None, None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + h * D + d, mask=h < H, other=0.0).to(tl.float32)
        if video:  # the norm in each branch: the caption's layout stays out of the video's
            table = _table_offsets(t, HV, HP, D)
            cos = tl.load(cv_ptr + table, mask=mask, other=0.0)
            sin = tl.load(sv_ptr + table, mask=mask, other=0.0)
            n, _ = _normalised(x, w, EPS, H, D)
            y = n * cos + _rotated(n, True, BT, HP, D) * sin
        else:
            table = _table_offsets(t, 1, HP, D)
            cos = tl.load(ct_ptr + table, mask=mask, other=0.0)
            sin = tl.load(st_ptr + table, mask=mask, other=0.0)
            n, _ = _normalised(x, w, EPS, H, D)
            y = n * cos + _rotated(n, False, BT, HP, D) * sin
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_rope_bwd(
        gq_ptr, gk_ptr, xq_ptr, xk_ptr, wq_ptr, wk_ptr, dxq_ptr, dxk_ptr, dw_ptr,
        cv_ptr, sv_ptr, ct_ptr, st_ptr, S, num_video, video_blocks, blocks, num_blocks,
        EPS: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr,
        HV: tl.constexpr, BT: tl.constexpr,
    ):  # fmt: skip
        """The forward's blocks, looped over by ``num_programs(0)`` programs of q and of k,
        each summing its blocks' weight gradients (no atomics)."""
        which = tl.program_id(1)
        if which == 0:
            g_ptr, x_ptr, w_ptr, dx_ptr = gq_ptr, xq_ptr, wq_ptr, dxq_ptr
        else:
            g_ptr, x_ptr, w_ptr, dx_ptr = gk_ptr, xk_ptr, wk_ptr, dxk_ptr
        h = tl.arange(0, HP)[None, :, None]
        d = tl.arange(0, D)[None, None, :]
        w = tl.load(w_ptr + h * D + d, mask=h < H, other=0.0).to(tl.float32)
        dw = tl.zeros((HP, D), dtype=tl.float32)
        for block in range(tl.program_id(0), num_blocks, tl.num_programs(0)):
            video, offs, mask, t = _norm_rope_block(
                block, S, num_video, video_blocks, blocks, H, HP, D, BT
            )
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if video:  # the rotation's transpose
                table = _table_offsets(t, HV, HP, D)
                cos = tl.load(cv_ptr + table, mask=mask, other=0.0)
                sin = tl.load(sv_ptr + table, mask=mask, other=0.0)
                gn = g * cos - _rotated(g * sin, True, BT, HP, D)
            else:
                table = _table_offsets(t, 1, HP, D)
                cos = tl.load(ct_ptr + table, mask=mask, other=0.0)
                sin = tl.load(st_ptr + table, mask=mask, other=0.0)
                gn = g * cos - _rotated(g * sin, False, BT, HP, D)
            xr, r = _normalised(x, 1.0, EPS, H, D)
            dw += tl.sum(gn * xr, axis=0)
            u = gn * w
            dot = tl.sum(tl.sum(u * x, axis=2), axis=1)[:, None, None]
            dx = r * u - x * (r * r * r) * dot / (H * D)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_offs = (which * tl.num_programs(0) + tl.program_id(0)) * (H * D) + h * D + d
        tl.store(dw_ptr + tl.reshape(dw_offs, (HP, D)), dw, mask=tl.reshape(h < H, (HP, 1)))

    @triton.jit
    def _attn_tiles(
        ptr, b, h, start, n, stride_b, stride_s, stride_h, ROWS: tl.constexpr, D: tl.constexpr
    ):
        """Offsets and mask of rows ``start..start+ROWS`` of (batch b, head h), all channels."""
        r = start + tl.arange(0, ROWS)
        offs = b * stride_b + h * stride_h + r[:, None] * stride_s + tl.arange(0, D)[None, :]
        return ptr + offs, r[:, None] < n

    @triton.jit
    def _few_key_fwd(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, S, L, H,
        sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
        SCALE: tl.constexpr, D: tl.constexpr, LP: tl.constexpr, BM: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        start = tl.program_id(0) * BM
        kp, kmask = _attn_tiles(k_ptr, b, h, 0, L, skb, sks, skh, LP, D)
        vp, _ = _attn_tiles(v_ptr, b, h, 0, L, svb, svs, svh, LP, D)
        qp, qmask = _attn_tiles(q_ptr, b, h, start, S, sqb, sqs, sqh, BM, D)
        k = tl.load(kp, mask=kmask, other=0.0)
        v = tl.load(vp, mask=kmask, other=0.0)
        q = tl.load(qp, mask=qmask, other=0.0)
        keys = tl.arange(0, LP)[None, :] < L
        s = tl.where(keys, tl.dot(q, tl.trans(k)) * SCALE, float("-inf"))  # [BM, LP]
        m = tl.max(s, axis=1)
        p = tl.exp(s - m[:, None])
        den = tl.sum(p, axis=1)
        o = tl.dot(p.to(v.dtype), v) / den[:, None]
        op, omask = _attn_tiles(o_ptr, b, h, start, S, sob, sos, soh, BM, D)
        tl.store(op, o.to(o_ptr.dtype.element_ty), mask=omask)
        rows = start + tl.arange(0, BM)
        tl.store(lse_ptr + bh * S + rows, m + tl.log(den), mask=rows < S)

    @triton.jit
    def _few_key_bwd(
        q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr, S, L, H,
        sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, sdb, sds, sdh,
        SCALE: tl.constexpr, D: tl.constexpr, LP: tl.constexpr, BM: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        kp, kmask = _attn_tiles(k_ptr, b, h, 0, L, skb, sks, skh, LP, D)
        vp, vmask = _attn_tiles(v_ptr, b, h, 0, L, svb, svs, svh, LP, D)
        k = tl.load(kp, mask=kmask, other=0.0)
        v = tl.load(vp, mask=vmask, other=0.0)
        keys = tl.arange(0, LP)[None, :] < L
        dk = tl.zeros((LP, D), dtype=tl.float32)
        dv = tl.zeros((LP, D), dtype=tl.float32)
        for start in range(tl.program_id(0) * BM, S, tl.num_programs(0) * BM):
            qp, qmask = _attn_tiles(q_ptr, b, h, start, S, sqb, sqs, sqh, BM, D)
            op, omask = _attn_tiles(o_ptr, b, h, start, S, sob, sos, soh, BM, D)
            dop, domask = _attn_tiles(do_ptr, b, h, start, S, sdb, sds, sdh, BM, D)
            q = tl.load(qp, mask=qmask, other=0.0)
            o = tl.load(op, mask=omask, other=0.0).to(tl.float32)
            do = tl.load(dop, mask=domask, other=0.0)
            rows = start + tl.arange(0, BM)
            lse = tl.load(lse_ptr + bh * S + rows, mask=rows < S, other=0.0)
            s = tl.dot(q, tl.trans(k)) * SCALE
            p = tl.where(keys & qmask, tl.exp(s - lse[:, None]), 0.0)  # [BM, LP]
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            delta = tl.sum(o * do.to(tl.float32), axis=1)
            ds = (p * (dp - delta[:, None])).to(q.dtype)
            dq = tl.dot(ds, k) * SCALE
            dqp, dqmask = _attn_tiles(dq_ptr, b, h, start, S, sqb, sqs, sqh, BM, D)
            tl.store(dqp, dq.to(dq_ptr.dtype.element_ty), mask=dqmask)
            dk += tl.dot(tl.trans(ds), q)
        # this program's share of the keys' and values' gradients: (chunk, B * H, LP, D)
        part = (tl.program_id(0) * tl.num_programs(1) + bh) * LP * D
        offs = part + tl.arange(0, LP)[:, None] * D + tl.arange(0, D)[None, :]
        tl.store(dk_ptr + offs, dk * SCALE)
        tl.store(dv_ptr + offs, dv)

    # ---- the operators ---------------------------------------------------------------------

    def _rope_blocks(s: int, num_video: int, rows: int) -> tuple[int, int]:
        """Blocks of ``rows`` tokens over a sequence's video tokens, and over all its tokens
        (the video's, then the caption's)."""
        video = triton.cdiv(num_video, rows)
        return video, video + triton.cdiv(s - num_video, rows)

    @torch.library.triton_op("lightning_vigu::qk_norm_rope", mutates_args=())
    def _qk_norm_rope_op(
        q: Tensor, k: Tensor, wq: Tensor, wk: Tensor, cos_v: Tensor, sin_v: Tensor,
        cos_t: Tensor, sin_t: Tensor, num_video: int, eps: float,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        b, s, heads, d = q.shape
        rows = ROPE_TUNING["rows"]
        video_blocks, blocks = _rope_blocks(s, num_video, rows)
        yq, yk = torch.empty_like(q), torch.empty_like(k)
        torch.library.wrap_triton(_norm_rope_fwd)[(b * blocks, 2)](
            q, k, wq, wk, yq, yk, cos_v, sin_v, cos_t, sin_t, s, num_video, video_blocks, blocks,
            EPS=eps, H=heads, HP=_pow2(heads), D=d, HV=cos_v.shape[1], BT=rows,
            num_warps=ROPE_TUNING["warps"],
        )  # fmt: skip
        return yq, yk

    @torch.library.triton_op("lightning_vigu::qk_norm_rope_backward", mutates_args=())
    def _qk_norm_rope_backward_op(
        gq: Tensor, gk: Tensor, q: Tensor, k: Tensor, wq: Tensor, wk: Tensor,
        cos_v: Tensor, sin_v: Tensor, cos_t: Tensor, sin_t: Tensor, num_video: int, eps: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        b, s, heads, d = q.shape
        rows = ROPE_TUNING["backward_rows"]
        video_blocks, blocks = _rope_blocks(s, num_video, rows)
        programs = min(b * blocks, ROPE_TUNING["backward_programs"])
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dw = torch.empty(2, programs, heads * d, device=q.device, dtype=torch.float32)
        torch.library.wrap_triton(_norm_rope_bwd)[(programs, 2)](
            gq, gk, q, k, wq, wk, dq, dk, dw, cos_v, sin_v, cos_t, sin_t,
            s, num_video, video_blocks, blocks, b * blocks, EPS=eps,
            H=heads, HP=_pow2(heads), D=d, HV=cos_v.shape[1], BT=rows,
            num_warps=ROPE_TUNING["backward_warps"],
        )  # fmt: skip
        return dq, dk, dw[0].sum(0).to(wq.dtype), dw[1].sum(0).to(wk.dtype)

    def _qk_norm_rope_setup(ctx, inputs, output) -> None:
        *tensors, num_video, eps = inputs
        ctx.save_for_backward(*tensors)
        ctx.num_video, ctx.eps = num_video, eps

    def _qk_norm_rope_backward(ctx, gq: Tensor, gk: Tensor):
        grads = _qk_norm_rope_backward_op(
            gq.contiguous(), gk.contiguous(), *ctx.saved_tensors, ctx.num_video, ctx.eps
        )
        return *grads, None, None, None, None, None, None

    _qk_norm_rope_op.register_autograd(_qk_norm_rope_backward, setup_context=_qk_norm_rope_setup)

    def _strides(t: Tensor) -> tuple[int, int, int]:
        return t.stride(0), t.stride(1), t.stride(2)

    @torch.library.triton_op("lightning_vigu::few_key_attention", mutates_args=())
    def _few_key_op(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        b, s, heads, d = q.shape
        length = k.shape[1]
        o = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(b * heads, s, device=q.device, dtype=torch.float32)
        grid = (triton.cdiv(s, _ATTN_ROWS), b * heads)
        torch.library.wrap_triton(_few_key_fwd)[grid](
            q, k, v, o, lse, s, length, heads,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            SCALE=1.0 / math.sqrt(d), D=d, LP=max(16, _pow2(length)), BM=_ATTN_ROWS,
        )  # fmt: skip
        return o, lse

    @torch.library.triton_op("lightning_vigu::few_key_attention_backward", mutates_args=())
    def _few_key_backward_op(
        do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, s, heads, d = q.shape
        length, padded = k.shape[1], max(16, _pow2(k.shape[1]))
        chunks = max(1, min(triton.cdiv(s, _ATTN_ROWS), _ATTN_BACKWARD_PROGRAMS // (b * heads)))
        dq = torch.empty_like(q)  # q's strides, which the kernel writes it with
        dk = torch.empty(chunks, b, heads, padded, d, device=q.device, dtype=torch.float32)
        dv = torch.empty_like(dk)
        torch.library.wrap_triton(_few_key_bwd)[(chunks, b * heads)](
            q, k, v, o, do, lse, dq, dk, dv, s, length, heads,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do),
            SCALE=1.0 / math.sqrt(d), D=d, LP=padded, BM=_ATTN_ROWS,
        )  # fmt: skip
        # (chunks, B, H, LP, D) -> (B, L, H, D)
        dk, dv = (t.sum(0)[:, :, :length].transpose(1, 2) for t in (dk, dv))
        return dq, dk.to(k.dtype), dv.to(v.dtype)

    def _few_key_setup(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs, *output)

    def _few_key_backward(ctx, do: Tensor, _dlse: Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        return _few_key_backward_op(do.contiguous(), q, k, v, o, lse)

    _few_key_op.register_autograd(_few_key_backward, setup_context=_few_key_setup)


def _table(t: Tensor) -> Tensor:
    """A rope table ``(1, L, heads, D)`` as a contiguous float32 ``(L, heads, D)``."""
    return t[0].float().contiguous()


def qk_norm_rope(
    q: Tensor,
    k: Tensor,
    weight_q: Tensor,
    weight_k: Tensor,
    eps: float,
    rope_video: tuple[Tensor, Tensor] | None,
    rope_text: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """RMS-normalise ``q`` and ``k`` ``(B, S, H, D)`` over ``H * D`` (weights ``(H * D,)``),
    then rotate the first ``Lv`` tokens with the video's interleaved pairs (``rope_video``,
    cos and sin ``(1, Lv, 1 or H, D)``) and the rest with the caption's rotate-half
    (``rope_text``, ``(1, Lt, 1, D)``); ``S = Lv + Lt``, either part may be absent. The same
    values as ``norm`` followed by :func:`~lightning_vigu.model.embeddings.apply_rope_joint`,
    in the inputs' dtype."""
    return _qk_norm_rope_op(
        *norm_rope_arguments(q, k, weight_q, weight_k, eps, rope_video, rope_text)
    )


def norm_rope_arguments(
    q: Tensor,
    k: Tensor,
    weight_q: Tensor,
    weight_k: Tensor,
    eps: float,
    rope_video: tuple[Tensor, Tensor] | None,
    rope_text: tuple[Tensor, Tensor] | None,
) -> tuple:
    """:func:`qk_norm_rope`'s arguments checked and laid out as its operator
    (``torch.ops.lightning_vigu.qk_norm_rope``) takes them."""
    if rope_video is None and rope_text is None:
        raise ValueError("qk_norm_rope needs the video's or the caption's rope tables")
    num_video = rope_video[0].shape[1] if rope_video is not None else 0
    num_text = rope_text[0].shape[1] if rope_text is not None else 0
    if not fits(q.shape[-1]):
        raise ValueError(f"qk_norm_rope takes heads of 2^n >= 16 channels, got {q.shape[-1]}")
    if q.shape != k.shape or q.shape[1] != num_video + num_text:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must match and hold the rope's "
            f"{num_video} video and {num_text} caption tokens"
        )
    video = rope_video if rope_video is not None else rope_text  # a table that is never read
    text = rope_text if rope_text is not None else rope_video
    tables = (_table(t) for t in (*video, *text))
    return q.contiguous(), k.contiguous(), weight_q, weight_k, *tables, num_video, eps


def few_key_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention of ``q`` ``(B, S, H, D)`` to ``k``, ``v`` ``(B, L, H, D)`` with
    ``L <= MAX_KEYS`` (no mask, scale ``1/sqrt(D)``), returns ``(B, S, H, D)``."""
    if k.shape[1] > MAX_KEYS or not fits(q.shape[-1]):
        raise ValueError(
            f"few_key_attention takes at most {MAX_KEYS} keys and heads of 2^n >= 16 channels, "
            f"got {k.shape[1]} keys of {q.shape[-1]}"
        )
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("few_key_attention needs contiguous channels (stride 1 in the last dim)")
    return _few_key_op(q, k, v)[0]
