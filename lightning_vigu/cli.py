"""Command line: LightningCLI (``fit | validate | test``) plus ``generate``, ``caption``, ``export``.

python -m lightning_vigu fit -c conf/recall.yaml
python -m lightning_vigu generate --ckpt runs/recall/checkpoints/last.ckpt --prompts "a red circle moves to the left" --out samples/
python -m lightning_vigu caption --ckpt runs/recall/checkpoints/last.ckpt --videos clip.mp4
python -m lightning_vigu export --ckpt runs/recall/checkpoints/last.ckpt --format diffusers --out export/transformer
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_vigu import runs
from lightning_vigu.module import INJECTED_PARTS, UniViGU
from lightning_vigu.video_io import (
    ClipSpec,
    ClipTooShortError,
    VideoDecodeError,
    decode_clip,
    to_tensor,
)

USAGE = """usage: python -m lightning_vigu <command> [options]   (<command> --help for its options)

training and evaluation (LightningCLI, -c conf/<run>.yaml):
  fit        train (python -m lightning_vigu fit -c conf/recall.yaml)
  validate   validation losses and the Evaluation callback on a checkpoint
  test       the same on the test split
  predict    Lightning's predict loop

sampling and export:
  generate   prompts -> mp4 files, from --ckpt or --wan-folder [--checkpoint Uni-ViGU weights]
  caption    video files -> captions, from --ckpt or --wan-folder --checkpoint
  export     a fit checkpoint -> Uni-ViGU release file, diffusers Wan transformer, or LoRA
"""


class ViGUCLI(LightningCLI):
    """LightningCLI with omegaconf interpolation and the DataModule chosen by ``class_path``.

    ``--phase`` and ``--init_from`` are top-level options linked into the model, so a phase
    config can name them next to a shared model preset file (``model: model/tiny.yaml``).

    Interpolations (``${...}``) are resolved once, after every ``-c`` file and ``--option``
    (jsonargparse's ``omegaconf+`` mode): the trainer presets (``conf/trainer/``) derive the
    loggers' and checkpoints' folders from ``trainer.default_root_dir``, so setting the run
    folder once, in a phase config or on the command line, moves all of them.
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
        self._run_lock: runs.RunLock | None = None
        try:
            super().__init__(
                UniViGU,
                L.LightningDataModule,
                subclass_mode_model=False,
                subclass_mode_data=True,
                parser_kwargs={"parser_mode": "omegaconf+"},
                save_config_kwargs={"overwrite": True},
                args=args,
                run=run,
            )
        finally:
            if self._run_lock is not None:
                self._run_lock.release()

    def parse_arguments(self, parser, args) -> None:
        """Parse, then refuse an unreadable ``--ckpt_path`` by name (LightningCLI reads it next)."""
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and Path(str(ckpt)).exists():
            runs.check_checkpoint(ckpt, "checkpoint (--ckpt_path)")

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """The trainer, writing checkpoints atomically and logging the data's skip counts."""
        from callbacks.skips import SkippedSamples

        trainer = super().instantiate_trainer(**kwargs)
        runs.use_atomic_checkpoints(trainer)
        if hasattr(self.datamodule, "skipped_counts") and not any(
            isinstance(cb, SkippedSamples) for cb in trainer.callbacks
        ):
            trainer.callbacks.append(SkippedSamples())
        return trainer

    def before_fit(self) -> None:
        """Claim the run folders: lock them, refuse another run's files on a fresh start,
        resolve ``--ckpt_path=last`` to a readable file, append to the logs of a resume."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        folders = runs.run_folders(trainer)
        self._run_lock = runs.RunLock(folders)
        config = self.config_init[self.subcommand]
        ckpt = config.get("ckpt_path")
        if ckpt == "last":
            last = runs.resolve_last(trainer)
            ckpt = config["ckpt_path"] = str(last) if last is not None else None
        if ckpt is None:
            runs.refuse_fresh_run_over(folders + [f / "checkpoints" for f in folders])
        elif trainer.log_dir:
            for cb in trainer.callbacks:  # keep config.yaml: it describes the first checkpoints
                if isinstance(cb, SaveConfigCallback):
                    cb.config_filename = runs.resume_config_name(trainer.log_dir)
        runs.append_csv_logs(trainer)


def load_module(
    ckpt: str, device: str = "auto", trust_pickle: bool = False, **parts: Any
) -> UniViGU:
    """A trained module from a checkpoint (EMA weights when the run used EMA), in eval mode.

    Loads with ``torch.load(weights_only=True)`` (fit's checkpoints need nothing else);
    ``trust_pickle`` allows arbitrary pickled objects, which runs code stored in the file.
    ``parts``: the injected parts (``codec``, ``tokenizer``, ``prompt_encoder``) of a module
    that was built in Python rather than by ``fit``'s config: only a config's parts are stored
    in the checkpoint, so a Python-built module's must be passed again.
    """
    if not Path(ckpt).is_file():
        raise FileNotFoundError(
            f"checkpoint '{ckpt}' does not exist; pass a .ckpt written by 'fit' (e.g. <run>/checkpoints/last.ckpt)"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint = runs.load_checkpoint_file(
        ckpt, trust_pickle=trust_pickle, mmap=True, what="--ckpt"
    )
    try:  # the checkpoint holds every weight: do not re-read the run's init_from file
        module = UniViGU.load_from_checkpoint(
            ckpt, map_location=device, weights_only=not trust_pickle, init_from=None, **parts
        )
    except RuntimeError as exn:
        stored = checkpoint.get("hyper_parameters", {})
        missing = [k for k in INJECTED_PARTS if k not in stored and k not in parts]
        if "size mismatch" not in str(exn) or not missing:
            raise
        raise runs.CheckpointError(
            f"'{ckpt}' was written by a module built in Python: its {', '.join(missing)} are not "
            "in the file, and the defaults do not fit its weights. Pass them again "
            f"(load_module(..., {', '.join(f'{k}=...' for k in missing)})), or train through "
            "'fit', whose config the "
            f"checkpoint keeps. ({str(exn).splitlines()[-1].strip()[:160]})"
        ) from exn
    return module.eval().to(device)


def _sampling_parser(prog: str, doc: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description=doc)
    src = p.add_argument_group("weights: a checkpoint of fit, or a Wan2.1 folder")
    src.add_argument("--ckpt", type=str | None, default=None, help="checkpoint written by fit")
    src.add_argument(
        "--wan-folder",
        type=str | None,
        default=None,
        help="Wan2.1 diffusers folder (VAE, umT5, tokenizer; its transformer without --checkpoint)",
    )
    src.add_argument(
        "--checkpoint",
        type=str | None,
        default=None,
        help="Uni-ViGU weights in the release format (.pth/.safetensors), with --wan-folder",
    )
    src.add_argument("--caption-source", type=str, default="uniform", help="uniform | mask")
    src.add_argument("--normalize-latents", type=bool | None, default=None)
    src.add_argument("--trust-pickle", type=bool, default=False)
    p.add_argument("--seed", type=int, default=0, help="batch k uses seed + k")
    p.add_argument(
        "--steps", type=int | None, default=None, help="sampling steps (default: the run's sampler)"
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", type=str, default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--frames", type=int | None, default=None)
    p.add_argument("--height", type=int | None, default=None)
    p.add_argument("--width", type=int | None, default=None)
    p.add_argument("--device", type=str, default="auto")
    return p


def _load_for_sampling(a) -> UniViGU:
    """The module named by ``--ckpt`` or ``--wan-folder`` (+ ``--checkpoint``)."""
    from lightning_vigu.inference import module_from_wan_folder, resolve_device

    device = resolve_device(a.device)
    if (a.ckpt is None) == (a.wan_folder is None):
        raise ValueError(
            "pass either --ckpt <run>/checkpoints/last.ckpt (a fit checkpoint) or --wan-folder "
            "<Wan2.1-T2V-1.3B-Diffusers> [--checkpoint <Uni-ViGU weights>], not both or neither"
        )
    if a.checkpoint is not None and a.wan_folder is None:
        raise ValueError(
            "--checkpoint (Uni-ViGU release weights) needs --wan-folder: the VAE, umT5 encoder "
            "and tokenizer come from the Wan2.1 folder"
        )
    if a.ckpt is not None:
        return load_module(a.ckpt, device, trust_pickle=a.trust_pickle)
    return module_from_wan_folder(
        a.wan_folder,
        a.checkpoint,
        caption_source=a.caption_source,
        normalize_latents=a.normalize_latents,
        dtype=a.dtype,
        device=device,
        trust_pickle=a.trust_pickle,
    )


def _video_shape(a, module: UniViGU) -> tuple[int, int, int]:
    f, h, w = module.hparams.video_shape
    return (a.frames or f, a.height or h, a.width or w)


def generate_main(argv: list[str]) -> None:
    """``generate``: prompts -> mp4 files (and the captions of a joint generation with --joint)."""
    from lightning_vigu.inference import batches, precision, write_mp4

    p = _sampling_parser("python -m lightning_vigu generate", generate_main.__doc__)
    p.add_argument(
        "--prompts",
        type=list[str] | str,
        required=True,
        help="a prompt, a list '[p1, p2]', or @file.txt with one per line",
    )
    p.add_argument("--negative-prompt", type=str, default="", help="the CFG unconditional prompt")
    p.add_argument("--out", type=str, required=True, help="folder for the mp4 files")
    p.add_argument("--guidance", type=float | None, default=None)
    p.add_argument(
        "--eta",
        type=float | None,
        default=None,
        help="noise re-drawn at each video step: 0 = Euler (the checkpoint's default), 1 = DDPM-like",
    )
    p.add_argument("--fps", type=int | None, default=None, help="default 16 (Wan), 8 (ckpt)")
    p.add_argument("--video-format", type=str, default="h264", help="h264 (yuv420p) | lossless")
    p.add_argument(
        "--joint", type=bool, default=False, help="generate a caption together with each video"
    )
    a = p.parse_args(argv)
    prompts = _expand_list(a.prompts)
    module = _load_for_sampling(a)
    shape = _video_shape(a, module)
    fps = a.fps or (16 if a.wan_folder else 8)
    overrides = {
        "video_steps": a.steps,
        "text_steps": a.steps,
        "guidance_scale": a.guidance,
        "video_eta": a.eta,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for k, chunk in batches(prompts, a.batch_size):
        kw = dict(seed=a.seed + k, video_shape=shape, negative_prompt=a.negative_prompt)
        captions = None
        with precision(module, a.dtype):
            if a.joint:
                videos, captions = module.generate_joint(chunk, **kw, **overrides)
            else:
                videos = module.generate_video(chunk, **kw, **overrides)
        for j, (prompt, video) in enumerate(zip(chunk, videos.float().cpu())):
            i = len(records)
            path = write_mp4(out / f"{i:04d}.mp4", video, fps, a.video_format)
            records.append(
                {
                    "file": path.name,
                    "prompt": prompt,
                    **({"caption": captions[j]} if captions else {}),
                }
            )
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {len(records)} videos to {out}")


def caption_main(argv: list[str]) -> None:
    """``caption``: video files -> captions (printed, and written as JSONL with --out)."""
    from lightning_vigu.inference import batches, precision

    p = _sampling_parser("python -m lightning_vigu caption", caption_main.__doc__)
    p.add_argument(
        "--videos",
        type=list[str] | str,
        required=True,
        help="a video file, a list '[a.mp4, b.mp4]', or @file.txt with one path per line",
    )
    p.add_argument("--out", type=str | None, default=None, help="JSONL file for the captions")
    a = p.parse_args(argv)
    paths = _expand_list(a.videos)
    missing = [v for v in paths if not Path(v).is_file()]
    if missing:
        raise FileNotFoundError(f"video file(s) {missing[:5]} do not exist")
    module = _load_for_sampling(a)
    f, h, w = _video_shape(a, module)
    spec = ClipSpec(num_frames=f, size=(h, w))
    lines, skipped = [], []
    for k, chunk in batches(paths, a.batch_size):
        clips = []
        for path in chunk:  # a file that does not decode is named and skipped, not fatal
            try:
                clips.append((path, to_tensor(decode_clip(Path(path).read_bytes(), spec))))
            except (VideoDecodeError, ClipTooShortError, OSError) as exn:
                skipped.append(path)
                print(f"skipped '{path}': {type(exn).__name__}: {exn}", file=sys.stderr)
        if not clips:
            continue
        with precision(module, a.dtype):
            texts = module.caption(
                torch.stack([c for _, c in clips]), seed=a.seed + k, text_steps=a.steps
            )
        for (path, _), text in zip(clips, texts):
            lines.append({"file": path, "caption": text})
            print(f"{path}\t{text}")
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in lines))
    if skipped:
        print(f"captioned {len(lines)} of {len(paths)} videos; skipped {skipped}", file=sys.stderr)


def _expand_list(values: list[str] | str) -> list[str]:
    """The inputs of ``--prompts`` / ``--videos``: one value, a list, ``@file`` lines."""
    out = []
    values = [values] if isinstance(values, str) else values
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
    from lightning_vigu.export import export_main

    args = sys.argv[1:] if argv is None else argv
    extra = {"generate": generate_main, "caption": caption_main, "export": export_main}
    if args in (["-h"], ["--help"]):
        print(USAGE)
        return
    if args and args[0] in extra:
        with torch.no_grad():  # scoped: an in-process caller keeps its autograd state
            extra[args[0]](args[1:])
    else:
        try:
            ViGUCLI(args=argv)
        except SIGTERMException:  # Lightning exits 0 on SIGTERM; a scheduler must see the stop
            print(
                "stopped by SIGTERM (the on-exception checkpoint, if configured, is written); "
                f"exit {128 + signal.SIGTERM}",
                file=sys.stderr,
            )
            sys.exit(128 + signal.SIGTERM)
