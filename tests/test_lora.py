"""LoRA on the video path (peft), caption stream trainable, exact merge."""

from __future__ import annotations

import pytest
import torch

from lightning_vigu.model import build_model, parameter_group
from lightning_vigu.model.lora import apply_lora, is_lora, lora_state_dict, merge_lora


def _model():
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=50, in_channels=4, out_channels=4, num_layers=1).eval()
    with torch.no_grad():  # move away from the zero-initialised heads so outputs are non-trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _forward(model):
    g = torch.Generator().manual_seed(1)
    video = torch.randn(1, 4, 2, 4, 4, generator=g)
    context = torch.randn(1, 3, 64, generator=g)
    text = torch.randint(0, 50, (1, 6), generator=g)
    with torch.no_grad():
        return model(video, 300.0, context, text=text, t_text=100.0)


def test_only_lora_and_caption_parameters_train():
    model = apply_lora(_model(), rank=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and frozen
    assert all(is_lora(n) or parameter_group(n) != "video" for n in trainable)
    assert all(not is_lora(n) and parameter_group(n) == "video" for n in frozen)
    # every targeted video linear got an adapter, the caption expert did not
    assert "blocks.0.attn1.to_q.lora_A.default.weight" in trainable
    assert "blocks.0.ffn.net.2.lora_B.default.weight" in trainable
    assert "blocks.0.ffn_t.net.2.weight" in trainable
    assert not any("ffn_t" in n and is_lora(n) for n in trainable)
    assert set(lora_state_dict(model)) == {n for n in trainable if is_lora(n)}


def test_adapters_only():
    model = apply_lora(_model(), rank=2, trainable_groups=())
    assert all(is_lora(n) for n, p in model.named_parameters() if p.requires_grad)


def test_output_unchanged_at_init_and_merge_is_exact():
    model = _model()
    before = _forward(model)
    names = set(model.state_dict())
    apply_lora(model, rank=4, alpha=8)
    at_init = _forward(model)
    assert torch.equal(at_init.velocity, before.velocity)
    assert torch.equal(at_init.text_logits, before.text_logits)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    adapted = _forward(model)
    assert (adapted.velocity - before.velocity).abs().max() > 1e-3
    merge_lora(model)
    assert set(model.state_dict()) == names
    merged = _forward(model)
    assert torch.allclose(merged.velocity, adapted.velocity, atol=1e-5)
    assert torch.allclose(merged.text_logits, adapted.text_logits, atol=1e-5)


def test_bad_targets():
    with pytest.raises(ValueError, match="'to_qkv' matches no linear"):
        apply_lora(_model(), targets=("to_qkv",))
    with pytest.raises(ValueError, match="caption-stream layers"):
        apply_lora(_model(), targets=("net.2",))
