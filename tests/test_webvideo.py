"""WebVideoDataModule: real mp4 shards -> batches, splitting, shuffling, bad input, patterns."""

from __future__ import annotations

import json
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from datamodules import WebVideoDataModule
from datamodules.in_memory import MemoryClips
from datamodules.sample_decoder import BadSampleError, SampleDecoder, SkippedSampleWarning
from datamodules.synthetic.generate import make_clip
from datamodules.synthetic.world import world_config
from datamodules.webvideo import ShardStream, expand_shards
from lightning_vigu.batch import check_batch
from lightning_vigu.video_io import (
    ClipSpec,
    ClipTooShortError,
    decode_clip,
    encode_video,
    frame_indices,
)

CPU = world_config("cpu")


def _keys(stream) -> list[str]:
    return [s["key"] for s in stream]


def _write_tar(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def _clip(index: int, frames: int | None = None) -> tuple[bytes, dict]:
    video, record = make_clip(CPU, 0, "test", index)
    return encode_video(video[:frames], CPU.fps), record


def _fitting(shards, val: str = "val-*.tar", **kwargs) -> WebVideoDataModule:
    """A DataModule over the synthetic shards' train split and ``val``, set up for fitting."""
    dm = WebVideoDataModule(
        train_shards=str(shards / "train-*.tar"), val_shards=str(shards / val), **kwargs
    )
    dm.setup("fit")
    return dm


def test_batches_follow_the_contract(data_synthetic_shards):
    val = "val-{000000..000001}.tar"
    # training batches leave the clips' records out unless asked (nothing in training reads
    # them; pinning walks every one), with the same clips and texts either way
    loader = _fitting(data_synthetic_shards, val, batch_size=4, num_workers=0).train_dataloader()
    plain = next(iter(loader))
    check_batch(plain)
    assert "meta" not in plain
    dm = _fitting(data_synthetic_shards, val, batch_size=4, num_workers=0, train_records=True)
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch)
    assert batch["key"] == plain["key"] and batch["caption"] == plain["caption"]
    assert torch.equal(batch["video"], plain["video"])
    assert batch["video"].shape == (4, 3, 16, 32, 32) and batch["video"].dtype == torch.float32
    assert batch["video"].min() >= -1.0 and batch["video"].max() <= 1.0
    assert batch["caption"] == [m["caption"] for m in batch["meta"]]
    assert batch["prompt"] == [m["prompt"] for m in batch["meta"]]
    val = [k for b in dm.val_dataloader() for k in b["key"]]
    assert val == [f"val-{i:06d}" for i in range(8)]  # deterministic order, nothing dropped
    assert dm.skipped_counts() == dict.fromkeys(dm.skipped_counts(), 0)
    # to the device by its tensors alone: Lightning's transfer would walk every record
    moved = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["video"].device.type == "meta" and batch["video"].device.type == "cpu"
    assert moved["meta"] is batch["meta"] and moved["prompt"] is batch["prompt"]


def test_decoded_pixels_match_the_rendered_clip(data_synthetic_shards):
    dm = WebVideoDataModule(
        val_shards=str(data_synthetic_shards / "val-000000.tar"), batch_size=2, num_workers=0
    )
    batch = next(iter(dm.val_dataloader()))
    frames, _ = make_clip(CPU, 0, "val", 0)
    expected = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0  # (3, T, H, W)
    assert torch.allclose(batch["video"][0], expected, atol=3 / 127.5)


def test_fps_sampling_resize_and_centre_crop():
    t = np.arange(30, dtype=np.uint8)
    frames = np.zeros((30, 48, 64, 3), dtype=np.uint8)
    frames[..., 0] = (t * 8)[:, None, None]  # red encodes the frame index
    frames[:, :, :6, 1] = 255  # a green stripe on the left edge, cropped away
    data = encode_video(frames, fps=16)
    clip = decode_clip(data, ClipSpec(num_frames=4, fps=8, size=(32, 32)), start=0.0)
    assert clip.shape == (4, 32, 32, 3)
    assert (
        np.abs(clip[:, 16, 16, 0].astype(int) - np.array([0, 16, 32, 48])).max() <= 3
    )  # every 2nd frame
    assert clip[..., 1].max() < 40  # 64 -> 43 wide: the stripe (4 px) lies in the 5 cropped px
    assert frame_indices(30, 16.0, ClipSpec(4, frame_stride=3), start=None) == [10, 13, 16, 19]
    with pytest.raises(ClipTooShortError, match="needs 31"):
        frame_indices(30, 30.0, ClipSpec(16, frame_stride=2), start=0.0)


def _key_only(raw: dict, start: float | None) -> dict:
    """A decoder that skips the video: the splitting/shuffling tests only need keys."""
    return {"key": raw["__key__"]}


def _stream(urls, decode: bool = False, **kwargs) -> ShardStream:
    return ShardStream(urls, SampleDecoder(ClipSpec(16)) if decode else _key_only, **kwargs)


def test_rank_and_worker_splits_are_disjoint_and_complete(data_synthetic_shards, monkeypatch):
    urls = expand_shards(str(data_synthetic_shards / "train-*.tar"))
    everything = sorted(_keys(_stream(urls)))
    assert len(everything) == 24
    seen = []
    for rank in range(2):
        for worker in range(3):  # webdataset.split_by_worker also reads WORKER / NUM_WORKERS
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", "3")
            seen += _keys(_stream(urls, train=True, shuffle_buffer=8, rank=rank, world_size=2))
    assert sorted(seen) == everything
    monkeypatch.delenv("WORKER")
    monkeypatch.delenv("NUM_WORKERS")
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank=None: webdataset.split_by_node reads the env
    by_env = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        by_env.append(set(_keys(_stream(urls))))
    assert not by_env[0] & by_env[1] and sorted(by_env[0] | by_env[1]) == everything


def test_dataloader_workers_cover_every_sample_once(data_synthetic_shards):
    dm = _fitting(data_synthetic_shards, batch_size=3, num_workers=2)
    train = [k for b in dm.train_dataloader() for k in b["key"]]
    assert len(train) == len(set(train)) == 24
    val = [k for b in dm.val_dataloader() for k in b["key"]]
    assert sorted(val) == [f"val-{i:06d}" for i in range(8)]


def test_training_shuffle_is_seeded_and_changes_per_epoch(data_synthetic_shards):
    urls = expand_shards(str(data_synthetic_shards / "train-*.tar"))
    a, b = (
        _stream(urls, train=True, shuffle_buffer=10, seed=1),
        _stream(urls, train=True, shuffle_buffer=10, seed=1),
    )
    first, again = _keys(a), _keys(b)
    assert first == again and sorted(first) == sorted(_keys(_stream(urls)))
    assert _keys(a) != first  # epoch 2 of the same stream
    assert _keys(_stream(urls, train=True, shuffle_buffer=10, seed=2)) != first


def test_resampled_stream_is_endless_or_sized(data_synthetic_shards):
    urls = expand_shards(str(data_synthetic_shards / "train-*.tar"))
    stream = _stream(urls, train=True, resampled=True, shuffle_buffer=4)
    taken = [s["key"] for _, s in zip(range(60), stream)]
    assert len(taken) == 60  # more than the 24 samples on disk
    sized = _stream(urls, train=True, resampled=True, samples_per_epoch=10)
    assert len(_keys(sized)) == 10 and len(_keys(sized)) == 10


@pytest.fixture()
def data_bad_shard(tmp_path) -> Path:
    good, record = _clip(0)
    short, _ = _clip(1, frames=8)
    samples = [
        {
            "__key__": "good",
            "mp4": good,
            "txt": b"a red circle",
            "json": json.dumps(record).encode(),
        },
        {"__key__": "garbage", "mp4": b"this is not a video" * 20, "txt": b"x"},
        {"__key__": "truncated", "mp4": good[: len(good) // 2], "txt": b"x"},
        {"__key__": "notext", "mp4": good},
        {"__key__": "short", "mp4": short, "txt": b"x"},
        {"__key__": "badjson", "mp4": good, "txt": b"x", "json": b"{not json"},
        {"__key__": "nocaption", "mp4": good, "txt": b"only a prompt"},
    ]
    _write_tar(tmp_path / "bad-000000.tar", samples)
    whole = _write_tar(
        tmp_path / "bad-000001.tar", [dict(samples[0], __key__=f"k{i}") for i in range(3)]
    )
    with tarfile.open(whole) as tar:
        cut = tar.getmember("k1.mp4").offset_data + 100
    whole.write_bytes(whole.read_bytes()[:cut])  # the shard ends inside k1's video
    return tmp_path


def test_bad_samples_are_skipped_counted_and_named(data_bad_shard):
    dm = WebVideoDataModule(
        val_shards=str(data_bad_shard / "bad-*.tar"), batch_size=2, num_workers=0
    )
    with pytest.warns(SkippedSampleWarning) as caught:
        batches = list(dm.val_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert keys == ["good", "nocaption", "k0"]
    assert batches[0]["caption"] == [_clip(0)[1]["caption"], "only a prompt"]  # no json: the prompt
    assert dm.skipped_counts() == {
        "corrupt_shard": 1,
        "truncated_shard": 0,
        "missing_video": 0,
        "missing_text": 1,
        "undecodable": 2,
        "too_short": 1,
        "bad_member": 1,
    }
    messages = [str(w.message) for w in caught]
    assert any("'garbage'" in m and "bad-000000.tar" in m for m in messages)
    assert any("bad-000001.tar" in m and "after sample 'k0'" in m for m in messages)


def test_skip_counts_cross_worker_processes(data_bad_shard):
    dm = WebVideoDataModule(
        val_shards=str(data_bad_shard / "bad-*.tar"), batch_size=2, num_workers=2
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keys = sorted(k for b in dm.val_dataloader() for k in b["key"])
    assert keys == ["good", "k0", "nocaption"]
    assert sum(dm.skipped_counts().values()) == 6


def test_require_caption_and_strict_mode(data_bad_shard):
    dm = WebVideoDataModule(
        val_shards=str(data_bad_shard / "bad-000000.tar"),
        require_caption=True,
        batch_size=1,
        num_workers=0,
    )
    with pytest.warns(SkippedSampleWarning) as caught:
        keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert keys == ["good"]
    assert any("'nocaption'" in str(w.message) and "no caption" in str(w.message) for w in caught)
    strict = WebVideoDataModule(
        val_shards=str(data_bad_shard / "bad-000000.tar"), strict=True, batch_size=1, num_workers=0
    )
    with pytest.raises(
        BadSampleError, match=r"sample 'garbage' of shard '.*bad-000000.tar' \(undecodable\)"
    ):
        list(strict.val_dataloader())


def test_patterns_fail_at_setup_with_their_name(tmp_path, data_synthetic_shards, monkeypatch):
    with pytest.raises(
        FileNotFoundError, match=r"train_shards: '.*nothing-\*\.tar' matches no shard"
    ):
        WebVideoDataModule(train_shards=str(tmp_path / "nothing-*.tar")).setup("fit")
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        WebVideoDataModule(
            val_shards=[
                str(data_synthetic_shards / "val-000000.tar"),
                str(tmp_path / "missing.tar"),
            ]
        ).setup("fit")
    monkeypatch.setattr("datamodules.webvideo.os.access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="val-000000.tar' is not readable"):
        WebVideoDataModule(val_shards=str(data_synthetic_shards / "val-000000.tar")).setup("fit")


def test_pattern_kinds_expand(data_synthetic_shards):
    folder = expand_shards(str(data_synthetic_shards))
    braces = expand_shards(str(data_synthetic_shards / "train-{000000..000005}.tar"))
    assert len(folder) == 8 and len(braces) == 6 and set(braces) <= set(folder)
    assert expand_shards("pipe:cat a.tar::pipe:cat b.tar") == ["pipe:cat a.tar", "pipe:cat b.tar"]
    stream = _stream(
        expand_shards(f"pipe:cat {data_synthetic_shards / 'val-000000.tar'}"), decode=True
    )
    assert len(_keys(stream)) == 4


# ---------------------------------------------------------------------------- in memory
@pytest.fixture(autouse=True)
def _decoded_splits_in_tmp(monkeypatch, tmp_path):
    """Decoded splits are kept under $LIGHTNING_VIGU_CACHE: one folder per test."""
    monkeypatch.setenv("LIGHTNING_VIGU_CACHE", str(tmp_path / "cache"))


def _memory_keys(dm: WebVideoDataModule, epochs: int = 1) -> list[list[str]]:
    loader = dm.train_dataloader()
    return [list(b["key"]) for _ in range(epochs) for b in loader]


def test_in_memory_training_holds_the_same_clips_and_walks_each_epoch_once(data_synthetic_shards):
    shards = str(data_synthetic_shards / "train-*.tar")
    dm = WebVideoDataModule(train_shards=shards, batch_size=4, num_workers=0, in_memory=True)
    batches = _memory_keys(dm, epochs=2)
    assert dm.memory is not None and dm.memory.tensors["video"].dtype == torch.uint8
    first, second = batches[:6], batches[6:]
    assert sorted(k for b in first for k in b) == [f"train-{i:06d}" for i in range(24)]
    assert sorted(k for b in second for k in b) == sorted(k for b in first for k in b)
    assert first != second  # a new permutation per epoch
    # the clips are the streamed ones: uint8 storage loses nothing of the decoded pixels
    streamed = {
        s["key"]: s for s in ShardStream(expand_shards(shards), dm.decoder, rank=0, world_size=1)
    }
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch)
    assert batch["video"].dtype == torch.uint8  # copied as pixels, made float on the device
    batch = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    for key, video, caption in zip(batch["key"], batch["video"], batch["caption"]):
        assert torch.allclose(video, streamed[key]["video"], atol=1e-6)
        assert caption == streamed[key]["caption"]


def test_in_memory_ranks_partition_the_epoch_and_workers_keep_the_order(data_synthetic_shards):
    shards = str(data_synthetic_shards / "train-*.tar")
    dm = WebVideoDataModule(train_shards=shards, batch_size=3, num_workers=0, in_memory=True)
    one = _memory_keys(dm)
    ranks = []
    for rank in (0, 1):
        stream = dm.memory_stream()
        stream.rank, stream.world_size = rank, 2
        ranks.append([s["key"] for s in stream])
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(k for b in one for k in b)
    two_workers = WebVideoDataModule(  # decodes again (the kept split would be the same)
        train_shards=shards, batch_size=3, num_workers=2, in_memory=True, in_memory_cache=False
    )
    assert _memory_keys(two_workers) == one  # the same batches whichever the worker count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_in_memory_decoding_holds_no_open_file_per_clip(data_synthetic_shards):
    # A tensor leaving a DataLoader worker keeps a shared-memory file descriptor open while it
    # lives: a split held that way ran out of open files (20,000 clips, `ulimit -n` 1,024).
    # Here 24 clips are decoded with room for 40 more open files: the workers and their shards
    # need about 20, the clips held as tensors would need 24 more.
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 40, hard))
    try:
        dm = WebVideoDataModule(
            train_shards=str(data_synthetic_shards / "train-*.tar"),
            batch_size=4,
            num_workers=2,
            in_memory=True,
        )
        dm.train_dataloader()  # decodes the split
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(dm.memory) == 24


def test_a_decoded_split_is_kept_and_loaded_until_a_shard_changes(
    data_synthetic_shards, tmp_path, monkeypatch
):
    shards = sorted(data_synthetic_shards.glob("train-*.tar"))
    copies = tmp_path / "shards"  # a copy this test may touch
    copies.mkdir()
    for shard in shards:
        (copies / shard.name).write_bytes(shard.read_bytes())
    make = lambda: WebVideoDataModule(  # noqa: E731
        train_shards=str(copies / "train-*.tar"), batch_size=4, num_workers=0, in_memory=True
    )
    first = make()
    first.train_dataloader()
    kept = list((tmp_path / "cache" / "decoded").glob("*.pt"))
    assert len(kept) == 1
    decodes = []
    real = MemoryClips.decode
    monkeypatch.setattr(MemoryClips, "decode", lambda *a, **k: decodes.append(1) or real(*a, **k))
    second = make()
    second.train_dataloader()  # loaded, not decoded
    assert not decodes and second.memory.key == first.memory.key
    for k, t in first.memory.tensors.items():
        assert torch.equal(second.memory.tensors[k], t)
    os.utime(copies / shards[0].name, ns=(1, 1))  # a changed shard: another file
    make().train_dataloader()
    assert decodes == [1] and len(list(kept[0].parent.glob("*.pt"))) == 2


def test_an_unreadable_decoded_split_is_named_then_decoded_and_rewritten(
    data_synthetic_shards, tmp_path
):
    shards = str(data_synthetic_shards / "train-*.tar")
    make = lambda: WebVideoDataModule(  # noqa: E731
        train_shards=shards, batch_size=4, num_workers=0, in_memory=True
    )
    make().train_dataloader()
    (kept,) = (tmp_path / "cache" / "decoded").glob("*.pt")
    kept.write_bytes(kept.read_bytes()[:1000])  # truncated
    dm = make()
    with pytest.warns(UserWarning, match=f"{kept.name}.*decoding the shards again"):
        dm.train_dataloader()
    assert len(dm.memory) == 24
    assert len(MemoryClips.load(kept)[0]) == 24  # rewritten whole


def test_a_loaded_split_keeps_the_skip_counts_of_its_decoding(data_bad_shard):
    make = lambda: WebVideoDataModule(  # noqa: E731
        train_shards=str(data_bad_shard / "bad-*.tar"), batch_size=1, num_workers=0, in_memory=True
    )
    first = make()
    with pytest.warns(SkippedSampleWarning):
        first.train_dataloader()
    loaded = make()
    loaded.train_dataloader()
    assert loaded.skipped_counts() == first.skipped_counts()
    assert sum(first.skipped_counts().values()) > 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_in_memory_resume_continues_the_epoch(data_synthetic_shards, num_workers):
    shards = str(data_synthetic_shards / "train-*.tar")
    make = lambda: WebVideoDataModule(  # noqa: E731
        train_shards=shards, batch_size=4, num_workers=num_workers, in_memory=True
    )
    full = _memory_keys(make())
    loader = make().train_dataloader()
    batches = iter(loader)
    seen = [list(next(batches)["key"]) for _ in range(2)]
    assert seen == full[:2]
    resumed = make().train_dataloader()
    resumed.load_state_dict(loader.state_dict())
    assert [list(b["key"]) for b in resumed] == full[2:]
    with pytest.raises(ValueError, match="batch_size"):
        dm = WebVideoDataModule(train_shards=shards, batch_size=2, num_workers=0, in_memory=True)
        dm.train_dataloader().load_state_dict(loader.state_dict())
