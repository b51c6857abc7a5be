"""Knowledge Recall data for free: sample videos from a pretrained generator for a prompt list.

A video the generator made for a prompt is a valid (video, prompt) pair for the recall phase.
This writes them as WebDataset shards, one sample per prompt::

    KEY.mp4    the decoded video (PyAV, lossless x264 by default)
    KEY.txt    the prompt
    KEY.json   {"prompt", "seed", "negative_prompt", "steps", "guidance_scale", "shift",
                "num_frames", "height", "width", "fps", "caption_length", "generator"}

Usage::

    python -m datamodules.generate_shards --prompts prompts.txt --out data/recall \\
        --wan-folder /models/Wan2.1-T2V-1.3B-Diffusers [--checkpoint uni-vigu.pth] \\
        --steps 50 --guidance 5 --seed 0 --num-frames 81 --height 480 --width 832

Sample ``i`` uses the seed ``seed + i``, so any sample can be regenerated alone.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lightning_vigu.flows import SamplerConfig
from lightning_vigu.pretrained import WanParts, load_wan_folder
from lightning_vigu.video_io import encode_video, to_uint8

SHARD_PATTERN = "shard-%06d.tar"


@dataclass
class GenerationSettings:
    """What each video is generated with (written into every ``KEY.json``).

    ``caption_length`` is the canvas of a model with a caption stream (a Uni-ViGU checkpoint):
    as in the reference text-to-video inference, it holds the clean prompt tokens.
    """

    steps: int = 50
    guidance_scale: float = 5.0
    shift: float = 3.0
    num_frames: int = 81
    height: int = 480
    width: int = 832
    fps: int = 16
    negative_prompt: str = ""
    caption_length: int = 256


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line of a text file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file '{path}' does not exist (one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file '{path}' has no non-empty line")
    return prompts


def _check_geometry(parts: WanParts, settings: GenerationSettings) -> tuple[int, int, int, int]:
    """The latent shape ``(c, t, h, w)`` of the requested videos, with clear errors."""
    codec, patch = parts.codec, parts.model.config.patch_size
    ft, fh, fw = codec.factors
    if codec.video_frames(codec.latent_frames(settings.num_frames)) != settings.num_frames:
        raise ValueError(
            f"--num-frames {settings.num_frames} is not a frame count the codec produces "
            f"(Wan VAE: {ft}n + 1, e.g. 5, 17, 81)"
        )
    shape = codec.latent_shape(settings.num_frames, settings.height, settings.width)
    for name, size, f, p in zip(("height", "width"), shape[2:], (fh, fw), patch[1:]):
        if size * f != getattr(settings, name) or size % p:
            raise ValueError(
                f"--{name} {getattr(settings, name)} must be a multiple of {f * p} "
                f"(codec factor {f} x patch size {p})"
            )
    return shape


@torch.no_grad()
def generate_shards(
    parts: WanParts,
    prompts: Sequence[str],
    out: str | Path,
    settings: GenerationSettings | None = None,
    seed: int = 0,
    samples_per_shard: int = 100,
    generator_name: str = "",
    crf: int = 0,
    progress: bool = True,
) -> list[Path]:
    """Generate one video per prompt and write WebDataset shards into ``out``.

    Args:
        parts: the loaded generator, codec and prompt encoder.
        prompts: the prompts, in order (sample ``i`` gets key ``{i:08d}`` and seed ``seed + i``).
        out: output folder (must not hold shards already).
        settings: sampling and video settings.
        seed: base seed.
        samples_per_shard: samples per tar file.
        generator_name: recorded in each json (e.g. the checkpoint's file name).
        crf: x264 quality (0 = lossless; 17-23 gives much smaller files).
        progress: show a progress bar.

    Returns:
        The shard paths written.
    """
    from webdataset import ShardWriter

    settings = settings or GenerationSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("shard-*.tar")):
        raise FileExistsError(f"'{out}' already holds shards; choose an empty --out folder")
    latent_shape = _check_geometry(parts, settings)
    sampler = parts.sampler(
        SamplerConfig(
            video_steps=settings.steps,
            shift=settings.shift,
            guidance_scale=settings.guidance_scale,
        )
    )
    device = next(parts.model.parameters()).device
    dtype = next(parts.model.parameters()).dtype
    guided = settings.guidance_scale != 1.0
    uncond = parts.prompt_encoder([settings.negative_prompt]) if guided else None
    meta = {**asdict(settings), "generator": generator_name}
    with ShardWriter(str(out / SHARD_PATTERN), maxcount=samples_per_shard, verbose=0) as sink:
        for i, prompt in enumerate(tqdm(prompts, desc="generating", disable=not progress)):
            context = parts.prompt_encoder([prompt])  # (1, Lc, text_dim)
            text = None
            if parts.model.has_text and parts.tokenizer is not None:
                text = parts.tokenizer.encode([prompt], settings.caption_length).to(device)
            rng = torch.Generator().manual_seed(seed + i)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                latents = sampler.generate_video(context, latent_shape, uncond, text, rng)
            video = parts.codec.decode(latents.float())  # (1, 3, T, H, W) in [-1, 1]
            mp4 = encode_video(to_uint8(video[0]), settings.fps, options={"crf": str(crf)})
            record = {"prompt": prompt, "seed": seed + i, **meta}
            sink.write({"__key__": f"{i:08d}", "mp4": mp4, "txt": prompt, "json": record})
        written = sink.shard
    return [out / (SHARD_PATTERN % k) for k in range(written)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m datamodules.generate_shards",
        description="Sample videos for a prompt list from a pretrained generator and write "
        "WebDataset shards (KEY.mp4, KEY.txt, KEY.json): Knowledge Recall data.",
    )
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="output folder for shard-XXXXXX.tar")
    p.add_argument(
        "--wan-folder",
        required=True,
        help="Wan2.1 diffusers folder (transformer/, vae/, text_encoder/, tokenizer/)",
    )
    p.add_argument("--checkpoint", help="Uni-ViGU checkpoint to generate with instead of Wan")
    p.add_argument("--steps", type=int, default=50, help="Euler steps")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale (1 = off)")
    p.add_argument("--shift", type=float, default=3.0, help="Wan's timestep shift")
    p.add_argument("--negative-prompt", default="", help="prompt of the CFG branch")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--num-frames", type=int, default=81, help="4n + 1 frames")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--fps", type=int, default=16, help="frame rate written into the mp4")
    p.add_argument(
        "--caption-length", type=int, default=256, help="prompt canvas of a Uni-ViGU checkpoint"
    )
    p.add_argument("--crf", type=int, default=0, help="x264 quality, 0 = lossless")
    p.add_argument("--samples-per-shard", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        default="bfloat16" if torch.cuda.is_available() else "float32",
        help="weights dtype of the transformer, VAE and text encoder",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Command-line entry point; returns the shard paths written."""
    args = parse_args(argv)
    prompts = read_prompts(args.prompts)
    parts = load_wan_folder(
        args.wan_folder,
        checkpoint=args.checkpoint,
        caption=False,
        dtype=args.dtype,
        device=args.device,
    )
    parts.model.eval()
    settings = GenerationSettings(
        steps=args.steps,
        guidance_scale=args.guidance,
        shift=args.shift,
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        fps=args.fps,
        negative_prompt=args.negative_prompt,
        caption_length=args.caption_length,
    )
    name = Path(args.checkpoint or args.wan_folder).name
    shards = generate_shards(
        parts,
        prompts,
        args.out,
        settings,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        generator_name=name,
        crf=args.crf,
    )
    print(f"wrote {len(prompts)} samples in {len(shards)} shard(s) to {args.out}")
    return shards


if __name__ == "__main__":
    main()
