"""Sample logging: generated videos and captions, every N steps, to the logger and the run folder.

Held-out prompts and videos come from the first validation batch. Every ``every_n_steps``
optimiser steps (and at the end of training) the callback generates videos for those prompts
and captions the real videos, then writes

* ``<run>/samples/step_XXXXXX.mp4`` -- a grid of generated videos (top) above the real ones,
* ``<run>/samples/step_XXXXXX.md``  -- a table of prompt, target caption and generated caption,
* TensorBoard: the middle frames of the grid as an image and the table as text (when a
  TensorBoard logger is attached); CSV logs get nothing extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
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


class SampleLogger(L.Callback):
    """Generate and caption a few held-out examples every ``every_n_steps`` steps.

    Args:
        every_n_steps: optimiser steps between samples (0 = only at the end of training).
        num_samples: videos to generate and caption.
        fps: frame rate of the written mp4.
        steps: sampling steps (default: the module's sampler settings).
        seed: sampling seed (fixed, so samples at different steps are comparable).
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_samples: int = 4,
        fps: int = 8,
        steps: int | None = None,
        seed: int = 0,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.fps = fps
        self.steps = steps
        self.seed = seed
        self._batch: dict[str, Any] | None = None
        self._last_step = -1

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if self._batch is None and "video" in batch:
            k = self.num_samples
            self._batch = {
                "video": batch["video"][:k].detach().cpu(),
                "prompt": list(batch["prompt"][:k]),
                "caption": list(batch["caption"][:k]),
            }

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
        from datamodules.video_io import encode_video, to_uint8

        if self._batch is None:
            return
        self._last_step = step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        batch = self._batch
        overrides = {"video_steps": self.steps, "text_steps": self.steps}
        try:
            generated = pl_module.generate_video(batch["prompt"], seed=self.seed, **overrides).cpu()
            captions = (
                pl_module.caption(batch["video"], seed=self.seed, **overrides)
                if pl_module.model.has_text
                else [""] * len(batch["prompt"])
            )
        finally:
            pl_module.train(was_training)
        grid = video_grid([generated, batch["video"]])
        out = run_dir(trainer) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"step_{step:06d}.mp4").write_bytes(encode_video(to_uint8(grid), fps=self.fps))
        target = batch["prompt"] if pl_module.phase.caption_target == "prompt" else batch["caption"]
        table = caption_table(batch["prompt"], target, captions)
        (out / f"step_{step:06d}.md").write_text(
            f"# Samples at step {step} (phase {pl_module.phase.name})\n\n{table}"
        )
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                frame = grid[:, grid.shape[1] // 2].add(1).div(2).clamp(0, 1)  # (3, H, W)
                logger.experiment.add_image("samples/generated_over_real", frame, step)
                logger.experiment.add_text("samples/captions", table, step)
