"""Sampling outside training: a module from a ``.ckpt`` or a Wan2.1 folder (+ released weights),
batched generation / captioning in a chosen dtype, and mp4 files that play everywhere.

Both sources give a :class:`~lightning_vigu.module.UniViGU`, so ``generate`` and ``caption``
run the same samplers whichever weights they use:

* :func:`~lightning_vigu.cli.load_module` -- a checkpoint written by ``fit``;
* :func:`module_from_wan_folder` -- Wan2.1's VAE, umT5 encoder and tokenizer with either the
  folder's own transformer (a video-only generator) or released Uni-ViGU weights
  (``checkpoint``), as the official ``inference_unified_wan.py`` loads them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_vigu.flows import FlowTimeModel, SamplerConfig
from lightning_vigu.module import UniViGU
from lightning_vigu.pretrained import _as_dtype, load_wan_folder
from lightning_vigu.video_io import encode_video, to_uint8

#: the official script's settings (REFERENCE.md): 81 frames at 480x832, 100 steps, CFG 5, shift 3
WAN_VIDEO_SHAPE = (81, 480, 832)
WAN_SAMPLER = SamplerConfig(video_steps=100, text_steps=100, shift=3.0, guidance_scale=5.0)
VIDEO_FORMATS = {  # name -> (pixel format, x264 options)
    "h264": ("yuv420p", {"crf": "18"}),  # plays in browsers and common players
    "lossless": ("yuv444p", {"crf": "0"}),  # exact colours (what the synthetic world stores)
}


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def module_from_wan_folder(
    folder: str | Path,
    checkpoint: str | Path | None = None,
    *,
    caption_source: str = "uniform",
    caption_length: int = 256,
    prompt_length: int = 512,
    normalize_latents: bool | None = None,
    video_shape: tuple[int, int, int] = WAN_VIDEO_SHAPE,
    sampler: SamplerConfig | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_pickle: bool = False,
) -> UniViGU:
    """A sampling-ready module around a Wan2.1 folder (see :func:`load_wan_folder`).

    With a ``checkpoint`` (the Uni-ViGU release format) the module captions and generates
    jointly as a Capability-Refinement model (joint generation sees the prompt, as the official
    ``t2vt`` mode); without one it is the folder's video-only generator.
    """
    from accelerate import init_empty_weights

    from lightning_vigu.text import HFTokenizer

    parts = load_wan_folder(
        folder,
        checkpoint=checkpoint,
        caption=checkpoint is not None,
        caption_source=caption_source,
        normalize_latents=normalize_latents,
        dtype=dtype,
        device=device,
        prompt_length=prompt_length,
        trust_pickle=trust_pickle,
    )
    config = parts.model.config
    overrides = {k: v for k, v in vars(config).items() if k != "vocab_size"}
    overrides.pop("mask_token")
    tokenizer = parts.tokenizer or HFTokenizer(str(Path(folder) / "tokenizer"))
    # the module's own transformer is built without memory and replaced by the loaded one
    with init_empty_weights(include_buffers=False):
        module = UniViGU(
            size="wan1.3b",
            model_overrides=overrides,
            caption_stream=parts.model.has_text,
            codec=parts.codec,
            tokenizer=tokenizer,
            prompt_encoder=parts.prompt_encoder,
            caption_length=caption_length,
            caption_source=caption_source,
            phase="refine" if parts.model.has_text else "generator",
            sampler=sampler or WAN_SAMPLER,
            video_shape=video_shape,
        )
    module.model = parts.model
    module.flow = FlowTimeModel(parts.model, "velocity")  # Wan and the release predict velocity
    return module.eval().to(device)


@contextlib.contextmanager
def precision(module: UniViGU, dtype: str) -> Iterator[None]:
    """Run sampling in ``dtype``: the transformer's weights are cast to it and its matmuls
    autocast (inputs, the noise and latents stay float32 and are cast at each layer)."""
    dt = _as_dtype(dtype)
    if dt == torch.float32:
        yield
        return
    module.model.to(dt)
    with torch.autocast(module.device.type, dtype=dt):
        yield


def batches(items: Sequence, size: int) -> Iterator[tuple[int, list]]:
    """``(index of the batch, items)`` in chunks of ``size``."""
    if size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {size}")
    for k, start in enumerate(range(0, len(items), size)):
        yield k, list(items[start : start + size])


def write_mp4(path: str | Path, video: Tensor, fps: int, video_format: str = "h264") -> Path:
    """Write one video ``(3, T, H, W)`` in [-1, 1] as mp4.

    ``h264`` is H.264 yuv420p (crf 18), which browsers and common players decode; odd heights or
    widths are padded by one edge row/column since 4:2:0 chroma needs even sizes. ``lossless``
    is H.264 yuv444p crf 0 (exact colours, fewer players).
    """
    if video_format not in VIDEO_FORMATS:
        raise ValueError(
            f"unknown video format '{video_format}'; choose one of {list(VIDEO_FORMATS)}"
        )
    pix_fmt, options = VIDEO_FORMATS[video_format]
    frames = to_uint8(video)  # (T, H, W, 3)
    if pix_fmt == "yuv420p":
        _, h, w, _ = frames.shape
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = Path(path)
    path.write_bytes(encode_video(frames, fps=fps, pix_fmt=pix_fmt, options=dict(options)))
    return path
