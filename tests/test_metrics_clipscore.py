"""VideoCLIPScore with a tiny random open_clip model saved to disk and loaded like real weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from lightning_vigu.metrics import MetricUnavailable, VideoCLIPScore

MODEL = "vigu-test-tiny-clip"
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}
TEXTS = ["a red circle moves left", "two blue squares", "a spinning bar"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config json, checkpoint) of a randomly initialised tiny CLIP, saved as a state dict."""
    root = tmp_path_factory.mktemp("clip")
    config = root / f"{MODEL}.json"
    config.write_text(json.dumps(TINY))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL)
    checkpoint = root / "tiny_clip.pt"
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint


def smooth_videos(n: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random but smooth videos in [-1, 1]: upsampled low-resolution noise, ``(N, 3, T, H, W)``."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, t, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, (t, h, w), mode="trilinear")


def direct_scores(checkpoint: Path, videos: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Per-video mean over frames of 100 * max(cos, 0) for 32x32 frames (no resizing needed)."""
    model = open_clip.create_model(MODEL, pretrained=str(checkpoint)).eval()
    tokenizer = open_clip.get_tokenizer(MODEL)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    out = []
    with torch.no_grad():
        for video, text in zip(videos, texts):
            frames = (video.transpose(0, 1) + 1) / 2  # (T, 3, H, W) in [0, 1]
            image = model.encode_image((frames - mean) / std)
            txt = model.encode_text(tokenizer([text]))
            cos = torch.nn.functional.cosine_similarity(image, txt)
            out.append((100 * cos.clamp(min=0)).mean())
    return torch.stack(out)


def test_matches_direct_computation(tiny_clip: tuple[Path, Path]) -> None:
    config, checkpoint = tiny_clip
    videos = smooth_videos(3, t=5, h=32, w=32)
    metric = VideoCLIPScore(MODEL, checkpoint, model_config=config, num_frames=None)
    expected = direct_scores(checkpoint, videos, TEXTS)
    torch.testing.assert_close(metric.scores(videos, TEXTS), expected, rtol=1e-5, atol=1e-5)
    metric.update(videos[:2], TEXTS[:2])
    metric.update(videos[2:], TEXTS[2:])
    assert metric.compute().item() == pytest.approx(expected.mean().item(), rel=1e-5)
    # num_frames picks evenly spaced frames: 3 of 5 are frames 0, 2, 4.
    sub = VideoCLIPScore(MODEL, checkpoint, num_frames=3)
    torch.testing.assert_close(
        sub.scores(videos, TEXTS), direct_scores(checkpoint, videos[:, :, [0, 2, 4]], TEXTS)
    )


def test_preprocessing_close_to_open_clips_pil_transform(tiny_clip: tuple[Path, Path]) -> None:
    _, checkpoint = tiny_clip
    metric = VideoCLIPScore(MODEL, checkpoint)
    _, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=str(checkpoint))
    frame = smooth_videos(1, t=1, h=48, w=64, seed=1)[0, :, 0]  # (3, 48, 64)
    pixels = ((frame + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    pil = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    theirs = preprocess(pil)  # (3, 32, 32): bicubic resize of the short side, centre crop
    ours = metric.preprocess(pixels[None].float() / 127.5 - 1)[0]
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs()  # PIL rounds the resized image to uint8; we stay in float
    assert diff.mean() < 0.01 and diff.max() < 0.05


def test_states_sum_across_shards(tiny_clip: tuple[Path, Path]) -> None:
    _, checkpoint = tiny_clip
    videos = smooth_videos(4, t=3, h=40, w=36, seed=2)
    texts = [*TEXTS, "nothing"]
    whole, a, b = (VideoCLIPScore(MODEL, checkpoint) for _ in range(3))
    whole.update(videos, texts)
    a.update(videos[:1], texts[:1])
    b.update(videos[1:], texts[1:])
    a.merge_state(b)
    assert a.score_sum.dtype == torch.float64 and int(a.count) == 4
    assert a.compute().item() == pytest.approx(whole.compute().item(), rel=1e-6)
    uint8 = ((videos + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    assert np.allclose(whole.scores(uint8, texts), whole.scores(videos, texts), atol=0.5)


def test_missing_checkpoint_and_bad_names(tmp_path: Path, tiny_clip: tuple[Path, Path]) -> None:
    missing = tmp_path / "clip.pt"
    assert not VideoCLIPScore.available(missing)
    with pytest.raises(MetricUnavailable, match=str(missing)):
        VideoCLIPScore("ViT-B-32", missing)
    _, checkpoint = tiny_clip
    assert VideoCLIPScore.available(checkpoint)
    with pytest.raises(ValueError, match="schema"):
        VideoCLIPScore("hf-hub:org/model", checkpoint)
    with pytest.raises(ValueError, match="model_config"):
        VideoCLIPScore("no-such-model", checkpoint)
    with pytest.raises(ValueError, match="one text per video"):
        VideoCLIPScore(MODEL, checkpoint).update(smooth_videos(2, 2, 32, 32), ["one"])
