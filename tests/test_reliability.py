"""Runs that lose nothing (issue 17): run folders, locks, safe and atomic checkpoints, SIGTERM,
streaming resume, bad data that is loud, and values that are refused."""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import av
import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from test_training import RandomClips, RandomVideoDataModule, tiny_module
from torch.utils.data import DataLoader

from callbacks import SkippedSamples
from datamodules.sample_decoder import BadSample, BadSampleError, SampleDecoder
from datamodules.synthetic.generate import ensure_split
from datamodules.synthetic.world import world_config
from datamodules.webvideo import ShardStream, WebVideoDataModule
from datamodules.write_shards import write_shards
from lightning_vigu import runs
from lightning_vigu.batch import collate_batch
from lightning_vigu.cli import ViGUCLI, caption_main, load_module
from lightning_vigu.video_io import ClipSpec, decode_clip, encode_video

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- a tiny CLI run
def _fit_args(run: Path, max_steps: int, *extra: str) -> list[str]:
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(run / "checkpoints"), "every_n_train_steps": 2,
                       "save_last": True, "save_top_k": -1}},
        {"class_path": "lightning.pytorch.callbacks.OnExceptionCheckpoint",
         "init_args": {"dirpath": str(run / "checkpoints"), "filename": "interrupted"}},
    ]  # fmt: skip
    logger = [
        {"class_path": "lightning.pytorch.loggers.CSVLogger",
         "init_args": {"save_dir": str(run), "name": "", "version": ""}},
    ]  # fmt: skip
    return [
        "fit",
        "--data.class_path=test_training.RandomVideoDataModule",
        "--model.caption_length=8", "--model.prompt_length=8", "--model.video_shape=[2, 8, 8]",
        "--model.warmup_steps=1", f"--trainer.max_steps={max_steps}",
        "--trainer.accelerator=cpu", "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={run}",
        f"--trainer.logger={yaml.safe_dump(logger, default_flow_style=True)}",
        f"--trainer.callbacks={yaml.safe_dump(callbacks, default_flow_style=True)}",
        *extra,
    ]  # fmt: skip


def _csv_steps(run: Path) -> list[int]:
    with (run / "metrics.csv").open() as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def data_finished_run(tmp_path_factory) -> Path:
    """A run folder of 2 finished steps (checkpoints, metrics.csv, config.yaml)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    cli = ViGUCLI(args=_fit_args(run, 2))
    assert isinstance(cli.trainer.strategy.checkpoint_io, runs.AtomicCheckpointIO)
    return run


@pytest.fixture
def run_copy(data_finished_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(data_finished_run, run)
    # the copy's callbacks must write into the copy: its paths are the copy's own
    return run


def test_fresh_fit_refuses_another_runs_folder_and_a_resume_appends(run_copy):
    before = {p: p.read_bytes() for p in (run_copy / "metrics.csv", run_copy / "config.yaml")}
    assert _csv_steps(run_copy) == [0, 1]
    with pytest.raises(runs.RunFolderError, match="--ckpt_path=.*last.ckpt") as exn:
        ViGUCLI(args=_fit_args(run_copy, 2))
    assert str(run_copy) in str(exn.value)
    assert all(p.read_bytes() == b for p, b in before.items())  # nothing touched

    ViGUCLI(args=_fit_args(run_copy, 4, "--ckpt_path=last"))
    assert _csv_steps(run_copy) == [0, 1, 2, 3]  # appended, the first rows kept
    assert (run_copy / "config.yaml").read_bytes() == before[run_copy / "config.yaml"]
    resumed = yaml.safe_load((run_copy / "config.resume-1.yaml").read_text())
    assert resumed["trainer"]["max_steps"] == 4


def test_a_second_run_on_a_locked_folder_stops_naming_the_first(tmp_path):
    run = tmp_path / "run"
    holder = runs.RunLock([run])  # what a running fit holds (an flock on <run>/.run.lock)
    try:
        with pytest.raises(
            runs.RunFolderError, match=f"in use by another run \\(pid {os.getpid()}"
        ):
            ViGUCLI(args=_fit_args(run, 2))
    finally:
        holder.release()
    assert not (run / "metrics.csv").exists() and not (run / "checkpoints").exists()


def _generate_split(out: str, go=None) -> None:
    if go is not None:
        go.wait(60)
    ensure_split(out, world_config("cpu"), "val", 2, 0, 1, workers=1, progress=False)


def test_synthetic_cache_lock_makes_a_second_run_wait_then_reuse(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setenv("LIGHTNING_VIGU_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cache" / "world"
    out.mkdir(parents=True)
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    second = ctx.Process(target=_generate_split, args=(str(out), go))
    second.start()  # forked before the lock is taken, so it does not share the lock's file
    try:
        with (out / "val.lock").open("a") as lock:  # a first run generating the split
            fcntl.flock(lock, fcntl.LOCK_EX)
            go.set()
            time.sleep(1.0)
            assert second.is_alive() and not list(out.glob("val-*"))  # waits, deletes nothing
        second.join(60)
        assert second.exitcode == 0
    finally:
        if second.is_alive():
            second.kill()
    shards = sorted(out.glob("val-*.tar"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    _generate_split(str(out))  # a third run reuses the finished split
    assert len(shards) == 2 and [p.stat().st_mtime_ns for p in shards] == stamps


# ---------------------------------------------------------------------------- checkpoints
class _Evil:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (str(self.path),))  # runs on unpickling


def test_checkpoints_load_safely_and_pickles_need_an_opt_in(data_finished_run, tmp_path):
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "code-ran"
    torch.save({"state_dict": _Evil(marker)}, evil)
    with pytest.raises(runs.CheckpointError, match="--model.trust_pickle=true") as exn:
        tiny_module(init_from=str(evil))
    assert str(evil) in str(exn.value)
    with pytest.raises(runs.CheckpointError, match="--trust-pickle"):
        load_module(str(evil), "cpu")
    assert not marker.exists()
    # the project's own checkpoints need no pickles
    module = load_module(str(data_finished_run / "checkpoints" / "last.ckpt"), "cpu")
    assert module.hparams.video_shape == [2, 8, 8] or tuple(module.hparams.video_shape) == (2, 8, 8)
    tiny_module(init_from=str(data_finished_run / "checkpoints" / "last.ckpt"))


def test_a_python_built_module_loads_with_its_parts_passed_again(tmp_path):
    from datamodules.synthetic import WorldTokenizer

    module = tiny_module(tokenizer=WorldTokenizer())  # not open_clip's default vocabulary
    ckpt = tmp_path / "python_built.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__,
        },
        ckpt,
    )
    with pytest.raises(runs.CheckpointError, match="built in Python: its codec, tokenizer") as e:
        load_module(str(ckpt), "cpu")
    assert str(ckpt) in str(e.value) and "codec=..., tokenizer=..., prompt_encoder=..." in str(
        e.value
    )
    loaded = load_module(str(ckpt), "cpu", tokenizer=WorldTokenizer())
    for name, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def _other_filesystem_tmp(path: Path) -> str | None:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != path.stat().st_dev:
        return str(shm)
    return None


def test_checkpoint_writes_replace_the_file_and_never_leave_a_partial_one(tmp_path, monkeypatch):
    # the system temp folder on another filesystem than the run, as on clusters
    monkeypatch.setattr(tempfile, "tempdir", _other_filesystem_tmp(tmp_path))
    target = tmp_path / "last.ckpt"
    io_ = runs.AtomicCheckpointIO()
    io_.save_checkpoint({"step": 1, "w": torch.zeros(1000)}, target)
    old = target.read_bytes()
    with target.open("rb") as reader:  # a reader of the old file while the new one is written
        io_.save_checkpoint({"step": 2, "w": torch.ones(1000)}, target)
        assert reader.read() == old  # replaced by rename, never rewritten in place
    assert torch.load(target, weights_only=True)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    # a full disk in the middle of a write (file size limit: the write fails with EFBIG)
    current = target.read_bytes()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(current) // 2, len(current) // 2))
        try:
            io_.save_checkpoint({"step": 3, "w": torch.full((1000,), 3.0)}, target)
        except OSError:
            os._exit(7)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7
    assert target.read_bytes() == current  # the previous checkpoint is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file


def test_an_unreadable_checkpoint_is_refused_by_name(run_copy):
    bad = run_copy / "checkpoints" / "interrupted.ckpt"
    bad.write_bytes(b"")  # newer than last.ckpt: what --ckpt_path=last would pick
    with pytest.raises(runs.CheckpointError, match="interrupted.ckpt' is empty") as exn:
        ViGUCLI(args=_fit_args(run_copy, 4, "--ckpt_path=last"))
    assert "last.ckpt" in str(exn.value)  # the readable alternative is named
    cut = run_copy / "checkpoints" / "cut.ckpt"
    data = (run_copy / "checkpoints" / "last.ckpt").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(runs.CheckpointError, match="cut.ckpt' is unreadable"):
        ViGUCLI(args=_fit_args(run_copy, 4, f"--ckpt_path={cut}"))


class SigtermAtStep(L.Callback):
    """Sends this process SIGTERM after ``step`` steps (what a scheduler does at a deadline)."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_writes_the_checkpoint_and_exits_143(tmp_path):
    run = tmp_path / "run"
    args = _fit_args(run, 50, "--trainer.callbacks+=test_reliability.SigtermAtStep")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    r = subprocess.run(
        [sys.executable, "-m", "lightning_vigu", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "interrupted.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2


# ---------------------------------------------------------------------------- streaming resume
class KeyRecorder(L.LightningModule):
    """Records the sample keys of each training step (one weight, so there is something to step)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.keys: dict[int, list[str]] = {}

    def training_step(self, batch, batch_idx):
        self.keys[self.global_step] = list(batch["key"])
        return (self.w - batch["video"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _stream_fit(root: Path, max_steps: int, ckpt_path: str | None = None, **dm) -> KeyRecorder:
    module = KeyRecorder()
    data = WebVideoDataModule(
        **{"batch_size": 2, "num_workers": 0, "shuffle_buffer": 4, "num_frames": 4, **dm}
    )
    ckpt = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1)
    L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[ckpt],
    ).fit(module, data, ckpt_path=ckpt_path)  # fmt: skip
    return module


@pytest.mark.parametrize("resampled", [True, False])
def test_a_resumed_streaming_run_sees_new_data(data_synthetic_shards, tmp_path, resampled):
    shards = str(data_synthetic_shards / "train-*.tar")
    full = _stream_fit(tmp_path / "a", 4, train_shards=shards, resampled=resampled)
    ckpt = next((tmp_path / "a").glob("*step=2.ckpt"))
    state = torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]
    assert state["combined_loader"][0]["epoch"] == 0 and state["combined_loader"][0]["batches"] >= 2
    resumed = _stream_fit(tmp_path / "b", 4, str(ckpt), train_shards=shards, resampled=resampled)
    assert sorted(resumed.keys) == [2, 3]
    # before: a fresh process replayed the stream's first batches after the resume step
    assert [resumed.keys[2], resumed.keys[3]] != [full.keys[0], full.keys[1]]


# ---------------------------------------------------------------------------- bad data
def _write_tar(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def _clip(frames: int = 16) -> bytes:
    video = np.zeros((frames, 32, 32, 3), np.uint8)
    video[:, 8:24, 8:24, 0] = 200
    return encode_video(video, 8)


def test_a_shard_list_with_no_usable_sample_raises_instead_of_hanging(tmp_path):
    bad = [{"__key__": f"k{i}", "mp4": b"not a video" * 30, "txt": b"x"} for i in range(3)]
    shard = _write_tar(tmp_path / "bad-000000.tar", bad)
    decoder = SampleDecoder(ClipSpec(4))
    stream = ShardStream([str(shard)], decoder, train=True, resampled=True, max_consecutive_skips=7)
    with pytest.warns(), pytest.raises(BadSampleError, match="7 bad samples in a row") as exn:
        next(iter(stream))
    assert str(shard) in str(exn.value) and "undecodable" in str(exn.value)


def test_skip_counts_are_logged_and_summarised(tmp_path, caplog):
    good = _clip()
    samples = [{"__key__": f"g{i}", "mp4": good, "txt": b"a red square"} for i in range(4)]
    samples += [{"__key__": "noprompt", "mp4": good}, {"__key__": "junk", "mp4": b"x", "txt": b"x"}]
    _write_tar(tmp_path / "s-000000.tar", samples)
    data = WebVideoDataModule(
        train_shards=str(tmp_path / "s-000000.tar"), batch_size=2, num_workers=0,
        shuffle_buffer=0, num_frames=4,
    )  # fmt: skip
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="", version="")
    with pytest.warns(), caplog.at_level("INFO"):
        L.Trainer(
            max_steps=2, accelerator="cpu", logger=logger, log_every_n_steps=1,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[SkippedSamples()],
        ).fit(KeyRecorder(), data)  # fmt: skip
    with (tmp_path / "metrics.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    assert float(last["data/skipped"]) == 2
    assert float(last["data/skipped_missing_text"]) == 1
    assert float(last["data/skipped_undecodable"]) == 1
    assert "skipped 2 samples (missing_text: 1, undecodable: 1)" in caplog.text
    # the CLI adds the callback to any DataModule that counts skips
    cli = ViGUCLI(
        args=["--data.class_path=datamodules.WebVideoDataModule",
              f"--data.train_shards={tmp_path / 's-000000.tar'}", "--trainer.logger=false"],
        run=False,
    )  # fmt: skip
    assert any(isinstance(cb, SkippedSamples) for cb in cli.trainer.callbacks)


def test_truncated_tar_and_half_downloaded_mp4_say_what_happened(tmp_path):
    good = _clip()
    whole = _write_tar(
        tmp_path / "t-000000.tar",
        [{"__key__": f"k{i}", "mp4": good, "txt": b"a red square"} for i in range(3)],
    )
    with tarfile.open(whole) as tar:
        cut = tar.getmember("k2.mp4").offset  # the header of the last sample: a sample boundary
    whole.write_bytes(whole.read_bytes()[:cut])
    dm = WebVideoDataModule(val_shards=str(whole), batch_size=1, num_workers=0, num_frames=4)
    with pytest.warns(match="without the tar end-of-archive marker") as caught:
        keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert keys == ["k0", "k1"] and dm.skipped_counts()["truncated_shard"] == 1
    assert "after sample 'k1'" in str(caught[0].message)
    assert dm.skipped_counts()["corrupt_shard"] == 0

    # a half-downloaded mp4 whose header (moov first) promises all its frames
    faststart = tmp_path / "faststart.mp4"
    with av.open(str(faststart), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(64):
            frame = np.full((32, 32, 3), (i * 4) % 256, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    data = faststart.read_bytes()
    half = data[: len(data) * 2 // 3]
    with pytest.raises(BadSample) as exn:
        SampleDecoder(ClipSpec(60))({"__key__": "half", "mp4": half, "txt": b"x"})
    assert exn.value.reason == "undecodable" and "cut short" in exn.value.detail


def test_caption_names_and_skips_an_undecodable_file(data_finished_run, tmp_path, capsys):
    good, bad = tmp_path / "good.mp4", tmp_path / "bad.mp4"
    good.write_bytes(_clip(2))
    bad.write_bytes(b"half a download")
    out = tmp_path / "caps.jsonl"
    ckpt = data_finished_run / "checkpoints" / "last.ckpt"
    caption_main(
        [f"--ckpt={ckpt}", f"--videos=[{bad}, {good}]", "--steps=2", f"--out={out}", "--device=cpu"]
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in lines] == [str(good)]
    assert f"skipped '{bad}'" in capsys.readouterr().err


def _striped_video(frames: int, size: int, gop: int) -> bytes:
    """Frame ``i`` is a flat grey of level ``2 * i`` (its index can be read back)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv444p"
        stream.options = {"g": str(gop), "crf": "0", "preset": "ultrafast"}
        for i in range(frames):
            rgb = np.full((size, size, 3), (2 * i) % 256, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def test_decoding_seeks_to_the_clip_and_returns_the_right_frames():
    data = _striped_video(120, 16, gop=10)
    spec = ClipSpec(num_frames=5, frame_stride=3)
    for start, first in ((1.0, 107), (0.5, 54), (0.0, 0)):  # 120 - 13 frames free
        clip = decode_clip(data, spec, start)
        levels = clip.reshape(5, -1).mean(1) / 2
        assert np.allclose(levels, [first + 3 * i for i in range(5)], atol=0.6), (start, levels)


MEMORY_PROBE = """
import resource, sys
from lightning_vigu.video_io import ClipSpec, decode_clip
data = open(sys.argv[1], "rb").read()
decode_clip(data, ClipSpec(4), start=0.0)  # codecs loaded
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decode_clip(data, ClipSpec(4), start=1.0)  # the last 4 of 400 frames
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_decoding_a_clip_at_the_end_of_a_long_video_keeps_only_the_clip(tmp_path):
    video = tmp_path / "long.mp4"
    video.write_bytes(_striped_video(400, 256, gop=50))  # 400 frames: 75 MiB decoded
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(video)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip()) < 30  # MiB more than a short clip's decode


def test_write_shards_refuses_a_folder_with_shards_and_overwrite_cleans_it(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(_clip())
    (tmp_path / "captions.csv").write_text("file,prompt\na.mp4,a red square\n")
    out = tmp_path / "out"
    out.mkdir()
    for stale in ("shard-000000.tar", "shard-000001.tar"):
        (out / stale).write_bytes(b"old")
    with pytest.raises(FileExistsError, match="not empty.*--overwrite"):
        write_shards(videos, tmp_path / "captions.csv", out, progress=False, min_frames=4)
    assert (out / "shard-000001.tar").read_bytes() == b"old"
    report = write_shards(
        videos, tmp_path / "captions.csv", out, progress=False, min_frames=4, overwrite=True
    )
    assert report["replaced"] == ["shard-000000.tar", "shard-000001.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "shard-000000.tar"]
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert sorted(tar.getnames()) == ["a.json", "a.mp4", "a.txt"]


# ---------------------------------------------------------------------------- bad values
@pytest.mark.parametrize("lr", [0.0, -1e-3, math.nan])
def test_a_learning_rate_that_is_not_positive_is_refused(lr):
    with pytest.raises(ValueError, match="model.lr must be a positive number"):
        tiny_module(lr=lr)


def test_data_of_another_shape_than_video_shape_is_named():
    module = tiny_module()  # video_shape (2, 8, 8)
    batch = {
        "video": torch.zeros(2, 3, 2, 16, 16),
        "prompt": ["a", "b"],
        "caption": ["a", "b"],
    }
    with pytest.warns(UserWarning, match=r"frames \(2, 16, 16\) differ from model.video_shape"):
        module.batch_inputs(batch)


@pytest.mark.parametrize("fused", [False, True], ids=["read-on-host", "skipped-by-fused-adamw"])
def test_skipped_nonfinite_steps_are_logged_as_skipped(tmp_path, fused):
    class NaNClips(RandomClips):
        def __getitem__(self, i: int) -> dict:
            sample = super().__getitem__(i)
            if 4 <= i < 8:  # the second batch of 4
                sample["video"] = torch.full_like(sample["video"], math.nan)
            return sample

    class NaNAtSecondBatch(RandomVideoDataModule):
        def train_dataloader(self):
            return DataLoader(NaNClips(12, 2, 8), 4, collate_fn=collate_batch)

    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="", version="")
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=logger, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    with warnings.catch_warnings():  # Lightning's "training_step returned None" (once a process)
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(
            tiny_module(optimizer=functools.partial(torch.optim.AdamW, fused=fused)),
            NaNAtSecondBatch(),
        )
    with (tmp_path / "metrics.csv").open() as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    assert math.isnan(float(rows[1]["train/loss"]))  # not the previous step's finite loss
    assert float(rows[1]["train/skipped_steps"]) == 1
    assert math.isfinite(float(rows[2]["train/loss"]))


def test_pipe_urls_are_documented_as_shell_commands():
    readme = (ROOT / "README.md").read_text()
    assert "`pipe:` urls run a shell command" in readme
