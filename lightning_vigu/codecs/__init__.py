"""Latent codecs: the pixel codec (default, no weights) and the Wan VAE (diffusers, local path)."""

from lightning_vigu.codecs.base import LatentCodec
from lightning_vigu.codecs.pixel import PixelCodec
from lightning_vigu.codecs.wan_vae import WanVAECodec

__all__ = ["LatentCodec", "PixelCodec", "WanVAECodec"]
