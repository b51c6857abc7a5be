"""WebDataset video DataModule: tar shards of ``KEY.mp4`` + texts -> :class:`~lightning_vigu.batch.Batch`.

Pipeline of one :class:`ShardStream` iteration (one per DataLoader worker and epoch)::

    shard urls --(train: shuffled per epoch, same order on every rank)
      --> split by node (rank) --> split by worker          [or resampled: random shards forever]
      --> tar members --> samples --(train: shuffle buffer)--> SampleDecoder --> dict
    DataLoader(batch_size, collate_fn=collate_batch) --> Batch

Validation/test streams are deterministic: no shuffling, clips centred in their videos.
Bad samples are skipped with a :class:`~datamodules.sample_decoder.SkippedSampleWarning` naming the
shard and key and counted by reason (:meth:`WebVideoDataModule.skipped_counts`; the CLI logs
them, see :class:`callbacks.SkippedSamples`); with ``strict=True`` the same message is raised
instead, and after ``max_consecutive_skips`` bad samples in a row the stream stops with an error
naming its shards (a shard list with no usable sample never hangs).

Resume: the training loader is stateful (:class:`StreamLoader`): Lightning saves its position
(epoch, batches delivered) in the checkpoint, and a resumed run draws a stream seeded by that
position, so it sees new data rather than the start of the stream again (see the README).

``pipe:`` urls run their command through the shell, with the rights of the training process:
a config that names shards is code; use only configs you trust.
"""

from __future__ import annotations

import glob
import io
import itertools
import math
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from webdataset.tariterators import group_by_keys, tar_file_expander

from datamodules.in_memory import MemoryClips, MemoryStream, decoded_cache_file
from datamodules.sample_decoder import (
    SKIP_REASONS,
    BadSample,
    BadSampleError,
    SampleDecoder,
    SkipCounter,
    SkippedSampleWarning,
)
from lightning_vigu.batch import Batch, batch_to_device, collate_batch
from lightning_vigu.video_io import ClipSpec

ShardSpec = str | Sequence[str]


def expand_shards(spec: ShardSpec, what: str = "shards") -> list[str]:
    """Expand shard patterns into a list of urls, checking that local files exist.

    Accepts a path, a brace pattern (``data/train-{000000..000009}.tar``), a glob
    (``data/*.tar``), a folder (all its ``*.tar``), a ``pipe:`` command or a remote url, or a
    list of those (a string may also join several with ``::``). A ``pipe:`` url is a shell
    command run as is (``pipe:curl -s https://host/train-000000.tar``): whoever writes the
    config runs commands on the training machine.

    Raises:
        FileNotFoundError: a local pattern matches no file.
        PermissionError: a local shard is not readable.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        for url in wds.shardlists.expand_urls(str(item)):
            if url.startswith("pipe:") or "://" in url:
                urls.append(url)
                continue
            path = os.path.expanduser(url)
            if any(c in path for c in "*?["):
                matches = sorted(glob.glob(path))
            elif os.path.isdir(path):
                matches = sorted(str(p) for p in Path(path).glob("*.tar"))
            else:
                matches = [path] if os.path.exists(path) else []
            if not matches:
                raise FileNotFoundError(
                    f"{what}: '{item}' matches no shard (looked for '{path}'); pass a tar path, "
                    "a brace pattern like data/train-{000000..000009}.tar, a glob, a folder of "
                    ".tar files or a 'pipe:' command"
                )
            for match in matches:
                if not os.access(match, os.R_OK):
                    raise PermissionError(
                        f"{what}: shard '{match}' is not readable; fix its permissions"
                    )
            urls.extend(matches)
    if not urls:
        raise FileNotFoundError(f"{what}: the shard list {spec!r} is empty")
    return urls


class ShardStream(IterableDataset):
    """An iterable over decoded samples of a list of shards.

    Args:
        urls: shard urls (see :func:`expand_shards`).
        decoder: reads one raw sample (a :class:`~datamodules.sample_decoder.SampleDecoder`); gets
            the clip position (random in training, ``None``: centred) and raises
            :class:`~datamodules.sample_decoder.BadSample` for unusable samples.
        train: shuffle shards (per epoch) and samples, and place clips at random in longer
            videos; otherwise a deterministic pass with centred clips.
        resampled: draw shards at random forever (training by ``max_steps``); every rank and
            worker draws its own stream, so no splitting is needed.
        shuffle_buffer: samples in the shuffle buffer (``train`` only; 0 disables).
        seed: base seed of all shuffling.
        rank: this process's rank; ``None`` asks ``webdataset.split_by_node`` (environment
            ``RANK``/``WORLD_SIZE`` or ``torch.distributed``).
        world_size: number of ranks (with ``rank``).
        samples_per_epoch: with ``resampled``, end an epoch after this many samples in total
            (split over ranks and workers); ``None`` streams forever.
        counter: shared skip counter (a private one when ``None``).
        strict: raise :class:`~datamodules.sample_decoder.BadSampleError` instead of skipping.
        max_consecutive_skips: raise :class:`~datamodules.sample_decoder.BadSampleError` (naming the
            shards) after this many bad samples or shards in a row, across epochs.
    """

    def __init__(
        self,
        urls: list[str],
        decoder: Callable[[dict, float | None], dict],
        *,
        train: bool = False,
        resampled: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        samples_per_epoch: int | None = None,
        counter: SkipCounter | None = None,
        strict: bool = False,
        max_consecutive_skips: int = 1000,
    ) -> None:
        super().__init__()
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.urls = list(urls)
        self.decoder = decoder
        self.train = train
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.samples_per_epoch = samples_per_epoch
        self.counter = counter if counter is not None else SkipCounter()
        self.strict = strict
        self.max_consecutive_skips = max_consecutive_skips
        self.epoch = -1
        self._skips_in_a_row = 0
        self._resume = (0, 1)  # (batches delivered in the resumed epoch, batch size)

    def resume_at(self, epoch: int, batches: int, batch_size: int) -> None:
        """Continue epoch ``epoch`` after ``batches`` batches were delivered: the next pass is
        seeded by that position (new data, not the start of the stream again) and, with
        ``samples_per_epoch``, holds the samples the epoch has left."""
        self.epoch = epoch - 1
        self._resume = (batches, batch_size)

    def _where(self) -> tuple[int, int, int, int]:
        rank, world, _, _ = wds.utils.pytorch_worker_info()
        if self.rank is not None:
            rank, world = self.rank, self.world_size or 1
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank, world, worker, workers

    def _split_by_node(self, src: Iterator[dict]) -> Iterator[dict]:
        if self.rank is None:
            yield from wds.split_by_node(src)
        else:
            yield from itertools.islice(src, self.rank, None, self.world_size or 1)

    def _shards(self, rng: random.Random, tag: str) -> Iterator[dict]:
        if self.resampled:
            return ({"url": rng.choice(self.urls)} for _ in itertools.count())
        urls = list(self.urls)
        if self.train:  # the same order on every rank, so the node split stays a partition
            random.Random(tag).shuffle(urls)
        return wds.split_by_worker(self._split_by_node({"url": u} for u in urls))

    def _skip(self, reason: str, message: str) -> None:
        self.counter.add(reason)
        if self.strict:
            raise BadSampleError(f"{message} (strict=True; set strict=False to skip bad samples)")
        self._skips_in_a_row += 1
        if self._skips_in_a_row >= self.max_consecutive_skips:
            shown = self.urls[:5] + (
                [f"... {len(self.urls) - 5} more"] if len(self.urls) > 5 else []
            )
            raise BadSampleError(
                f"{self._skips_in_a_row} bad samples in a row and none usable, in shards {shown} "
                f"(skips by reason: {self.counter.as_dict()}); the last: {message}. Check the "
                "shards and the DataModule's prompt_key/caption_key/num_frames/fps, or raise "
                "max_consecutive_skips if long bad stretches are expected"
            )
        warnings.warn(message, SkippedSampleWarning, stacklevel=3)

    def _read_shards(self, shards: Iterator[dict]) -> Iterator[dict]:
        """Raw samples of each shard; a shard that breaks (truncated, corrupt member) is
        skipped from that point on, counted once, and the stream moves to the next shard."""
        for shard in shards:
            url, key = shard["url"], None
            try:
                with wds.gopen(url, "rb") as stream:
                    reader = _EndCheckingReader(stream)
                    files = tar_file_expander([{"url": url, "stream": reader}], eof_value={})
                    for sample in group_by_keys(files):
                        key = sample["__key__"]
                        yield sample
                    reader.drain()
                if reader.truncated():
                    where = f"after sample '{key}'" if key else "before its first sample"
                    self._skip(
                        "truncated_shard",
                        f"shard '{url}' ends {where} without the tar end-of-archive marker: it "
                        "was cut short (an interrupted copy or download?) and the samples after "
                        "the cut are missing; copy the shard again",
                    )
            except Exception as exn:  # tarfile, OSError, pipe failures: all mean a broken shard
                where = f"after sample '{key}'" if key else "before its first sample"
                detail = exn.args[0] if exn.args else ""
                self._skip(
                    "corrupt_shard",
                    f"skipped the rest of shard '{url}' ({where}): {type(exn).__name__}: {detail}",
                )

    def __iter__(self) -> Iterator[dict]:
        self.epoch += 1
        (resumed, batch_size), self._resume = self._resume, (0, 1)
        rank, world, worker, workers = self._where()
        tag = f"{self.seed}-{self.epoch}" + (f"-resume{resumed}" if resumed else "")
        rng = random.Random(f"{tag}-{rank}-{worker}")
        raw = self._read_shards(self._shards(rng, tag))
        if self.train and self.shuffle_buffer > 0:
            raw = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)(
                raw
            )
        samples = self._decode(raw, rng)
        if self.resampled and self.samples_per_epoch is not None:
            mine = math.ceil(self.samples_per_epoch / (world * workers))
            delivered = batch_size * len(range(worker, resumed, workers))  # batches go round-robin
            samples = itertools.islice(samples, max(0, mine - delivered))
        yield from samples

    def _decode(self, raw: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        for sample in raw:
            try:
                decoded = self.decoder(sample, rng.random() if self.train else None)
                self._skips_in_a_row = 0
                yield decoded
            except BadSample as exn:
                shard, key = sample.get("__url__", "?"), sample.get("__key__", "?")
                self._skip(
                    exn.reason,
                    f"skipped sample '{key}' of shard '{shard}' ({exn.reason}): {exn.detail}",
                )


class _EndCheckingReader(io.RawIOBase):
    """A read-through wrapper of a shard's byte stream that keeps its first and last bytes, so a
    tar cut at a member boundary (which ``tarfile`` reads as a normal end) can be told apart
    from a whole one: an uncompressed tar ends with at least two 512-byte blocks of zeros."""

    _COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream = stream
        self.head = b""
        self.tail = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if data:
            if len(self.head) < 8:
                self.head = (self.head + data)[:8]
            self.tail = (self.tail + data)[-1024:]
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read what ``tarfile`` left after the end marker (zero padding)."""
        while self.read(1 << 16):
            pass

    def truncated(self) -> bool:
        """The stream was a plain tar and did not end with its end-of-archive marker."""
        if not self.head or self.head.startswith(self._COMPRESSED):
            return False  # compressed streams report their own truncation
        return len(self.tail) < 1024 or bool(self.tail.strip(b"\0"))


class StreamLoader(DataLoader):
    """A DataLoader over a :class:`ShardStream` whose position is saved in checkpoints.

    Lightning stores ``state_dict()`` of a stateful training loader with the loop state and
    calls ``load_state_dict`` on resume, before the first batch; the stream then continues the
    epoch from a pass seeded by the saved position (:meth:`ShardStream.resume_at`). The count
    is of batches handed out, which runs at most Lightning's one prefetched batch ahead of the
    steps taken.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._epoch, self._batches, self._resume = -1, 0, 0

    def __iter__(self):
        self._epoch += 1
        self._batches, self._resume = self._resume, 0
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches", "batch_size"}``: the stream's epoch and the batches (of that
        size) handed out in it."""
        return {
            "epoch": max(self._epoch, 0),
            "batches": self._batches,
            "batch_size": self.batch_size or 1,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state`` (see :meth:`state_dict`)."""
        self._epoch, self._resume = state["epoch"] - 1, state["batches"]
        if hasattr(self.dataset, "resume_at"):  # ShardStream, MemoryStream
            saved = state.get("batch_size", self.batch_size or 1)  # older checkpoints: ours
            self.dataset.resume_at(state["epoch"], state["batches"], saved)


def parse_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``(height, width)`` from a square side, a pair, or ``None``."""
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


class WebVideoDataModule(L.LightningDataModule):
    """Video-text pairs from WebDataset shards (local paths, brace patterns, globs, ``pipe:``).

    Args:
        train_shards: training shards (see :func:`expand_shards`).
        val_shards: validation shards, read once per validation in a fixed order.
        test_shards: test shards.
        batch_size: samples per batch (per rank).
        num_workers: DataLoader worker processes (0 decodes in the main process).
        num_frames: frames per clip.
        fps: sample frames at this rate; ``None`` uses ``frame_stride``.
        frame_stride: source frames between sampled frames when ``fps`` is ``None``.
        size: output ``(height, width)`` or a square side; videos are resized to cover it and
            centre-cropped. ``None`` keeps the source size (all videos must then match).
        prompt_key: member with the prompt (``"txt"``) or ``"json:<field>"``.
        caption_key: member or ``"json:<field>"`` with the detailed caption; the prompt is
            used when it is missing.
        require_caption: skip samples without a caption instead.
        shuffle_buffer: training shuffle buffer (samples).
        resampled: training draws shards at random forever (use with ``max_steps``).
        samples_per_epoch: with ``resampled``, samples per epoch over all ranks (``None``: one
            endless epoch).
        seed: seed of shard order, shuffle buffer and clip placement.
        strict: raise on the first bad sample instead of skipping it.
        max_consecutive_skips: stop with an error naming the shards after this many bad samples
            in a row (per worker), instead of skipping forever.
        latents: ``None`` reads ``latents.npy`` members when present (latent-cache shards),
            ``True`` requires them, ``False`` always decodes the video.
        video_key: member name of the video (default: the first video extension present).
        pin_memory: DataLoader ``pin_memory``.
        in_memory: decode the training shards once, when the training loader is first asked
            for, and draw training batches from memory (:mod:`datamodules.in_memory`): no
            decoding per step, for worlds that fit in host memory. Clips are decoded centred
            (no random placement in longer videos); ``resampled``, ``samples_per_epoch`` and
            ``shuffle_buffer`` do not apply (each epoch is a seeded permutation of the clips).
        in_memory_cache: with ``in_memory``, keep the decoded split in a file under
            ``$LIGHTNING_VIGU_CACHE/decoded/`` (named by the shards' paths, sizes and
            modification times and the decoder's settings) and load it instead of decoding
            when the same shards are decoded again (local shards only). The file is as large
            as the split in memory; delete the folder to reclaim the space.
        train_records: keep each clip's record (``meta``, the synthetic world's ground truth)
            in training batches. Off by default: training reads none of them, and the
            DataLoader's pin-memory thread walks every nested record of a batch while holding
            the interpreter lock the training loop needs (about 9 ms a batch of 256 synthetic
            clips on a 2-core CPU, against 0.2 ms for their prompts, captions and keys).
            Validation and test batches always keep them (the evaluation scores with them).
    """

    def __init__(
        self,
        train_shards: ShardSpec | None = None,
        val_shards: ShardSpec | None = None,
        test_shards: ShardSpec | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        num_frames: int = 16,
        fps: float | None = None,
        frame_stride: int = 1,
        size: int | tuple[int, int] | None = None,
        prompt_key: str = "txt",
        caption_key: str = "json:caption",
        require_caption: bool = False,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        strict: bool = False,
        latents: bool | None = None,
        video_key: str | None = None,
        pin_memory: bool = False,
        max_consecutive_skips: int = 1000,
        in_memory: bool = False,
        in_memory_cache: bool = True,
        train_records: bool = False,
    ) -> None:
        super().__init__()
        self.shards = {"train": train_shards, "val": val_shards, "test": test_shards}
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.decoder = SampleDecoder(
            clip=ClipSpec(num_frames, fps, frame_stride, parse_size(size)),
            prompt_key=prompt_key,
            caption_key=caption_key,
            require_caption=require_caption,
            latents=latents,
            video_key=video_key,
        )
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.strict = strict
        self.max_consecutive_skips = max_consecutive_skips
        self.pin_memory = pin_memory
        self.in_memory = in_memory
        self.in_memory_cache = in_memory_cache
        self.train_records = train_records
        self.memory: MemoryClips | None = None
        self.urls: dict[str, list[str]] = {}
        self.counter: SkipCounter | None = None

    def transfer_batch_to_device(self, batch: Batch, device: torch.device, dataloader_idx: int):
        """Tensors to the device; texts and the ground-truth records stay as they are
        (:func:`~lightning_vigu.batch.batch_to_device`: Lightning's transfer would walk every
        record, milliseconds of host time a step)."""
        return batch_to_device(batch, device)

    def setup(self, stage: str | None = None) -> None:
        """Expand and check the shard patterns; create the shared skip counter."""
        for split, spec in self.shards.items():
            if spec is not None and split not in self.urls:
                self.urls[split] = expand_shards(spec, f"{split}_shards")
        if self.counter is None:
            self.counter = SkipCounter()
        world = self._rank_world()[1]
        train = self.urls.get("train", [])
        if world > 1 and not self.resampled and train and len(train) % world:
            warnings.warn(
                f"{len(train)} training shards do not split evenly over {world} ranks; ranks "
                "will see different numbers of batches. Use resampled=True with max_steps, or a "
                "shard count divisible by the world size.",
                stacklevel=2,
            )

    def _rank_world(self) -> tuple[int | None, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return None, wds.utils.pytorch_worker_info()[1]

    def stream(self, split: str, whole: bool = False) -> ShardStream:
        """The :class:`ShardStream` of ``split`` (``"train"``, ``"val"``, ``"test"``...);
        ``whole``: one deterministic pass over all of it on every rank (to hold it in memory)."""
        if split not in self.urls:
            self.setup()
        if split not in self.urls:
            raise ValueError(f"no {split}_shards were given to {type(self).__name__}")
        train = split == "train" and not whole
        rank, world = (0, 1) if whole else self._rank_world()
        return ShardStream(
            self.urls[split],
            self.decoder,
            train=train,
            resampled=train and self.resampled,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            seed=self.seed,
            rank=rank,
            world_size=world if rank is not None else None,
            samples_per_epoch=self.samples_per_epoch,
            counter=self.counter,
            strict=self.strict,
            max_consecutive_skips=self.max_consecutive_skips,
        )

    def memory_stream(self) -> MemoryStream:
        """The training split held in memory (decoded on the first call)."""
        if self.memory is None:
            stream = self.stream("train", whole=True)  # also expands the shard patterns
            what = f"{len(self.urls['train'])} training shards"
            urls = self.urls["train"]
            cache = decoded_cache_file(urls, self.decoder) if self.in_memory_cache else None
            self.memory = MemoryClips.load_or_decode(
                stream, self.num_workers, what, self.counter, cache
            )
        rank, world = self._rank_world()
        return MemoryStream(self.memory, self.batch_size, self.seed, rank, world)

    def loader(self, split: str) -> DataLoader:
        """A DataLoader over ``split`` that yields collated :class:`~lightning_vigu.batch.Batch`."""
        train = split == "train"
        return (StreamLoader if train else DataLoader)(
            self.memory_stream() if train and self.in_memory else self.stream(split),
            batch_size=self.batch_size,
            collate_fn=collate_batch
            if self.train_records or not train
            else partial(collate_batch, drop=("meta",)),
            num_workers=self.num_workers,
            persistent_workers=train and self.num_workers > 0,
            pin_memory=self.pin_memory,
            drop_last=train,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def _optional_loader(self, split: str) -> DataLoader | list:
        """The loader of ``split``, or ``[]`` (Lightning: no such loop) when it has no shards."""
        if split not in self.urls:
            self.setup()
        return self.loader(split) if split in self.urls else []

    def val_dataloader(self) -> DataLoader | list:
        return self._optional_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._optional_loader("test")

    def skipped_counts(self) -> dict[str, int]:
        """Samples skipped so far by reason, summed over all DataLoader workers of this process."""
        return (
            self.counter.as_dict() if self.counter is not None else dict.fromkeys(SKIP_REASONS, 0)
        )
