"""Several processes on CPU (gloo): a 2-rank DDP run of the CLI, the data split it reads, and
evaluation numbers gathered over ranks.

The stream-level rank/worker split is in ``test_webvideo.py`` and the metrics' own 2-rank sync
in ``test_metrics_fvd.py`` / ``test_metrics_captions.py``; these tests check the same things
one level up, where a run meets them: the Trainer's ranks and :func:`callbacks.evaluate`.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch import nn

import callbacks.evaluation as evaluation
from lightning_vigu.metrics import CaptionMetrics, FrechetVideoDistance, FVDProtocol

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


class RecordKeys(L.Callback):
    """Writes the sample keys each rank trained and validated on to
    ``<default_root_dir>/keys-rank<N>.json`` (selected with ``--trainer.callbacks+=``)."""

    def __init__(self) -> None:
        self.keys: dict[str, list[str]] = {"train": [], "val": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.keys["train"] += list(batch["key"])

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not trainer.sanity_checking:
            self.keys["val"] += list(batch["key"])

    def on_train_end(self, trainer, pl_module) -> None:
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, **self.keys}
        out = Path(trainer.default_root_dir) / f"keys-rank{trainer.global_rank}.json"
        out.write_text(json.dumps(record))


def _shard_keys(folder: Path, split: str) -> list[str]:
    keys = set()
    for shard in folder.glob(f"*/{split}-*.tar"):
        with tarfile.open(shard) as tar:
            keys |= {m.name.split(".", 1)[0] for m in tar.getmembers()}
    return sorted(keys)


def _fit_on_two_cpu_ranks(tmp_path: Path, config: str, *overrides: str) -> None:
    """``python -m lightning_vigu fit -c <config> -c conf/ddp.yaml <overrides>`` on two gloo
    ranks in ``tmp_path`` (a small world of 32 training clips, batches of 4); fails with the
    run's stderr."""
    env = {
        **os.environ,
        "LIGHTNING_VIGU_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    data = {"num_train": 32, "num_val": 8, "num_test": 0, "num_unseen": 0, "batch_size": 4,
            "num_workers": 0, "resampled": False, "shuffle_buffer": 8, "progress": False}  # fmt: skip
    command = [
        sys.executable, "-m", "lightning_vigu", "fit",
        "-c", str(ROOT / config), "-c", str(ROOT / "conf/ddp.yaml"),
        "--trainer.accelerator=cpu", "--trainer.num_sanity_val_steps=0",
        *(f"--data.init_args.{k}={v}" for k, v in data.items()), *overrides,
    ]  # fmt: skip
    # its own process group, so that a hang is ended with every rank Lightning started
    run = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = run.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        _, stderr = run.communicate()
        pytest.fail(f"the 2-rank DDP run did not finish within 240 s: {stderr[-3000:]}")
    assert run.returncode == 0, stderr[-4000:]


def test_ddp_fit_on_two_cpu_processes_splits_the_shards(tmp_path):
    cache = tmp_path / "cache"
    _fit_on_two_cpu_ranks(
        tmp_path, "conf/recall.yaml",
        # the run's folder is tmp_path: the config's prior is named from the repository
        f"--init_from={ROOT / 'conf/init/tiny_generator.pt'}",
        "--trainer.max_epochs=1", "--trainer.val_check_interval=4",
        # the config checkpoints every 250 steps: add one every 2 for this 4-step run
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath=checkpoints", "--trainer.callbacks.every_n_train_steps=2",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks+=test_distributed.RecordKeys",
    )  # fmt: skip
    ranks = [
        json.loads((tmp_path / "runs/recall" / f"keys-rank{r}.json").read_text()) for r in (0, 1)
    ]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    for split, per_rank in (("train", 16), ("val", 4)):
        a, b = (set(r[split]) for r in ranks)
        assert len(a) == len(b) == per_rank and not a & b, split  # disjoint halves...
        assert sorted(a | b) == _shard_keys(cache / "synthetic", split)  # ...covering the split
    ckpt = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4  # 16 clips per rank, batches of 4: both ranks stepped together
    assert ckpt["phase"]["name"] == "recall"


class NaNOnRankZero(L.Callback):
    """Makes rank 0's second batch NaN and writes each rank's weights after every step to
    ``<default_root_dir>/weights-rank<N>.json`` (a checksum, and whether they are finite)."""

    def __init__(self) -> None:
        self.after: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == 0 and batch_idx == 1:
            batch["video"].fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.model.parameters()])
        self.after.append([float(flat.double().sum()), float(torch.isfinite(flat).all())])

    def on_train_end(self, trainer, pl_module) -> None:
        out = Path(trainer.default_root_dir) / f"weights-rank{trainer.global_rank}.json"
        out.write_text(json.dumps(self.after))


def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """Fused AdamW skips a non-finite step without a host read; under DDP the skip is decided
    from the all-reduced gradient norm, so a NaN on rank 0 alone skips the update on both
    ranks and their weights stay equal and finite."""
    _fit_on_two_cpu_ranks(
        tmp_path, "conf/generator.yaml",
        "--trainer.max_steps=3", "--trainer.val_check_interval=100",
        "--model.optimizer.init_args.fused=true",
        "--trainer.callbacks+=test_distributed.NaNOnRankZero",
    )  # fmt: skip
    ranks = [
        json.loads((tmp_path / "runs/generator" / f"weights-rank{r}.json").read_text())
        for r in (0, 1)
    ]
    assert ranks[0] == ranks[1]  # the same weights on both ranks after every step
    (before, _), (skipped, finite), (after, _) = ranks[0]
    assert finite and skipped == before != after  # step 2 skipped everywhere, step 3 trained


# ---------------------------------------------------------------------------- evaluate() over ranks
PROMPTS = [
    "a red circle moves left", "a blue square jumps", "two green balls bounce",
    "a yellow triangle rotates", "a white star slides right", "a red square falls",
    "three blue circles orbit", "a green triangle grows",
]  # fmt: skip
SHARDS = (slice(0, 5), slice(5, 8))  # uneven, as a last partial shard would be


class FrameMeans(nn.Module):
    """Tiny FVD feature extractor: per-channel, per-frame means through a fixed linear map."""

    def __init__(self, num_frames: int = 4, d: int = 5) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * num_frames, d)
        with torch.no_grad():
            self.proj.weight.copy_(torch.linspace(-1, 1, d * 3 * num_frames).view(d, -1))
            self.proj.bias.zero_()

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        return self.proj(videos.mean(dim=(3, 4)).flatten(1))  # (N, 3*F) -> (N, d)


class Scripted(nn.Module):
    """A stand-in model with known outputs: each video's caption and each prompt's video are
    fixed functions of their input, so any split over ranks must give the same numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def caption(self, videos: torch.Tensor, seed: int = 0, **_) -> list[str]:
        index = (videos[:, 0, 0, 0, 0] * 10).round().long().tolist()
        return [" ".join(PROMPTS[i].split()[: 2 + i % 3]) + " slowly" for i in index]

    def generate_video(self, prompts: list[str], seed: int = 0, **_) -> torch.Tensor:
        seeds = [PROMPTS.index(p) for p in prompts]
        return torch.stack(
            [torch.rand(3, 6, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds]
        )


def _clips() -> dict:
    video = torch.rand(len(PROMPTS), 3, 6, 16, 16, generator=torch.Generator().manual_seed(99))
    video[:, 0, 0, 0, 0] = torch.arange(len(PROMPTS)) / 10  # tells Scripted.caption the clip
    keys = [f"clip{i:02d}" for i in range(len(PROMPTS))]
    return {"video": video, "prompt": PROMPTS, "caption": PROMPTS, "meta": [{}] * len(PROMPTS), "key": keys}  # fmt: skip


def _evaluate(clips: dict) -> evaluation.EvalResult:
    fvd = FrechetVideoDistance(
        FrameMeans(), protocol=FVDProtocol(num_frames=4, resolution=16), num_features=5
    )
    return evaluation.evaluate(Scripted(), clips, ("v2t", "t2v"), fvd=fvd, batch_size=2)


def _rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    evaluation.CaptionMetrics = functools.partial(CaptionMetrics, use_java=False)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    clips = _clips()
    mine = {k: v[SHARDS[rank]] for k, v in clips.items()}
    results = _evaluate(mine)
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
    dist.destroy_process_group()


def test_evaluate_gathers_caption_metrics_and_fvd_over_ranks(
    tmp_path, monkeypatch, run_two_gloo_ranks
):
    run_two_gloo_ranks(_rank_worker)
    monkeypatch.setattr(
        evaluation, "CaptionMetrics", functools.partial(CaptionMetrics, use_java=False)
    )
    result = _evaluate(_clips())
    single = result.metrics
    keys = ["v2t/bleu4", "v2t/rougeL", "v2t/cider", "t2v/fvd"]
    assert 0 < single["v2t/bleu4"] < 1 and single["t2v/fvd"] > 0
    for rank in range(len(SHARDS)):
        mine = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        gathered = mine.metrics
        for key in keys:  # every rank reports the metric of all clips
            assert gathered[key] == pytest.approx(single[key], rel=1e-6), (rank, key)
        # counts, predictions and FVD features are gathered too, in key order: one process's
        assert gathered["num_videos"] == len(PROMPTS)
        assert mine.predictions_v2t == result.predictions_v2t
        assert mine.per_clip == result.per_clip == {"key": sorted(_clips()["key"])}
        torch.testing.assert_close(mine.fvd_features, result.fvd_features)


# ---------------------------------------------------------------------------- the real model
def _world_clips() -> dict:
    from benchmarks.train_loop import clips
    from lightning_vigu.batch import video_as_float

    videos, records = clips("cpu", len(PROMPTS))  # uint8 pixels
    return {
        "video": video_as_float(videos),
        "prompt": [r["prompt"] for r in records],
        "caption": [r["caption"] for r in records],
        "meta": records,
        "key": [r["key"] for r in records],
    }


def _world_evaluate(clips: dict) -> evaluation.EvalResult:
    """UniViGU (tiny, weights nudged off their zero-initialised heads) sampling in 2 steps,
    two clips per call: the shards' uneven sizes put clips in other batches than one process."""
    from datamodules.synthetic import WorldTokenizer
    from lightning_vigu.module import UniViGU

    torch.manual_seed(0)
    module = UniViGU(size="tiny", tokenizer=WorldTokenizer(), caption_length=16, prompt_length=16)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    module.eval()
    return evaluation.evaluate(module, clips, batch_size=2, steps=2)


def _world_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    evaluation.CaptionMetrics = functools.partial(CaptionMetrics, use_java=False)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    mine = {k: v[SHARDS[rank]] for k, v in _world_clips().items()}
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(_world_evaluate(mine)))
    dist.destroy_process_group()


def test_evaluation_numbers_do_not_depend_on_the_number_of_ranks(
    tmp_path, monkeypatch, run_two_gloo_ranks
):
    """Captions, adherence (and its floor) and joint agreement of the real model: the same
    numbers from one process as from two ranks holding 5 and 3 of the clips."""
    run_two_gloo_ranks(_world_rank_worker)
    monkeypatch.setattr(
        evaluation, "CaptionMetrics", functools.partial(CaptionMetrics, use_java=False)
    )
    single = _world_evaluate(_world_clips())
    assert {"v2t/attr_accuracy", "t2v/adherence_accuracy", "t2v/adherence_floor"} <= set(
        single.metrics
    ) and "joint/agreement" in single.metrics
    for rank in range(len(SHARDS)):
        mine = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        assert mine.predictions_v2t == single.predictions_v2t, rank
        assert mine.per_clip == single.per_clip, rank  # adherence checks per clip
        for key, value in single.metrics.items():
            assert mine.metrics[key] == pytest.approx(value, rel=1e-9, nan_ok=True), (rank, key)
