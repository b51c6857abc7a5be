"""latent_cache: shards -> codec latents (+ frozen prompt embeddings) -> DataModule round trip."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules import WebVideoDataModule
from datamodules.latent_cache import cache_latents, instantiate, main
from lightning_vigu.codecs import PixelCodec
from lightning_vigu.text.encoders import PromptEncoder


class HashPromptEncoder(PromptEncoder):
    """A frozen stand-in encoder: ``(B, 4, 8)`` embeddings from the prompt's characters."""

    dim, max_length = 8, 4

    def forward(self, prompts):
        codes = torch.tensor([[float(ord(c) % 17) for c in (p + " " * 32)[:32]] for p in prompts])
        return codes.reshape(len(prompts), 4, 8) / 17.0  # (B, 4, 8)


class Holder:
    """Takes a module argument, to check that nested class paths are instantiated."""

    def __init__(self, inner: torch.nn.Module) -> None:
        self.inner = inner


def test_pixel_codec_cache_round_trip(data_synthetic_shards, tmp_path, capsys):
    out = tmp_path / "latents"
    main(
        [
            "--shards",
            str(data_synthetic_shards / "val-*.tar"),
            "--out",
            str(out),
            "--codec",
            "lightning_vigu.codecs.PixelCodec",
            "--codec-args",
            '{"factors": [1, 4, 4]}',
            "--batch-size",
            "3",
            "--samples-per-shard",
            "5",
        ]
    )
    assert (
        "wrote 8 samples (latents [48, 16, 8, 8], float16) in 2 shards" in capsys.readouterr().out
    )
    summary = json.loads((out / "latent_cache.json").read_text())
    assert summary["codec"] == "lightning_vigu.codecs.PixelCodec" and summary["dtype"] == "float16"
    cached = WebVideoDataModule(val_shards=str(out / "latents-*.tar"), batch_size=8, num_workers=0)
    source = WebVideoDataModule(
        val_shards=str(data_synthetic_shards / "val-*.tar"), batch_size=8, num_workers=0
    )
    lat, vid = next(iter(cached.val_dataloader())), next(iter(source.val_dataloader()))
    assert "video" not in lat and lat["latents"].shape == (8, 48, 16, 8, 8)
    assert (
        lat["key"] == vid["key"]
        and lat["prompt"] == vid["prompt"]
        and lat["caption"] == vid["caption"]
    )
    decoded = PixelCodec(factors=(1, 4, 4)).decode(lat["latents"])
    assert (decoded - vid["video"]).abs().max() < 2e-3  # float16 storage


def test_prompt_embeddings_are_cached(data_synthetic_shards, tmp_path):
    out = tmp_path / "with_emb"
    summary = cache_latents(
        str(data_synthetic_shards / "val-000000.tar"),
        out,
        PixelCodec((2, 8, 8)),
        HashPromptEncoder(),
        dtype="float32",
        progress=False,
    )
    assert summary["written"] == 4 and summary["latent_shape"] == [384, 8, 4, 4]
    batch = next(
        iter(WebVideoDataModule(val_shards=str(out), batch_size=4, num_workers=0).val_dataloader())
    )
    assert batch["prompt_emb"].shape == (4, 4, 8) and batch["prompt_emb"].dtype == torch.float32
    assert torch.equal(batch["prompt_emb"], HashPromptEncoder()(batch["prompt"]))


def test_trainable_encoders_and_bad_class_paths_are_refused(data_synthetic_shards, tmp_path):
    trainable = HashPromptEncoder()
    trainable.trainable = True
    with pytest.raises(ValueError, match="trainable"):
        cache_latents(
            str(data_synthetic_shards / "val-000000.tar"), tmp_path, PixelCodec(), trainable
        )
    with pytest.raises(ValueError, match="cannot import 'lightning_vigu.codecs.NoSuchCodec'"):
        instantiate("lightning_vigu.codecs.NoSuchCodec")
    holder = instantiate(
        "test_latent_cache.Holder",
        {
            "inner": {
                "class_path": "lightning_vigu.codecs.PixelCodec",
                "init_args": {"factors": [1, 2, 2]},
            }
        },
    )
    assert isinstance(holder.inner, PixelCodec) and holder.inner.factors == (1, 2, 2)
    codec = instantiate("lightning_vigu.codecs.PixelCodec", {"factors": [1, 2, 2], "scale": 2.0})
    assert codec.factors == (1, 2, 2) and codec.scale == 2.0
