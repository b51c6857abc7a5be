"""Throughput suite: step time, peak memory and MFU of the unified model vs diffusers' Wan.

    python -m benchmarks.throughput --preset wan1.3b --out benchmarks/results     # on one H100
    python -m benchmarks.throughput --preset toy                                  # CPU smoke test

Every comparison (ours vs diffusers' ``WanTransformer3DModel``, unified vs video-only,
attention backends, ``torch.compile``) is measured in the same process, so ratios are honest.
Weights are random, bf16 on GPU; a "train step" is forward + backward of a velocity MSE
(the optimiser update is excluded, as in the reference numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table, timed, write_results
from benchmarks.flops import device_rates, failure, forward_flops, train_flops
from lightning_vigu.model import build_model, model_config


@dataclass
class Shape:
    """One benchmark input: latent frames/height/width, caption and context lengths, batch."""

    frames: int
    height: int
    width: int
    caption: int
    context: int
    batch: int = 1
    label: str = ""


PRESETS = {
    # Wan2.1 VAE latents: 81x480x832 -> 21x60x104 (32,760 tokens), 17 frames -> 5x60x104 (7,800)
    "wan1.3b": dict(
        size="wan1.3b",
        shapes=[
            Shape(21, 60, 104, 256, 512, label="81x480x832"),
            Shape(5, 60, 104, 256, 512, label="17x480x832"),
        ],
        latency_steps=[5, 20],
    ),
    "small": dict(
        size="small",
        shapes=[
            Shape(16, 16, 16, 48, 32, 16, label="16x64x64 (pixel codec), batch 16"),
            Shape(16, 16, 16, 48, 32, 64, label="16x64x64 (pixel codec), batch 64"),
        ],
    ),
    "tiny": dict(
        size="tiny",
        shapes=[
            Shape(16, 8, 8, 32, 32, 8, label="16x32x32 (pixel codec), batch 8"),
            Shape(16, 16, 16, 32, 32, 8, label="16x64x64 (pixel codec), batch 8"),
        ],
        latency_steps=[20, 50],
    ),
    "toy": dict(size="tiny", shapes=[Shape(2, 4, 4, 8, 8, 2, label="toy")], latency_steps=[2, 4]),
}


def _device_dtype():
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def build(impl: str, size: str, device, dtype, ckpt_blocks: int):
    """``ours`` (unified), ``ours-video`` (no caption stream) or ``diffusers`` (the reference)."""
    cfg = model_config(size)
    if impl == "diffusers":
        from diffusers import WanTransformer3DModel

        with torch.device(device):
            m = WanTransformer3DModel(
                patch_size=cfg.patch_size,
                num_attention_heads=cfg.num_attention_heads,
                attention_head_dim=cfg.attention_head_dim,
                in_channels=cfg.in_channels,
                out_channels=cfg.out_channels,
                text_dim=cfg.text_dim,
                freq_dim=cfg.freq_dim,
                ffn_dim=cfg.ffn_dim,
                num_layers=cfg.num_layers,
            )
        if ckpt_blocks:
            m.enable_gradient_checkpointing()
    else:
        with torch.device(device):
            m = build_model(size, vocab_size=None if impl == "ours-video" else cfg.vocab_size)
        if ckpt_blocks:
            m.enable_gradient_checkpointing(ckpt_blocks)
    return m.to(dtype)


def inputs(impl: str, cfg, shape: Shape, device, dtype):
    b = shape.batch
    video = torch.randn(
        b, cfg.in_channels, shape.frames, shape.height, shape.width, device=device, dtype=dtype
    )
    ctx = torch.randn(b, shape.context, cfg.text_dim, device=device, dtype=dtype)
    t = torch.full((b,), 500.0, device=device)
    text = (
        torch.randint(0, cfg.vocab_size, (b, shape.caption), device=device)
        if impl == "ours"
        else None
    )
    return video, t, ctx, text


def run_model(impl: str, m, video, t, ctx, text):
    if impl == "diffusers":
        return m(video, t, ctx).sample, None
    out = m(video, t, ctx, text=text, t_text=t) if text is not None else m(video, t, ctx)
    return (out.velocity, out.text_logits) if text is not None else (out, None)


def measure(
    impl: str,
    size: str,
    shape: Shape,
    *,
    train: bool = True,
    ckpt_blocks: int = 0,
    compile: bool = False,
    backend=None,
    iters: int = 3,
    warmup: int = 2,
) -> dict:
    """Time one configuration; returns a result row (``error`` set when it failed, e.g. OOM)."""
    device, dtype = _device_dtype()
    cfg = model_config(size)
    row = {
        "impl": impl,
        "size": size,
        "shape": shape.label,
        "batch": shape.batch,
        "train": train,
        "ckpt_blocks": ckpt_blocks,
        "compile": compile,
        "backend": backend or "default",
    }
    m = None
    try:
        m = build(impl, size, device, dtype, ckpt_blocks)
        if compile:
            for blk in m.blocks:
                blk.compile()
        video, t, ctx, text = inputs(impl, cfg, shape, device, dtype)

        def step():
            with contextlib.ExitStack() as stack:
                if backend is not None:
                    from torch.nn.attention import sdpa_kernel

                    stack.enter_context(sdpa_kernel(backend))
                if not train:
                    stack.enter_context(torch.no_grad())
                v, logits = run_model(impl, m, video, t, ctx, text)
                if train:
                    loss = F.mse_loss(v.float(), video.float())
                    if logits is not None:
                        loss = loss + logits.float().logsumexp(-1).mean()
                    loss.backward()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec = timed(step, warmup, iters)
        n_video = shape.frames * shape.height * shape.width // 4
        n_text = shape.caption if impl == "ours" else 0
        flops = (train_flops if train else forward_flops)(
            cfg if impl == "ours" else model_config(size, vocab_size=None),
            n_video,
            n_text,
            shape.context,
            shape.batch,
        )
        row.update(
            seconds=sec,
            tokens_per_s=shape.batch * (n_video + n_text) / sec,
            tflops=flops / sec / 1e12,
        )
        row.update(device_rates(flops, sec))
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as exn:  # a backend or compile failure is a result, not a crash
        row["error"] = failure(exn)
    finally:
        m = None  # free the model before the next configuration
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return row


def latency(size: str, shape: Shape, steps: list[int], batch: int = 1) -> list[dict]:
    """Sampling latency per video: captioning (video -> text) and text -> video, vs steps.

    Runs the real :class:`UnifiedSampler` (jump sampler for captions; Euler with CFG for video,
    the conditional and unconditional halves in one forward of twice the batch) on the
    random-weight model in bf16 under ``no_grad``. With causal captions
    (``model.caption_objective: autoregressive``) a caption of ``shape.caption`` tokens is
    written one token a pass, by the sampler (``caption_causal``: the video read once into a
    :class:`~lightning_vigu.model.attention.VideoMemory`, then passes over the caption alone)
    and by full passes over video and caption (``caption_causal_full``); both draw the same
    tokens, so the ratio of the two rows is the memory's saving.
    """
    from lightning_vigu.flows import discrete
    from lightning_vigu.flows.causal import CausalCaptions
    from lightning_vigu.flows.convention import FlowTimeModel
    from lightning_vigu.flows.sampling import SamplerConfig, UnifiedSampler

    device, dtype = _device_dtype()
    cfg = model_config(size)
    shape = Shape(**{**vars(shape), "batch": batch})
    m = build("ours", size, device, dtype, 0).eval()
    with torch.device(device):
        causal = build_model(size, causal_captions=True).to(dtype).eval()
    video, _, ctx, _ = inputs("ours", cfg, shape, device, dtype)
    path = discrete.MixtureDiscretePath("uniform", cfg.vocab_size)
    causal_path = CausalCaptions(cfg.vocab_size, eos_id=cfg.vocab_size - 1)

    def sample(task: str, n: int) -> None:
        sampler = UnifiedSampler(
            FlowTimeModel(m),
            path,
            SamplerConfig(video_steps=n, text_steps=n, guidance_scale=5.0),
        )
        gen = torch.Generator(device).manual_seed(0)
        flow, ones = FlowTimeModel(causal), torch.ones(batch, device=device)
        with torch.no_grad(), torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            if task == "caption":
                sampler.caption(video, ctx, shape.caption, generator=gen)
            elif task == "caption_causal":
                UnifiedSampler(flow, causal_path, SamplerConfig(temperature=1.0)).caption(
                    video, ctx, shape.caption, generator=gen
                )
            elif task == "caption_causal_full":
                causal_path.decode(
                    lambda canvas: flow(video, ones, ctx, canvas, ones).text_logits,
                    batch, shape.caption, device, 1.0, gen,
                )  # fmt: skip
            else:
                sampler.generate_video(ctx, tuple(video.shape[1:]), ctx, generator=gen)

    rows = []
    for task in ("caption", "t2v", "caption_causal", "caption_causal_full"):
        sample(task, 1)  # warm-up: kernels, allocator
        for n in [shape.caption] if task.startswith("caption_causal") else steps:
            sec = timed(functools.partial(sample, task, n), 0, 1)
            row = {
                "task": task,
                "size": size,
                "shape": shape.label.split(", batch")[0],
                "batch": batch,
                "steps": n,
                "seconds_per_video": sec / batch,
                "ms_per_step": 1e3 * sec / n,
            }
            print(row, flush=True)
            rows.append(row)
    m = None
    gc.collect()
    return rows


def largest_batch(impl: str, size: str, shape: Shape, ckpt_blocks: int, limit: int = 64) -> int:
    """Largest power-of-two batch whose train step fits (0 if none)."""
    best, b = 0, 1
    while b <= limit:
        r = measure(
            impl,
            size,
            Shape(**{**vars(shape), "batch": b}),
            ckpt_blocks=ckpt_blocks,
            iters=1,
            warmup=1,
        )
        if "error" in r:
            break
        best, b = b, b * 2
    return best


def backends():
    """SDPA kernel choices available in this torch."""
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="toy", choices=sorted(PRESETS))
    p.add_argument(
        "--suites",
        nargs="+",
        default=["train", "overhead", "backends", "inference"],
        choices=["train", "overhead", "backends", "compile", "inference", "maxbatch", "latency"],
    )
    p.add_argument(
        "--ckpt",
        nargs="+",
        type=int,
        default=None,
        help="gradient-checkpointed block counts to try (default: all blocks and 0)",
    )
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    a = p.parse_args(argv)
    preset = PRESETS[a.preset]
    size, shapes = preset["size"], preset["shapes"]
    layers = model_config(size).num_layers
    ckpts = a.ckpt if a.ckpt is not None else [layers, 0]
    rows: list[dict] = []
    latencies: list[dict] = []
    for shape in shapes:
        if "latency" in a.suites:
            latencies += latency(size, shape, preset.get("latency_steps", [10, 20, 50, 100]))
        if "train" in a.suites:
            for ck in ckpts:
                for impl in ("diffusers", "ours-video", "ours"):
                    rows.append(measure(impl, size, shape, ckpt_blocks=ck, iters=a.iters))
        if "overhead" in a.suites and "train" not in a.suites:
            for impl in ("ours-video", "ours"):
                rows.append(measure(impl, size, shape, ckpt_blocks=ckpts[0], iters=a.iters))
        if "compile" in a.suites:
            rows.append(
                measure("ours", size, shape, ckpt_blocks=ckpts[0], compile=True, iters=a.iters)
            )
        if "inference" in a.suites:
            for impl in ("diffusers", "ours-video", "ours"):
                rows.append(measure(impl, size, shape, train=False, iters=a.iters))
        if "backends" in a.suites and torch.cuda.is_available():
            for name, be in backends().items():
                if name != "math":
                    r = measure(
                        "ours-video", size, shape, ckpt_blocks=ckpts[0], backend=be, iters=a.iters
                    )
                    r["backend"] = name
                    rows.append(r)
        if "maxbatch" in a.suites:
            for ck in ckpts:
                rows.append(
                    {
                        "impl": "ours",
                        "size": size,
                        "shape": shape.label,
                        "ckpt_blocks": ck,
                        "max_batch": largest_batch("ours", size, shape, ck),
                    }
                )
    ratios = overhead_ratios(rows)
    cols = [
        "impl",
        "shape",
        "batch",
        "train",
        "ckpt_blocks",
        "compile",
        "backend",
        "seconds",
        "peak_gib",
        "tflops",
        "mfu",
        "tokens_per_s",
        "max_batch",
        "error",
    ]
    table = (
        markdown_table(rows, cols)
        + "\n\n"
        + markdown_table(
            ratios, ["shape", "train", "ckpt_blocks", "ours_over_diffusers", "unified_over_video"]
        )
    )
    if latencies:
        table += (
            "\n\nSampling latency (batch 1, random weights, bf16 on GPU, float32 on CPU; "
            "caption_causal*: steps = caption tokens):\n\n"
            + markdown_table(
                latencies, ["task", "shape", "steps", "seconds_per_video", "ms_per_step"]
            )
        )
    path = write_results(
        f"throughput_{a.preset}{a.tag}",
        {"preset": a.preset, "rows": rows, "ratios": ratios, "latency": latencies},
        table,
        a.out,
    )
    print(table)
    print(f"wrote {path}")


def overhead_ratios(rows: list[dict]) -> list[dict]:
    """Step-time ratios measured in this run: ours/diffusers and unified/video-only."""
    out = []
    keys = {
        (r.get("shape"), r.get("train"), r.get("ckpt_blocks"))
        for r in rows
        if "seconds" in r and r.get("backend") == "default" and not r.get("compile")
    }
    for key in sorted(keys, key=str):
        by = {
            r["impl"]: r["seconds"]
            for r in rows
            if (r.get("shape"), r.get("train"), r.get("ckpt_blocks")) == key
            and "seconds" in r
            and r.get("backend") == "default"
            and not r.get("compile")
        }
        ratio = {"shape": key[0], "train": key[1], "ckpt_blocks": key[2]}
        if "diffusers" in by and "ours-video" in by:
            ratio["ours_over_diffusers"] = by["ours-video"] / by["diffusers"]
        if "ours" in by and "ours-video" in by:
            ratio["unified_over_video"] = by["ours"] / by["ours-video"]
        out.append(ratio)
    return out


if __name__ == "__main__":
    main()
