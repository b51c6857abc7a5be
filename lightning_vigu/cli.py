"""Command line: LightningCLI (``fit | validate | test``) plus ``generate`` and ``caption``.

python -m lightning_vigu fit -c conf/recall.yaml
python -m lightning_vigu generate --ckpt runs/recall/checkpoints/last.ckpt --prompts "a red circle moves to the left" --out samples/
python -m lightning_vigu caption --ckpt runs/recall/checkpoints/last.ckpt --videos clip.mp4
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningCLI

from lightning_vigu.module import UniViGU


class ViGUCLI(LightningCLI):
    """LightningCLI with omegaconf interpolation and the DataModule chosen by ``class_path``.

    ``--phase`` and ``--init_from`` are top-level options linked into the model, so a phase
    config can name them next to a shared model preset file (``model: model/tiny.yaml``).
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--phase",
            type=str | dict,
            default="recall",
            help="phase preset (generator, recall, refine) or a Phase dict",
        )
        parser.add_argument(
            "--init_from",
            type=str | None,
            default=None,
            help="checkpoint whose weights initialise the model",
        )
        parser.link_arguments("phase", "model.phase")
        parser.link_arguments("init_from", "model.init_from")

    def __init__(self, args=None, run: bool = True) -> None:
        super().__init__(
            UniViGU,
            L.LightningDataModule,
            subclass_mode_model=False,
            subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )


def load_module(ckpt: str, device: str = "auto") -> UniViGU:
    """A trained module from a checkpoint (EMA weights when the run used EMA), in eval mode."""
    if not Path(ckpt).is_file():
        raise FileNotFoundError(
            f"checkpoint '{ckpt}' does not exist; pass a .ckpt written by 'fit' (e.g. <run>/checkpoints/last.ckpt)"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # the checkpoint holds every weight: do not re-read the run's init_from file
    module = UniViGU.load_from_checkpoint(
        ckpt, map_location=device, weights_only=False, init_from=None
    )
    return module.eval().to(device)


def _sampling_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--ckpt", type=str, required=True, help="checkpoint written by fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--steps", type=int | None, default=None, help="sampling steps (default: the run's sampler)"
    )
    p.add_argument("--device", type=str, default="auto")
    return p


def generate_main(argv: list[str]) -> None:
    """``generate``: prompts -> mp4 files (and the captions of a joint generation with --joint)."""
    from datamodules.video_io import encode_video, to_uint8

    p = _sampling_parser("python -m lightning_vigu generate")
    p.add_argument(
        "--prompts", type=list[str], required=True, help="prompts, or @file.txt with one per line"
    )
    p.add_argument("--out", type=str, required=True, help="folder for the mp4 files")
    p.add_argument("--guidance", type=float | None, default=None)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument(
        "--joint", type=bool, default=False, help="generate a caption together with each video"
    )
    a = p.parse_args(argv)
    prompts = _expand_list(a.prompts)
    module = load_module(a.ckpt, a.device)
    overrides = {"video_steps": a.steps, "text_steps": a.steps, "guidance_scale": a.guidance}
    captions = None
    if a.joint:
        videos, captions = module.generate_joint(prompts, seed=a.seed, **overrides)
    else:
        videos = module.generate_video(prompts, seed=a.seed, **overrides)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (prompt, video) in enumerate(zip(prompts, videos)):
        path = out / f"{i:04d}.mp4"
        path.write_bytes(encode_video(to_uint8(video), fps=a.fps))
        records.append(
            {"file": path.name, "prompt": prompt, **({"caption": captions[i]} if captions else {})}
        )
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {len(records)} videos to {out}")


def caption_main(argv: list[str]) -> None:
    """``caption``: video files -> captions (printed, and written as JSONL with --out)."""
    from datamodules.video_io import ClipSpec, decode_clip, to_tensor

    p = _sampling_parser("python -m lightning_vigu caption")
    p.add_argument(
        "--videos",
        type=list[str],
        required=True,
        help="video files, or @file.txt with one path per line",
    )
    p.add_argument("--out", type=str | None, default=None, help="JSONL file for the captions")
    a = p.parse_args(argv)
    module = load_module(a.ckpt, a.device)
    f, h, w = module.hparams.video_shape
    spec = ClipSpec(num_frames=f, size=(h, w))
    lines = []
    for path in _expand_list(a.videos):
        data = Path(path).read_bytes()
        video = to_tensor(decode_clip(data, spec))[None]  # (1, 3, T, H, W)
        text = module.caption(video, seed=a.seed, text_steps=a.steps)[0]
        lines.append({"file": path, "caption": text})
        print(f"{path}\t{text}")
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in lines))


def _expand_list(values: list[str]) -> list[str]:
    out = []
    for v in values:
        if v.startswith("@"):
            out += [line.strip() for line in Path(v[1:]).read_text().splitlines() if line.strip()]
        else:
            out.append(v)
    if not out:
        raise ValueError("no inputs given")
    return out


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``generate`` / ``caption`` to their commands, everything else to LightningCLI."""
    args = sys.argv[1:] if argv is None else argv
    extra = {"generate": generate_main, "caption": caption_main}
    if args and args[0] in extra:
        torch.set_grad_enabled(False)
        extra[args[0]](args[1:])
    else:
        ViGUCLI(args=argv)
