"""Precompute codec latents (and frozen prompt embeddings) once, as new WebDataset shards.

Usage::

    python -m datamodules.latent_cache --shards 'data/train-{000000..000009}.tar' --out data/latents \
        --codec lightning_vigu.codecs.PixelCodec --codec-args '{"factors": [1, 4, 4]}' \
        [--prompt-encoder lightning_vigu.text.encoders.UMT5PromptEncoder \
         --prompt-encoder-args '{"path": "/models/Wan2.1-T2V-1.3B-Diffusers"}'] \
        [--num-frames 16] [--size 32] [--device cpu|cuda] [--batch-size 8] [--dtype float16]

Each output sample holds ``latents.npy`` ``(c, t, h, w)``, optionally ``prompt_emb.npy``
``(L, D)``, stored as ``--dtype`` (default float16: half the disk, ~1e-3 relative error), plus
``txt`` (the prompt) and ``json`` (the source record with ``prompt``, ``caption`` and a
``latent_cache`` entry). :class:`~datamodules.webvideo.WebVideoDataModule` reads these shards
directly (``latents`` is detected). ``<out>/latent_cache.json`` records the settings.
Class paths are resolved with ``importlib``; nested ``{"class_path", "init_args"}`` dicts in
the JSON arguments are instantiated too.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from datamodules.sample_decoder import SampleDecoder, SkipCounter
from datamodules.webvideo import ShardStream, expand_shards, parse_size
from lightning_vigu.batch import collate_batch
from lightning_vigu.video_io import ClipSpec


def instantiate(class_path: str, init_args: dict[str, Any] | None = None) -> Any:
    """``module.Class(**init_args)``; dict values with a ``class_path`` are built first."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exn:
        raise ValueError(
            f"cannot import '{class_path}' ({exn}); give a full path like lightning_vigu.codecs.PixelCodec"
        ) from exn
    kwargs = {
        k: instantiate(v["class_path"], v.get("init_args"))
        if isinstance(v, dict) and "class_path" in v
        else v
        for k, v in (init_args or {}).items()
    }
    return cls(**kwargs)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def cache_latents(
    shards: str | Sequence[str],
    out: str | Path,
    codec: torch.nn.Module,
    prompt_encoder: torch.nn.Module | None = None,
    clip: ClipSpec | None = None,
    prompt_key: str = "txt",
    caption_key: str = "json:caption",
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float16",
    samples_per_shard: int = 100,
    num_workers: int = 0,
    info: dict | None = None,
    progress: bool = True,
) -> dict:
    """Encode every sample of ``shards`` and write latent shards to ``out/latents-NNNNNN.tar``.

    Args:
        shards: source shards (any pattern :func:`~datamodules.webvideo.expand_shards` takes).
        out: output folder.
        codec: a :class:`~lightning_vigu.codecs.LatentCodec` (frozen).
        prompt_encoder: a frozen :class:`~lightning_vigu.text.encoders.PromptEncoder`, or
            ``None`` to store no embeddings.
        clip: frames/rate/size cut from each video (clips are centred, deterministic).
        prompt_key: prompt member of the source shards.
        caption_key: caption member of the source shards.
        batch_size: videos per codec call.
        device: where the codec and encoder run.
        dtype: ``float16`` or ``float32`` storage of the arrays.
        samples_per_shard: samples per output tar.
        num_workers: DataLoader workers decoding the source videos.
        info: extra settings to record (class paths and arguments).
        progress: show a progress bar.

    Returns:
        The summary written to ``out/latent_cache.json`` (counts, shapes, skipped samples).
    """
    if prompt_encoder is not None and getattr(prompt_encoder, "trainable", False):
        raise ValueError(
            f"{type(prompt_encoder).__name__} is trainable: caching its outputs would freeze it. "
            "Cache only frozen encoders (e.g. UMT5PromptEncoder) and leave trainable ones in the model."
        )
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got '{dtype}'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    decoder = SampleDecoder(clip or ClipSpec(), prompt_key, caption_key, latents=False)
    counter = SkipCounter()
    stream = ShardStream(expand_shards(shards, "--shards"), decoder, counter=counter)
    loader = DataLoader(
        stream, batch_size=batch_size, collate_fn=collate_batch, num_workers=num_workers
    )
    codec = codec.to(device).eval().requires_grad_(False)
    if prompt_encoder is not None:
        prompt_encoder = prompt_encoder.to(device).eval().requires_grad_(False)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    settings = {"dtype": dtype, "clip": dataclasses.asdict(decoder.clip), **(info or {})}
    written, names, sink, latent_shape = 0, [], None, None
    with torch.no_grad():
        for batch in tqdm(loader, desc="latent cache", unit="batch", disable=not progress):
            latents = (
                codec.encode(batch["video"].to(device)).float().cpu().numpy()
            )  # (B, c, t, h, w)
            latent_shape = list(latents.shape[1:])
            emb = None
            if prompt_encoder is not None:
                emb = prompt_encoder(batch["prompt"]).float().cpu().numpy()  # (B, L, D)
            for i, key in enumerate(batch["key"]):
                if written % samples_per_shard == 0:
                    if sink is not None:
                        sink.close()
                    names.append(f"latents-{len(names):06d}.tar")
                    sink = wds.TarWriter(str(out / names[-1]), encoder=False)
                record = {
                    **batch["meta"][i],
                    "prompt": batch["prompt"][i],
                    "caption": batch["caption"][i],
                }
                record["latent_cache"] = settings
                sample = {
                    "__key__": key,
                    "latents.npy": _npy(latents[i].astype(np_dtype)),
                    "txt": batch["prompt"][i].encode(),
                    "json": json.dumps(record).encode(),
                }
                if emb is not None:
                    sample["prompt_emb.npy"] = _npy(emb[i].astype(np_dtype))
                sink.write(sample)
                written += 1
    if sink is not None:
        sink.close()
    if prompt_encoder is not None:  # read by PrecomputedPromptEncoder (CFG, video -> text)
        with torch.no_grad():
            torch.save(prompt_encoder([""])[0].float().cpu(), out / "empty_prompt_emb.pt")
    summary = {
        "written": written,
        "shards": names,
        "latent_shape": latent_shape,
        "skipped": counter.as_dict(),
        **settings,
    }
    (out / "latent_cache.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.latent_cache", description="Precompute latent-cache shards."
    )
    parser.add_argument(
        "--shards", required=True, help="source shards: path, brace pattern, glob, folder"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--codec", required=True, help="class path, e.g. lightning_vigu.codecs.PixelCodec"
    )
    parser.add_argument("--codec-args", default="{}", help="JSON init arguments of the codec")
    parser.add_argument(
        "--prompt-encoder", default=None, help="class path of a frozen prompt encoder"
    )
    parser.add_argument(
        "--prompt-encoder-args", default="{}", help="JSON init arguments of the encoder"
    )
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--fps", type=float, default=None)
    parser.add_argument("--frame-stride", type=int, default=1)
    parser.add_argument("--size", type=int, nargs="+", default=None, help="side, or height width")
    parser.add_argument("--prompt-key", default="txt")
    parser.add_argument("--caption-key", default="json:caption")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args(argv)
    codec_args, encoder_args = json.loads(args.codec_args), json.loads(args.prompt_encoder_args)
    size = (
        None
        if args.size is None
        else parse_size(args.size[0] if len(args.size) == 1 else args.size)
    )
    summary = cache_latents(
        args.shards,
        args.out,
        instantiate(args.codec, codec_args),
        instantiate(args.prompt_encoder, encoder_args) if args.prompt_encoder else None,
        ClipSpec(args.num_frames, args.fps, args.frame_stride, size),
        args.prompt_key,
        args.caption_key,
        args.batch_size,
        args.device,
        args.dtype,
        args.samples_per_shard,
        args.num_workers,
        info={
            "codec": args.codec,
            "codec_args": codec_args,
            "prompt_encoder": args.prompt_encoder,
            "prompt_encoder_args": encoder_args,
        },
    )
    print(
        f"wrote {summary['written']} samples (latents {summary['latent_shape']}, {args.dtype}) "
        f"in {len(summary['shards'])} shards to {args.out}; skipped {summary['skipped']}"
    )


if __name__ == "__main__":
    main()
