"""The Triton kernels of :mod:`lightning_vigu.model.kernels` against the PyTorch expressions they
replace, at the training step's shapes: forward + backward time and error.

    python -m benchmarks.kernels               # one GPU: the GPU preset's small and base, the twin
    python -m benchmarks.kernels --tune        # the norm + rope kernel's launch parameters
    TRITON_INTERPRET=1 python -m benchmarks.kernels --preset toy  # CPU: Triton's interpreter

Each row times one layer's worth of one part, forward and backward, as the training step runs
it (bf16 autocast): ``norm + rope`` (the self-attention's q/k RMS norms and rotary embedding
over ``[video | caption]``; the PyTorch expression compiled with ``torch.compile``, as
``model.compile: step`` runs it) and ``prompt attention`` (the cross-attention of every token
to the prompt; SDPA, cuDNN on Hopper). ``max_err_*``: the largest absolute difference of the
output and of the first input's gradient from the same computation in float64; the PyTorch
path's own error is the scale of bf16 rounding the kernel's is compared with.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import markdown_table, timed, write_results
from benchmarks.step_profile import profile_steps
from benchmarks.train_loop import textbook_rope
from lightning_vigu.model import kernels
from lightning_vigu.model.attention import WanAttention
from lightning_vigu.model.embeddings import TextRope1D, VideoRope3D, VideoRopeMixed


@dataclass
class Shape:
    """One case: batch, video grid (frames, rows, columns of tokens), caption and prompt tokens,
    heads, head width, and the video rope (``axial`` or ``mixed``)."""

    name: str
    batch: int
    grid: tuple[int, int, int]
    caption: int
    prompt: int
    heads: int
    head_dim: int
    rope: str = "axial"


PRESETS = {
    "gpu": [
        Shape("small, GPU preset", 64, (16, 8, 8), 64, 32, 6, 64),
        Shape("base, GPU preset", 64, (16, 8, 8), 64, 32, 8, 64),
        Shape("small, quality twin", 256, (16, 4, 4), 0, 32, 6, 64, rope="mixed"),
    ],
    "toy": [
        Shape("toy", 2, (2, 2, 3), 5, 7, 3, 16),
        Shape("toy mixed", 2, (2, 2, 2), 0, 20, 2, 16),
    ],
}


def rope_tables(shape: Shape, device: torch.device):
    """The video's and the caption's rope tables of ``shape`` (``None`` for no caption)."""
    d = shape.head_dim
    video = VideoRope3D(d, (1, 2, 2), 1024) if shape.rope == "axial" else None
    video = video or VideoRopeMixed(d, shape.heads, 1024)
    text = TextRope1D(d)(shape.caption, device) if shape.caption else None
    return video.to(device)(shape.grid), text


def gpu_ms(fn, iters: int) -> float:
    """Milliseconds of GPU kernels a call of ``fn`` (a profiler trace of ``iters`` calls: the
    kernels' own time, not the host's launches); on the CPU, wall clock."""
    if not torch.cuda.is_available():
        return timed(fn, warmup=1, iters=iters) * 1e3
    fn()
    return profile_steps(lambda i, part: fn(), steps=iters)["gpu_ms"]


def measure(step, iters: int, ref, ref_grad, **row) -> dict:
    """A table row: ``step()`` (returning its outputs and the first input's gradient) timed,
    and its largest errors from the float64 ``ref`` outputs and ``ref_grad``."""
    out, grad = step()
    out = out if isinstance(out, (tuple, list)) else [out]
    return dict(
        row,
        ms=gpu_ms(step, iters),
        wall_ms=timed(step, warmup=2, iters=iters) * 1e3,
        max_err_out=_max_err(out, ref),
        max_err_grad=_max_err([grad], [ref_grad]),
    )


def _max_err(outputs, reference) -> float:
    return max(float((a.double() - b).abs().max()) for a, b in zip(outputs, reference))


def norm_rope_row(shape: Shape, device: torch.device, iters: int) -> list[dict]:
    """``norm + rope``: the compiled PyTorch expression and the kernel, forward + backward."""
    b, (f, h, w), heads, d = shape.batch, shape.grid, shape.heads, shape.head_dim
    seq, inner = f * h * w + shape.caption, heads * d
    rope_video, rope_text = rope_tables(shape, device)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, gq, gk = (
        torch.randn(b, seq, inner, generator=g).to(device, torch.bfloat16) for _ in "1234"
    )
    q.requires_grad_(True)
    k.requires_grad_(True)
    norms = [nn.RMSNorm(inner, eps=1e-6).to(device) for _ in range(2)]
    for n in norms:
        nn.init.uniform_(n.weight, 0.5, 1.5)

    def torch_path(q, k, norms, rope_video, rope_text):  # the model's PyTorch path
        return tuple(
            WanAttention._rope(n(x).unflatten(-1, (heads, d)), rope_video, rope_text)
            for n, x in zip(norms, (q, k))
        )

    def ref_path(q, k):
        cos_v, sin_v = (t.double() for t in rope_video)
        text = tuple(t.double() for t in rope_text) if rope_text else None
        out = []
        for n, x in zip(norms, (q, k)):
            x = x.double()
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * n.weight.double()
            x = x.unflatten(-1, (heads, d))
            out.append(textbook_rope(x, (cos_v, sin_v), text))
        return out

    compiled = torch.compile(torch_path)
    qd, kd = (t.detach().double().requires_grad_(True) for t in (q, k))
    ref = ref_path(qd, kd)
    grads = [t.unflatten(-1, (heads, d)).double() for t in (gq, gk)]
    ref_grad = torch.autograd.grad(ref, [qd], grads)[0]
    ref = [t.detach() for t in ref]
    rows = []
    for path in ("torch", "triton"):

        def step(path=path):
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                if path == "torch":
                    out = compiled(q, k, norms, rope_video, rope_text)
                else:
                    out = kernels.qk_norm_rope(
                        q.unflatten(-1, (heads, d)), k.unflatten(-1, (heads, d)),
                        norms[0].weight, norms[1].weight, 1e-6, rope_video, rope_text,
                    )  # fmt: skip
            grads = [t.unflatten(-1, (heads, d)).to(o.dtype) for t, o in zip((gq, gk), out)]
            return out, torch.autograd.grad(out, [q], grads)[0]

        rows.append(
            measure(step, iters, ref, ref_grad, case=shape.name, part="norm + rope", path=path)
        )
    return rows


TUNE_GRID = {
    "forward": [dict(rows=r, warps=w) for r, w in ((4, 2), (8, 2), (8, 4), (16, 4))],
    "backward": [
        dict(backward_rows=r, backward_warps=w, backward_programs=n)
        for r in (2, 4, 8)
        for w in (2, 4)
        for n in (1024, 2048, 4096)
    ],
}
"""The launch parameters ``--tune`` tries (:data:`kernels.ROPE_TUNING`'s keys)."""


def tune_rows(shape: Shape, device: torch.device, iters: int) -> list[dict]:
    """The norm + rope kernel's forward and backward alone (GPU ms a call) for each launch
    configuration of :data:`TUNE_GRID`, the others at :data:`kernels.ROPE_TUNING`'s values."""
    b, (f, h, w), heads, d = shape.batch, shape.grid, shape.heads, shape.head_dim
    seq, dtype = f * h * w + shape.caption, torch.bfloat16 if device.type == "cuda" else None
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, gq, gk = (torch.randn(b, seq, heads, d, generator=g).to(device, dtype) for _ in "1234")
    weights = [torch.rand(heads * d, generator=g).to(device) + 0.5 for _ in "qk"]
    args = kernels.norm_rope_arguments(q, k, *weights, 1e-6, *rope_tables(shape, device))
    ops = torch.ops.lightning_vigu
    calls = {
        "forward": lambda: ops.qk_norm_rope(*args),
        "backward": lambda: ops.qk_norm_rope_backward(gq, gk, *args),
    }
    default, rows = dict(kernels.ROPE_TUNING), []
    try:
        for part, configs in TUNE_GRID.items():
            for config in configs:
                kernels.ROPE_TUNING.update(default, **config)
                ms = gpu_ms(calls[part], iters)
                current = all(default[key] == value for key, value in config.items())
                config = ", ".join(f"{key}={value:g}" for key, value in config.items())
                rows.append(dict(case=shape.name, part=part, config=config, ms=ms, now=current))
    finally:
        kernels.ROPE_TUNING.update(default)
    return rows


def prompt_attention_row(shape: Shape, device: torch.device, iters: int) -> list[dict]:
    """``prompt attention``: SDPA and the few-key kernel, forward + backward."""
    b, (f, h, w), heads, d = shape.batch, shape.grid, shape.heads, shape.head_dim
    seq = f * h * w + shape.caption
    g = torch.Generator(device="cpu").manual_seed(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, do = (torch.randn(b, seq, heads, d, generator=g).to(device, dtype) for _ in "12")
    k, v = (torch.randn(b, shape.prompt, heads, d, generator=g).to(device, dtype) for _ in "12")
    for t in (q, k, v):
        t.requires_grad_(True)

    def sdpa(q, k, v):
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        return out.transpose(1, 2)

    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = sdpa(qd, kd, vd)
    ref_grad = torch.autograd.grad(ref, [qd], [do.double()])[0]
    rows = []
    for path, fn in (("torch", sdpa), ("triton", kernels.few_key_attention)):

        def step(fn=fn):
            out = fn(q, k, v)
            return out, torch.autograd.grad(out, [q], [do])[0]

        rows.append(
            measure(
                step, iters, [ref], ref_grad, case=shape.name, part="prompt attention", path=path
            )
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="gpu", choices=sorted(PRESETS))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--tag", default="", help="suffix of the results' file names")
    p.add_argument("--tune", action="store_true", help="time the norm + rope kernel's launches")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1 (Triton's interpreter, toy shapes)")
    if a.tune:
        return tune(a, device)
    rows = []
    for shape in PRESETS[a.preset]:
        for measure in (norm_rope_row, prompt_attention_row):
            rows += measure(shape, device, a.iters)
            print(markdown_table(rows[-2:], list(rows[-1])), flush=True)
    by = {(r["case"], r["part"], r["path"]): r for r in rows}
    for r in rows:
        r["speedup"] = by[(r["case"], r["part"], "torch")]["ms"] / r["ms"]
    columns = ["case", "part", "path", "ms", "speedup", "wall_ms", "max_err_out", "max_err_grad"]
    table = markdown_table(rows, columns)
    note = (
        "\n\nOne layer's part, forward + backward, bf16 autocast on the GPU (float32 under "
        "Triton's interpreter on the CPU); `torch`: the compiled PyTorch expression (norm + "
        "rope) or SDPA (prompt attention). `ms`: the GPU's kernels a call (profiler trace; "
        "wall clock on the CPU), `wall_ms`: a call eagerly, the host's launches included; "
        "`max_err_*`: largest absolute difference from float64."
    )
    write_results(f"kernels{a.tag}", {"rows": rows}, table + note, a.out)
    print(table)


def tune(a: argparse.Namespace, device: torch.device) -> None:
    """``--tune``: every shape's launch configurations, fastest first within a part."""
    rows = []
    for shape in PRESETS[a.preset]:
        found = tune_rows(shape, device, a.iters)
        rows += sorted(found, key=lambda r: (r["part"] != "forward", r["ms"]))
        print(markdown_table(rows[-len(found) :], list(found[0])), flush=True)
    note = (
        "\n\nThe norm + rope kernel's forward and backward alone, GPU ms a call (profiler "
        "trace), for each launch configuration (`kernels.ROPE_TUNING`'s keys; the others at "
        "their values); `now`: the configuration the model runs with."
    )
    write_results(
        f"kernels_tune{a.tag}", {"rows": rows}, markdown_table(rows, list(rows[0])) + note, a.out
    )


if __name__ == "__main__":
    main()
