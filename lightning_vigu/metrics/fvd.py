"""Fréchet Video Distance (Unterthiner et al. 2018) as a DDP-syncable torchmetrics ``Metric``.

FVD fits a Gaussian to the features of real and of generated videos and reports the Fréchet
distance between the two: ``|mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))``. The standard
features are the 400 Kinetics logits of Inception-I3D on 16 frames at 224x224 in ``[-1, 1]``;
every choice that changes the number is a field of :class:`FVDProtocol`, and
:meth:`FrechetVideoDistance.protocol_dict` returns it so that callers store the protocol next to
every FVD value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_vigu.metrics.availability import MetricUnavailable
from lightning_vigu.metrics.i3d import POOLED_DIM, WEIGHTS_HOWTO, InceptionI3D, load_i3d


@dataclass(frozen=True)
class FVDProtocol:
    """Everything that decides an FVD value besides the two video sets.

    Attributes:
        num_frames: frames per clip fed to the network (16 is the standard "FVD16").
        temporal: how clips are cut to ``num_frames``: ``"first"`` keeps the first
            ``num_frames`` consecutive frames and pads shorter videos by repeating the last
            frame; ``"uniform"`` picks ``num_frames`` evenly spaced frames (nearest frame, so
            shorter videos repeat frames evenly).
        resolution: frames are resized (bilinear, antialiased) so that the short side is
            ``resolution``, then centre-cropped to ``resolution x resolution``.
        value_range: pixel range the network expects; ``[-1, 1]`` for the Kinetics I3D.
        features: ``"logits"`` (400-d, the standard) or ``"pool"`` (1024-d pooled
            ``Mixed_5c``); only used with the I3D network.
        min_videos: :meth:`FrechetVideoDistance.compute` refuses fewer real or fake videos
            (published FVD numbers use 2048; at least 2 are needed for a covariance).
        real_set: a name for the reference set (dataset, split, number of clips), recorded
            with every value.
    """

    num_frames: int = 16
    temporal: Literal["first", "uniform"] = "first"
    resolution: int = 224
    value_range: tuple[float, float] = (-1.0, 1.0)
    features: Literal["logits", "pool"] = "logits"
    min_videos: int = 2
    real_set: str = "unspecified"

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.resolution < 1:
            raise ValueError(f"FVDProtocol needs num_frames, resolution >= 1, got {self}")
        if self.temporal not in ("first", "uniform"):
            raise ValueError(
                f"FVDProtocol.temporal must be 'first' or 'uniform', got {self.temporal!r}"
            )
        if self.features not in ("logits", "pool"):
            raise ValueError(
                f"FVDProtocol.features must be 'logits' or 'pool', got {self.features!r}"
            )
        if self.min_videos < 2:
            raise ValueError(f"FVDProtocol.min_videos must be >= 2, got {self.min_videos}")


def to_float_video(videos: Tensor) -> Tensor:
    """Accept ``(N, C, T, H, W)`` float in ``[-1, 1]`` or ``(N, T, H, W, C)`` uint8 in ``[0, 255]``.

    Returns:
        ``(N, 3, T, H, W)`` float32 in ``[-1, 1]`` (grayscale is repeated to 3 channels).
    """
    if videos.ndim != 5:
        raise ValueError(f"videos must be 5-D, got shape {tuple(videos.shape)}")
    if videos.dtype == torch.uint8:
        videos = videos.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # (N, C, T, H, W)
    elif not videos.is_floating_point():
        raise ValueError(f"videos must be float in [-1, 1] or uint8, got dtype {videos.dtype}")
    if videos.shape[1] == 1:
        videos = videos.expand(-1, 3, -1, -1, -1)
    if videos.shape[1] != 3:
        raise ValueError(
            "videos must be (N, C, T, H, W) float or (N, T, H, W, C) uint8 with C in {1, 3}, "
            f"got shape {tuple(videos.shape)} and dtype {videos.dtype}"
        )
    return videos.float().clamp(-1.0, 1.0)


def select_frames(videos: Tensor, num_frames: int, temporal: str) -> Tensor:
    """Cut ``(N, C, T, H, W)`` videos to ``num_frames`` frames (see :class:`FVDProtocol`)."""
    t = videos.shape[2]
    if temporal == "uniform":
        index = torch.linspace(0, t - 1, num_frames, device=videos.device).round().long()
    else:
        index = torch.arange(num_frames, device=videos.device).clamp(max=t - 1)
    return videos.index_select(2, index)  # (N, C, num_frames, H, W)


def resize_center_crop(videos: Tensor, size: int) -> Tensor:
    """Resize ``(N, C, T, H, W)`` so the short side is ``size`` (bilinear, antialias) and
    centre-crop to ``size x size``."""
    n, c, t, h, w = videos.shape
    if (h, w) != (size, size):
        # Sizes and offsets as torchvision's Resize(size) + CenterCrop(size) compute them.
        new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        frames = videos.transpose(1, 2).reshape(n * t, c, h, w)  # (N*T, C, H, W)
        frames = F.interpolate(frames, (new_h, new_w), mode="bilinear", antialias=True)
        top, left = round((new_h - size) / 2), round((new_w - size) / 2)
        frames = frames[:, :, top : top + size, left : left + size]  # (N*T, C, size, size)
        videos = frames.reshape(n, t, c, size, size).transpose(1, 2)  # (N, C, T, size, size)
    return videos.contiguous()


def preprocess_videos(videos: Tensor, protocol: FVDProtocol) -> Tensor:
    """Apply the protocol: dtype/layout, temporal cut, resize + centre crop, value range.

    Args:
        videos: ``(N, C, T, H, W)`` float in ``[-1, 1]`` or ``(N, T, H, W, C)`` uint8.
        protocol: the :class:`FVDProtocol`.

    Returns:
        ``(N, 3, num_frames, resolution, resolution)`` float32 in ``protocol.value_range``.
    """
    videos = to_float_video(videos)
    videos = select_frames(videos, protocol.num_frames, protocol.temporal)
    videos = resize_center_crop(videos, protocol.resolution).clamp(-1.0, 1.0)
    low, high = protocol.value_range
    return low + (videos + 1.0) * (0.5 * (high - low))


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``, in float64.

    ``tr((S1 S2)^(1/2))`` is the sum of the square roots of the eigenvalues of
    ``S1^(1/2) S2 S1^(1/2)`` (symmetric PSD, the same non-zero spectrum as ``S1 S2``), which is
    exact for singular covariances and needs no complex arithmetic.

    Args:
        mu1, mu2: ``(d,)`` means.
        sigma1, sigma2: ``(d, d)`` covariances.

    Returns:
        A 0-d float64 tensor.
    """
    mu1, mu2, sigma1, sigma2 = (x.double() for x in (mu1, mu2, sigma1, sigma2))
    eigval, eigvec = torch.linalg.eigh(sigma1)
    sqrt1 = (eigvec * eigval.clamp(min=0).sqrt()) @ eigvec.T  # (d, d)
    middle = sqrt1 @ sigma2 @ sqrt1
    middle = 0.5 * (middle + middle.T)
    tr_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return diff.dot(diff) + sigma1.trace() + sigma2.trace() - 2.0 * tr_sqrt


def frechet_distance_of_features(real: Tensor, fake: Tensor) -> Tensor:
    """The Fréchet distance between the Gaussians fitted to two feature sets, in float64.

    The same number as :func:`frechet_distance` of their means and covariances, computed from
    the features themselves: with ``R``, ``G`` the centred sets, the non-zero eigenvalues of
    ``S_r S_g`` are the squared singular values of ``R G^T / sqrt((n_r - 1)(n_g - 1))``, so
    the trace term needs an ``(n_r, n_g)`` decomposition instead of two ``(d, d)`` ones: cheap
    for a few hundred clips of 400 features, and batched (bootstraps of FVD).

    Args:
        real: ``(..., n_r, d)`` features.
        fake: ``(..., n_g, d)`` features (leading sizes that broadcast with ``real``'s).

    Returns:
        ``(...)`` float64 distances.
    """
    real, fake = real.double(), fake.double()
    n_r, n_g = real.shape[-2], fake.shape[-2]
    mu_r, mu_g = real.mean(-2), fake.mean(-2)  # (..., d)
    r, g = real - mu_r.unsqueeze(-2), fake - mu_g.unsqueeze(-2)  # centred, (..., n, d)
    cross = r @ g.transpose(-1, -2)  # (..., n_r, n_g)
    tr_sqrt = torch.linalg.svdvals(cross).sum(-1) / ((n_r - 1) * (n_g - 1)) ** 0.5
    traces = r.pow(2).sum((-2, -1)) / (n_r - 1) + g.pow(2).sum((-2, -1)) / (n_g - 1)
    return (mu_r - mu_g).pow(2).sum(-1) + traces - 2.0 * tr_sqrt


class I3DFeatures(nn.Module):
    """Wrap :class:`InceptionI3D` to return the protocol's features, ``(N, d)``."""

    def __init__(self, i3d: InceptionI3D, features: str = "logits") -> None:
        super().__init__()
        self.i3d, self.features = i3d, features
        self.num_features = i3d.num_classes if features == "logits" else POOLED_DIM

    def forward(self, videos: Tensor) -> Tensor:
        out = self.i3d.extract(videos)
        return out.logits if self.features == "logits" else out.pooled


class FrechetVideoDistance(Metric):
    """FVD between videos fed with ``real=True`` and ``real=False``.

    ``update(videos, real)`` takes ``(N, C, T, H, W)`` float in ``[-1, 1]`` (the batch contract)
    or ``(N, T, H, W, C)`` uint8 in ``[0, 255]``, of any length and size: the metric applies the
    protocol (temporal cut, resize with antialias + centre crop, value range), runs the network
    in float32 with autocast off, and adds the features to float64 running sums (sum, sum of
    outer products, count; summed across ranks). ``compute()`` returns the distance as a 0-d
    float64 tensor. ``last_features`` holds the features of the last ``update`` (``(N, d)``,
    this rank's), for callers that keep them per clip (a bootstrap of FVD).

    Args:
        feature_extractor: any module mapping ``(N, 3, F, R, R)`` in ``protocol.value_range`` to
            ``(N, d)``; when None, Inception-I3D is built and loaded from ``i3d_weights``.
        i3d_weights: local ``.pt`` file made by :mod:`lightning_vigu.metrics.convert_i3d`.
        protocol: the :class:`FVDProtocol`.
        num_features: ``d``; probed with one dummy clip when None and a custom extractor is given.
        reset_real_features: when False, ``reset()`` keeps the real statistics, so a fixed
            reference set is encoded once.
        **kwargs: torchmetrics ``Metric`` options (``process_group``, ``sync_on_compute`` ...).

    Raises:
        MetricUnavailable: no extractor was given and ``i3d_weights`` is unset or missing.
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    def __init__(
        self,
        feature_extractor: nn.Module | None = None,
        i3d_weights: str | Path | None = None,
        protocol: FVDProtocol = FVDProtocol(),  # noqa: B008 - frozen dataclass, safe default
        num_features: int | None = None,
        reset_real_features: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.protocol = protocol
        self.reset_real_features = reset_real_features
        if feature_extractor is None:
            if i3d_weights is None:
                raise MetricUnavailable(
                    f"FVD needs i3d_weights=<path to i3d_k400.pt> or a feature_extractor.\n{WEIGHTS_HOWTO}"
                )
            feature_extractor = I3DFeatures(load_i3d(i3d_weights), protocol.features)
            self.extractor_name = f"InceptionI3D({Path(i3d_weights).name}, {protocol.features})"
        else:
            self.extractor_name = type(feature_extractor).__name__
        self.feature_extractor = feature_extractor.eval().requires_grad_(False)
        if num_features is None:
            num_features = getattr(feature_extractor, "num_features", None) or self._probe()
        self.num_features = num_features
        self.last_counts: tuple[int, int] | None = None
        self.last_features: Tensor | None = None
        d = num_features
        for kind in ("real", "fake"):
            self.add_state(f"{kind}_sum", torch.zeros(d, dtype=torch.double), dist_reduce_fx="sum")
            self.add_state(
                f"{kind}_outer", torch.zeros(d, d, dtype=torch.double), dist_reduce_fx="sum"
            )
            self.add_state(f"{kind}_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def available(i3d_weights: str | Path | None) -> bool:
        """Whether the I3D weights file exists (never downloads anything)."""
        return i3d_weights is not None and Path(i3d_weights).expanduser().is_file()

    def _probe(self) -> int:
        p = self.protocol
        dummy = torch.zeros(1, 3, p.num_frames, p.resolution, p.resolution)
        with torch.no_grad():
            return int(self.feature_extractor(dummy).shape[-1])

    def extract(self, videos: Tensor) -> Tensor:
        """Preprocessed features of ``videos``: ``(N, d)`` float64."""
        clips = preprocess_videos(videos.to(self.real_sum.device), self.protocol)
        param = next(self.feature_extractor.parameters(), None)
        if param is not None:
            clips = clips.to(param.dtype)
        with torch.no_grad(), torch.autocast(clips.device.type, enabled=False):
            features = self.feature_extractor(clips)
        if features.shape != (clips.shape[0], self.num_features):
            raise ValueError(
                f"feature extractor returned {tuple(features.shape)}, expected "
                f"({clips.shape[0]}, {self.num_features})"
            )
        return features.double()

    def update(self, videos: Tensor, real: bool) -> None:
        """Add a batch of real (``real=True``) or generated videos; see the class docstring."""
        features = self.extract(videos)  # (N, d)
        self.last_features = features
        kind = "real" if real else "fake"
        setattr(self, f"{kind}_sum", getattr(self, f"{kind}_sum") + features.sum(0))
        setattr(self, f"{kind}_outer", getattr(self, f"{kind}_outer") + features.T @ features)
        setattr(self, f"{kind}_count", getattr(self, f"{kind}_count") + features.shape[0])

    def _gaussian(self, kind: str) -> tuple[Tensor, Tensor]:
        n = int(getattr(self, f"{kind}_count"))
        if n < self.protocol.min_videos:
            raise ValueError(
                f"FVD needs at least protocol.min_videos={self.protocol.min_videos} {kind} videos, "
                f"got {n}; feed more with update(videos, real={kind == 'real'})"
            )
        mean = getattr(self, f"{kind}_sum") / n
        cov = (getattr(self, f"{kind}_outer") - n * torch.outer(mean, mean)) / (n - 1)
        return mean, cov

    def compute(self) -> Tensor:
        """The Fréchet distance between the real and fake feature Gaussians (0-d float64)."""
        mu_r, sigma_r = self._gaussian("real")
        mu_f, sigma_f = self._gaussian("fake")
        self.last_counts = (int(self.real_count), int(self.fake_count))
        return frechet_distance(mu_r, sigma_r, mu_f, sigma_f)

    def reset(self) -> None:
        """Reset the statistics; the real ones are kept when ``reset_real_features=False``."""
        kept = {}
        if not self.reset_real_features:
            kept = {k: getattr(self, k).clone() for k in ("real_sum", "real_outer", "real_count")}
        super().reset()
        for key, value in kept.items():
            setattr(self, key, value)

    def protocol_dict(self) -> dict[str, Any]:
        """The protocol as a flat dict, plus the extractor, ``d`` and the video counts of the
        last :meth:`compute` (None before it): write it next to every FVD value."""
        real, fake = self.last_counts or (None, None)
        return {
            **dataclasses.asdict(self.protocol),
            "extractor": self.extractor_name,
            "num_features": self.num_features,
            "num_real": real,
            "num_fake": fake,
        }
