"""A training split decoded once and held in memory, for worlds small enough to fit.

Streaming decodes every clip again at every step: for the synthetic world on a GPU the
decoding, not the model, sets the pace (a small model's step takes ~0.07 s; decoding a batch of
64 clips of 16x32x32 takes ~0.2 s of one core). :class:`MemoryClips` decodes a split once
(through the same :class:`~datamodules.webvideo.ShardStream`, clips centred, bad samples
skipped and counted as when streaming) and keeps videos as uint8, 4x smaller than float;
:class:`MemoryStream` then hands out training samples from it.

Order: every epoch is a permutation of the clips seeded by ``(seed, epoch)``, the same on every
rank; rank ``r`` of ``R`` takes every ``R``-th batch-sized chunk of it, and DataLoader worker
``w`` of ``W`` every ``W``-th of those, so the batches of a run are a partition of the epoch
whatever the worker count. Resume continues the epoch at the next batch
(:meth:`MemoryStream.resume_at`, called by :class:`~datamodules.webvideo.StreamLoader`).

Memory: ``clips x T x H x W x 3`` bytes per process (20,000 clips of 16x32x32: 0.98 GB;
of 16x64x64: 3.9 GB). The decoded split is also written to a file (:meth:`MemoryClips.save`,
under ``$LIGHTNING_VIGU_CACHE/decoded/``) named by the shards' paths, sizes and modification
times and the decoder's settings, so a later run over the same shards loads it in a second
instead of decoding again (20-25 s a run for the GPU world on 3 workers). Clips are decoded centred once, so random clip placement in videos longer
than a clip is lost: stream real data instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from datamodules.sample_decoder import SkipCounter

_FLOAT_KEYS = ("latents", "prompt_emb")
CACHE_VERSION = 1  # of the file MemoryClips.save writes
CACHE_ENV = "LIGHTNING_VIGU_CACHE"


@dataclass
class MemoryClips:
    """A decoded split: ``video`` ``(N, 3, T, H, W)`` uint8 and/or float ``latents`` /
    ``prompt_emb`` ``(N, ...)``, and per-clip ``prompt``, ``caption``, ``key``, ``meta``."""

    prompt: list[str] = field(default_factory=list)
    caption: list[str] = field(default_factory=list)
    key: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt)

    @classmethod
    def decode(
        cls, stream: IterableDataset, num_workers: int = 0, what: str = "clips"
    ) -> MemoryClips:
        """Decode every sample of a deterministic ``stream`` (``DataLoader`` workers split its
        shards) into memory, with a progress bar, in the order of the sample keys."""
        loader = DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=_compact)
        kept = []  # (key, texts and record, tensors) per sample, videos already uint8
        for sample in tqdm(loader, f"decoding {what} into memory", unit="clip", mininterval=5.0):
            tensors = {k: sample[k] for k in (*_FLOAT_KEYS, "video") if k in sample}
            texts = {k: sample.get(k) for k in ("prompt", "caption", "meta")}
            kept.append((sample.get("key", ""), texts, tensors))
        if not kept:
            raise ValueError(f"no usable sample to hold in memory among the {what}")
        kept.sort(key=lambda entry: entry[0])  # one order whatever the worker count
        clips = cls(
            prompt=[s["prompt"] for _, s, _ in kept],
            caption=[s["caption"] for _, s, _ in kept],
            key=[k for k, _, _ in kept],
            meta=[s["meta"] or {} for _, s, _ in kept],
        )
        clips.tensors = {
            k: torch.from_numpy(np.stack([t[k] for _, _, t in kept])) for k in kept[0][2]
        }
        return clips

    @classmethod
    def load_or_decode(
        cls,
        stream: IterableDataset,
        num_workers: int,
        what: str,
        counter: SkipCounter,
        cache: Path | None,
    ) -> MemoryClips:
        """The split kept in ``cache`` (its skip counts added to ``counter``), else decoded
        (:meth:`decode`) and kept there. An unreadable file is named in a warning, decoded
        again and rewritten; a file that cannot be written costs the next run a decode."""
        if cache is not None and cache.is_file():
            try:
                clips, skipped = cls.load(cache)
            except Exception as e:  # a truncated, foreign or crafted file: decode instead
                warnings.warn(
                    f"the decoded {what} in {cache} could not be read ({type(e).__name__}: {e}); "
                    "decoding the shards again and rewriting it",
                    stacklevel=3,
                )
            else:
                for reason, count in skipped.items():
                    counter.add(reason, count)
                print(f"loaded the decoded {what} ({len(clips)} clips) from {cache}", flush=True)
                return clips
        before = counter.as_dict()
        clips = cls.decode(stream, num_workers, what)
        if cache is not None:
            try:
                clips.save(cache, {k: n - before[k] for k, n in counter.as_dict().items()})
            except OSError as e:
                warnings.warn(
                    f"could not keep the decoded {what} in {cache} ({e}); the next run decodes "
                    "them again (in_memory_cache=False stops trying)",
                    stacklevel=3,
                )
        return clips

    def save(self, path: Path, skipped: dict[str, int]) -> None:
        """Write the decoded split to ``path`` (atomically: a reader never sees half a file),
        with the decoder's skip counts, so :meth:`load` restores both."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        state = {
            "version": CACHE_VERSION,
            "prompt": self.prompt,
            "caption": self.caption,
            "key": self.key,
            "meta": self.meta,
            "tensors": self.tensors,
            "skipped": dict(skipped),
        }
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> tuple[MemoryClips, dict[str, int]]:
        """A split written by :meth:`save` and its skip counts (tensors only: nothing in the
        file is unpickled as code)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("version") != CACHE_VERSION:
            raise ValueError(f"format {state.get('version')}, expected {CACHE_VERSION}")
        clips = cls(state["prompt"], state["caption"], state["key"], state["meta"])
        clips.tensors = state["tensors"]
        return clips, state["skipped"]

    def sample(self, i: int) -> dict:
        """Clip ``i`` as a sample dict of the Batch contract, the video as its ``uint8`` pixels:
        a batch of them is a quarter of the float one to collate, pin and copy to the GPU
        (:func:`~lightning_vigu.batch.batch_to_device` makes it float on the device)."""
        out = {
            "prompt": self.prompt[i],
            "caption": self.caption[i],
            "key": self.key[i],
            "meta": self.meta[i],
        }
        for k, v in self.tensors.items():
            out[k] = v[i]
        return out


def _compact(sample: dict) -> dict:
    """A decoded sample with its arrays as numpy (the video as uint8), computed where it was
    decoded (a DataLoader worker): per-clip torch ops in the main process ran at ~20 clips/s on
    a busy 16-core machine (each small op waits on the intra-op thread pool), and a torch tensor
    leaving a worker holds a shared-memory file descriptor for as long as it lives, so holding
    a split of them exhausts the open-file limit (numpy arrays are copied through the pipe)."""
    for k in _FLOAT_KEYS:
        if k in sample:
            sample[k] = sample[k].numpy()
    if "video" in sample:
        video = (sample["video"].numpy() + 1.0) * 127.5
        sample["video"] = np.rint(video).clip(0, 255).astype(np.uint8)
    return sample


def decoded_cache_file(urls: list[str], decoder: object) -> Path | None:
    """Where the decoded split of ``urls`` lives: ``$LIGHTNING_VIGU_CACHE/decoded/<key>.pt``
    (default root ``~/.cache/lightning_vigu``), the key hashing every shard's absolute path,
    size and modification time and the decoder's settings, so that a changed shard or decoder
    is a different file. ``None`` when a shard is not a local file (``pipe:``, URLs)."""
    files = []
    for url in urls:
        path = Path(url)
        if not path.is_file():
            return None
        st = path.stat()
        files.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    key = json.dumps([CACHE_VERSION, repr(decoder), files])
    return cache_root() / "decoded" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"


def cache_root() -> Path:
    """The project's cache folder: ``$LIGHTNING_VIGU_CACHE`` or ``~/.cache/lightning_vigu``
    (synthetic shards under ``synthetic/``, decoded splits under ``decoded/``)."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lightning_vigu"


class MemoryStream(IterableDataset):
    """Training samples drawn from :class:`MemoryClips` in seeded per-epoch permutations.

    Args:
        clips: the decoded split.
        batch_size: the loader's batch size (the unit of the rank / worker split and of resume).
        seed: base seed of the permutations.
        rank: this process's rank (``None``: 0 of 1).
        world_size: number of ranks.
    """

    def __init__(
        self,
        clips: MemoryClips,
        batch_size: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.clips, self.batch_size, self.seed = clips, batch_size, seed
        self.rank, self.world_size = rank or 0, world_size or 1
        if len(clips) < batch_size * self.world_size:
            raise ValueError(
                f"{len(clips)} clips in memory cannot fill one batch of {batch_size} on each of "
                f"{self.world_size} ranks; lower batch_size or add clips"
            )
        self.epoch = -1
        self._resume = 0  # batches already delivered in the resumed epoch

    def batches_per_epoch(self) -> int:
        """Full batches each rank gets per epoch (a last partial chunk is dropped)."""
        return len(self.clips) // self.batch_size // self.world_size

    def resume_at(self, epoch: int, batches: int, batch_size: int) -> None:
        """Continue epoch ``epoch`` after ``batches`` of this rank's batches were delivered."""
        if batch_size != self.batch_size:
            raise ValueError(
                f"the checkpoint's loader position counts batches of {batch_size} clips but "
                f"batch_size is now {self.batch_size}; resume with the batch size it was saved with"
            )
        self.epoch, self._resume = epoch - 1, batches

    def __iter__(self) -> Iterator[dict]:
        self.epoch += 1
        skip, self._resume = self._resume, 0
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        seeded = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.clips), generator=seeded)  # the same on every rank
        mine = range(self.rank, self.batches_per_epoch() * self.world_size, self.world_size)
        for n, chunk in enumerate(mine):  # n: this rank's batch number in the epoch
            if n < skip or n % workers != (worker + skip) % workers:
                continue
            start = chunk * self.batch_size
            for i in order[start : start + self.batch_size].tolist():
                yield self.clips.sample(i)
