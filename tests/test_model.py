"""The unified transformer: fidelity to diffusers' Wan, routing, groups, sizes, bad input."""

import pytest
import torch

from lightning_vigu.model import SIZES, build_model, model_config
from lightning_vigu.model.blocks import ModalityRouter

WAN_TINY = dict(
    num_attention_heads=2,
    attention_head_dim=24,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=32,
    ffn_dim=40,
    num_layers=2,
    rope_max_seq_len=64,
)


def _diffusers_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    ref = WanTransformer3DModel(patch_size=(1, 2, 2), **WAN_TINY).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(std=0.1)  # non-trivial weights everywhere (diffusers' defaults hide bugs)
    return ref


def test_video_path_matches_diffusers_wan():
    ref = _diffusers_wan()
    ours = build_model("tiny", vocab_size=None, **WAN_TINY).eval()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=True), None
    assert missing is not None and unexpected is None
    x, t, ctx = torch.randn(2, 4, 3, 6, 8), torch.tensor([700.0, 20.0]), torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        got = ours(x, t, ctx)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_caption_stream_absent_computes_the_video_dit_exactly():
    ref = _diffusers_wan()
    unified = build_model("tiny", vocab_size=97, **WAN_TINY).eval()
    missing, unexpected = unified.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected
    assert all(
        k.startswith(("vocab_embed", "time_embedding_t", "scale_shift_table_t", "text_head"))
        or ".ffn_t." in k
        for k in missing
    )
    x, ctx = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 3, 16)
    with torch.no_grad():
        assert torch.equal(unified(x, 400.0, ctx), ref(x, torch.tensor([400.0]), ctx).sample)


def test_unified_forward_shapes_and_text_only():
    m = build_model("tiny", vocab_size=50).eval()
    v, ctx = torch.randn(2, 48, 2, 4, 4), torch.randn(2, 3, 64)
    tok = torch.randint(0, 50, (2, 7))
    out = m(v, torch.tensor([1000.0, 0.0]), ctx, text=tok, t_text=torch.tensor([0.0, 1000.0]))
    assert out.velocity.shape == v.shape and out.text_logits.shape == (2, 7, 50)
    text_only = m(None, None, ctx, text=tok, t_text=500.0)
    assert text_only.velocity is None and text_only.text_logits.shape == (2, 7, 50)


def test_caption_tokens_change_video_only_through_shared_attention():
    """Text tokens influence video tokens (shared attention) but the video expert never sees them."""
    m = build_model("tiny", vocab_size=50)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.05)
    v, ctx = torch.randn(1, 48, 2, 4, 4), torch.randn(1, 3, 64)
    a = m(v, 500.0, ctx, text=torch.zeros(1, 5, dtype=torch.long), t_text=500.0).velocity
    b = m(v, 500.0, ctx, text=torch.ones(1, 5, dtype=torch.long), t_text=500.0).velocity
    assert not torch.allclose(a, b)


def test_causal_captions_read_the_video_and_the_past_only():
    """causal_captions: caption logits at i ignore caption tokens after i, the video ignores
    the caption stream, and the video still reaches the caption."""
    m = build_model("tiny", vocab_size=50, causal_captions=True)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.05)
    v, ctx = torch.randn(1, 48, 2, 4, 4), torch.randn(1, 3, 64)
    tok = torch.randint(0, 50, (1, 8))
    later = tok.clone()
    later[:, 5:] = (later[:, 5:] + 1) % 50
    a, b = (m(v, 500.0, ctx, text=t, t_text=0.0) for t in (tok, later))
    assert torch.equal(a.text_logits[:, :5], b.text_logits[:, :5])
    assert not torch.allclose(a.text_logits[:, 5:], b.text_logits[:, 5:])
    assert torch.equal(a.velocity, b.velocity)
    assert torch.allclose(a.velocity, m(v, 500.0, ctx), atol=1e-5)  # exactly the video DiT
    other = m(torch.randn_like(v), 500.0, ctx, text=tok, t_text=0.0)
    assert not torch.allclose(a.text_logits[:, :1], other.text_logits[:, :1])


def test_a_video_memory_gives_the_joint_pass_caption_logits():
    """Causal captions decode from the video's recorded keys and values: a caption-only pass
    reading them gives the joint pass's logits, pass after pass; the memory needs the causal
    mask and takes the place of the video."""
    m = build_model("tiny", vocab_size=50, causal_captions=True, text_absolute_positions=True)
    with torch.no_grad():
        for name, p in m.named_parameters():  # q / k norms at 1: attention logits of order 1
            p.fill_(1.0) if ".norm_" in name else p.normal_(std=0.05)
    v, ctx = torch.randn(2, 48, 2, 4, 4), torch.randn(2, 3, 64)
    memory = m.video_memory(v, 0.0, ctx)
    assert len(memory.layers) == len(m.blocks) and memory.num_video == 2 * 2 * 2
    with torch.no_grad():
        for _ in range(2):  # the memory is read again from the first block
            tok = torch.randint(0, 50, (2, 8))
            joint = m(v, 0.0, ctx, text=tok, t_text=0.0).text_logits
            alone = m(None, None, ctx, text=tok, t_text=0.0, memory=memory).text_logits
            assert torch.allclose(alone, joint, atol=1e-5)
    with pytest.raises(ValueError, match="pass text only"):
        m(v, 0.0, ctx, text=tok, t_text=0.0, memory=memory)
    with pytest.raises(ValueError, match="causal_captions"):
        build_model("tiny", vocab_size=50).video_memory(v, 0.0, ctx)


def test_text_experts_initialised_as_ffn_copies_and_lighter_option():
    m = build_model("tiny")
    for blk in m.blocks:
        assert torch.equal(blk.ffn_t.net[0].proj.weight, blk.ffn.net[0].proj.weight)
        assert blk.ffn_t.net[0].proj.weight.data_ptr() != blk.ffn.net[0].proj.weight.data_ptr()
    light = build_model("tiny", text_ffn_dim=32)
    assert light.blocks[0].ffn_t.net[0].proj.weight.shape == (32, 64)
    assert sum(p.numel() for p in light.parameter_groups()["text_experts"]) < sum(
        p.numel() for p in m.parameter_groups()["text_experts"]
    )


def test_gradients_reach_only_trainable_groups_when_video_is_frozen():
    m = build_model("tiny", vocab_size=40)
    with torch.no_grad():
        m.proj_out.weight.normal_(std=0.1)
        m.text_head.linear.weight.normal_(std=0.1)
    groups = m.parameter_groups()
    for p in groups["video"]:
        p.requires_grad_(False)
    v, ctx = torch.randn(2, 48, 2, 4, 4), torch.randn(2, 3, 64)
    out = m(v, 300.0, ctx, text=torch.randint(0, 40, (2, 6)), t_text=600.0)
    (out.velocity.pow(2).mean() + out.text_logits.logsumexp(-1).mean()).backward()
    assert all(p.grad is None for p in groups["video"])
    got = [
        p.grad is not None and p.grad.abs().sum() > 0
        for p in groups["text_experts"] + groups["text_embed"]
    ]
    assert sum(got) >= len(got) - 2  # norm3_t has no parameters; every text weight gets a gradient


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    m = build_model("tiny", vocab_size=30)
    with torch.no_grad():
        m.proj_out.weight.normal_(std=0.1)
    v, ctx, tok = torch.randn(1, 48, 2, 4, 4), torch.randn(1, 3, 64), torch.randint(0, 30, (1, 5))

    def grads():
        m.zero_grad()
        out = m(v, 300.0, ctx, text=tok, t_text=600.0)
        (out.velocity.sum() + out.text_logits.sum()).backward()
        return [p.grad.clone() for p in m.parameters() if p.grad is not None]

    plain = grads()
    m.enable_gradient_checkpointing(True)
    ckpt = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt))


def test_wan13b_builds_on_meta_with_the_documented_parameter_split():
    with torch.device("meta"):
        m = build_model("wan1.3b")
    counts = {k: sum(p.numel() for p in v) for k, v in m.parameter_groups().items()}
    assert counts["video"] == 1_418_996_800  # Wan2.1-T2V-1.3B's transformer
    assert counts["text_experts"] == 30 * (2 * 1536 * 8960 + 8960 + 1536)
    assert counts["text_embed"] == 804_793_216  # umT5 vocabulary embedding + head + text time/mod
    cfg = model_config("wan1.3b")
    assert (cfg.dim, cfg.num_layers, cfg.ffn_dim, cfg.text_dim, cfg.in_channels) == (
        1536,
        30,
        8960,
        4096,
        16,
    )


def test_router_splits_by_position():
    r = ModalityRouter(3, 2)
    x = torch.arange(10.0).view(1, 5, 2)
    v, t = r.split(x)
    assert v.shape[1] == 3 and t.shape[1] == 2 and torch.equal(r.merge([v, t]), x)
    assert ModalityRouter(3, 0).active == [0]
    with pytest.raises(ValueError, match="needs video tokens"):
        ModalityRouter(0, 0)


@pytest.mark.parametrize(
    "video, ctx, text, match",
    [
        (torch.randn(1, 3, 2, 4, 4), torch.randn(1, 3, 64), None, "in_channels=48"),
        (torch.randn(1, 48, 2, 5, 4), torch.randn(1, 3, 64), None, "H=5 is not divisible"),
        (torch.randn(1, 48, 2, 4, 4), torch.randn(1, 3, 32), None, "text_dim=64"),
        (torch.randn(1, 48, 2, 4, 4), torch.randn(1, 3, 64), torch.zeros(1, 4), "long tensor"),
    ],
)
def test_bad_inputs_say_what_was_expected(video, ctx, text, match):
    m = build_model("tiny")
    with pytest.raises(ValueError, match=match):
        m(video, 10.0, ctx, text=text, t_text=None if text is None else 5.0)


def test_unknown_size_and_option_are_named():
    with pytest.raises(ValueError, match="unknown model size 'huge'.*tiny"):
        build_model("huge")
    with pytest.raises(ValueError, match="unknown model option.*'hidden'"):
        build_model("tiny", hidden=3)
    assert {"tiny", "small", "wan1.3b"} <= set(SIZES)


def test_pooled_prompt_reaches_the_video_without_cross_attention():
    """With ``pooled_prompt`` the prompt's mean feature joins the time embedding: with every
    cross-attention silenced, the video output still depends on the prompt, not on its
    padding (zero rows); without it the prompt has no other way in."""
    video = torch.randn(1, 48, 2, 4, 4)
    prompt, other = torch.randn(2, 1, 3, 64)
    padded = torch.cat([prompt, torch.zeros(1, 4, 64)], 1)
    for on in (False, True):
        torch.manual_seed(0)
        m = build_model("tiny", vocab_size=None, pooled_prompt=on)
        torch.nn.init.normal_(m.proj_out.weight, std=0.02)  # a zero head hides everything
        for block in m.blocks:
            torch.nn.init.zeros_(block.attn2.to_out[0].weight)
        with torch.no_grad():
            a, b, c = (m(video, torch.tensor([500.0]), x) for x in (prompt, other, padded))
        assert (a - b).abs().amax() > 1e-4 if on else torch.equal(a, b)
        assert torch.allclose(a, c, atol=1e-6)  # padding does not enter the mean
    with pytest.raises(ValueError, match="pooled-prompt .* needs the prompt features"):
        m.condition_embedder(torch.tensor([500.0]))


def test_video_absolute_positions_let_a_token_know_where_it_is():
    """Rope rotates queries and keys only: on a constant video every video token computes the
    same value. With ``video_absolute_positions`` the sine-cosine grid (frame, row, column)
    enters each token's value, so the outputs differ by frame and place."""
    video = torch.full((1, 48, 4, 4, 4), 0.3)
    context = torch.randn(1, 6, 64)
    outputs = {}
    for on in (False, True):
        torch.manual_seed(0)
        m = build_model("tiny", vocab_size=None, video_absolute_positions=on)
        torch.nn.init.normal_(m.proj_out.weight, std=0.02)  # a zero head hides everything
        with torch.no_grad():
            outputs[on] = m(video, torch.tensor([500.0]), context)
    # (C, T, h', 2, w', 2) -> one (C, 2, 2) patch output per token (T, h', w')
    blind, seeing = (o[0].unflatten(2, (2, 2)).unflatten(4, (2, 2)) for o in outputs.values())
    blind, seeing = (o.permute(1, 2, 4, 0, 3, 5).flatten(0, 2) for o in (blind, seeing))
    assert torch.allclose(blind, blind[:1].expand_as(blind), atol=1e-5)  # 16 equal tokens
    apart = (seeing[:, None] - seeing[None]).abs().flatten(2).amax(-1)  # (16, 16)
    assert apart[~torch.eye(16, dtype=torch.bool)].min() > 1e-3  # every token its own value


def test_rope_tables_are_the_float64_angles_and_survive_a_cast_to_bf16():
    from lightning_vigu.model.embeddings import TextRope1D, VideoRope3D

    rope = VideoRope3D(64, (1, 2, 2))
    cos, sin = rope((3, 4, 5))
    # token (t, h, w) = (2, 1, 3): channel pairs 0..11 rotate by frame, 12..21 by row, 22..31 by column
    token = (2 * 4 + 1) * 5 + 3
    freqs = [
        1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d) for d in (24, 20, 20)
    ]
    angle = torch.cat([2 * freqs[0], 1 * freqs[1], 3 * freqs[2]]).repeat_interleave(2)
    assert torch.equal(cos[0, token, 0], angle.cos().float())
    assert torch.equal(sin[0, token, 0], angle.sin().float())
    # bf16 weights (".to(torch.bfloat16)", bf16-true training) must not round the positions
    cast = rope.to(torch.bfloat16)
    assert cast.cos.dtype == torch.float32 and torch.equal(cast((3, 4, 5))[0], cos)
    text = TextRope1D(64, table_length=8)
    short, long = text(8, torch.device("cpu")), text(12, torch.device("cpu"))  # table, computed
    assert torch.equal(long[0][:, :8], short[0]) and torch.equal(long[1][:, :8], short[1])
    assert rope.state_dict() == {} and text.state_dict() == {}  # derived, not learned


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("video_rope", ["axial", "mixed"])
def test_rotations_are_the_textbook_pairs_bit_for_bit_also_over_a_joint_sequence(dtype, video_rope):
    """Each rope is written as one elementwise expression (``x * cos + swap(x) * signed sin``,
    and both pairings over ``[video | caption]`` in one pass). Every element must be exactly
    the textbook ``(x0 c - x1 s, x0 s + x1 c)`` of its pair, computed per part."""
    from lightning_vigu.model.embeddings import (
        TextRope1D,
        VideoRope3D,
        VideoRopeMixed,
        apply_rope_half,
        apply_rope_interleaved,
        apply_rope_joint,
    )

    heads, grid, length = 4, (2, 3, 4), 7
    video = VideoRope3D(32, (1, 2, 2)) if video_rope == "axial" else VideoRopeMixed(32, heads)
    cos_v, sin_v = video(grid)
    cos_t, sin_t = TextRope1D(32)(length, torch.device("cpu"))
    x = torch.randn(2, 24 + length, heads, 32).to(dtype)
    xv, xt = x[:, :24].float(), x[:, 24:].float()
    # interleaved pairs (Wan's video rope)
    a, b = xv.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos_v[..., 0::2], sin_v[..., 0::2]
    want_v = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(dtype)
    # rotate-half pairs (the caption's rope)
    a, b = xt.chunk(2, dim=-1)
    want_t = (xt * cos_t + torch.cat([-b, a], dim=-1) * sin_t).to(dtype)
    assert torch.equal(apply_rope_interleaved(x[:, :24], cos_v, sin_v), want_v)
    assert torch.equal(apply_rope_half(x[:, 24:], cos_t, sin_t), want_t)
    joint = apply_rope_joint(x, (cos_v, sin_v), (cos_t, sin_t))
    assert torch.equal(joint, torch.cat([want_v, want_t], dim=1))
    with pytest.raises(ValueError, match="24 video and 7 caption tokens, but the sequence has 30"):
        apply_rope_joint(x[:, :30], (cos_v, sin_v), (cos_t, sin_t))


def test_mixed_rope_turns_pairs_along_oblique_directions_and_scores_relative_offsets():
    from lightning_vigu.model.embeddings import VideoRopeMixed, apply_rope_interleaved

    rope = VideoRopeMixed(32, 4)
    grid = (3, 4, 5)
    cos, sin = rope(grid)
    assert cos.shape == (1, 60, 4, 32)
    # the closed form: pair i of head n turns by omega_i * (u_ni . (t, h, w)), from float64
    freqs = rope.frequencies()  # (3, 4 * 16)
    pos = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"), -1)
    angle = (pos.reshape(-1, 3).double() @ freqs).reshape(1, 60, 4, 16).repeat_interleave(2, -1)
    torch.testing.assert_close(cos, angle.cos().float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, angle.sin().float(), atol=1e-6, rtol=0)
    assert (freqs != 0).all(), "every pair turns with frame, row and column together"
    # a logit depends on the offset between query and key only: (0,0,0)->(1,2,1) as (1,1,3)->(2,3,4)
    q, k = torch.randn(2, 1, 1, 4, 32).unbind(0)
    index = {p: (p[0] * 4 + p[1]) * 5 + p[2] for p in [(0, 0, 0), (1, 2, 1), (1, 1, 3), (2, 3, 4)]}

    def logit(a, b):
        rq = apply_rope_interleaved(
            q, cos[:, index[a] : index[a] + 1], sin[:, index[a] : index[a] + 1]
        )
        rk = apply_rope_interleaved(
            k, cos[:, index[b] : index[b] + 1], sin[:, index[b] : index[b] + 1]
        )
        return (rq * rk).sum(-1)

    torch.testing.assert_close(logit((0, 0, 0), (1, 2, 1)), logit((1, 1, 3), (2, 3, 4)))
    cast = rope.to(torch.bfloat16)  # tables stay float32 from the float64 angles
    assert cast.cos.dtype == torch.float32 and torch.equal(cast(grid)[0], cos)
    assert rope.state_dict() == {}
    m = build_model("tiny", vocab_size=None, video_rope="mixed")
    out = m(torch.randn(1, 48, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, 64))
    assert out.shape == (1, 48, 2, 4, 4)
    with pytest.raises(ValueError, match="video_rope must be 'axial' or 'mixed'"):
        build_model("tiny", vocab_size=None, video_rope="diagonal")
