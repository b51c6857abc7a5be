"""The autoregressive captioner baseline: shapes, causality, greedy stop at EOS, and that a tiny
one overfits four clips and then greedily decodes their captions exactly."""

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from benchmarks.baselines import ARCaptionerModule, build_ar_captioner
from lightning_vigu.batch import collate_batch
from lightning_vigu.model.embeddings import sincos_3d
from lightning_vigu.text import CaptionTokenizer

CAPTIONS = [
    "a red circle moves to the left",
    "a blue square bounces",
    "two green triangles spin slowly on a black background",
    "nothing happens",
]


class FixedClips(Dataset):
    """Four fixed random clips ``(3, 2, 8, 8)`` with distinct captions, repeated ``repeats``
    times so that one epoch holds the whole run."""

    def __init__(self, repeats: int = 1) -> None:
        g = torch.Generator().manual_seed(0)
        self.videos = torch.rand(len(CAPTIONS), 3, 2, 8, 8, generator=g) * 2 - 1
        self.repeats = repeats

    def __len__(self) -> int:
        return len(CAPTIONS) * self.repeats

    def __getitem__(self, i: int) -> dict:
        i %= len(CAPTIONS)
        return {"video": self.videos[i], "prompt": f"clip {i}", "caption": CAPTIONS[i]}


class WordTokenizer(CaptionTokenizer):
    """Whitespace words of ``CAPTIONS`` (id 0 is EOS): a 20-word vocabulary keeps CPU steps fast."""

    def __init__(self) -> None:
        self.words = ["<eos>", *sorted({w for c in CAPTIONS for w in c.split()})]
        self.vocab_size, self.eos_id = len(self.words), 0

    def _encode_one(self, text: str) -> list[int]:
        return [self.words.index(w) for w in text.split()]

    def _decode_ids(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops run fastest on one thread (and do not slow down on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_module(**kw) -> ARCaptionerModule:
    return ARCaptionerModule(size="tiny", tokenizer=WordTokenizer(), caption_length=12, **kw)


def test_shapes_and_latent_batches():
    module = ARCaptionerModule(size="tiny", caption_length=12)  # open_clip's BPE by default
    latents = torch.randn(2, 48, 2, 4, 6)  # a PixelCodec((1, 4, 4)) clip of 2 x 16 x 24
    memory = module.model.encode_video(latents)
    assert memory.shape == (2, 2 * 2 * 3, 64)
    targets = module.tokenizer.encode(["a b", "c"], 12)
    assert module.model(latents, targets).shape == (2, 12, module.tokenizer.vocab_size)
    assert sincos_3d(2, 2, 3, 64).shape == (12, 64)
    batch = {"latents": latents, "prompt": ["p", "q"], "caption": ["a b", "c"]}
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert module.model.patch_embedding.weight.grad.abs().sum() > 0  # cross-attention is wired


def test_decoder_is_causal():
    model = build_ar_captioner("tiny", vocab_size=50, eos_id=49).eval()
    latents = torch.randn(1, 48, 1, 4, 4)
    a = torch.tensor([[1, 2, 3, 4, 5, 49]])
    b = torch.tensor([[1, 2, 3, 9, 9, 9]])
    # logits[:, i] sees targets[:, :i]: positions 0..3 agree, position 4 does not
    la, lb = model(latents, a), model(latents, b)
    torch.testing.assert_close(la[:, :4], lb[:, :4])
    assert not torch.allclose(la[:, 4], lb[:, 4])


def test_greedy_stops_at_eos():
    model = build_ar_captioner("tiny", vocab_size=10, eos_id=9)
    calls = []

    def scripted(tokens, memory):  # row 0 ends at once, row 1 after three 7s, then says 5
        step = tokens.shape[1] - 1
        calls.append(step)
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], 10)
        logits[0, -1, 9] = 1.0
        logits[1, -1, 7 if step < 3 else (9 if step == 3 else 5)] = 1.0
        logits[0, -1, 5] = 0.5 if step > 0 else 0.0  # row 0 would go on if it were not done
        return logits

    model.decode_tokens = scripted
    canvas = model.generate(torch.randn(2, 48, 1, 4, 4), max_length=8)
    assert canvas.tolist() == [[9] * 8, [7, 7, 7, 9, 9, 9, 9, 9]]
    assert calls == [0, 1, 2, 3]  # stopped once every row had its EOS, not at max_length


def _fit(module: ARCaptionerModule, steps: int, validate: bool = False, **trainer_kw):
    """``steps`` steps on :class:`FixedClips` on the CPU (validated on them when asked)."""
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=None if validate else 0,
        **trainer_kw,
    )
    train = DataLoader(FixedClips(repeats=steps), batch_size=4, collate_fn=collate_batch)
    val = DataLoader(FixedClips(), batch_size=4, collate_fn=collate_batch) if validate else None
    trainer.fit(module, train, val)
    return trainer


def test_overfits_four_clips_and_decodes_their_captions():
    L.seed_everything(0)
    module = tiny_module(lr=3e-3, warmup_steps=10)
    trainer = _fit(module, 150, validate=True)
    assert trainer.callback_metrics["val/loss"] < 0.05
    assert trainer.callback_metrics["val/token_accuracy"] == 1.0
    module.eval()
    videos = FixedClips().videos
    assert module.caption(videos, seed=0) == CAPTIONS
    assert module.caption(videos, seed=123, steps=4) == CAPTIONS  # UniViGU-style extras ignored
    assert module.caption(videos, max_length=3) == [" ".join(c.split()[:3]) for c in CAPTIONS]


def test_bf16_clips_for_a_fused_adamw_as_for_a_plain_one():
    """The quality suite trains the baseline with conf/gpu.yaml's fused AdamW under bf16-mixed
    and conf/arcap.yaml's clipping, which Lightning's plugin refuses for a fused optimiser
    (the run of bea2a94 stopped there): both optimisers take the same clipped steps."""
    from functools import partial

    weights = {}
    for fused, clip in ((False, 1e-3), (True, 1e-3), (False, None)):
        L.seed_everything(0)
        module = tiny_module(optimizer=partial(torch.optim.AdamW, fused=fused), warmup_steps=0)
        _fit(module, 2, precision="bf16-mixed", gradient_clip_val=clip)
        weights[fused, clip] = torch.cat([p.detach().flatten() for p in module.parameters()])
    torch.testing.assert_close(weights[True, 1e-3], weights[False, 1e-3], atol=1e-6, rtol=0)
    assert not torch.allclose(weights[False, 1e-3], weights[False, None], atol=1e-6)


def test_nonfinite_losses_are_skipped_then_stop_the_run():
    """As the unified model's: a non-finite step leaves the weights as they were, and
    ``max_nonfinite_steps`` of them in a row stop the run with a message that says so."""
    module = tiny_module(max_nonfinite_steps=2)
    with torch.no_grad():
        module.model.patch_embedding.bias.fill_(float("nan"))
    before = copy.deepcopy(module.model.state_dict())
    with pytest.raises(RuntimeError, match="2 consecutive non-finite losses"):
        _fit(module, 4, gradient_clip_val=1.0)
    torch.testing.assert_close(module.model.state_dict(), before, rtol=0, atol=0, equal_nan=True)


def test_the_loss_is_the_mean_over_each_captions_tokens_and_its_first_eos():
    """The loss weighs the kept tokens (no selection, whose size would be read on the host):
    it equals the cross-entropy over exactly the caption's tokens and its first EOS."""
    torch.manual_seed(0)
    module = tiny_module()
    latents = torch.randn(3, 48, 2, 4, 4)
    captions = ["a blue square bounces", "nothing happens", "a red circle moves to the left"]
    logged = {}
    module.log_dict = lambda values, **_: logged.update(values)
    loss = module.training_step({"latents": latents, "prompt": ["p"] * 3, "caption": captions}, 0)
    target = module.tokenizer.encode(captions, 12)
    logits = module.model(latents, target)
    lengths = [len(c.split()) + 1 for c in captions]  # the words and the first EOS
    kept = torch.cat([logits[i, :n] for i, n in enumerate(lengths)])
    wanted = torch.cat([target[i, :n] for i, n in enumerate(lengths)])
    torch.testing.assert_close(loss, F.cross_entropy(kept, wanted))
    hits = (kept.argmax(-1) == wanted).float().mean()
    torch.testing.assert_close(logged["train/token_accuracy"], hits)


def test_the_training_step_calls_the_compiled_captioner_and_copies_drop_it():
    """``compile`` as UniViGU's: training calls a compiled wrapper of the same weights,
    evaluation and greedy decoding the captioner itself, and a copy (EMA's) holds no wrapper;
    the per-block mode, which the captioner has no blocks for, is refused naming the key."""
    module = tiny_module(compile="cudagraphs")
    wrapper = module.for_training(module.model)
    assert wrapper is not module.model and wrapper._orig_mod is module.model
    assert module._cudagraphs and not tiny_module(compile="model")._cudagraphs
    assert "_compiled" not in dict(module.named_children())  # the weights are held once
    module.eval()
    assert module.for_training(module.model) is module.model
    assert copy.deepcopy(module).__dict__["_compiled"] is None
    eager = tiny_module()
    assert eager.for_training(eager.model) is eager.model
    with pytest.raises(ValueError, match="model.compile 'blocks'"):
        tiny_module(compile="blocks")
