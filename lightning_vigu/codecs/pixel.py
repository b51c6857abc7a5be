"""The pixel codec: a lossless space-time-to-depth rearrangement (no VAE, no weights).

A ``(B, 3, T, H, W)`` video becomes ``(B, 3*ft*fh*fw, T/ft, H/fh, W/fw)`` latents; decoding is
the exact inverse. This keeps small synthetic videos cheap for the transformer (fewer tokens)
without a learned autoencoder, so the embedded default needs no downloaded weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_vigu.codecs.base import LatentCodec


class PixelCodec(LatentCodec):
    """Space-time-to-depth codec.

    Args:
        factors: ``(ft, fh, fw)`` downsampling per axis; the video's ``T, H, W`` must divide.
        video_channels: channels of the video (3 for RGB).
        scale: latents are multiplied by this (pixels in ``[-1, 1]`` have std ~0.5-0.6; a
            scale near 1/std makes them closer to the unit-variance noise of the flow).
    """

    def __init__(
        self,
        factors: tuple[int, int, int] = (1, 4, 4),
        video_channels: int = 3,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.factors = tuple(int(f) for f in factors)  # type: ignore[assignment]
        self.video_channels = video_channels
        self.latent_channels = video_channels * self.factors[0] * self.factors[1] * self.factors[2]
        self.scale = float(scale)

    def _check(self, video: Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != self.video_channels:
            raise ValueError(
                f"PixelCodec.encode expects video (B, {self.video_channels}, T, H, W), "
                f"got {tuple(video.shape)}"
            )
        _, _, t, h, w = video.shape
        ft, fh, fw = self.factors
        if t % ft or h % fh or w % fw:
            raise ValueError(
                f"PixelCodec with factors {self.factors} needs T, H, W divisible by them; got "
                f"T={t}, H={h}, W={w}. Change the data's num_frames/size or the codec's factors."
            )

    def encode(self, video: Tensor) -> Tensor:
        self._check(video)
        b, c, t, h, w = video.shape
        ft, fh, fw = self.factors
        x = video.reshape(b, c, t // ft, ft, h // fh, fh, w // fw, fw)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # (b, c, ft, fh, fw, t', h', w')
        return x.reshape(b, self.latent_channels, t // ft, h // fh, w // fw) * self.scale

    def decode(self, latents: Tensor) -> Tensor:
        b, n, t, h, w = latents.shape
        if n != self.latent_channels:
            raise ValueError(
                f"PixelCodec.decode expects {self.latent_channels} latent channels, got {n} "
                f"(latents {tuple(latents.shape)})"
            )
        ft, fh, fw = self.factors
        c = self.video_channels
        x = (latents / self.scale).reshape(b, c, ft, fh, fw, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (b, c, t', ft, h', fh, w', fw)
        return torch.clamp(x.reshape(b, c, t * ft, h * fh, w * fw), -1.0, 1.0)
