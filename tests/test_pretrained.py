"""Loading Wan2.1 diffusers folders and Uni-ViGU checkpoints (tiny on-disk models, CPU)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from tiny_wan import EXTRA_IDS, save_univigu_checkpoint, tiny_wan_folder
from torch import nn

from lightning_vigu.flows import SamplerConfig
from lightning_vigu.pretrained import (
    load_univigu_checkpoint,
    load_wan_folder,
    load_wan_transformer,
    ours_to_univigu,
    univigu_to_ours,
)


@pytest.fixture(scope="session")
def wan(tmp_path_factory):
    return tiny_wan_folder(tmp_path_factory)


def _inputs(vocab: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(2, 4, 2, 4, 4, generator=g)  # (B, z_dim, t, h, w)
    context = torch.randn(2, 7, 32, generator=g)  # (B, Lc, text_dim)
    text = torch.randint(0, vocab, (2, 6), generator=g)
    return video, torch.tensor([500.0, 20.0]), context, text


def _randomize_caption(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("vocab_embed", "text_head", "time_embedding_t")) or "ffn_t" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------- Wan folders
def test_matches_diffusers_wan_transformer(wan):
    from diffusers import WanTransformer3DModel

    reference = WanTransformer3DModel.from_pretrained(
        str(wan / "transformer"), local_files_only=True
    )
    video, t, context, _ = _inputs()
    with torch.no_grad():
        expected = reference.eval()(video, t, context, return_dict=False)[0]
        for vocab in (None, 50):  # with and without a caption stream, video only in
            ours = load_wan_transformer(wan, vocab_size=vocab).eval()
            assert (ours(video, t, context) - expected).abs().max() <= 1e-4


def test_transformer_folder_or_pipeline_root(wan):
    a = load_wan_transformer(wan).state_dict()
    b = load_wan_transformer(wan / "transformer").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_caption_stream_initialised_from_video(wan):
    model = load_wan_transformer(wan, vocab_size=50)
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    for block in model.blocks:
        for a, b in zip(block.ffn_t.parameters(), block.ffn.parameters()):
            assert torch.equal(a, b)
    video_time = model.condition_embedder
    assert torch.equal(model.time_embedding_t.time_proj.weight, video_time.time_proj.weight)
    assert torch.equal(
        model.time_embedding_t.time_embedder.linear_1.weight,
        video_time.time_embedder.linear_1.weight,
    )
    assert torch.equal(model.scale_shift_table_t, model.scale_shift_table)
    assert torch.count_nonzero(model.text_head.linear.weight) == 0
    assert torch.equal(model.text_head.norm_final.weight, torch.ones(32))
    assert 0.8 < model.vocab_embed.weight.std() < 1.2
    assert torch.isfinite(model.rope.cos).all() and model.rope.cos.dtype == torch.float32


def test_lighter_text_experts_and_dtype(wan):
    model = load_wan_transformer(wan, vocab_size=50, text_ffn_dim=16, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    proj = model.blocks[0].ffn_t.net[0].proj
    assert proj.weight.shape == (16, 32) and torch.isfinite(proj.weight.float()).all()
    assert proj.weight.float().std() > 0 and torch.count_nonzero(proj.bias) == 0


def test_sharded_transformer_folder(wan, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(wan / "transformer" / "config.json", folder)
    state = load_file(str(wan / "transformer" / "diffusion_pytorch_model.safetensors"))
    keys = sorted(state)
    shards = {"part-1.safetensors": keys[::2], "part-2.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(folder / name))
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_wan_transformer(folder).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_wrong_folder_names_the_missing_file(wan, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_wan_transformer(tmp_path)
    (tmp_path / "config.json").write_text((wan / "transformer" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_wan_transformer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"\['vae/'\]"):
        shutil.copytree(wan, tmp_path / "wan", ignore=shutil.ignore_patterns("vae"))
        load_wan_folder(tmp_path / "wan")


def test_unsupported_config_is_rejected(wan, tmp_path):
    shutil.copytree(wan / "transformer", tmp_path / "i2v")
    config = json.loads((tmp_path / "i2v" / "config.json").read_text())
    config["image_dim"] = 1280
    (tmp_path / "i2v" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="image_dim=1280"):
        load_wan_transformer(tmp_path / "i2v")


def test_override_of_another_size_names_the_tensor(wan):
    with pytest.raises(ValueError, match=r"tensor 'scale_shift_table' has shape \(1, 2, 32\) in"):
        load_wan_transformer(wan, num_attention_heads=4)


# ---------------------------------------------------------------------------- Uni-ViGU format
def _reference_layout(wan) -> set[str]:
    """Parameter names of the reference ``WanUnifiedTransformer`` built from the same parts
    (module tree of Fr0zenCrane/Uni-ViGU ``model/transformer.py``, names only)."""
    from diffusers import WanTransformer3DModel

    wan_model = WanTransformer3DModel.from_pretrained(str(wan / "transformer"))
    root, dim = nn.Module(), 32
    root.vocab_embed = nn.Embedding(50, dim)
    root.blocks = nn.ModuleList()
    for block in wan_model.blocks:
        unified = nn.Module()
        for name in ("norm1", "attn1", "attn2", "norm2", "ffn", "norm3"):
            setattr(unified, name, getattr(block, name))
        unified.ffn_t, unified.norm3_t = copy.deepcopy(block.ffn), copy.deepcopy(block.norm3)
        unified.scale_shift_table = block.scale_shift_table
        root.blocks.append(unified)
    time_v = nn.Module()
    for name in ("timesteps_proj", "time_embedder", "act_fn", "time_proj"):
        setattr(time_v, name, getattr(wan_model.condition_embedder, name))
    root.time_embedding_v, root.time_embedding_t = time_v, copy.deepcopy(time_v)
    root.cond_text_embedder = wan_model.condition_embedder.text_embedder
    root.scale_shift_table_v = nn.Parameter(wan_model.scale_shift_table.clone())
    root.scale_shift_table_t = nn.Parameter(wan_model.scale_shift_table.clone())
    root.rotary_emb_text = nn.Module()
    root.rotary_emb_text.register_buffer("inv_freq", torch.ones(8))
    root.rotary_emb_video = wan_model.rope
    root.patch_embedding = wan_model.patch_embedding
    root.text_head = nn.Module()
    root.text_head.norm_final = nn.Module()
    root.text_head.norm_final.weight = nn.Parameter(torch.ones(dim))
    root.text_head.linear = nn.Linear(dim, 50)
    root.video_head = nn.Module()
    root.video_head.norm_out, root.video_head.proj_out = wan_model.norm_out, wan_model.proj_out
    return set(root.state_dict())


def test_univigu_names_match_the_reference_layout(wan):
    ours = load_wan_transformer(wan, vocab_size=50)
    theirs = ours_to_univigu(ours.state_dict(), ours.config.attention_head_dim)
    assert set(theirs) == _reference_layout(wan)
    assert univigu_to_ours(theirs).keys() == ours.state_dict().keys()


def test_univigu_mapping_table():
    names = {
        "time_embedding_v.time_proj.weight": "condition_embedder.time_proj.weight",
        "cond_text_embedder.linear_2.bias": "condition_embedder.text_embedder.linear_2.bias",
        "scale_shift_table_v": "scale_shift_table",
        "scale_shift_table_t": "scale_shift_table_t",
        "video_head.proj_out.weight": "proj_out.weight",
        "_orig_mod.blocks.3._fsdp_wrapped_module.ffn_t.net.2.weight": "blocks.3.ffn_t.net.2.weight",
        "module.text_head.norm_final.weight": "text_head.norm_final.weight",
    }
    mapped = univigu_to_ours(
        {**dict.fromkeys(names, torch.zeros(1)), "rotary_emb_text.inv_freq": 0}
    )
    assert list(mapped) == list(names.values())


@pytest.mark.parametrize("mask_token", [False, True])
def test_univigu_checkpoint_loads_exactly(wan, tmp_path, mask_token):
    model = load_wan_transformer(wan, vocab_size=50, mask_token=mask_token).eval()
    _randomize_caption(model)
    path = save_univigu_checkpoint(model, tmp_path / "step-00001000.pth")
    loaded = load_univigu_checkpoint(path, wan_folder=wan, mask_token=mask_token).eval()
    assert loaded.config.vocab_size == 50 and loaded.config.mask_token is mask_token
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in got)
    video, t, context, text = _inputs()
    with torch.no_grad():
        a, b = model(video, t, context, text, t), loaded(video, t, context, text, t)
    assert torch.equal(a.velocity, b.velocity) and torch.equal(a.text_logits, b.text_logits)
    assert a.text_logits.abs().max() > 0


def test_univigu_checkpoint_of_another_size(wan, tmp_path):
    model = load_wan_transformer(wan, vocab_size=50)
    path = save_univigu_checkpoint(model, tmp_path / "ckpt.pth")
    with pytest.raises(
        ValueError, match=r"'scale_shift_table' has shape \(1, 2, 32\) .* \(1, 2, 64\)"
    ):
        load_univigu_checkpoint(path, size="tiny")
    with pytest.raises(
        ValueError, match=r"size 'tiny' expects .* dim=32, num_layers=2, ffn_dim=32"
    ):
        load_univigu_checkpoint(path, size="tiny")


class _Opaque:
    pass


def test_univigu_checkpoint_with_pickled_objects(wan, tmp_path):
    model = load_wan_transformer(wan, vocab_size=50)
    path = tmp_path / "ckpt.pth"
    state = ours_to_univigu(model.state_dict(), 16)
    torch.save({"model": state, "config": _Opaque()}, path)
    with pytest.raises(ValueError, match="trust_pickle=True"):
        load_univigu_checkpoint(path, wan_folder=wan)
    assert load_univigu_checkpoint(path, wan_folder=wan, trust_pickle=True).config.vocab_size == 50


def test_tokenizer_larger_than_vocabulary(wan, tmp_path):
    small = load_wan_transformer(wan, vocab_size=10)
    path = save_univigu_checkpoint(small, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match=r"tokenizer at .*tokenizer has \d+ ids .* 10 rows"):
        load_wan_folder(wan, checkpoint=path)


# ---------------------------------------------------------------------------- end to end
def test_wan_folder_text_to_video_and_video_to_text(wan):
    parts = load_wan_folder(wan)
    tok = parts.tokenizer
    assert tok.vocab_size == parts.model.config.vocab_size  # base vocabulary + sentinels
    assert parts.codec.normalize and EXTRA_IDS > 0
    sampler = parts.sampler(SamplerConfig(video_steps=2, text_steps=3, guidance_scale=3.0))
    prompts = ["a red circle moves left", "two white balls bounce"]
    context, uncond = parts.prompt_encoder(prompts), parts.prompt_encoder(["", ""])
    shape = parts.codec.latent_shape(5, 32, 32)
    assert shape == (4, 2, 4, 4)
    g = torch.Generator().manual_seed(0)
    latents = sampler.generate_video(context, shape, uncond_context=uncond, generator=g)
    video = parts.codec.decode(latents)
    assert video.shape == (2, 3, 5, 32, 32) and video.abs().max() <= 1
    tokens = sampler.caption(parts.codec.encode(video), uncond, length=8, generator=g)
    assert tokens.shape == (2, 8) and int(tokens.max()) < tok.vocab_size
    captions = tok.decode(tokens)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_wan_folder_with_univigu_checkpoint(wan, tmp_path):
    model = load_wan_transformer(wan, vocab_size=56)
    _randomize_caption(model)
    path = save_univigu_checkpoint(model, tmp_path / "ckpt.pth")
    parts = load_wan_folder(wan, checkpoint=path)
    assert not parts.codec.normalize  # the reference inference keeps raw VAE latents
    assert parts.tokenizer.vocab_size == 56 and parts.caption_path.vocab_size == 56
    for a, b in zip(model.parameters(), parts.model.parameters()):
        assert torch.equal(a, b)


def test_size_suggestion_for_wan_weights():
    from lightning_vigu.model import build_model
    from lightning_vigu.pretrained import _describe

    with torch.device("meta"):
        state = build_model("wan1.3b").state_dict()
    assert "size='wan1.3b'" in _describe(state)
