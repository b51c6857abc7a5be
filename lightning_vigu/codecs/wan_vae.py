"""The Wan2.1 VAE as a latent codec (diffusers' ``AutoencoderKLWan`` from a local folder).

Videos of ``T = 4n + 1`` frames become ``(B, 16, n + 1, H/8, W/8)`` latents: the first frame is
encoded alone, then every 4 frames make one latent frame (a causal 3-D VAE).

Latents are normalised per channel with the VAE config's ``latents_mean`` / ``latents_std``
(``(z - mean) / std``), as diffusers' ``WanPipeline`` does when decoding; ``normalize=False``
keeps raw VAE latents, as the Uni-ViGU reference inference does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lightning_vigu.codecs.base import LatentCodec


def vae_folder(path: str | Path) -> Path:
    """The ``AutoencoderKLWan`` folder: ``path`` itself or the pipeline root's ``vae/``."""
    root = Path(path)
    vdir = root / "vae" if (root / "vae" / "config.json").is_file() else root
    if not (vdir / "config.json").is_file():
        raise FileNotFoundError(
            f"no VAE config.json in '{root}' nor in '{root / 'vae'}': pass a Wan2.1 diffusers "
            "folder (holding vae/) or its vae/ folder (config.json + "
            "diffusion_pytorch_model.safetensors)"
        )
    if not any(vdir.glob("diffusion_pytorch_model*")):
        raise FileNotFoundError(
            f"'{vdir}' has a config.json but no diffusion_pytorch_model.safetensors weights"
        )
    return vdir


class WanVAECodec(LatentCodec):
    """Frozen Wan VAE codec.

    Args:
        path: a Wan2.1 diffusers folder (pipeline root) or its ``vae/`` folder.
        normalize: normalise latents with the config's ``latents_mean`` / ``latents_std``.
        dtype: dtype the VAE runs in (``bfloat16`` on GPU); latents are returned as float32.
        sample: encode to a draw of the posterior instead of its mode.
    """

    def __init__(
        self,
        path: str | Path,
        normalize: bool = True,
        dtype: str = "float32",
        sample: bool = False,
    ) -> None:
        super().__init__()
        from diffusers import AutoencoderKLWan

        vdir = vae_folder(path)
        self.dtype = getattr(torch, dtype)
        self.vae = AutoencoderKLWan.from_pretrained(
            str(vdir), torch_dtype=self.dtype, local_files_only=True
        )
        self.vae.requires_grad_(False).eval()
        cfg = self.vae.config
        self.latent_channels = int(cfg.z_dim)
        t, s = int(cfg.scale_factor_temporal or 4), int(cfg.scale_factor_spatial or 8)
        self.factors = (t, s, s)
        self.normalize = normalize
        self.sample = sample
        shape = (1, self.latent_channels, 1, 1, 1)
        self.register_buffer("mean", torch.tensor(cfg.latents_mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.latents_std).view(shape), persistent=False)

    def train(self, mode: bool = True) -> WanVAECodec:
        super().train(mode)
        self.vae.eval()  # always frozen
        return self

    def latent_frames(self, num_frames: int) -> int:
        """``(T - 1) // 4 + 1`` latent frames for ``T = 4n + 1`` video frames."""
        return (num_frames - 1) // self.factors[0] + 1

    def video_frames(self, latent_frames: int) -> int:
        """``4 (n - 1) + 1`` video frames decoded from ``n`` latent frames."""
        return self.factors[0] * (latent_frames - 1) + 1

    def _check_video(self, video: Tensor) -> None:
        ft, fh, fw = self.factors
        if video.ndim != 5 or video.shape[1] != self.video_channels:
            raise ValueError(
                f"WanVAECodec.encode expects video (B, 3, T, H, W) in [-1, 1], "
                f"got {tuple(video.shape)}"
            )
        _, _, t, h, w = video.shape
        if t % ft != 1 and ft > 1:
            raise ValueError(
                f"the Wan VAE needs T = {ft}n + 1 frames (1, 5, 9, ..., 81), got T={t}; "
                f"use num_frames={ft * ((t - 1) // ft) + 1} or {ft * ((t - 1) // ft + 1) + 1}"
            )
        if h % fh or w % fw:
            raise ValueError(
                f"the Wan VAE needs H and W divisible by {fh}, got H={h}, W={w}; resize or crop"
            )

    @torch.no_grad()
    def encode(self, video: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``(B, 3, T, H, W)`` in [-1, 1] -> latents ``(B, c, (T-1)/4 + 1, H/8, W/8)`` float32."""
        self._check_video(video)
        dist = self.vae.encode(video.to(self.dtype)).latent_dist
        z = (dist.sample(generator) if self.sample else dist.mode()).float()
        return (z - self.mean) / self.std if self.normalize else z

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``(B, c, n, h, w)`` -> video ``(B, 3, 4(n-1)+1, 8h, 8w)`` in [-1, 1] float32."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"WanVAECodec.decode expects latents (B, {self.latent_channels}, n, h, w), got "
                f"{tuple(latents.shape)}"
            )
        z = latents.float() * self.std + self.mean if self.normalize else latents.float()
        video = self.vae.decode(z.to(self.dtype)).sample
        return video.float().clamp(-1.0, 1.0)
