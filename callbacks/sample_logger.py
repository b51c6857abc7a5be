"""Sample logging: generated videos and captions, every N steps, to the loggers and the run folder.

Held-out prompts and videos come from the first validation batch -- decoded videos, or the
latents of a latent cache, which the module's codec decodes for the grid and the captioner reads
directly -- or from a fixed ``prompts`` list. Every ``every_n_steps`` optimiser steps (and at
the end of training) the callback generates videos for those prompts and captions the real
clips, then writes

* ``<run>/samples/step_XXXXXX.mp4`` -- a grid of generated videos (top) above the real ones
  (H.264 yuv420p, which browsers play; ``video_format="lossless"`` keeps exact colours),
* ``<run>/samples/step_XXXXXX.md``  -- a table of prompt, target caption and generated caption,

and hands both to every configured logger that takes media: TensorBoard (``add_video`` when
moviepy is installed, else the middle frame as an image; the table as text), loggers with
``log_video`` / ``log_text`` (W&B and loggers with the same API) and MLflow (artifacts).
CSV logs get nothing extra.

Under FSDP the callback is off (said once): each rank holds a shard of the weights and
sampling outside the training step would need them whole. Sample from a consolidated
checkpoint with ``python -m lightning_vigu generate`` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor


def run_dir(trainer: L.Trainer) -> Path:
    """The run's folder (the first logger's, else ``default_root_dir``).

    Not ``trainer.log_dir``: it broadcasts across ranks, and callers here run on rank zero
    alone, which would deadlock under DDP.
    """
    logger_dir = trainer.loggers[0].log_dir if trainer.loggers else None
    return Path(logger_dir or trainer.default_root_dir)


def video_grid(rows: list[Tensor]) -> Tensor:
    """Tile rows of videos ``[(N, 3, T, H, W), ...]`` into one ``(3, T, rows*H, N*W)`` video."""
    tiles = [torch.cat(list(r.unbind(0)), dim=-1) for r in rows]  # each (3, T, H, N*W)
    return torch.cat(tiles, dim=-2)  # (3, T, rows*H, N*W)


def caption_table(prompts: list[str], targets: list[str], generated: list[str]) -> str:
    """A markdown table of prompts, target captions and generated captions."""

    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| # | prompt | target caption | generated caption |", "|---|---|---|---|"]
    lines += [
        f"| {i} | {cell(p)} | {cell(t)} | {cell(g)} |"
        for i, (p, t, g) in enumerate(zip(prompts, targets, generated))
    ]
    return "\n".join(lines) + "\n"


def off_under_fsdp(trainer: L.Trainer, what: str, instead: str) -> bool:
    """Whether the run shards its weights (FSDP), so a sampling callback cannot run on its
    own; if so, warn once that ``what`` is off and what to do ``instead``."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return False
    rank_zero_warn(f"{what} is off under FSDP (sharded weights); {instead}")
    return True


def held_out(batch: dict, k: int) -> dict[str, Any]:
    """The first ``k`` clips of a batch on the CPU: ``video`` or ``latents``, prompts, captions."""
    out: dict[str, Any] = {key: list(batch[key][:k]) for key in ("prompt", "caption")}
    for key in ("video", "latents"):
        if key in batch:
            out[key] = batch[key][:k].detach().cpu()
    return out


class SampleLogger(L.Callback):
    """Generate and caption a few held-out examples every ``every_n_steps`` steps.

    Args:
        every_n_steps: optimiser steps between samples (0 = only at the end of training).
        num_samples: videos to generate and caption.
        fps: frame rate of the written mp4.
        steps: sampling steps (default: the module's sampler settings).
        seed: sampling seed (fixed, so samples at different steps are comparable).
        prompts: a fixed prompt list to generate from instead of the validation prompts (the
            real clips, when a validation loop runs, are still captioned).
        video_format: ``h264`` (yuv420p, plays everywhere) or ``lossless`` (yuv444p crf 0).
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_samples: int = 4,
        fps: int = 8,
        steps: int | None = None,
        seed: int = 0,
        prompts: list[str] | None = None,
        video_format: str = "h264",
    ) -> None:
        from lightning_vigu.inference import VIDEO_FORMATS

        if video_format not in VIDEO_FORMATS:
            raise ValueError(
                f"unknown video_format '{video_format}'; choose one of {list(VIDEO_FORMATS)}"
            )
        if prompts is not None and not prompts:
            raise ValueError("SampleLogger(prompts=[]) has no prompt; pass some or None")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.fps = fps
        self.steps = steps
        self.seed = seed
        self.prompts = list(prompts) if prompts is not None else None
        self.video_format = video_format
        self._batch: dict[str, Any] | None = None
        self._last_step = -1
        self._off = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._off = off_under_fsdp(
            trainer,
            "SampleLogger",
            "sample from a consolidated checkpoint with 'python -m lightning_vigu generate' instead",
        )

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if self._batch is None and ("video" in batch or "latents" in batch):
            self._batch = held_out(batch, self.num_samples)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (
            self.every_n_steps
            and step > 0
            and step % self.every_n_steps == 0
            and step != self._last_step
        ):
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self.log_samples(trainer, pl_module)

    @rank_zero_only
    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Generate, caption and write one round of samples."""
        from lightning_vigu.inference import write_mp4

        if self._off or (self._batch is None and self.prompts is None):
            return
        self._last_step = step = trainer.global_step
        batch = self._batch or {}
        prompts = self.prompts[: self.num_samples] if self.prompts else batch["prompt"]
        was_training = pl_module.training
        pl_module.eval()
        overrides = {"video_steps": self.steps, "text_steps": self.steps}
        real, captions = None, None
        try:
            generated = pl_module.generate_video(prompts, seed=self.seed, **overrides).cpu()
            if "latents" in batch:
                with torch.no_grad():
                    latents = batch["latents"].to(pl_module.device).float()
                    real = pl_module.codec.decode(latents).cpu()
            else:
                real = batch.get("video")
            if real is not None and pl_module.model.has_text:
                captions = (
                    pl_module.caption_latents(batch["latents"], seed=self.seed, **overrides)
                    if "latents" in batch
                    else pl_module.caption(real, seed=self.seed, **overrides)
                )
        finally:
            pl_module.train(was_training)
        rows = [generated]
        if real is not None and real.shape == generated.shape:  # fixed prompts may differ
            rows.append(real)
        grid = video_grid(rows)
        out = run_dir(trainer) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        mp4 = write_mp4(out / f"step_{step:06d}.mp4", grid, self.fps, self.video_format)
        table, cells = "", []
        if captions is not None:
            key = "prompt" if pl_module.phase.caption_target == "prompt" else "caption"
            table = caption_table(batch["prompt"], batch[key], captions)
            cells = [list(r) for r in zip(batch["prompt"], batch[key], captions)]
            (out / f"step_{step:06d}.md").write_text(
                f"# Samples at step {step} (phase {pl_module.phase.name})\n\n{table}"
            )
        for logger in trainer.loggers:
            log_media(logger, step, grid, mp4, table, cells, self.fps)


def log_media(
    logger, step: int, grid: Tensor, mp4: Path, table: str, cells: list[list[str]], fps: int
) -> None:
    """Give a sample grid ``(3, T, H, W)`` in [-1, 1], its mp4 and the caption table (markdown
    ``table`` and its rows ``cells``) to a logger in the form it takes (nothing for loggers
    without media, e.g. CSV)."""
    import importlib.util

    from lightning.pytorch.loggers import MLFlowLogger

    tag = "samples/generated_over_real"
    if isinstance(logger, TensorBoardLogger):
        frames = grid.add(1).div(2).clamp(0, 1)  # (3, T, H, W) in [0, 1]
        if importlib.util.find_spec("moviepy") is not None:  # TensorBoard encodes with moviepy
            logger.experiment.add_video(tag, frames.transpose(0, 1)[None], step, fps=fps)
        else:
            logger.experiment.add_image(tag, frames[:, frames.shape[1] // 2], step)
        if table:
            logger.experiment.add_text("samples/captions", table, step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_artifact(logger.run_id, str(mp4), "samples")
    elif hasattr(logger, "log_video"):  # W&B's API (WandbLogger and look-alikes)
        logger.log_video(tag, [str(mp4)], step=step, fps=[fps], format=["mp4"])
        if cells and hasattr(logger, "log_text"):
            columns = ["prompt", "target caption", "generated caption"]
            logger.log_text("samples/captions", columns=columns, data=cells, step=step)
