"""Observable real-data runs: SampleLogger and Evaluation on latent-cache data, sample media
handed to the configured loggers, both off (said once) under FSDP, a W&B run that resumes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import av
import lightning as L
import pytest
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from test_training import tiny_module

from callbacks import Evaluation, SampleLogger
from datamodules import WebVideoDataModule
from datamodules.latent_cache import cache_latents
from lightning_vigu.codecs import PixelCodec
from lightning_vigu.video_io import ClipSpec


class MediaLogger(Logger):
    """A logger with W&B's media API that records what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.videos: list[tuple] = []
        self.texts: list[tuple] = []

    name = "media"
    version = "0"

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_video(self, key, videos, step=None, **kwargs) -> None:
        self.videos.append((key, list(videos), step, kwargs))

    def log_text(self, key, columns=None, data=None, step=None) -> None:
        self.texts.append((key, columns, data, step))


@pytest.fixture(scope="module")
def latent_shards(data_synthetic_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    cache_latents(
        str(data_synthetic_shards / "val-*.tar"),
        out,
        PixelCodec((1, 4, 4)),
        clip=ClipSpec(num_frames=4, size=(16, 16)),
        batch_size=4,
        progress=False,
    )
    return out / "latents-*.tar"


def test_sample_media_and_evaluation_during_a_latent_cache_fit(latent_shards, tmp_path):
    data = WebVideoDataModule(
        train_shards=str(latent_shards),
        val_shards=str(latent_shards),
        batch_size=4,
        num_workers=0,
        shuffle_buffer=0,
        latents=True,
    )
    module = tiny_module(video_shape=(4, 16, 16), caption_length=8, phase="refine")
    media = MediaLogger()
    loggers = [TensorBoardLogger(tmp_path, name="", version=""), media]
    samples = SampleLogger(every_n_steps=0, num_samples=2, steps=2)
    evaluation = Evaluation(every_n_steps=0, num_videos=2, directions=["v2t", "t2v"], steps=2)
    L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=loggers,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=1,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=[samples, evaluation],
    ).fit(module, data)
    mp4 = tmp_path / "samples" / "step_000002.mp4"
    with av.open(str(mp4)) as container:
        stream = container.streams.video[0]
        # generated row above the decoded real latents, H.264 yuv420p
        assert (stream.height, stream.width) == (32, 32)
        assert stream.codec_context.pix_fmt == "yuv420p"
    table = (tmp_path / "samples" / "step_000002.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "| # |" not in line]
    assert len(rows) == 2  # one per held-out clip
    assert media.videos == [
        ("samples/generated_over_real", [str(mp4)], 2, {"fps": [8], "format": ["mp4"]})
    ]
    assert media.texts[0][0] == "samples/captions" and len(media.texts[0][2]) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path)).Reload()
    assert "samples/generated_over_real" in events.Tags()["images"] + events.Tags().get(
        "tensors", []
    )
    report = json.loads((tmp_path / "eval" / "val_step000002.json").read_text())
    assert report["results"]["num_videos"] == 2.0 and "t2v/adherence_accuracy" in report["results"]
    assert len(report["caption_examples"]) == 2


def test_fixed_prompt_list_without_a_validation_loop(tmp_path):
    module = tiny_module(video_shape=(2, 8, 8))
    trainer = SimpleNamespace(global_step=5, loggers=[], default_root_dir=tmp_path)
    SampleLogger(
        prompts=["red circle", "blue square", "green"], num_samples=2, steps=1
    ).log_samples(trainer, module)
    assert (tmp_path / "samples" / "step_000005.mp4").stat().st_size > 0


def test_off_under_fsdp_and_said(recwarn):
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy())
    logger, evaluation = SampleLogger(), Evaluation()
    logger.setup(trainer, None, "fit")
    evaluation.setup(trainer, None, "fit")
    assert logger._off and evaluation._off
    messages = " ".join(str(w.message) for w in recwarn)
    assert (
        "SampleLogger is off under FSDP" in messages and "Evaluation is off under FSDP" in messages
    )


def test_wandb_run_id_is_kept_in_the_run_folder(tmp_path):
    from lightning_vigu.loggers import RUN_ID_FILE, persistent_run_id

    first = persistent_run_id(tmp_path / "run")
    assert persistent_run_id(tmp_path / "run") == first  # the resumed fit: same W&B run
    assert (tmp_path / "run" / RUN_ID_FILE).read_text().strip() == first
    assert persistent_run_id(tmp_path / "other") != first
    assert [p.name for p in (tmp_path / "run").iterdir()] == [RUN_ID_FILE]


def test_wandb_overlay_takes_a_per_run_folder(capsys, monkeypatch):
    from test_configs import print_config

    monkeypatch.setattr("sys.argv", ["lightning_vigu"])
    extra = ("--trainer.logger.init_args.save_dir=runs/recall",)
    config = print_config(capsys, "recall.yaml", "wandb.yaml", extra=extra)
    logger = config["trainer"]["logger"]
    assert logger["class_path"] == "lightning_vigu.loggers.ResumableWandbLogger"
    assert logger["init_args"]["save_dir"] == "runs/recall"
