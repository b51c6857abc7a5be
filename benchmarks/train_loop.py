"""Training-loop suite: the real unified training step, today's loop against the faster one.

    python -m benchmarks.train_loop --preset gpu      # one GPU: small and base, both loops
    python -m benchmarks.train_loop --preset world    # one GPU: the quality suite's world and batch
    python -m benchmarks.train_loop --preset phases   # one GPU: each phase's step, alone
    python -m benchmarks.train_loop --preset phases --side-by-side 60   # ... and all at once
    python -m benchmarks.train_loop --preset caption_rows   # causal captions: their rows or all
    python -m benchmarks.train_loop --preset wave3 --profile 5 --side-by-side 60  # twin vs recall
    python -m benchmarks.train_loop --preset step     # one GPU: the whole step compiled, small and base
    python -m benchmarks.train_loop --preset rope     # one GPU: the rope in one pass or split
    python -m benchmarks.train_loop --preset toy      # CPU smoke test (eager loops only)

A step is what ``fit`` runs per batch, minus Lightning's bookkeeping: the objective of the
phase on a batch of synthetic clips (tokenising the texts, drawing tasks, times and noise),
backward, gradient clipping, the optimiser update and the EMA update. Each loop is a named
configuration (:data:`LOOPS`): how the transformer is compiled, whether AdamW is fused, and how
the EMA average is updated. Every configuration of one (size, clip shape) case starts from the
same initial weights and sees the same batches with the same per-step randomness, so the table
reports speed *and* whether the loss curves agree (largest difference over the first steps).
The loops run one after the other, each in a fresh process, and the results are written after
every loop, so a run cut short by its time limit keeps what it measured. With ``--side-by-side
SECONDS`` every loop of the preset also trains at the same time as the others, each in its own
process on the one GPU (as the quality suite's stages of a wave do): after compiling they wait for
each other, then count their steps for ``SECONDS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import multiprocessing
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.optim.swa_utils import AveragedModel

from benchmarks.common import ROOT, markdown_table, write_results
from benchmarks.flops import clip_train_flops, device_rates, failure
from benchmarks.step_profile import profile_steps
from callbacks.ema import WarmupAveragedModel, WarmupEMA
from datamodules.synthetic import WorldTokenizer, make_clip, world_config
from lightning_vigu.batch import batch_to_device, video_as_float
from lightning_vigu.model.attention import WanAttention
from lightning_vigu.model.embeddings import TextRope1D, VideoRope3D, _rope_frequencies
from lightning_vigu.module import UniViGU
from lightning_vigu.objective import ObjectiveConfig, caption_row_count

# the loops before d19f7cd computed the rotary cos/sin inside the forward (``rope: graph``)
# and copied float videos (``video: float``)
_OLD = dict(rope="graph", video="float")
_NOW = dict(rope="tables", video="uint8")
LOOPS: dict[str, dict] = {
    # the loop of conf/gpu.yaml three changes ago: compiled blocks, AdamW's default, per-tensor
    # EMA, the loss read on the host every step (the non-finite check). Every loop runs on this
    # tree's model code, so a model change moves this one too (fb9772d's rope: 0.118 -> 0.0917 s
    # a `small` step): loops compare configurations; an earlier commit against this one is
    # `benchmarks.cli_loop --before <its tree>`
    "before": dict(compile="blocks", fused=False, ema="per_tensor", host_reads=True, **_OLD),
    # the loop of conf/gpu.yaml at 8861e1e: the whole transformer as one graph, fused AdamW,
    # torch's AveragedModel (which reads its count on the host), the loss read every step
    "whole graph": dict(compile="model", fused=True, ema="foreach", host_reads=True, **_OLD),
    # conf/gpu.yaml at 553f91a: the same graph, and nothing read on the host during a step
    # (the fused update skips non-finite steps, callbacks.EMA keeps its count on the host)
    "no host reads": dict(compile="model", fused=True, ema="callback", host_reads=False, **_OLD),
    # that loop with the rotary tables gathered instead of computed in the graph
    "rope tables": dict(
        compile="model", fused=True, ema="callback", host_reads=False, rope="tables", video="float"
    ),
    # conf/gpu.yaml now: that loop, the clips copied to the GPU as uint8 pixels
    "uint8 clips": dict(compile="model", fused=True, ema="callback", host_reads=False, **_NOW),
    # that loop with the graph replayed as CUDA graphs
    "cuda graphs": dict(compile="cudagraphs", fused=True, ema="callback", host_reads=False, **_NOW),
    # that loop with the objective's tensor work compiled with the transformer: one graph for
    # forward and losses (the caption path's masks, gathers and means included), replayed as
    # CUDA graphs; only the step's random draws stay eager (model.compile: step)
    "whole step": dict(compile="step", fused=True, ema="callback", host_reads=False, **_NOW),
    # that loop with inductor's combo kernels: independent small kernels (the caption rows'
    # norms, gates and casts beside the video's) launched as one
    "combo kernels": dict(
        compile="step", fused=True, ema="callback", host_reads=False, combo_kernels=True, **_NOW
    ),
    # that loop with inductor's coordinate-descent tuning: each generated (Triton) kernel's
    # block sizes tuned by timing neighbours of its heuristic choice; a `base` step's GPU time
    # is 35% such elementwise and norm kernels (train_loop_step_h200.md), the lever for the
    # issue's 30% MFU
    "coordinate descent": dict(
        compile="step",
        fused=True,
        ema="callback",
        host_reads=False,
        coordinate_descent=True,
        **_NOW,
    ),
    # that loop with the rope as it was before fb9772d: each part of [video | caption] rotated
    # in its textbook form (interleaved pairs stacked, halves concatenated), the joint sequence
    # split and concatenated (the same values; see split_rope)
    "split rope": dict(
        compile="step", fused=True, ema="callback", host_reads=False, rope_form="split", **_NOW
    ),
    # the eager loop with that rope (CPU: its losses are the loop's)
    "eager split rope": dict(
        compile="none", fused=True, ema="callback", host_reads=False, rope_form="split", **_NOW
    ),
    # that loop with the fused Triton kernels (model.triton_kernels: the q/k norm and rope in one
    # kernel, the attention to the prompt's few tokens in another; lightning_vigu.model.kernels)
    "triton kernels": dict(
        compile="step", fused=True, ema="callback", host_reads=False, triton_kernels=True, **_NOW
    ),
    # that loop with the caption rows packed with the video tokens: the norms and the
    # attention's projections once over both streams (UniViGUConfig.pack_caption_rows)
    "packed rows": dict(
        compile="step", fused=True, ema="callback", host_reads=False, packed=True, **_NOW
    ),
    # that loop with the fused Triton kernels
    "packed rows, triton kernels": dict(
        compile="step",
        fused=True,
        ema="callback",
        host_reads=False,
        packed=True,
        triton_kernels=True,
        **_NOW,
    ),
    # that loop with inductor's max-autotune (each matrix multiply's kernel chosen by timing)
    "autotune": dict(compile="autotune", fused=True, ema="callback", host_reads=False, **_NOW),
    # that loop with inductor's C++ wrapper (kernels launched from C++, not Python)
    "cpp wrapper": dict(
        compile="model", fused=True, ema="callback", host_reads=False, cpp_wrapper=True, **_NOW
    ),
    # "uint8 clips" with every row holding its causal caption, in one masked joint pass: the
    # step before 7bf44e3 (now only the rows that train the captions hold one; see
    # EveryRowCaptions)
    "every row's caption": dict(
        compile="model", fused=True, ema="callback", host_reads=False, caption_rows="all", **_NOW
    ),
    # CPU: the eager loop, default vs fused AdamW, and the fused one with every row's caption
    "eager": dict(compile="none", fused=False, ema="per_tensor", host_reads=True, **_OLD),
    "eager fused": dict(compile="none", fused=True, ema="callback", host_reads=False, **_NOW),
    "eager every row": dict(
        compile="none", fused=True, ema="callback", host_reads=False, caption_rows="all", **_NOW
    ),
    "eager packed": dict(
        compile="none", fused=True, ema="callback", host_reads=False, packed=True, **_NOW
    ),
}


@dataclass
class Case:
    """One measurement case: model size, world preset (clip shape), batch, loops to compare."""

    size: str
    world: str
    batch: int
    loops: tuple[str, ...]
    model: str = "fixed"  # "recipe": conf/model/tiny.yaml's model_overrides (see build)
    phase: str = "recall"  # the phase whose objective the step runs
    caption_objective: str = "flow"  # or "autoregressive" (the next-token caption stream)


def case_row(case: Case, loop: str) -> dict:
    """The columns that name a case's loop in its results row."""
    return dict(
        size=case.size,
        world=case.world,
        batch=case.batch,
        model=case.model,
        phase=case.phase,
        caption_objective=case.caption_objective,
        loop=loop,
    )


def twin_and_recall_causal(twin: tuple[str, ...], recall: tuple[str, ...]) -> list[Case]:
    """The quality suite's wave-3 steps, at its world, batch (256 clips) and model: the twin
    (generator phase) with the loops ``twin`` and recall_causal (next-token captions) with
    ``recall``."""
    return [
        Case("small", "cpu", 256, twin, model="recipe", phase="generator"),
        Case("small", "cpu", 256, recall, model="recipe", caption_objective="autoregressive"),
    ]


PRESETS = {
    "gpu": dict(
        cases=[
            Case("small", "gpu", 64, ("no host reads", "uint8 clips")),
            Case("base", "gpu", 64, ("no host reads", "uint8 clips")),
            # compared with the first small rows (the same case)
            Case("small", "gpu", 64, ("cuda graphs", "cpp wrapper")),
        ],
        steps=100,
        timed_from=40,
    ),
    # the quality suite's world (16x32x32, 256 tokens a clip) with the recipe's model: the batch
    # it used (64 clips) against the one it uses now (256, the tokens of a 64x64 step at 64)
    "world": dict(
        cases=[
            Case("small", "cpu", 64, ("uint8 clips",), model="recipe"),
            Case("small", "cpu", 256, ("uint8 clips", "cuda graphs"), model="recipe"),
        ],
        steps=100,
        timed_from=40,
    ),
    # base on the GPU preset (issue 15's MFU target): the GPU overlay's loop and two candidates
    "base": dict(
        cases=[Case("base", "gpu", 64, ("uint8 clips", "cuda graphs", "autotune"))],
        steps=100,
        timed_from=40,
    ),
    # the quality suite's wave 3 (benchmarks/quality.py): the twin (generator phase), recall and
    # recall with next-token captions, at the suite's world, batch and model
    "phases": dict(
        cases=[
            Case("small", "cpu", 256, ("uint8 clips",), model="recipe", phase="generator"),
            Case("small", "cpu", 256, ("uint8 clips",), model="recipe"),
            Case(
                "small",
                "cpu",
                256,
                ("uint8 clips",),
                model="recipe",
                caption_objective="autoregressive",
            ),
        ],
        steps=100,
        timed_from=40,
    ),
    # next-token captions held by the rows that train them against every row's (the step before
    # 7bf44e3), recall_causal's step in the quality suite; the twin's step for scale
    "caption_rows": dict(
        cases=twin_and_recall_causal(("uint8 clips",), ("uint8 clips", "every row's caption")),
        steps=100,
        timed_from=40,
    ),
    # the quality suite's wave 3: both steps replayed as CUDA graphs, and with the whole step
    # compiled (conf/gpu.yaml's loop since this preset measured it). Alone recall's step took
    # 1.24x the twin's for 1.04x its FLOPs, its caption rows adding ~1,000 small kernels a step
    # (train_loop_wave3_h200.md); combo kernels launch independent ones as one, packed rows
    # make fewer and larger ones
    "wave3": dict(
        cases=twin_and_recall_causal(
            ("cuda graphs", "whole step"),
            ("cuda graphs", "whole step", "packed rows", "combo kernels"),
        ),
        steps=100,
        timed_from=40,
    ),
    # issue 15's cases (the GPU preset's world and batch): the whole step compiled against
    # the CUDA-graphs loop (conf/gpu.yaml's before b6b67e5), and for `small` the loop of three
    # changes ago, all in one run
    "step": dict(
        cases=[
            Case("small", "gpu", 64, ("before", "cuda graphs", "whole step")),
            Case("base", "gpu", 64, ("cuda graphs", "whole step")),
        ],
        steps=100,
        timed_from=40,
    ),
    # the rope in one pass (fb9772d) against the split one, for the quality suite's twin
    # (generator phase: video tokens only, the recipe's mixed rope) and base's recall step
    # (the joint sequence, where it took base from 0.0893 to 0.0872 s a step)
    "rope": dict(
        cases=[
            Case(
                "small", "cpu", 256, ("whole step", "split rope"), model="recipe", phase="generator"
            ),
            Case("base", "gpu", 64, ("whole step", "split rope")),
        ],
        steps=100,
        timed_from=40,
    ),
    # the fused Triton kernels against the whole step without them: issue 15's cases (the GPU
    # preset's small and base), and the quality suite's twin and next-token recall
    "kernels": dict(
        cases=[
            Case("small", "gpu", 64, ("whole step", "triton kernels")),
            Case("base", "gpu", 64, ("whole step", "triton kernels")),
            *twin_and_recall_causal(
                ("whole step", "triton kernels"), ("packed rows", "packed rows, triton kernels")
            ),
        ],
        steps=100,
        timed_from=40,
    ),
    # base's MFU (issue 15's 30%): the whole step with and without coordinate-descent tuning
    "base_tuning": dict(
        cases=[Case("base", "gpu", 64, ("whole step", "coordinate descent"))],
        steps=100,
        timed_from=40,
    ),
    "toy": dict(cases=[Case("tiny", "cpu", 4, ("eager", "eager fused"))], steps=6, timed_from=3),
}
RECIPE = ROOT / "conf" / "model" / "tiny.yaml"
"""Where ``Case(model="recipe")`` reads its ``model_overrides`` (so it follows the recipe)."""


def clips(world: str, num: int) -> tuple[torch.Tensor, list[dict]]:
    """``num`` training clips of a world preset: videos ``(N, 3, T, H, W)`` uint8, records."""
    config = world_config(world)
    pairs = [make_clip(config, 0, "train", i) for i in range(num)]
    frames = torch.from_numpy(np.stack([f for f, _ in pairs]))  # (N, T, H, W, 3) uint8
    return frames.permute(0, 4, 1, 2, 3).contiguous(), [r for _, r in pairs]


class VideoRopeInGraph(VideoRope3D):
    """:class:`VideoRope3D` as the model had it before d19f7cd: cos/sin computed from
    float64 angles in every forward (the compiler fused them into each rotation). The values
    are the tables'; only where they are computed differs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("angles64", self.angles(), persistent=False)

    def forward(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        ang = self._on_grid(self.angles64, grid)
        return ang.cos().float(), ang.sin().float()


class TextRopeInGraph(TextRope1D):
    """:class:`TextRope1D` as the model had it before d19f7cd (see above)."""

    def forward(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ang = _rope_frequencies(self.head_dim, length, self.theta, device)
        ang = torch.cat([ang, ang], dim=-1)[None, :, None]
        return ang.cos().float(), ang.sin().float()


def rope_in_graph(model: torch.nn.Module) -> None:
    """Give ``model`` the rotary embeddings computed in the graph (before d19f7cd)."""
    rope = model.rope
    model.rope = VideoRopeInGraph(
        sum(rope.split), rope.patch_size, rope.max_seq_len, rope.theta
    ).to(rope.cos.device)
    if getattr(model, "rope_text", None) is not None:
        model.rope_text = TextRopeInGraph(model.rope_text.head_dim, model.rope_text.theta)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 if it is (a float64 reference keeps its precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _interleaved_textbook(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs rotated as before fb9772d: ``(x0 c - x1 s, x0 s + x1 c)`` stacked."""
    x1, x2 = _at_least_float32(x).unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 0::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


def _half_textbook(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half pairs as before fb9772d: ``x cos + cat(-x2, x1) sin``."""
    xf = _at_least_float32(x)
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


def textbook_rope(t, rope_video, rope_text):
    """``WanAttention._rope`` before fb9772d: the joint sequence split, each part rotated in
    its textbook form, the parts concatenated (also the float64 reference of
    ``benchmarks.kernels``)."""
    if rope_text is None:
        return _interleaved_textbook(t, *rope_video) if rope_video is not None else t
    if rope_video is None:
        return _half_textbook(t, *rope_text)
    n = rope_video[0].shape[1]
    video = _interleaved_textbook(t[:, :n], *rope_video)
    return torch.cat([video, _half_textbook(t[:, n:], *rope_text)], dim=1)


def split_rope(model: torch.nn.Module) -> None:
    """Give every attention of ``model`` the rope as it was before fb9772d (:func:`textbook_rope`;
    the same values). Set on the instances: other models keep the current one."""
    for attention in model.modules():
        if isinstance(attention, WanAttention):
            attention._rope = textbook_rope


def host_batches(videos: torch.Tensor, kind: str) -> torch.Tensor:
    """The clips as the loader hands them over: float in [-1, 1] (``float``, what
    ``MemoryClips`` gave before d19f7cd) or uint8 pixels (``uint8``)."""
    return video_as_float(videos) if kind == "float" else videos


def pin(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` in page-locked memory when copying to a GPU (what ``pin_memory=True`` does)."""
    return x.pin_memory() if device.type == "cuda" else x


class EveryRowCaptions(torch.nn.Module):
    """The transformer as the causal-caption step called it before 7bf44e3: every row of the
    batch holds a caption canvas (the rows without a caption task an empty one) and one joint
    pass runs under the causal mask. The logits of the rows that train the captions are the
    same as those of :meth:`~lightning_vigu.model.UniViGUTransformer.forward` with
    ``text_rows`` (the video never reads a caption), so the loss curves agree."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, video, t_video, context, text=None, t_text=None, text_rows=None, **kw):
        if text_rows is None:
            return self.model(video, t_video, context, text=text, t_text=t_text, **kw)
        b, length = video.shape[0], text.shape[1]
        canvas = text.new_zeros(b, length).index_copy(0, text_rows, text)
        times = t_text.new_zeros(b).index_copy(0, text_rows, t_text)
        out = self.model(video, t_video, context, text=canvas, t_text=times)
        return type(out)(out.velocity, out.text_logits.index_select(0, text_rows))


def build(case: Case, loop: dict, device: torch.device) -> UniViGU:
    """The GPU preset's module with the loop's compilation. For ``Case(model="fixed")`` the
    architecture is held fixed across loops and sessions (caption positions only), so rows stay
    comparable; ``model="recipe"`` takes the recipe's overrides (video positions, mixed video
    rope, pooled prompt: ``conf/model/tiny.yaml``)."""
    torch.manual_seed(0)
    mode = loop["compile"] if device.type == "cuda" else "none"
    config = world_config(case.world)
    overrides = {"text_absolute_positions": True}
    if case.model == "recipe":
        overrides = yaml.safe_load(RECIPE.read_text())["model_overrides"]
    overrides = {**overrides, "pack_caption_rows": loop.get("packed", False)}
    module = UniViGU(
        size=case.size,
        tokenizer=WorldTokenizer(),
        caption_length=64,
        prompt_length=32,
        video_shape=(config.num_frames, config.height, config.width),
        model_overrides=overrides,
        objective=ObjectiveConfig(prediction="data", time_shift=3.0),
        phase=case.phase,
        caption_objective=case.caption_objective,
        compile=mode,
        triton_kernels=loop.get("triton_kernels", False),
    )
    if loop["rope"] == "graph":
        if case.model != "fixed":
            raise ValueError("loops with the rope computed in the graph time the fixed model only")
        rope_in_graph(module.model)
    if loop.get("rope_form") == "split":
        split_rope(module.model)
    if loop.get("caption_rows") == "all":  # the training step calls the wrapper, compiled
        module.flow.model = EveryRowCaptions(module.model)
        module.compile_for_training(module.flow.model, mode)
    return module.to(device)


def averager(module: UniViGU, kind: str) -> AveragedModel:
    """The EMA: :class:`callbacks.EMA`'s (``callback``: no host reads), torch's
    ``AveragedModel`` with one foreach update (``foreach``: reads its count on the host), or
    one update per tensor (``per_tensor``)."""
    fn = WarmupEMA(0.999)
    if kind == "callback":
        return WarmupAveragedModel(module, fn)
    if kind == "foreach":
        return AveragedModel(module, multi_avg_fn=fn, use_buffers=True)
    return AveragedModel(
        module, avg_fn=lambda a, c, n: torch.lerp(c, a, fn.decay_at(n)), use_buffers=True
    )


def run_loop(
    case: Case,
    name: str,
    data,
    steps: int,
    timed_from: int,
    profile: int = 0,
    shared: tuple | None = None,
) -> dict:
    """Train ``steps`` steps of one loop; returns its row (losses, seconds per step, memory,
    and with ``profile`` the :func:`~benchmarks.step_profile.profile_steps` summary of that many
    further steps). With ``shared = (barrier, seconds)`` the loop is one of several training at
    once: after ``timed_from`` steps it waits at the barrier for the others, then times as many
    steps as fit in ``seconds``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loop = LOOPS[name]
    videos, records = data
    videos = host_batches(videos, loop["video"])
    row = dict(case_row(case, name), **loop)
    try:
        torch._inductor.config.cpp_wrapper = loop.get("cpp_wrapper", False)  # a process a loop
        torch._inductor.config.combo_kernels = loop.get("combo_kernels", False)
        torch._inductor.config.coordinate_descent_tuning = loop.get("coordinate_descent", False)
        module = build(case, loop, device)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.99), fused=loop["fused"])
        ema = averager(module, loop["ema"])
        order = torch.Generator().manual_seed(1)
        draws = [torch.randint(0, len(records), (case.batch,), generator=order) for _ in range(16)]
        # what a loader with pin_memory hands over: page-locked batches (16, used in turn)
        pinned = [pin(videos[idx], device) for idx in draws]
        losses, start = [], None

        def one(step: int, part=lambda name: nullcontext()) -> None:
            with part("batch"):
                idx = draws[step % len(draws)]
                batch = batch_to_device(  # the DataModules' transfer (uint8 made float there)
                    {
                        "video": pinned[step % len(draws)],
                        "prompt": [records[i]["prompt"] for i in idx],
                        "caption": [records[i]["caption"] for i in idx],
                    },
                    device,
                )
            with part("forward"):
                module.begin_training_step()
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    generator = module.step_generator("train", step)
                    out = module.compute_loss(batch, module.phase, generator)
                if loop["host_reads"] and not torch.isfinite(out.loss):  # the old check
                    return
            with part("backward"):
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
            with part("optimizer"):
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            with part("ema"):
                ema.update_parameters(module)
            losses.append(out.loss.detach().clone())  # a CUDA graph's output is overwritten

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if shared is None:
            for step in range(steps):
                if step == timed_from:
                    synchronize(device)
                    start = time.perf_counter()
                one(step)
            synchronize(device)
            seconds = (time.perf_counter() - start) / (steps - timed_from)
        else:
            seconds = steps_in_window(one, timed_from, device, *shared, row)
        if profile:  # after the timing, on further steps (their losses are not kept)
            kept = len(losses)
            row["profile"] = profile_steps(lambda i, part: one(steps + i, part), profile)
            del losses[kept:]
        cfg, hp = module.model.config, module.hparams
        text = hp.caption_length if module.phase.uses_text else 0  # generator: video only
        latent = module.codec.latent_shape(*videos.shape[2:])
        rows = None  # every row holds a caption (or none does)
        if text and module.objective.path.causal and loop.get("caption_rows") != "all":
            rows = caption_row_count(case.batch, module.phase)  # the rows that train them
        flops = clip_train_flops(cfg, latent, text, hp.prompt_length, case.batch, rows)
        row.update(
            losses=[float(v) for v in losses],
            seconds=seconds,
            examples_per_s=case.batch / seconds,
            tflops=flops / seconds / 1e12,
        )
        row.update(device_rates(flops, seconds))
    except Exception as exn:  # a compile or memory failure is a result, not a crash
        traceback.print_exc()  # the row keeps its first line; the log the whole story
        row["error"] = failure(exn)
        if shared is not None:
            shared[0].abort()  # the others stop waiting for this loop
    finally:
        module = opt = ema = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print({k: v for k, v in row.items() if k != "losses"}, flush=True)
    return row


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (the timing's edges only)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def steps_in_window(one, warmup: int, device: torch.device, barrier, window: float, row) -> float:
    """Seconds per step of ``one(step)`` while the other loops sharing ``barrier`` train too:
    ``warmup`` steps (compilation), the barrier, then steps until ``window`` seconds have
    passed. Adds the steps counted to ``row``."""
    for step in range(warmup):
        one(step)
    synchronize(device)
    barrier.wait(timeout=900)  # the slowest compilation
    start, step = time.perf_counter(), warmup
    while time.perf_counter() - start < window:
        one(step)
        step += 1
    synchronize(device)
    row.update(side_by_side=barrier.parties, window_steps=step - warmup)
    return (time.perf_counter() - start) / (step - warmup)


def run_one(
    case: Case, name: str, steps: int, timed_from: int, profile: int = 0, shared=None
) -> dict:
    """One loop of a case, on the case's clips (the same clips for every loop)."""
    data = clips(case.world, 8 * case.batch)
    return run_loop(case, name, data, steps, timed_from, profile, shared)


def run_side_by_side(preset: dict, seconds: float) -> list[dict]:
    """Every loop of the preset at once, one process each on the one GPU, each timed over
    the same ``seconds`` of wall clock once all have compiled."""
    jobs = [(case, name) for case in preset["cases"] for name in case.loops]
    spawn = multiprocessing.get_context("spawn")
    with spawn.Manager() as manager, spawn.Pool(len(jobs)) as pool:
        barrier = manager.Barrier(len(jobs))
        pending = [
            pool.apply_async(run_one, (case, name, 0, preset["timed_from"], 0, (barrier, seconds)))
            for case, name in jobs
        ]
        return [job.get() for job in pending]


def compare(rows: list[dict]) -> None:
    """Add, per case, the speed-up over the case's first loop and the loss-curve agreement;
    and the clips a second over the first row of the same size, world and model (another
    batch: ``clips_vs_first``)."""

    def model(r: dict) -> tuple:
        # rows before 69cd808: the fixed model, recall's step; side-by-side rows: their own
        objective = r.get("phase", "recall"), r.get("caption_objective", "flow")
        return r["size"], r["world"], r.get("model", "fixed"), *objective, r.get("side_by_side")

    for row in rows:
        first = next(r for r in rows if model(r) == model(row))
        if row["batch"] != first["batch"] and "seconds" in row and "seconds" in first:
            row["clips_vs_first"] = row["examples_per_s"] / first["examples_per_s"]
        ref = next(r for r in rows if (model(r), r["batch"]) == (model(row), row["batch"]))
        if "seconds" in row and "seconds" in ref:
            row["speedup"] = ref["seconds"] / row["seconds"]
            if row.get("side_by_side"):  # the steps differ from loop to loop
                continue
            a, b = np.asarray(ref["losses"]), np.asarray(row["losses"])
            rel = np.abs(a - b) / np.abs(a)
            row["max_loss_diff"] = float(np.abs(a - b).max())
            row["max_rel_loss_diff"] = float(rel.max())
            # bf16 differences of two fusions grow once training amplifies them (a loss spike
            # early on): the first steps say whether both compute the same step, the last
            # ones whether either learns less
            row["first10_rel_diff"] = float(rel[:10].max())
            row["last20_loss_ratio"] = float(b[-20:].mean() / a[-20:].mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="toy", choices=sorted(PRESETS))
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    p.add_argument("--steps", type=int, default=None, help="steps per loop (default: preset's)")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        help="after timing, profile this many more steps of each loop: GPU ms a step by kind of "
        "kernel and by part of the step (benchmarks/step_profile.py)",
    )
    p.add_argument(
        "--side-by-side",
        type=float,
        default=0,
        metavar="SECONDS",
        help="then train every loop of the preset at once, one process each, and count their "
        "steps in this many seconds of wall clock",
    )
    p.add_argument("--loops", nargs="+", default=None, help="only these loops of the preset")
    p.add_argument(
        "--cases",
        nargs="+",
        type=int,
        default=None,
        help="only these cases of the preset (0-based)",
    )
    p.add_argument(
        "--no-alone", action="store_true", help="with --side-by-side: skip the loops alone"
    )
    a = p.parse_args(argv)
    preset = dict(PRESETS[a.preset])
    if a.cases is not None:
        preset["cases"] = [preset["cases"][i] for i in a.cases]
    if a.loops:
        cases = [
            dataclasses.replace(c, loops=tuple(n for n in c.loops if n in a.loops))
            for c in preset["cases"]
        ]
        preset["cases"] = [c for c in cases if c.loops]
    if a.steps:
        preset.update(steps=a.steps, timed_from=min(preset["timed_from"], a.steps // 2))
    rows: list[dict] = []
    spawn = multiprocessing.get_context("spawn")
    for case in [] if a.no_alone else preset["cases"]:
        for name in case.loops:
            # a fresh process per loop: compiling a second model of another shape in one
            # process failed on the GPU (a reshape of the first shape's sizes inside the
            # compiled code), and each loop starts from a cold allocator and compile cache
            with spawn.Pool(1) as pool:
                try:
                    rows.append(
                        pool.apply(
                            run_one, (case, name, preset["steps"], preset["timed_from"], a.profile)
                        )
                    )
                except Exception as exn:  # the process's CUDA context died (a fault): its row
                    rows.append(dict(case_row(case, name), error=failure(exn)))
            path = report(rows, preset, a)  # after every loop: a run cut short keeps its rows
    if a.side_by_side:
        rows += run_side_by_side(preset, a.side_by_side)
        path = report(rows, preset, a)
    print(f"wrote {path}")


def report(rows: list[dict], preset: dict, a: argparse.Namespace) -> Path:
    """Compare the rows so far and write the results table."""
    compare(rows)
    cols = ["size", "world", "batch", "model", "phase", "caption_objective", "loop", "compile"]
    cols += ["fused", "ema", "host_reads", "rope", "video", "side_by_side", "window_steps"]
    cols += ["seconds", "examples_per_s", "speedup", "clips_vs_first", "tflops", "mfu", "peak_gib"]
    cols += ["max_rel_loss_diff", "first10_rel_diff", "last20_loss_ratio", "error"]
    table = markdown_table(rows, cols)
    table += (
        f"\n\nA step: the phase's objective (recall: the t2v/v2t/joint mix) on a batch of synthetic clips, "
        f"bf16 autocast on GPU, backward, clipping, AdamW, EMA; timed over steps "
        f"{preset['timed_from']}-{preset['steps']} (after compilation). `host_reads`: the loss "
        f"is read on the host every step (the non-finite check before fused AdamW skipped such "
        f"steps itself). `max_rel_loss_diff`: the largest relative difference of a step's loss "
        f"from the case's first loop over all {preset['steps']} steps (same weights, batches and "
        f"per-step randomness); `first10_rel_diff` the same over the first 10 steps; "
        f"`last20_loss_ratio` the mean loss of the last 20 steps over the first loop's."
    )
    if a.side_by_side:
        table += (
            f" Rows with `side_by_side` N: the N loops trained at once, one process each on the "
            f"one GPU, each timed over the same {a.side_by_side:g} s of wall clock "
            f"(`window_steps` steps) after all had compiled."
        )
    profiled = [profile_row(r) for r in rows if "profile" in r]
    if profiled:
        columns = list(dict.fromkeys(k for r in profiled for k in r))  # kinds differ by loop
        table += "\n\n" + markdown_table(profiled, columns)
        table += (
            "\n\nPer step, in milliseconds, from a torch.profiler trace of the steps after the "
            "timed ones: `gpu` the GPU's kernels and copies (by kind of kernel, and `gpu <part>` "
            "by the part of the step that launched them); `host <part>` the host's time in each "
            "part under the profiler (inflated by it: read it as shares); `launches` kernels "
            "and copies a step."
        )
    print(table, flush=True)
    return write_results(f"train_loop_{a.preset}{a.tag}", {"rows": rows}, table, a.out)


def profile_row(row: dict) -> dict:
    """One flat table row of a loop's profile summary."""
    prof = row["profile"]
    out = {"size": row["size"], "loop": row["loop"], "gpu": prof["gpu_ms"]}
    out.update(prof["gpu_ms_by_kind"])
    out.update({f"gpu {k}": v for k, v in prof["gpu_ms_by_part"].items()})
    out.update({f"host {k}": v for k, v in prof["host_ms_by_part"].items()})
    out["launches"] = prof["launches"]
    return out


if __name__ == "__main__":
    main()
