"""Evaluation noise: the per-clip rows :func:`callbacks.evaluation.evaluate` keeps, the paired
bootstrap of :mod:`benchmarks.noise`, and the quality report's table of differences from the
twin, on raw files with and without per-clip rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks import noise, quality
from callbacks.evaluation import evaluate
from datamodules.synthetic import make_clip, world_config
from lightning_vigu.batch import video_as_float
from lightning_vigu.metrics import FrechetVideoDistance, FVDProtocol, frechet_distance_of_features


class FrameMeans(nn.Module):
    """FVD features without weights: per-channel, per-frame means, ``(N, 3 * F)``."""

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        return videos.mean(dim=(3, 4)).flatten(1)


def test_per_clip_rows_give_back_the_adherence_and_fvd_of_the_round():
    """A generator drawing every other prompt's clip as the next prompt's: per-clip checks in key
    order whose sums are the round's adherence, and the FVD features of each clip."""
    config = world_config("cpu")
    pairs = [make_clip(config, 0, "test", i) for i in range(8)]
    frames = torch.from_numpy(np.stack([f for f, _ in pairs])).permute(0, 4, 1, 2, 3)
    videos = video_as_float(frames)  # (8, 3, T, H, W)
    records = [r for _, r in pairs]
    prompts = [r["prompt"] for r in records]
    drawn = [i + 1 if i % 2 else i for i in range(7)] + [7]  # odd prompts get the next clip

    class Shifted:
        device = torch.device("cpu")

        def generate_video(self, asked, seed=None, **kwargs):
            return videos[[drawn[prompts.index(p)] for p in asked]]

    keys = [f"clip{i:02d}" for i in reversed(range(8))]  # not in key order
    clips = {"video": videos, "prompt": prompts, "caption": prompts, "meta": records, "key": keys}
    fvd = FrechetVideoDistance(FrameMeans(), protocol=FVDProtocol(num_frames=4, resolution=16))
    result = evaluate(Shifted(), clips, directions=("t2v",), fvd=fvd, batch_size=3)
    rows, numbers = result.per_clip, result.metrics
    assert rows["key"] == sorted(keys)
    accuracy = sum(rows["adherence_correct"]) / sum(rows["adherence_checks"])
    assert accuracy == numbers["t2v/adherence_accuracy"]
    assert 0.3 < accuracy < 0.95  # some clips adhere, some do not
    by_key = {k: i for i, k in enumerate(keys)}
    order = [by_key[k] for k in rows["key"]]
    generated = videos[[drawn[i] for i in order]]
    torch.testing.assert_close(result.fvd_features["real"], fvd.extract(videos[order]).float())
    torch.testing.assert_close(result.fvd_features["generated"], fvd.extract(generated).float())
    again = frechet_distance_of_features(*result.fvd_features.values())  # real, generated
    assert again.item() == pytest.approx(numbers["t2v/fvd"], rel=1e-5)


def test_paired_bootstrap_within_noise_for_the_same_scores_and_not_for_a_shift():
    rng = np.random.default_rng(0)
    checks = [4] * 128
    same = rng.binomial(4, 0.7, 128).tolist()
    assert noise.paired_bootstrap(same, checks, same, checks) == (0.0, 0.0, 0.0)
    again = rng.binomial(4, 0.7, 128).tolist()  # the same adherence, drawn again
    diff, low, high = noise.paired_bootstrap(again, checks, same, checks)
    assert low <= 0 <= high and low < diff < high
    worse = rng.binomial(4, 0.5, 128).tolist()
    diff, low, high = noise.paired_bootstrap(worse, checks, same, checks)
    assert low < diff < high < 0
    assert diff == pytest.approx(sum(worse) / 512 - sum(same) / 512)
    with pytest.raises(ValueError, match="same clips"):
        noise.paired_bootstrap(worse[:10], checks[:10], same, checks)


def _quality_raw(tmp_path, per_clip: bool, equal_steps: bool = False):
    """A raw file of three scorings of 40 clips (``recall_causal`` as good as the twin,
    ``refine_causal`` worse on both counts) and their FVD features beside it; ``equal_steps``:
    a fourth, ``twin_recall_steps``, that adheres less than both."""
    rng = np.random.default_rng(0)
    keys = [f"clip{i:03d}" for i in range(40)]
    checks = [4] * 40
    twin = rng.binomial(4, 0.7, 40)
    real = torch.from_numpy(rng.standard_normal((40, 5))).float()
    twin_fake = real + 0.5 * torch.from_numpy(rng.standard_normal((40, 5))).float()
    scorings = {  # correct per clip, generated features
        "twin": (twin, twin_fake),
        "recall_causal": (np.roll(twin, 1), twin_fake.roll(1, 0)),  # the same scores, other clips
        "refine_causal": (rng.binomial(4, 0.3, 40), twin_fake + 3.0),
    }
    if equal_steps:
        scorings["twin_recall_steps"] = (np.maximum(twin - 2, 0), twin_fake)
    stages, features = {}, {}
    for name, (correct, fake) in scorings.items():
        metrics = {
            "t2v/adherence_accuracy": correct.sum() / 160,
            "t2v/fvd": float(frechet_distance_of_features(real, fake)),
        }
        if per_clip:
            rows = {"key": keys, "adherence_correct": correct.tolist(), "adherence_checks": checks}
            metrics[noise.PER_CLIP] = rows
        stages[name] = {"eval": {"test": metrics}, "loss": {}}
        features[name] = {"test": {"key": keys, "real": real, "generated": fake}}
    path = tmp_path / "quality_raw.json"
    path.write_text(json.dumps({"stages": stages}, default=float))
    torch.save(features, tmp_path / quality.FEATURES)
    return path


def test_quality_report_reads_differences_from_the_twin_against_evaluation_noise(tmp_path):
    out = tmp_path / "out"
    quality.report(_quality_raw(tmp_path, per_clip=True), out)
    found = json.loads((out / "quality.json").read_text())["evaluation_noise"]
    rows = {r["stage"]: r for r in found["rows"]}
    assert found["baseline"] == "twin" and set(rows) == {"recall_causal", "refine_causal"}
    recall, refine = rows["recall_causal"], rows["refine_causal"]
    for name in ("adherence", "fvd"):  # as good as the twin: within noise
        assert recall[f"{name}_diff"] == pytest.approx(0, abs=1e-9)
        assert recall[f"{name}_low"] < 0 < recall[f"{name}_high"]
    assert refine["adherence_high"] < 0 < refine["fvd_low"]  # worse: beyond it
    text = (out / "quality.md").read_text().split("Evaluation noise")[1]
    assert "not of training" in text and "Δ FVD vs twin" in text
    lines = {line.split(" |")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert lines["| recall_causal"].count("within noise") == 2  # adherence and FVD
    assert "within noise" not in lines["| refine_causal"]
    assert "_per_clip_t2v" not in (out / "quality.json").read_text()


def test_quality_report_of_a_raw_file_without_per_clip_rows_says_so(tmp_path):
    out = tmp_path / "out"
    quality.report(_quality_raw(tmp_path, per_clip=False), out)
    assert json.loads((out / "quality.json").read_text())["evaluation_noise"]["rows"] == []
    assert "No evaluation-noise table" in (out / "quality.md").read_text()


def test_quality_report_reads_recall_against_the_twin_capped_at_its_steps(tmp_path):
    """With ``twin_recall_steps`` scored, the report adds recall_causal's difference from it (the
    equal-step comparison beside the equal-time one), with its own paired intervals."""
    out = tmp_path / "out"
    quality.report(_quality_raw(tmp_path, per_clip=True, equal_steps=True), out)
    found = json.loads((out / "quality.json").read_text())
    (row,) = found["equal_steps"]["twin_recall_steps"]
    assert row["stage"] == "recall_causal" and row["split"] == "test"
    assert 0 < row["adherence_low"] < row["adherence_diff"] < row["adherence_high"]
    assert row["fvd_diff"] == pytest.approx(0, abs=1e-9)  # the twin's videos, other clips
    text = (out / "quality.md").read_text().split("At equal steps")[1]
    assert "Δ adherence vs twin_recall_steps" in text and "not on its objective" in text
    assert {r["stage"] for r in found["evaluation_noise"]["rows"]} == {
        "recall_causal",
        "refine_causal",
        "twin_recall_steps",
    }
    # without it, no such section
    quality.report(_quality_raw(tmp_path, per_clip=True), out)
    assert json.loads((out / "quality.json").read_text())["equal_steps"] == {}
    assert "At equal steps" not in (out / "quality.md").read_text()
