"""Export: fit checkpoint -> Uni-ViGU release file / diffusers Wan folder / LoRA adapters, and
back (ours and diffusers) with the same outputs."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_training import RandomVideoDataModule, tiny_module

from callbacks import EMA
from lightning_vigu.cli import main
from lightning_vigu.export import (
    LORA_WEIGHTS_NAME,
    export_diffusers,
    export_lora,
    export_univigu,
    lora_from_diffusers,
    merge_lora_state,
    read_checkpoint,
)
from lightning_vigu.model import UniViGUTransformer
from lightning_vigu.model.lora import apply_lora
from lightning_vigu.pretrained import load_univigu_checkpoint, load_wan_transformer
from lightning_vigu.runs import CheckpointError

LORA = {"rank": 4, "alpha": 8}


def _fit(folder, ema: bool, **module_kw):
    """Two optimiser steps of a tiny module (weights moved off their zero heads first)."""
    torch.manual_seed(0)
    module = tiny_module(lr=1e-2, **module_kw)
    with torch.no_grad():
        for p in module.model.parameters():  # LoRA's zero-initialised B included
            p.add_(0.05 * torch.randn_like(p))
    callbacks = [ModelCheckpoint(dirpath=folder, save_last=True)] + ([EMA(0.9)] if ema else [])
    L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=folder,
        callbacks=callbacks,
    ).fit(module, RandomVideoDataModule(num_clips=8))
    return folder / "last.ckpt"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("full"), ema=True)


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("lora"), ema=False, lora=LORA)


def _inputs(model: UniViGUTransformer, vocab: int = 100):
    c = model.config
    g = torch.Generator().manual_seed(0)
    video = torch.randn(2, c.in_channels, 2, 4, 4, generator=g)
    context = torch.randn(2, 5, c.text_dim, generator=g)
    text = torch.randint(0, vocab, (2, 6), generator=g)
    return video, torch.tensor([700.0, 30.0]), context, text


# ---------------------------------------------------------------------------- reading
def test_ema_weights_by_default_live_on_request(ckpt, tmp_path):
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    ema, live = read_checkpoint(ckpt), read_checkpoint(ckpt, weights="live")
    assert ema.weights == "ema" and live.weights == "live"
    key = "blocks.0.attn1.to_q.weight"
    assert torch.equal(ema.state[key], raw["state_dict"][f"model.{key}"])
    assert torch.equal(live.state[key], raw["current_model_state"][f"model.{key}"])
    assert not torch.equal(ema.state[key], live.state[key])
    assert ema.config.in_channels == 48 and ema.config.vocab_size == 49408
    no_ema = tmp_path / "no_ema.ckpt"
    torch.save({k: v for k, v in raw.items() if k != "current_model_state"}, no_ema)
    with pytest.raises(ValueError, match="no EMA weights .* --weights live"):
        read_checkpoint(no_ema, weights="ema")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        read_checkpoint(tmp_path / "missing.ckpt")


def test_init_format_is_what_a_later_phase_starts_from(ckpt, tmp_path):
    """``export --format init``: the video path and the prompt encoder (EMA weights) as a plain
    state dict; ``init_from`` loads it and builds the caption stream from the video path."""
    out = tmp_path / "init" / "generator.pt"
    main(["export", "--ckpt", str(ckpt), "--format", "init", "--out", str(out)])
    state = torch.load(out, weights_only=True)
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("prompt_encoder.") for k in state)
    assert not any("ffn_t." in k or "time_embedding_t" in k for k in state)  # the caption stream
    for key, value in state.items():
        assert torch.equal(value, raw[key])  # the EMA average, as saved
    module = tiny_module(init_from=str(out))
    key = "model.blocks.0.attn1.to_q.weight"
    assert torch.equal(module.state_dict()[key], raw[key])
    block = module.model.blocks[0]
    assert torch.equal(block.ffn_t.net[0].proj.weight, block.ffn.net[0].proj.weight)
    assert not torch.equal(
        block.ffn_t.net[0].proj.weight, raw["model.blocks.0.ffn_t.net.0.proj.weight"]
    )


def test_sharded_fsdp_folder_reads_like_its_consolidated_file(ckpt, tmp_path):
    import torch.distributed.checkpoint as dcp

    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    folder = tmp_path / "epoch=0-step=2.ckpt"  # what FSDPStrategy(state_dict_type="sharded") writes
    dcp.save({"model": raw["current_model_state"]}, checkpoint_id=folder, no_dist=True)
    torch.save({"hyper_parameters": raw["hyper_parameters"], "global_step": 2}, folder / "meta.pt")
    sharded, live = read_checkpoint(folder), read_checkpoint(ckpt, weights="live")
    assert sharded.state.keys() == live.state.keys()
    assert all(torch.equal(sharded.state[k], v) for k, v in live.state.items())


# ---------------------------------------------------------------------------- Uni-ViGU format
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_univigu_round_trip(ckpt, tmp_path, suffix):
    out = tmp_path / f"univigu{suffix}"
    main(["export", f"--ckpt={ckpt}", "--format=univigu", f"--out={out}"])
    ours = read_checkpoint(ckpt).model().eval()
    loaded = load_univigu_checkpoint(out, size="tiny").eval()
    video, t, context, text = _inputs(ours)
    with torch.no_grad():
        a, b = ours(video, t, context, text, t), loaded(video, t, context, text, t)
    assert torch.equal(a.velocity, b.velocity) and torch.equal(a.text_logits, b.text_logits)
    assert a.velocity.abs().max() > 0 and a.text_logits.abs().max() > 0
    if suffix == ".pth":  # what the official inference script reads
        release = torch.load(out, map_location="cpu", weights_only=True)
        assert release["step"] == 2 and "time_embedding_v.time_proj.weight" in release["model"]
        assert "video_head.proj_out.weight" in release["model"]
        assert "rotary_emb_text.inv_freq" in release["model"]


def test_univigu_vocabulary_rows_follow_the_target_tokenizer(ckpt, tmp_path):
    ours = read_checkpoint(ckpt).model().eval()
    out = export_univigu(ours, tmp_path / "cut.pth", vocab_rows=100)
    loaded = load_univigu_checkpoint(out, size="tiny").eval()
    assert loaded.vocab_embed.weight.shape[0] == 100 and loaded.config.vocab_size == 100
    video, t, context, text = _inputs(ours, vocab=100)
    with torch.no_grad():
        a, b = ours(video, t, context, text, t), loaded(video, t, context, text, t)
    assert torch.equal(a.text_logits[..., :100], b.text_logits)
    with pytest.raises(ValueError, match="49408 vocabulary rows but 60000"):
        export_univigu(ours, tmp_path / "big.pth", vocab_rows=60000)
    with pytest.raises(ValueError, match=r"\.pth .* or \.safetensors"):
        export_univigu(ours, tmp_path / "model.bin")


def test_mask_row_stays_last(tmp_path):
    model = UniViGUTransformer(tiny_module(caption_source="mask").model.config).eval()
    state = torch.load(export_univigu(model, tmp_path / "m.pth", vocab_rows=10), weights_only=True)
    rows = state["model"]["vocab_embed.weight"]
    assert rows.shape[0] == 11 and torch.equal(rows[-1], model.vocab_embed.weight[-1])


# ---------------------------------------------------------------------------- diffusers
def test_diffusers_folder_runs_in_diffusers_and_loads_back(ckpt, tmp_path):
    from diffusers import WanTransformer3DModel

    out = tmp_path / "transformer"
    main(["export", f"--ckpt={ckpt}", "--format=diffusers", f"--out={out}"])
    ours = read_checkpoint(ckpt).model().eval()
    theirs = WanTransformer3DModel.from_pretrained(str(out), local_files_only=True).eval()
    back = load_wan_transformer(out).eval()
    video, t, context, _ = _inputs(ours)
    with torch.no_grad():
        expected = ours(video, t, context)
        got = theirs(video, t, context, return_dict=False)[0]
        assert (got - expected).abs().max() <= 1e-4 and expected.abs().max() > 0
        assert torch.equal(back(video, t, context), expected)
    assert json.loads((out / "config.json").read_text())["in_channels"] == 48


def test_data_prediction_is_refused_for_velocity_formats(tmp_path):
    from lightning_vigu.objective import ObjectiveConfig

    ckpt = _fit(tmp_path, ema=False, objective=ObjectiveConfig(prediction="data"))
    args = ["export", f"--ckpt={ckpt}", "--format=diffusers", f"--out={tmp_path}/d"]
    with pytest.raises(CheckpointError, match="pickled Python objects .* --trust-pickle"):
        main(args)  # a module built in Python keeps its ObjectiveConfig object in hparams
    with pytest.raises(ValueError, match="prediction='data'.*--allow-data-prediction"):
        main([*args, "--trust-pickle=true"])


def test_parts_wan_lacks_are_refused_for_its_formats(tmp_path):
    overrides = {"video_absolute_positions": True, "text_absolute_positions": True}
    overrides |= {"video_rope": "mixed", "pooled_prompt": True}
    ckpt = _fit(tmp_path, ema=False, model_overrides=overrides)
    for fmt, named in (
        ("diffusers", "video_absolute_positions: true, video_rope: mixed, pooled_prompt: true:"),
        ("univigu", "video_rope: mixed, pooled_prompt: true, text_absolute_positions: true:"),
    ):
        args = ["export", f"--ckpt={ckpt}", f"--format={fmt}", f"--out={tmp_path}/{fmt}"]
        with pytest.raises(ValueError, match=f"model_overrides.*{named}.*does not have"):
            main(args)
        assert not (tmp_path / fmt).exists()


# ---------------------------------------------------------------------------- LoRA
def _peft_model(trained, state) -> UniViGUTransformer:
    model = UniViGUTransformer(trained.config)
    apply_lora(model, **LORA)
    model.load_state_dict(state)
    return model.eval()


def test_lora_merged_export_equals_the_adapted_model(lora_ckpt, tmp_path):
    trained = read_checkpoint(lora_ckpt)
    assert trained.lora_scale == 2.0 and trained.adapters()
    adapted = _peft_model(trained, trained.state)
    merged = trained.model().eval()
    video, t, context, text = _inputs(merged)
    with torch.no_grad():
        a, b = adapted(video, t, context, text, t), merged(video, t, context, text, t)
    assert torch.allclose(a.velocity, b.velocity, atol=1e-5)
    assert torch.allclose(a.text_logits, b.text_logits, atol=1e-4)
    out = export_univigu(merged, tmp_path / "merged.pth")
    assert "blocks.0.attn1.to_q.weight" in torch.load(out, weights_only=True)["model"]


def test_lora_adapters_alone_load_in_diffusers_and_back(lora_ckpt, tmp_path):
    from diffusers import WanTransformer3DModel

    trained = read_checkpoint(lora_ckpt)
    out = tmp_path / "lora"
    main(["export", f"--ckpt={lora_ckpt}", "--format=lora", f"--out={out}"])
    from safetensors.torch import load_file

    adapters = load_file(str(out / LORA_WEIGHTS_NAME))
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in adapters
    # the base transformer (adapters dropped) in diffusers, with the exported adapters
    base_state = merge_lora_state(trained.state, 0.0)
    base = load_wan_transformer(
        export_diffusers(_from_state(trained, base_state), tmp_path / "base")
    )
    diffusers_model = WanTransformer3DModel.from_pretrained(str(tmp_path / "base"))
    diffusers_model.load_lora_adapter(str(out / LORA_WEIGHTS_NAME), prefix="transformer")
    adapted = _peft_model(trained, trained.state)
    video, t, context, _ = _inputs(adapted)
    with torch.no_grad():
        expected = adapted(video, t, context)
        got = diffusers_model.eval()(video, t, context, return_dict=False)[0]
        assert (got - expected).abs().max() <= 1e-4
        assert (base(video, t, context) - expected).abs().max() > 1e-3  # the adapters matter
    # back into ours: scale folded into B, so alpha = rank
    ours = UniViGUTransformer(base.config)
    ours.load_state_dict(base.state_dict())
    apply_lora(ours, rank=LORA["rank"], alpha=LORA["rank"])
    missing, unexpected = ours.load_state_dict(lora_from_diffusers(adapters), strict=False)
    assert not unexpected and not [k for k in missing if ".lora_" in k]
    with torch.no_grad():
        assert (ours.eval()(video, t, context) - expected).abs().max() <= 1e-5


def _from_state(trained, state) -> UniViGUTransformer:
    model = UniViGUTransformer(trained.config)
    model.load_state_dict(state)
    return model


def test_lora_format_needs_adapters(ckpt, tmp_path):
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        export_lora(read_checkpoint(ckpt), tmp_path / "lora")
