"""Training: phases, resume, frozen groups, no-copying, a user DataModule through the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from callbacks import PhaseSchedule
from lightning_vigu.batch import collate_batch
from lightning_vigu.module import UniViGU
from lightning_vigu.objective import (
    V2T,
    ObjectiveConfig,
    UnifiedObjective,
    caption_rows,
    condition_mask,
    draw_tasks,
)
from lightning_vigu.phases import Phase, get_phase

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["red", "blue", "green", "circle", "square", "moves", "left", "right"]


class RandomClips(Dataset):
    """Deterministic tiny clips with short prompts and longer captions."""

    def __init__(self, n: int = 12, frames: int = 2, size: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.videos = torch.rand(n, 3, frames, size, size, generator=g) * 2 - 1
        self.prompts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(3)) for i in range(n)]

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        return {
            "video": self.videos[i],
            "prompt": self.prompts[i],
            "caption": self.prompts[i] + " on a black background",
        }


class RandomVideoDataModule(L.LightningDataModule):
    """A user DataModule: anything yielding the Batch contract works."""

    def __init__(
        self, batch_size: int = 4, num_clips: int = 12, frames: int = 2, size: int = 8
    ) -> None:
        super().__init__()
        self.batch_size, self.num_clips, self.frames, self.size = (
            batch_size,
            num_clips,
            frames,
            size,
        )

    def train_dataloader(self):
        return DataLoader(
            RandomClips(self.num_clips, self.frames, self.size),
            self.batch_size,
            collate_fn=collate_batch,
        )

    def val_dataloader(self):
        return DataLoader(
            RandomClips(4, self.frames, self.size), self.batch_size, collate_fn=collate_batch
        )


def tiny_module(**kw) -> UniViGU:
    args = dict(
        size="tiny",
        caption_length=8,
        prompt_length=8,
        video_shape=(2, 8, 8),
        warmup_steps=2,
        lr=1e-3,
    )
    args.update(kw)
    return UniViGU(**args)


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def _trainer(tmp_path, max_steps, callbacks, **kw):
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        deterministic=True,
        **kw,
    )


def test_resume_mid_phase_gives_the_same_next_step_loss_and_phase(tmp_path):
    """3 batches per epoch; a checkpoint after step 3 (in 'refine'), resumed to step 6."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    rec = LossRecorder()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    full = tiny_module()
    _trainer(tmp_path, 6, [PhaseSchedule(["recall", "refine"], [2]), rec, ckpt_cb]).fit(
        full, RandomVideoDataModule()
    )
    ckpt = next((tmp_path / "ck").glob("*step=3.ckpt"))

    L.seed_everything(123)  # a different global seed must not matter: randomness is per step
    rec2 = LossRecorder()
    resumed = tiny_module()
    _trainer(tmp_path, 6, [PhaseSchedule(["recall", "refine"], [2]), rec2]).fit(
        resumed, RandomVideoDataModule(), ckpt_path=str(ckpt)
    )
    assert resumed.phase.name == "refine"
    for step in (4, 5, 6):
        assert rec2.losses[step] == pytest.approx(rec.losses[step], rel=1e-5, abs=1e-6)


def _weights_around_switch(tmp_path, refine: str):
    """A tiny module's weights at the first step of ``refine`` (after 2 steps of recall) and
    at the end (step 5), with the parameter names of each group."""
    module = tiny_module()
    snapshot = {}

    class Snap(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:  # first step of the refine phase
                snapshot.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    _trainer(tmp_path, 5, [PhaseSchedule(["recall", refine], [2]), Snap()]).fit(
        module, RandomVideoDataModule()
    )
    after = module.state_dict()
    video_keys = [k for k in after if k.startswith("model.") and module.model_group(k) == "video"]
    text_keys = [k for k in after if k.startswith("model.") and module.model_group(k) != "video"]
    assert video_keys and text_keys
    return module, snapshot, after, video_keys, text_keys


def test_bf16_clips_gradients_for_a_fused_optimizer_as_for_a_plain_one(tmp_path):
    """conf/gpu.yaml's fused AdamW under bf16-mixed with gradient clipping (Lightning's plugin
    refuses it, though bf16 scales nothing): both optimisers take the same clipped steps."""
    from functools import partial

    weights = {}
    for fused, clip in ((False, 1e-3), (True, 1e-3), (False, None)):
        L.seed_everything(0)
        model = tiny_module(optimizer=partial(torch.optim.AdamW, fused=fused), warmup_steps=0)
        trainer = _trainer(tmp_path, 2, [], precision="bf16-mixed", gradient_clip_val=clip)
        trainer.fit(model, RandomVideoDataModule())
        weights[fused, clip] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(weights[True, 1e-3], weights[False, 1e-3], atol=1e-6)
    assert not torch.allclose(weights[False, 1e-3], weights[False, None], atol=1e-6)


def test_frozen_video_path_is_bit_identical_after_switch_and_text_parts_change(tmp_path):
    _, snapshot, after, video_keys, text_keys = _weights_around_switch(tmp_path, "refine_frozen")
    assert all(torch.equal(after[k], snapshot[k]) for k in video_keys)
    assert all(torch.equal(after[k], snapshot[k]) for k in after if k.startswith("prompt_encoder."))
    assert sum(not torch.equal(after[k], snapshot[k]) for k in text_keys) > len(text_keys) // 2


def test_refine_moves_attention_at_its_group_lr(tmp_path):
    """Refine trains the shared attention (captions must read what the prompt never said), here
    with the video group at a lower learning rate (conf/wan1.3b_refine.yaml's refine)."""
    refine = "refine_caption_heavy"
    module, snapshot, after, video_keys, _ = _weights_around_switch(tmp_path, refine)
    attention = [k for k in video_keys if ".attn1.to_q." in k]
    assert attention and all(not torch.equal(after[k], snapshot[k]) for k in attention)
    optimizer = module.trainer.optimizers[0]
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert get_phase(refine).group_lr("video") == 0.3
    assert lrs["video"] == pytest.approx(lrs["text_experts"] * 0.3)


def test_no_copying_caption_loss_does_not_depend_on_the_prompt_condition():
    """For v2t (and joint in recall) the caption stream must never see the prompt it rebuilds."""
    module = tiny_module()
    torch.manual_seed(0)
    with torch.no_grad():  # a non-zero head, so the logits depend on everything they can see
        module.model.text_head.linear.weight.normal_(std=0.5)
    latents = torch.randn(4, 48, 2, 2, 2)
    target = module.tokenizer.encode(["red circle moves left"] * 4, 8)
    empty = module.encode_prompts([""] * 4)
    objective = UnifiedObjective(ObjectiveConfig(cfg_dropout=0.0), module.caption_path)
    for mix in ({"v2t": 1.0}, {"joint": 1.0}):
        phase = Phase(name="recall-like", caption_target="prompt", task_mix=mix)
        losses = []
        for prompt in ("red circle moves left", "blue square moves right"):
            ctx = module.encode_prompts([prompt] * 4)
            out = objective(
                module.flow,
                latents,
                ctx,
                empty,
                target,
                target,
                phase,
                torch.Generator().manual_seed(1),
            )
            losses.append(out.text)
        assert torch.equal(losses[0], losses[1]), mix
    # with detailed captions as target, joint examples may be conditioned on the prompt
    phase = Phase(name="refine-like", caption_target="caption", task_mix={"joint": 1.0})
    outs = [
        objective(
            module.flow,
            latents,
            module.encode_prompts([p] * 4),
            empty,
            target,
            target,
            phase,
            torch.Generator().manual_seed(1),
        ).text
        for p in ("red circle moves left", "blue square moves right")
    ]
    assert not torch.equal(outs[0], outs[1])


def test_tasks_follow_the_phase_mix_and_v2t_never_trains_video():
    module = tiny_module()
    objective = UnifiedObjective(ObjectiveConfig(), module.caption_path)
    latents, empty = torch.randn(64, 48, 2, 2, 2), module.encode_prompts([""] * 64)
    tokens = module.tokenizer.encode(["a"] * 64, 8)
    out = objective(
        module.flow,
        latents,
        empty,
        empty,
        tokens,
        tokens,
        get_phase("refine_frozen"),
        torch.Generator().manual_seed(0),
    )
    assert set(out.tasks.tolist()) <= {V2T, 2} and int(out.num_video) == int((out.tasks == 2).sum())


RECALL_LIKE = Phase(
    name="recall-like", caption_target="prompt", task_mix={"t2v": 0.8, "v2t": 0.15, "joint": 0.05}
)


@pytest.mark.parametrize("target", ["prompt", "caption"])
def test_a_tenth_of_the_video_rows_are_unconditional_whatever_the_mix(target):
    """CFG's unconditional branch gets ``cfg_dropout`` of the rows that train the video. With
    the prompt as caption target the joint rows hide it anyway, so t2v rows drop it less."""
    mix = {"t2v": 0.8, "v2t": 0.15, "joint": 0.05}
    phase, gen = Phase(name="p", caption_target=target, task_mix=mix), torch.Generator()
    gen.manual_seed(0)
    hidden = video = t2v_hidden = t2v = 0
    for _ in range(400):
        tasks = draw_tasks(64, phase, gen)
        hide = condition_mask(tasks, phase, 0.1, gen)
        trains_video = tasks != V2T
        hidden += int((hide & trains_video).sum())
        video += int(trains_video.sum())
        t2v_hidden += int((hide & (tasks == 0)).sum())
        t2v += int((tasks == 0).sum())
        assert hide[tasks == V2T].all()
    assert abs(hidden / video - 0.1) < 0.01
    # recall-like: 0.1 x 0.85 = 0.085 of the rows, 0.05 from joint, 0.035 of 0.8 from t2v
    assert abs(t2v_hidden / t2v - (0.04375 if target == "prompt" else 0.1)) < 0.01


def test_task_counts_are_the_mix_rounded_down_or_up_and_exact_on_average():
    phase, gen = RECALL_LIKE, torch.Generator().manual_seed(0)
    draws = torch.stack([draw_tasks(8, phase, gen) for _ in range(4000)])
    counts = torch.stack([(draws == i).sum(1) for i in range(3)], 1)  # (draws, task)
    assert set(counts[:, 0].tolist()) == {6, 7} and set(counts[:, 2].tolist()) == {0, 1}
    assert torch.allclose(counts.float().mean(0) / 8, torch.tensor([0.8, 0.15, 0.05]), atol=0.01)
    for row in (0, -1):  # the order is drawn too: every row is a caption row a fifth of the time
        assert abs((draws[:, row] != 0).float().mean() - 0.2) < 0.03
    assert set(draw_tasks(16, get_phase("refine_frozen"), gen).tolist()) <= {V2T, 2}
    # a one-task mix (validation's t2v loss) draws nothing: a model with a caption stream then
    # draws the times and noise a generator draws, so their validation losses compare
    state = gen.get_state()
    assert torch.equal(
        draw_tasks(16, Phase(name="val", task_mix={"t2v": 1.0}), gen),
        torch.zeros(16, dtype=torch.long),
    )
    assert torch.equal(gen.get_state(), state)
    # the systematic points read off the mix as torch.bucketize reads them (right-closed)
    for b in (1, 7, 256):
        ours, ref = torch.Generator().manual_seed(b), torch.Generator().manual_seed(b)
        bounds = torch.tensor([0.8, 0.95], dtype=torch.float64)
        points = (torch.arange(b, dtype=torch.float64) + torch.rand((), generator=ref)) / b
        expected = torch.bucketize(points, bounds, right=True)[torch.randperm(b, generator=ref)]
        assert torch.equal(draw_tasks(b, phase, ours), expected)


def test_validation_video_loss_of_a_unified_model_compares_with_its_generators(tmp_path):
    """With next-token captions the video never reads the caption stream, so a recall model
    holding a generator's weights has the generator's validation video loss exactly: the same
    times and noise are drawn whether or not the model has a caption stream."""
    gen = tiny_module(caption_stream=False, phase="generator")
    torch.save({"state_dict": gen.state_dict()}, tmp_path / "gen.ckpt")
    recall = tiny_module(init_from=str(tmp_path / "gen.ckpt"), caption_objective="autoregressive")
    batch = {
        "video": torch.rand(4, 3, 2, 8, 8) * 2 - 1,
        "prompt": ["red circle moves left", "blue square", "green", ""],
        "caption": ["a red circle moves left"] * 4,
    }
    val = Phase(name="val-t2v", caption_target="prompt", task_mix={"t2v": 1.0}, trainable=[])
    gen.eval()
    recall.eval()
    with torch.no_grad():
        a, b = (m.compute_loss(batch, val, m.step_generator("val-t2v", 0)) for m in (gen, recall))
    assert torch.equal(a.video, b.video)


def test_caption_rows_keep_one_count_and_weigh_the_padding_zero():
    phase = RECALL_LIKE  # captions on 0.2 of the rows: 1 or 2 of 8, padded to 2
    for drawn in ([0, 0, 0, 1, 0, 0, 0, 0], [0, 2, 0, 1, 0, 0, 0, 0], [0] * 8):
        tasks = torch.tensor(drawn)
        rows, keep = caption_rows(tasks, phase)
        assert len(rows) == 2 and int(keep.sum()) == int((tasks != 0).sum())
        assert torch.equal(rows[keep.bool()], torch.nonzero(tasks != 0).squeeze(1))
    assert len(caption_rows(torch.zeros(8, dtype=torch.long), get_phase("generator"))[0]) == 0


def test_init_from_generator_checkpoint_copies_ffn_into_text_experts(tmp_path):
    gen = tiny_module(caption_stream=False, phase="generator")
    with torch.no_grad():
        for p in gen.model.parameters():
            p.add_(0.01)
    path = tmp_path / "gen.ckpt"
    torch.save({"state_dict": gen.state_dict()}, path)
    recall = tiny_module(init_from=str(path))
    assert torch.equal(
        recall.model.blocks[0].ffn_t.net[2].weight, gen.model.blocks[0].ffn.net[2].weight
    )
    assert torch.equal(recall.model.patch_embedding.weight, gen.model.patch_embedding.weight)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        tiny_module(init_from=str(tmp_path / "missing.ckpt"))
    with pytest.raises(ValueError, match="does not fit this model"):
        tiny_module(
            size="tiny",
            model_overrides={"num_layers": 1, "ffn_dim": 64, "text_ffn_dim": 64},
            init_from=str(path),
        )


@pytest.mark.parametrize("fused", [False, True], ids=["read-on-host", "skipped-by-fused-adamw"])
def test_nonfinite_losses_are_skipped_then_stop_with_a_clear_message(tmp_path, fused):
    """Fused AdamW skips a non-finite step itself (``found_inf``), so the loss is read on the
    host only every ``log_every_n_steps`` (the GPU path): the run still stops, and the weights
    the skipped steps saw are untouched."""
    from functools import partial

    module = tiny_module(max_nonfinite_steps=2, optimizer=partial(torch.optim.AdamW, fused=fused))
    with torch.no_grad():
        module.model.patch_embedding.bias.fill_(float("nan"))
    before = module.model.proj_out.weight.detach().clone()
    # the host check stops at the second non-finite step; the fused skip at the first check
    # (every 3 steps), which has seen 3 in a row
    count, step = (3, 2) if fused else (2, 1)
    with pytest.raises(RuntimeError, match=f"{count} consecutive non-finite losses by step {step}"):
        _trainer(tmp_path, 6, [], log_every_n_steps=3).fit(module, RandomVideoDataModule())
    assert module.global_step == step
    assert torch.equal(module.model.proj_out.weight, before)  # no update was applied


def test_sampling_api_shapes_and_determinism():
    module = tiny_module().eval()
    prompts = ["red circle moves left", "blue square"]
    v1 = module.generate_video(prompts, seed=3, video_steps=2)
    v2 = module.generate_video(prompts, seed=3, video_steps=2)
    assert v1.shape == (2, 3, 2, 8, 8) and torch.equal(v1, v2) and v1.abs().max() <= 1
    caps = module.caption(v1, seed=0, text_steps=2)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    video, joint_caps = module.generate_joint(prompts, seed=1, video_steps=2)
    assert video.shape == v1.shape and len(joint_caps) == 2


def _cli(args, tmp_path, **kw):
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    return subprocess.run(
        [sys.executable, "-m", "lightning_vigu", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


USER_DATA_ARGS = [
    "--data.class_path=test_training.RandomVideoDataModule",
    "--model.caption_length=8",
    "--model.prompt_length=8",
    "--model.video_shape=[2, 8, 8]",
    "--trainer.max_steps=3",
    "--trainer.accelerator=cpu",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
]


def test_cli_trains_a_user_datamodule_then_generates_and_captions(tmp_path):
    r = _cli(["fit", *USER_DATA_ARGS, f"--trainer.default_root_dir={tmp_path}/run"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    r = _cli(
        [
            "generate",
            f"--ckpt={ckpt}",
            "--prompts=[red circle moves left, blue square]",
            f"--out={tmp_path}/gen",
            "--steps=2",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    mp4s = sorted((tmp_path / "gen").glob("*.mp4"))
    assert len(mp4s) == 2 and all(p.stat().st_size > 0 for p in mp4s)
    r = _cli(
        [
            "caption",
            f"--ckpt={ckpt}",
            f"--videos=[{mp4s[0]}]",
            "--steps=2",
            f"--out={tmp_path}/caps.jsonl",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "caps.jsonl").read_text().count("caption") == 1


def test_cli_names_a_wrong_config_key_and_a_missing_init_from(tmp_path):
    r = _cli(["fit", *USER_DATA_ARGS, "--model.sise=tiny"], tmp_path)
    assert r.returncode != 0 and "sise" in r.stderr
    r = _cli(["fit", *USER_DATA_ARGS, f"--init_from={tmp_path}/nope.ckpt"], tmp_path)
    assert r.returncode != 0 and "nope.ckpt" in r.stderr


def test_the_generalized_kl_stays_finite_beside_t2v_rows():
    """t2v rows hold the clean prompt at caption time 1, where the generalized KL's weight
    diverges; their caption loss is masked out, and must not turn the batch's loss and
    gradients into NaN (it did: inf times the mask's zero)."""
    module = tiny_module()
    objective = UnifiedObjective(ObjectiveConfig(text_loss="generalized_kl"), module.caption_path)
    latents, empty = torch.randn(16, 48, 2, 2, 2), module.encode_prompts([""] * 16)
    tokens = module.tokenizer.encode(["red circle moves left"] * 16, 8)
    out = objective(
        module.flow, latents, empty, empty, tokens, tokens, RECALL_LIKE, torch.Generator()
    )
    assert (out.tasks == 0).any() and (out.tasks != 0).any()  # t2v rows beside caption rows
    assert torch.isfinite(out.loss) and out.text > 0
    out.loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def _offers_no_ids(encoder) -> None:
    """Make ``encoder`` one that encodes as before but does not split its tokenising off (as
    umT5's): the compiled step is then given the condition, not the ids."""
    embed, ids_of = encoder.embed, encoder.token_ids
    encoder.forward = lambda prompts: embed(ids_of(prompts))
    encoder.token_ids = lambda prompts: None


@pytest.mark.parametrize("caption_objective", ["flow", "autoregressive"])
def test_the_step_mode_traces_forward_and_losses_as_one_graph(monkeypatch, caption_objective):
    """``compile: step`` compiles the objective's tensor work with the transformer (and the
    prompt encoder's layers, given the prompts' token ids): it must trace as one graph (``fullgraph``: a break would leave eager ops between graphs) and give
    the eager step's losses and gradients. Traced by dynamo alone here (inductor's kernels and
    CUDA graphs are the GPU's: benchmarks/train_loop.py)."""
    compile_ = torch.compile
    modes, calls = [], []

    def traced(fn, mode=None):
        modes.append(mode)
        graph = compile_(fn, backend="eager", fullgraph=True)
        return lambda *args: calls.append(type(args[2]).__name__) or graph(*args)

    monkeypatch.setattr(torch, "compile", traced)
    batch = {
        "latents": torch.randn(8, 48, 2, 2, 2),
        "prompt": ["red circle moves left", "blue square"] * 4,
        "caption": ["a red circle moves to the left", "a blue square stays"] * 4,
    }
    runs = []
    # the eager step; the compiled one with the prompt encoder's layers in its graph (the
    # encoder splits off its tokenising); and with the condition encoded before it (an encoder
    # that does not split, as umT5's)
    for compile_mode, splits in (("none", True), ("step", True), ("step", False)):
        torch.manual_seed(0)
        module = tiny_module(compile=compile_mode, caption_objective=caption_objective)
        module.phase = RECALL_LIKE
        if not splits:
            _offers_no_ids(module.prompt_encoder)
        out = module.compute_loss(batch, RECALL_LIKE, module.step_generator("train", 1))
        out.loss.backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        runs.append((out, grads))
    # CUDA graphs on the GPU; the step ran, given the prompts' ids, then their condition
    assert modes == ["reduce-overhead"] * 2 and calls == ["Tensor", "tuple"]
    (eager, eager_grads), *compiled = runs
    for step, step_grads in compiled:
        for field in ("loss", "video", "text", "text_accuracy", "num_video", "num_text", "tasks"):
            torch.testing.assert_close(getattr(step, field), getattr(eager, field))
        assert step.text > 0 and eager_grads.keys() == step_grads.keys()
        assert any(n.startswith("prompt_encoder.") for n in step_grads)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(step_grads[name], grad, msg=name)
    with pytest.raises(ValueError, match="model.compile 'step'"):
        from benchmarks.baselines import ARCaptionerModule

        ARCaptionerModule(size="tiny", compile="step")
