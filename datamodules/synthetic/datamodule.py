"""The synthetic world as a DataModule: generate shards once in ``prepare_data``, then read
them exactly like user data with :class:`~datamodules.webvideo.WebVideoDataModule`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from torch.utils.data import DataLoader

from datamodules.synthetic.generate import completed_split, dataset_dir, ensure_split
from datamodules.synthetic.world import world_config
from datamodules.webvideo import WebVideoDataModule

MIN_SHARDS = 8
"""Small splits are cut into at least this many shards, so several ranks and workers share them."""


class SyntheticDataModule(WebVideoDataModule):
    """Coloured shapes with known motion, a prompt and a detailed caption per clip.

    Shards are written on first use to ``<cache_dir>/<world hash>-seed<seed>/`` (default
    ``$LIGHTNING_VIGU_CACHE/synthetic`` or ``~/.cache/lightning_vigu/synthetic``) and reused
    afterwards; a split is regenerated when its completion marker is missing or different.

    Args:
        preset: ``"cpu"`` (16 frames of 32x32 at 8 fps) or ``"gpu"`` (16 frames of 64x64).
        num_train: training clips.
        num_val: validation clips.
        num_test: test clips.
        num_unseen: clips of the held-out attribute combinations (0 skips the split).
        seed: dataset seed (same seed and index -> the same clip, prompt and caption).
        cache_dir: root folder of the cache (see above).
        samples_per_shard: clips per shard (small splits use smaller shards, see
            :data:`MIN_SHARDS`).
        batch_size: samples per batch (per rank).
        num_workers: DataLoader workers.
        caption_key: record field used as the caption: ``"caption"`` (detailed) or
            ``"prompt"`` (the Knowledge Recall target).
        test_split: split read by ``test_dataloader``: ``"test"`` or ``"unseen"``.
        shuffle_buffer: training shuffle buffer.
        resampled: training draws shards at random forever (use with ``max_steps``).
        samples_per_epoch: with ``resampled``, samples per epoch.
        strict: raise on bad samples instead of skipping them.
        num_frames: override the preset's frames per clip.
        size: override the preset's (square) frame side.
        fps: override the preset's frame rate.
        generation_workers: processes used to generate shards (default: all cores).
        progress: show a progress bar while generating.
        pin_memory: DataLoader ``pin_memory`` (faster host-to-GPU copies).
        in_memory: decode the training clips once and draw batches from memory (see
            :class:`~datamodules.webvideo.WebVideoDataModule`): the GPU preset's default,
            where decoding at every step would set the pace of a small model.
        in_memory_cache: keep the decoded clips in a file for the next run over the same
            shards (see :class:`~datamodules.webvideo.WebVideoDataModule`).
        train_records: keep each clip's ground-truth record in training batches (see
            :class:`~datamodules.webvideo.WebVideoDataModule`; evaluation batches keep them).
    """

    def __init__(
        self,
        preset: str = "cpu",
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 200,
        num_unseen: int = 200,
        seed: int = 0,
        cache_dir: str | None = None,
        samples_per_shard: int = 100,
        batch_size: int = 16,
        num_workers: int = 2,
        pin_memory: bool = False,
        caption_key: str = "caption",
        test_split: Literal["test", "unseen"] = "test",
        shuffle_buffer: int = 500,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        strict: bool = False,
        num_frames: int | None = None,
        size: int | None = None,
        fps: int | None = None,
        generation_workers: int | None = None,
        progress: bool = True,
        in_memory: bool = False,
        in_memory_cache: bool = True,
        train_records: bool = False,
    ) -> None:
        self.world = world_config(preset, num_frames=num_frames, height=size, width=size, fps=fps)
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            num_frames=self.world.num_frames,
            prompt_key="txt",
            caption_key=f"json:{caption_key}",
            shuffle_buffer=shuffle_buffer,
            resampled=resampled,
            samples_per_epoch=samples_per_epoch,
            seed=seed,
            strict=strict,
            latents=False,
            in_memory=in_memory,
            in_memory_cache=in_memory_cache,
            train_records=train_records,
        )
        if test_split not in ("test", "unseen"):
            raise ValueError(f"test_split must be 'test' or 'unseen', got '{test_split}'")
        self.sizes = {"train": num_train, "val": num_val, "test": num_test, "unseen": num_unseen}
        self.root = dataset_dir(self.world, seed, cache_dir)
        self.samples_per_shard = samples_per_shard
        self.test_split = test_split
        self.generation_workers = generation_workers
        self.progress = progress
        self.shards["unseen"] = None

    def _per_shard(self, num: int) -> int:
        return max(1, min(self.samples_per_shard, math.ceil(num / MIN_SHARDS)))

    def prepare_data(self) -> None:
        """Generate every split that is missing from the cache (Lightning: once, on rank 0)."""
        for split, num in self.sizes.items():
            if num > 0:
                ensure_split(
                    self.root,
                    self.world,
                    split,
                    num,
                    self.seed,
                    self._per_shard(num),
                    self.generation_workers,
                    self.progress,
                )

    def setup(self, stage: str | None = None) -> None:
        """Point every split at its generated shards, then check them like user shards."""
        for split, num in self.sizes.items():
            if num <= 0 or self.shards.get(split) is not None:
                continue
            marker = completed_split(self.root, split)
            if marker is None or marker.get("num") != num:
                raise RuntimeError(
                    f"synthetic split '{split}' ({num} clips) is not generated in '{self.root}'; "
                    "call prepare_data() first (Trainer.fit/test do this for you)"
                )
            self.shards[split] = [str(Path(self.root) / name) for name in marker["shards"]]
        super().setup(stage)

    def test_dataloader(self) -> DataLoader | list:
        return self._optional_loader(self.test_split)

    def unseen_dataloader(self) -> DataLoader:
        """A deterministic loader over the unseen split (held-out attribute combinations)."""
        return self.loader("unseen")
