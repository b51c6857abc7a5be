"""Causal captions (model.caption_objective: autoregressive): teacher forcing, the loss the
objective computes, left-to-right decoding, joint sampling and the export guard."""

import pytest
import torch
import torch.nn.functional as F

from datamodules.synthetic import WorldTokenizer
from lightning_vigu.flows.causal import CausalCaptions, make_caption_path
from lightning_vigu.module import UniViGU

EOS = 9


def test_teacher_forcing_canvas_and_loss_positions():
    path = CausalCaptions(vocab_size=10, eos_id=EOS)
    target = torch.tensor([[3, 4, EOS, EOS, EOS], [5, 6, 7, 8, 1]])
    assert path.inputs(target).tolist() == [[EOS, 3, 4, EOS, EOS], [EOS, 5, 6, 7, 8]]
    # the caption's tokens and its first end-of-text; a caption that fills the canvas: all
    assert path.loss_weight(target).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_decoding_writes_left_to_right_and_fills_after_the_end():
    path = CausalCaptions(vocab_size=10, eos_id=EOS)
    wanted = torch.tensor([[3, 4, EOS, 2, 2], [5, 6, 7, 8, 1]])
    calls = []

    def logits_of(canvas):  # a model that knows the captions: next token given the prefix
        calls.append(canvas.clone())
        return F.one_hot(wanted, 10).float() * 10

    out = path.decode(logits_of, 2, 5, torch.device("cpu"))
    assert out.tolist() == [[3, 4, EOS, EOS, EOS], [5, 6, 7, 8, 1]]
    assert calls[2][0].tolist() == [EOS, 3, 4, EOS, EOS]  # each pass sees what was written


def test_unknown_caption_objective_is_named():
    with pytest.raises(ValueError, match="caption_objective 'bert'"):
        make_caption_path("bert", "uniform", 10, 1.0, EOS)


def _module(phase) -> UniViGU:
    torch.manual_seed(0)
    return UniViGU(
        size="tiny",
        tokenizer=WorldTokenizer(),
        caption_length=24,
        prompt_length=8,
        video_shape=(2, 32, 32),
        phase=phase,
        caption_objective="autoregressive",
    )


def test_objective_is_the_next_token_cross_entropy_on_the_clean_video():
    module = _module({"preset": "refine", "task_mix": {"v2t": 1.0}})
    videos = torch.rand(2, 3, 2, 32, 32) * 2 - 1
    captions = ["a red circle moves left .", "two shapes on a black background ."]
    batch = {"video": videos, "prompt": captions, "caption": captions}
    out = module.compute_loss(batch, module.phase, module.step_generator("train", 0))
    latents, _, empty = module.batch_inputs(batch)
    target = module.encode_canvas(captions)
    ones = torch.ones(2)
    logits = module.flow(latents, ones, empty, module.caption_path.inputs(target), ones)
    ce = F.cross_entropy(
        logits.text_logits.flatten(0, 1), target.flatten(), reduction="none"
    ).view_as(target)
    weight = module.caption_path.loss_weight(target)
    expected = ((ce * weight).sum(1) / weight.sum(1)).mean()
    assert torch.allclose(out.text, expected, atol=1e-5)
    assert out.video.item() == 0.0  # v2t only: no video loss


def test_captions_of_some_rows_compute_what_the_masked_joint_pass_computes():
    """Training passes the captions of the rows that train them only (``text_rows``): the
    velocity of every row is the video-only pass's, each caption's logits the joint pass's,
    and so are the gradients, with or without gradient checkpointing."""
    model = _module("refine").model
    with torch.no_grad():
        for p in model.parameters():  # captions that depend on the video, a video that moves
            p.add_(torch.randn_like(p) * 0.05)
    video = torch.randn(5, model.config.in_channels, 2, 8, 8)
    t_video, t_text = torch.rand(5) * 1000, torch.rand(2) * 1000
    context = torch.randn(5, 8, model.config.text_dim)
    text, rows = torch.randint(0, 50, (2, 24)), torch.tensor([3, 0])

    def grads(out):
        model.zero_grad()
        (out.velocity.square().mean() + out.text_logits.square().mean()).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    packed = model(video, t_video, context, text, t_text, text_rows=rows)
    full_text = torch.zeros(5, 24, dtype=torch.long).index_copy(0, rows, text)
    full_t = torch.zeros(5).index_copy(0, rows, t_text)
    joint = model(video, t_video, context, full_text, full_t)
    assert torch.equal(packed.velocity, model(video, t_video, context))
    assert torch.allclose(packed.text_logits, joint.text_logits[rows], atol=1e-5)
    expected = grads(model(video, t_video, context, text, t_text, text_rows=rows))
    model.enable_gradient_checkpointing(True)
    checkpointed = grads(model(video, t_video, context, text, t_text, text_rows=rows))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(expected, checkpointed))
    with pytest.raises(ValueError, match="len\\(text_rows\\)"):
        model(video, t_video, context, text, t_text, text_rows=torch.tensor([1]))


def test_packed_caption_rows_compute_what_the_two_streams_compute():
    """``pack_caption_rows`` runs the norms and projections once over both streams' tokens: the
    same velocity, logits and gradients as the two streams apart, checkpointed or not."""
    model = _module("refine").model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    video = torch.randn(5, model.config.in_channels, 2, 8, 8)
    t_video, t_text = torch.rand(5) * 1000, torch.rand(2) * 1000
    context = torch.randn(5, 8, model.config.text_dim)
    text, rows = torch.randint(0, 50, (2, 24)), torch.tensor([3, 0])

    def run():
        model.zero_grad()
        out = model(video, t_video, context, text, t_text, text_rows=rows)
        (out.velocity.square().mean() + out.text_logits.square().mean()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return [out.velocity.detach(), out.text_logits.detach(), *grads]

    apart = run()
    model.config.pack_caption_rows = True
    packed = run()
    model.enable_gradient_checkpointing(True)
    checkpointed = run()
    assert len(packed) == len(apart)
    for a, b, c in zip(apart, packed, checkpointed):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(c, b, atol=1e-6, rtol=1e-5)


def test_only_the_rows_that_train_captions_hold_one():
    """The objective passes the captions of the v2t / joint rows only, padded to one count (here
    2 of 4 rows: 0.3 x 4 rounded up, whether 1 or 2 rows drew v2t); their loss is the
    next-token cross-entropy of a joint pass over the rows that drew v2t, the padding weighed 0."""
    module = _module({"preset": "refine", "task_mix": {"t2v": 0.7, "v2t": 0.3}})
    videos = torch.rand(4, 3, 2, 32, 32) * 2 - 1
    captions = ["a red circle moves left .", "two shapes .", "a blue square .", "one star ."]
    batch = {"video": videos, "prompt": captions, "caption": captions}
    seen = []
    forward = module.model.forward
    module.model.forward = lambda *a, **k: seen.append(k.get("text")) or forward(*a, **k)
    latents, _, empty = module.batch_inputs(batch)
    counts = set()
    for step in range(6):
        out = module.compute_loss(batch, module.phase, module.step_generator("train", step))
        rows = torch.nonzero(out.tasks == 1).squeeze(1)  # v2t
        assert seen[-1].shape[0] == 2 and int(out.num_text) == len(rows)
        counts.add(len(rows))
        target = module.encode_canvas(captions)[rows]
        ones = torch.ones(len(rows))
        canvas = module.caption_path.inputs(target)
        logits = module.flow(latents[rows], ones, empty[rows], canvas, ones).text_logits
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
        weight = module.caption_path.loss_weight(target)
        expected = ((ce.view_as(target) * weight).sum(1) / weight.sum(1)).mean()
        assert torch.allclose(out.text, expected, atol=1e-5), step
    assert counts == {1, 2}  # padded steps and full ones


def test_captioning_from_the_video_memory_writes_what_full_passes_write():
    """The sampler reads the video once (its keys and values, every block) and passes only
    the caption canvas at each step; the captions equal decoding by full joint passes."""
    module = _module("refine")
    with torch.no_grad():
        for p in module.model.parameters():  # a model whose captions depend on the video
            p.add_(torch.randn_like(p) * 0.05)
    latents = module.codec.encode(torch.rand(3, 3, 2, 32, 32) * 2 - 1)
    context = module.encode_prompts([""]).expand(3, -1, -1)
    ones = torch.ones(3)
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - sampled, the same draws
    with torch.no_grad():
        fast = module.sampler(temperature=1.0).caption(latents, context, 24, seed())
        full = module.caption_path.decode(
            lambda canvas: module.flow(latents, ones, context, canvas, ones).text_logits,
            3, 24, latents.device, 1.0, seed(),
        )  # fmt: skip
    assert torch.equal(fast, full) and len({tuple(t) for t in fast.tolist()}) > 1


def test_joint_sampling_generates_then_captions_and_univigu_export_refuses(tmp_path):
    module = _module("recall").eval()
    videos, captions = module.generate_joint(["", ""], seed=0, text_steps=2, video_steps=2)
    assert videos.shape == (2, 3, 2, 32, 32) and len(captions) == 2
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    from lightning_vigu.export import export

    with pytest.raises(ValueError, match="caption_objective='autoregressive'"):
        export(ckpt, "univigu", tmp_path / "out.pth", vocab_rows=module.tokenizer.vocab_size)
    assert export(ckpt, "diffusers", tmp_path / "diffusers").is_dir()
