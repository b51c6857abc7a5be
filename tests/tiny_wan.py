"""Builders of tiny on-disk Wan2.1 folders and Uni-ViGU checkpoints for CPU tests.

:func:`build_tiny_wan` writes a ``WanPipeline`` with ``save_pretrained``, so the folder has
exactly diffusers' layout (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) with random weights: a 2-block transformer, a VAE with 8 base
channels and 4 latent channels, a 1-layer umT5 encoder and a T5 (Unigram) tokenizer whose
vocabulary is written here, so nothing is downloaded or trained.

Use :func:`tiny_wan_folder` from a session fixture: it builds the folder once per session.
"""

from __future__ import annotations

from pathlib import Path

import torch

SENTENCES = (
    "a red circle moves left on a blue background",
    "a small green square jumps to the right",
    "the big yellow triangle rotates in the centre",
    "two white balls bounce slowly",
)
EXTRA_IDS = 2  # umT5's tokenizer also has sentinel tokens after its base vocabulary
TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    rope_max_seq_len=64,
)
VAE = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    latents_mean=[0.1, -0.2, 0.3, 0.0],
    latents_std=[1.5, 2.0, 0.5, 1.0],
)
UMT5 = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=1,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)
_CACHE: dict[str, Path] = {}


def tiny_tokenizer():
    """A T5 tokenizer over the words of :data:`SENTENCES` (ids: pad 0, eos 1, unk 2)."""
    from transformers import T5Tokenizer

    words = sorted({w for s in SENTENCES for w in s.split()})
    letters = sorted({c for w in words for c in w})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(words)]
    vocab += [(c, -5.0) for c in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=EXTRA_IDS)


def build_tiny_wan(root: Path, seed: int = 0) -> Path:
    """Write a tiny Wan2.1 diffusers pipeline folder at ``root`` and return it."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer) + 3, **UMT5))
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=encoder,
        transformer=WanTransformer3DModel(**TRANSFORMER),
        vae=AutoencoderKLWan(**VAE),
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),
    )
    pipe.save_pretrained(str(root), safe_serialization=True)
    return Path(root)


def tiny_wan_folder(tmp_path_factory) -> Path:
    """The session's tiny Wan folder (built on first use)."""
    if "wan" not in _CACHE:
        _CACHE["wan"] = build_tiny_wan(tmp_path_factory.mktemp("tiny_wan") / "Wan2.1-tiny")
    return _CACHE["wan"]


def save_univigu_checkpoint(model: torch.nn.Module, path: Path, step: int = 0) -> Path:
    """Save ``model`` as the Uni-ViGU trainer does: ``torch.save({"model": sd, "step": ...})``
    with the release's parameter names (and an FSDP wrapper prefix on the blocks, which the
    reference loader strips)."""
    from lightning_vigu.pretrained import ours_to_univigu

    theirs = ours_to_univigu(model.state_dict(), model.config.attention_head_dim)
    wrapped = {_fsdp_name(k): v for k, v in theirs.items()}
    torch.save({"model": wrapped, "step": step, "optimizer": {}}, path)
    return Path(path)


def _fsdp_name(key: str) -> str:
    """``blocks.3.attn1.x`` -> ``blocks.3._fsdp_wrapped_module.attn1.x`` (per-block FSDP wrap)."""
    if not key.startswith("blocks."):
        return key
    head, index, rest = key.split(".", 2)
    return f"{head}.{index}._fsdp_wrapped_module.{rest}"
