"""The Wan VAE codec on a tiny on-disk AutoencoderKLWan (4 latent channels, CPU)."""

from __future__ import annotations

import pytest
import torch
from tiny_wan import VAE, tiny_wan_folder

from lightning_vigu.codecs import WanVAECodec


@pytest.fixture(scope="session")
def wan(tmp_path_factory):
    return tiny_wan_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def codecs(wan):
    return WanVAECodec(wan), WanVAECodec(wan / "vae", normalize=False)


def _video(frames: int = 5, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1  # (B, 3, T, H, W)


def test_geometry(codecs):
    codec, _ = codecs
    assert codec.latent_channels == VAE["z_dim"] and codec.factors == (4, 8, 8)
    assert codec.latent_frames(81) == 21 and codec.video_frames(21) == 81
    assert codec.latent_frames(1) == 1 and codec.video_frames(1) == 1
    assert codec.latent_shape(81, 480, 832) == (4, 21, 60, 104)


def test_round_trip_shapes_and_range(codecs):
    codec, _ = codecs
    z = codec.encode(_video())
    assert z.shape == (1, 4, 2, 4, 4) and z.dtype == torch.float32
    video = codec.decode(z)
    assert video.shape == (1, 3, 5, 32, 32) and video.abs().max() <= 1


def test_normalisation_on_and_off(codecs, wan):
    from diffusers import AutoencoderKLWan

    normalized, raw = codecs
    x = _video()
    mean = torch.tensor(VAE["latents_mean"]).view(1, 4, 1, 1, 1)
    std = torch.tensor(VAE["latents_std"]).view(1, 4, 1, 1, 1)
    vae = AutoencoderKLWan.from_pretrained(str(wan / "vae"), local_files_only=True)
    with torch.no_grad():
        expected_raw = vae.encode(x).latent_dist.mode()
    z_raw, z = raw.encode(x), normalized.encode(x)
    assert torch.allclose(z_raw, expected_raw, atol=1e-6)
    assert torch.allclose(z, (z_raw - mean) / std, atol=1e-5)
    assert not torch.allclose(z, z_raw, atol=1e-2)
    assert torch.allclose(normalized.decode(z), raw.decode(z_raw), atol=1e-5)


def test_sampling_the_posterior(wan):
    codec = WanVAECodec(wan, sample=True)
    x = _video()
    a = codec.encode(x, generator=torch.Generator().manual_seed(1))
    b = codec.encode(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, WanVAECodec(wan).encode(x))


def test_frozen(codecs):
    codec, _ = codecs
    codec.train()
    assert not codec.vae.training
    assert not any(p.requires_grad for p in codec.parameters())


def test_clear_errors(codecs, tmp_path):
    codec, _ = codecs
    with pytest.raises(ValueError, match=r"T = 4n \+ 1 .* got T=6; use num_frames=5 or 9"):
        codec.encode(_video(frames=6))
    with pytest.raises(ValueError, match="divisible by 8, got H=20"):
        codec.encode(_video(size=20))
    with pytest.raises(ValueError, match=r"latents \(B, 4, n, h, w\)"):
        codec.decode(torch.zeros(1, 16, 2, 4, 4))
    with pytest.raises(FileNotFoundError, match="no VAE config.json"):
        WanVAECodec(tmp_path)
