"""The latent-codec interface: pixels in ``[-1, 1]`` <-> latents the transformer denoises."""

from __future__ import annotations

from torch import Tensor, nn


class LatentCodec(nn.Module):
    """Maps videos ``(B, C, T, H, W)`` in ``[-1, 1]`` to latents ``(B, c, t, h, w)`` and back.

    Subclasses set ``latent_channels`` and ``factors`` (temporal, height, width downsampling)
    and implement :meth:`encode` / :meth:`decode`. Codecs are frozen: they hold no trainable
    parameters of the Uni-ViGU model.
    """

    latent_channels: int
    factors: tuple[int, int, int]
    video_channels: int = 3

    def encode(self, video: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    def latent_frames(self, num_frames: int) -> int:
        """Number of latent frames for ``num_frames`` video frames."""
        return num_frames // self.factors[0]

    def video_frames(self, latent_frames: int) -> int:
        """Number of video frames decoded from ``latent_frames`` latent frames."""
        return latent_frames * self.factors[0]

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(c, t, h, w)`` of the latents of a ``num_frames x height x width`` video."""
        _, fh, fw = self.factors
        return (self.latent_channels, self.latent_frames(num_frames), height // fh, width // fw)
