"""Quality suite: does it learn both directions, and does understanding cost generation anything?

    python -m benchmarks.quality run --preset gpu --work runs/quality     # on one GPU (device)
    python -m benchmarks.quality report --raw runs/quality/quality_raw.json  # caption metrics, table, plots
    python -m benchmarks.quality all --preset toy                         # CPU smoke test

``run`` trains through the real entry points (``python -m lightning_vigu fit -c conf/...``):

1. ``generator``  -- the video path alone (the stand-in for a pretrained Wan);
2. ``twin``       -- the generator trained on for as long as Knowledge Recall, generation only:
   baseline (a), the claim being that understanding costs generation nothing;
3. ``recall_causal`` -- Knowledge Recall from the generator, with the next-token caption
   stream (``model.caption_objective: autoregressive``);
4. ``refine_causal`` -- Capability Refinement from it;
5. ``arcap``      -- baseline (b): an autoregressive captioner trained as long as recall + refine;

and, when asked for (``--stages``), ablations at the same budget: ``recall`` -> ``refine`` (the
same two phases with the discrete-flow caption stream, the paper's), ``recall_scratch`` (the
paper's claim: recall from no generator, trained as long as generator + recall),
``refine_frozen`` (refine with every attention weight frozen, the earlier recipe),
``recall_causal_caption1`` (recall_causal with the caption loss at 1.0 instead of 0.1),
``recall_causal_caption_heavy`` -> ``refine_causal_caption_heavy`` (the main pair with the
caption-heavy task mixes it used before, which the Wan configs keep), ``twin_seed1`` and
``recall_causal_seed1`` (the same stages from another seed: training noise),
``generator_previous`` (the generator with the recipe before the mixed rope and the pooled
prompt), ``generator_b64`` (the generator at the batch of 64 clips and lr the suite used before
batches of 256) and
``generator_fine`` (the generator with tokens of 4x4 pixels instead of 8x8) and
``twin_recall_steps`` (the twin capped at the steps recall_causal trained, in a fifth wave: equal
steps instead of equal time). By default only the
main stages run (:data:`MAIN`), so that they share the GPU with fewer processes and the
evaluation is shorter (generator runs took 0.070-0.124 s a step four side by side on one H200,
0.059-0.088 s alone; ``benchmarks/results/ablation.md``); ablations run in their own
invocation, next to the stages they compare with. Stages run in *waves* of equal wall-clock budget
(``--minutes`` per wave); a stage spans one or more waves, and the stages of a wave train side by
side on the GPU. The generator trains through waves 1-2, twin and recall(_causal) in wave 3
and refine(_causal) in wave 4, so the video path learns for half the budget before the caption
phases start from it.
On the GPU preset the training graphs of stages that start in a later wave are compiled beside
the first wave (:func:`warm_up_stages`), so that their budgets train rather than compile.
Each stage plans its length from its budget (:class:`callbacks.TimeBudget`, so its lr schedule
ends at its last step) and keeps EMA
weights (:class:`callbacks.EMA`). Then every stage is evaluated on the test split and the
held-out-combinations (``unseen``) split: caption attribute accuracy (parser), prompt adherence
(detector), FVD against real clips of the same split, joint agreement; ``recall_causal`` and
``refine_causal`` are also scored with their live (not averaged) weights, the EMA ablation, and
``twin`` with the DDIM video sampler at eta 1 (:data:`VARIANTS`, :data:`SCORED_AGAIN`).

A finished stage is skipped, a stage cut off part-way resumes from its ``last.ckpt`` and an
evaluated stage is not evaluated again, so a run split over several device calls (``--waves``,
``--skip-eval``) goes on where the last one stopped. ``report`` adds BLEU-4 / METEOR / ROUGE-L /
CIDEr-D (pycocoevalcap, Java) from the kept predictions and writes the table, the plots, the
sample grid (``quality_samples.png``) and each stage's difference from ``twin`` with its
interval of evaluation noise (:mod:`benchmarks.noise`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

from benchmarks import noise
from benchmarks.common import (
    ROOT,
    evaluate_checkpoint,
    finish_training,
    frame_strip,
    loss_curve,
    markdown_table,
    run_then_report,
    stage_overlay,
    stamp,
    start_training,
    write_results,
)
from datamodules.synthetic.detector import DetectorSettings

# The world at 16x32x32 (256 video tokens a clip, as the scaling suite): the detector and the
# parser are exact at this size, and a step costs a quarter of the 64x64 world's.
# Batches of 256 clips: the tokens of a step of conf/gpu.yaml's 64x64 world at 64 clips (65,536).
# At 64 clips of 256 tokens a small model's step was the host's (the GPU ~25% busy); alone on an
# H200, 256 clips a step pass 5x the clips a second, and in the same minutes the generator
# reached 0.58 adherence against 0.48; lr 1e-3 (sqrt(4) x 5e-4) for the 4x batch
# (benchmarks/results/ablation.md, part 11).
GPU_DATA = [
    "--data=conf/data/synthetic_gpu.yaml",
    "--data.init_args.preset=cpu",
    "--data.init_args.num_workers=3",
    "--data.init_args.batch_size=256",
]
GPU_LR = "--model.lr=1e-3"
PRESETS = {
    # minutes: the budget of one wave; eval clips per split; sampling steps; CLI overrides
    "gpu": dict(
        minutes=4.0,  # four waves: 16 minutes of training (3.5 a wave took 15.6 with starts, 69cd808)
        warm_up=True,  # later stages' graphs compiled beside wave 1 (warm_up_stages)
        max_steps=20000,
        eval_clips=128,
        sample_steps=30,
        overlay=[
            "-c",
            "conf/gpu.yaml",
            *GPU_DATA,
            "--model.video_shape=[16,32,32]",
            GPU_LR,
            # conf/gpu.yaml's loop: the training step with its losses (model.compile: step) replayed
            # as CUDA graphs; runs up to 65f0b55 replayed the transformer alone. Runs up to
            # 7bf44e3 compiled it without them (--model.compile=model): alone on this world a
            # step at 256 clips took 0.061-0.076 s of which the GPU worked 37-47 ms, and a
            # stage through the CLI 0.11-0.15 s (benchmarks/results/ablation.md, parts 11, 17)
        ],
        arcap_overlay=[  # the baseline takes the data and trainer settings, not UniViGU's
            *GPU_DATA,
            "--trainer.accelerator=gpu",
            "--trainer.precision=bf16-mixed",
            "--model.size=small",
            "--model.caption_length=64",
            "--model.warmup_steps=200",
            GPU_LR,
            # and the unified model's loop (conf/gpu.yaml): CUDA graphs and a fused AdamW, so
            # that "the same time" buys both the same kind of step. Runs up to 65f0b55 trained
            # the baseline eagerly (0.112-0.113 s a step beside the generator)
            "--model.compile=cudagraphs",
            "--model.optimizer=torch.optim.AdamW",
            "--model.optimizer.init_args.fused=true",
        ],
        data=("conf/data/synthetic_gpu.yaml", dict(preset="cpu")),
    ),
    "toy": dict(
        minutes=None,
        max_steps=6,
        eval_clips=4,
        sample_steps=2,
        overlay=[
            "--data.init_args.num_train=64",
            "--data.init_args.num_test=8",
            "--data.init_args.num_unseen=8",
            "--data.init_args.num_workers=0",
            "--model.sampler.video_steps=2",
        ],
        arcap_overlay=[
            "--data.init_args.num_train=64",
            "--data.init_args.num_test=8",
            "--data.init_args.num_unseen=8",
            "--data.init_args.num_workers=0",
        ],
        data=("conf/data/synthetic_cpu.yaml", dict(num_train=64, num_test=8, num_unseen=8)),
    ),
}


@dataclass(frozen=True)
class Stage:
    """One trained model of the suite.

    Attributes:
        config: the phase config it trains with.
        waves: the waves it trains through (its budget is one wave's minutes per wave).
        init: the stage whose last checkpoint initialises it (``None``: from scratch).
        extra: further CLI arguments.
        steps_of: another stage whose trained steps this one trains, no more (its time budget
            still applies): a comparison at equal steps instead of equal time.
    """

    config: str
    waves: tuple[int, ...]
    init: str | None = None
    extra: tuple[str, ...] = ()
    steps_of: str | None = None


CAUSAL = ("--model.caption_objective=autoregressive",)  # the next-token caption stream
SEED1 = ("--seed_everything=1", "--model.seed=1")  # other per-step draws, the same clips


def recall_causal_with(*extra: str) -> Stage:
    """``recall_causal`` with further CLI arguments (another phase, another seed): an ablation
    of wave 3, beside ``recall_causal`` from the same generator."""
    return Stage("conf/recall.yaml", (3,), init="generator", extra=(*CAUSAL, *extra))


STAGES: dict[str, Stage] = {
    "generator": Stage("conf/generator.yaml", (1, 2)),
    "twin": Stage("conf/generator.yaml", (3,), init="generator"),
    "recall": Stage("conf/recall.yaml", (3,), init="generator"),
    "refine": Stage("conf/refine.yaml", (4,), init="recall"),
    "arcap": Stage("conf/arcap.yaml", (1, 2)),  # as long as recall + refine
    # as long as generator + recall; from scratch (conf/recall.yaml starts from the tiny prior)
    "recall_scratch": Stage("conf/recall.yaml", (1, 2, 3), extra=("--init_from=null",)),
    "refine_frozen": Stage(
        "conf/refine.yaml", (4,), init="recall", extra=("--phase=refine_frozen",)
    ),
    "recall_causal": recall_causal_with(),
    # recall_causal with the caption loss at 1.0 and at 0.1 (the preset's before d04c15d) instead
    # of the preset's 0.01: their ablation at the same budget, side by side with `recall_causal`
    # (ablation.md, parts 14 and 18)
    "recall_causal_caption1": recall_causal_with(
        "--phase={preset: recall, loss_weights: {video: 1.0, text: 1.0}}"
    ),
    "recall_causal_caption01": recall_causal_with(
        "--phase={preset: recall, loss_weights: {video: 1.0, text: 0.1}}"
    ),
    "refine_causal": Stage("conf/refine.yaml", (4,), init="recall_causal", extra=CAUSAL),
    # recall_causal -> refine_causal with the caption-heavy mixes before 1911eae (the Wan
    # configs' recipe): recall t2v 0.6, refine t2v 0.2 with the generator at 0.3x the lr; their
    # ablation at the same budget, side by side with the main pair (ablation.md, part 16)
    "recall_causal_caption_heavy": recall_causal_with("--phase=recall_caption_heavy"),
    "refine_causal_caption_heavy": Stage(
        "conf/refine.yaml",
        (4,),
        init="recall_causal_caption_heavy",
        extra=(*CAUSAL, "--phase=refine_caption_heavy"),
    ),
    # recall_causal with the mix up to 9ef349e (t2v 0.8 / v2t 0.15 / joint 0.05: 76.5% of the
    # draws conditional, against 85%): their ablation at the same budget (ablation.md, part 18)
    "recall_causal_mix08": recall_causal_with(
        "--phase={preset: recall, task_mix: {t2v: 0.8, v2t: 0.15, joint: 0.05}}"
    ),
    # twin and recall_causal again from another seed (every per-step draw: times, noise, tasks,
    # prompt dropout; the clips and their order are the dataset seed's, kept): their difference
    # from the first seed's, in the report's evaluation-noise table, is training noise, which
    # the table's intervals leave out
    "twin_seed1": Stage("conf/generator.yaml", (3,), init="generator", extra=SEED1),
    "recall_causal_seed1": recall_causal_with(*SEED1),
    # the twin capped at recall_causal's steps: recall trains 71-75% of the twin's steps in the
    # same time and trails it by 0.03-0.05 unseen adherence (ablation.md, parts 21-22). If the
    # twin at recall's steps trails the twin as much, the step count explains the gap; if not,
    # the recall objective costs the video. Wave 5: after recall has trained, alone on the GPU
    # (beside refine_causal it would take refine's steps)
    "twin_recall_steps": Stage(
        "conf/generator.yaml", (5,), init="generator", steps_of="recall_causal"
    ),
    # the generator with the recipe before the mixed rope and the pooled prompt (Wan's axial
    # rope, no pooled prompt): their ablation at the same budget, side by side with `generator`
    "generator_previous": Stage(
        "conf/generator.yaml",
        (1, 2),
        extra=(
            "--model.model_overrides={text_absolute_positions: true, "
            "video_absolute_positions: true, video_rope: axial, pooled_prompt: false}",
        ),
    ),
    # the generator at the suite's batch and lr before batches of 256 (64 clips, lr 5e-4): their
    # ablation at the same wall clock, side by side with `generator`
    "generator_b64": Stage(
        "conf/generator.yaml",
        (1, 2),
        extra=("--data.init_args.batch_size=64", "--model.lr=5e-4"),
    ),
    # the generator with tokens of 4x4 pixels (1,024 a clip) instead of 8x8 (256): finer
    # tokens for shapes, at four times the tokens a step
    "generator_fine": Stage(
        "conf/generator.yaml",
        (1, 2),
        extra=(
            "--model.model_overrides={text_absolute_positions: true, "
            "video_absolute_positions: true, video_rope: mixed, pooled_prompt: true, "
            "patch_size: [1, 1, 1]}",
        ),
    ),
}
WAVES = (1, 2, 3, 4, 5)  # 5: ablations that need a finished stage's numbers
# The discrete-flow caption stream (``recall`` -> ``refine``, the paper's) trailed the
# next-token one by 0.20 caption accuracy at equal time (0.795 / 0.764 against 0.997 / 0.988,
# c3c3034) and, side by side, took a third of waves 3-4 from the stages the targets are read
# from: it runs on request, in its own invocation (ablation.md, part 14)
MAIN = ("generator", "twin", "arcap", "recall_causal", "refine_causal")
"""The stages the quality targets are read from (the default of ``--stages``)."""
# How a stage is scored: its EMA weights with the config's sampler; the variants below score
# some stages again: ``raw weights`` (live, not averaged: the EMA ablation), ``ddim eta 1``
# (the DDIM video sampler re-drawing noise at every step, against the Euler ODE) and
# ``guidance 5`` (classifier-free guidance 5 instead of the config's 3)
VARIANTS: dict[str, tuple[str, dict | None]] = {
    "ema": ("ema", None),
    "raw weights": ("raw", None),
    "ddim eta 1": ("ema", {"video_eta": 1.0}),
    "guidance 5": ("ema", {"guidance_scale": 5.0}),
}
# variant: the stages it scores. At c3c3034 the generator's live weights tied its EMA ones on
# adherence (0.708 / 0.615 against 0.710 / 0.602), and guidance 5 was worse than 3 on the twin
# (0.760 / 0.693 against 0.816 / 0.738): measured once, not repeated in every run
SCORED_AGAIN = {
    "raw weights": ("recall_causal", "refine_causal"),
    "ddim eta 1": ("twin",),
    "guidance 5": (),
}


def stage_command(work: Path, name: str, preset: dict, warm_up: bool = False) -> list[str]:
    """The CLI command that trains one stage (its overlay written into its run folder).

    ``warm_up``: the command that compiles the stage's training graph instead (see
    :func:`start_warm_ups`): :data:`WARM_UP_STEPS` steps from no checkpoint (the stage it starts
    from has not trained yet; the graph depends on shapes, not weights), in ``<work>/_warm_up``.
    """
    stage = STAGES[name]
    module = "benchmarks.baselines" if name == "arcap" else "lightning_vigu"
    cmd = [sys.executable, "-m", module, "fit", "-c", stage.config]
    if warm_up:
        cmd.append("--init_from=null")
    elif stage.init:
        cmd.append(f"--init_from={work / stage.init / 'checkpoints' / 'last.ckpt'}")
    cmd += [*preset["arcap_overlay" if name == "arcap" else "overlay"], *stage.extra]  # extra wins
    if warm_up:  # no validation, no interval checkpoints: only the training graph is wanted
        overlay = stage_overlay(work / WARM_UP, name, WARM_UP_STEPS, every_n=10**9)
        return [*cmd, "-c", str(overlay), "--trainer.limit_val_batches=0"]
    minutes = preset["minutes"] * len(stage.waves) if preset["minutes"] else None
    steps = trained_steps(work, stage.steps_of) if stage.steps_of else preset["max_steps"]
    overlay = stage_overlay(
        work,
        name,
        steps,
        minutes=minutes,
        ema=True,
        every_s=CHECKPOINT_SECONDS if minutes else None,
    )
    return [*cmd, "-c", str(overlay)]


# a timed stage's last.ckpt every 30 s of training (resumed from there when a device call ends
# mid-wave): each save paused a `small` stage 0.8-1.3 s on an H200's host, which at every 200
# steps (9.4 s at fbbb4cd's 0.047 s a step) was a tenth of its time (ablation.md, part 24)
CHECKPOINT_SECONDS = 30.0


def trained_steps(work: Path, stage: str) -> int:
    """The optimiser steps ``stage`` trained (its ``last.ckpt``'s global step)."""
    ckpt = work / stage / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"'{ckpt}' is missing: train '{stage}' first (a stage with steps_of={stage!r} trains "
            "as many steps as it did)"
        )
    return int(torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)["global_step"])


WARM_UP, WARM_UP_STEPS = "_warm_up", 3
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def this_boot() -> str:
    """This boot of this machine ('' where the system does not say): a warm-up compiled under
    it left its graph in the compile cache (under /tmp), which a new machine or a reboot lacks."""
    return BOOT_ID.read_text().strip() if BOOT_ID.is_file() else ""


def warmed_up(work: Path, name: str) -> Path:
    """The file a finished warm-up of ``name`` writes: the boot it compiled under."""
    return work / WARM_UP / f"{name}.compiled"


def warm_up_stages(work: Path, stages: list[str], waves: tuple[int, ...]) -> list[str]:
    """The stages whose training graph is compiled beside the first wave asked for.

    A stage compiles its graph at its start, inside its wall-clock budget, unless the compile
    cache already holds it. In the run of cb65b7b the twin (the generator's graph, cached) took
    its first step after 5 s, recall_causal after 63 s of its 240 (alone on one H200, 40 recall
    steps took 94.6 s from a cold cache and 42.3 s from a warm one; ablation.md, part 14). So
    every unfinished stage that starts after that wave, and whose config and extra arguments no
    earlier-starting stage shares, is compiled once beforehand; compiling is host work, so it
    costs the first wave's stages little of the GPU. A stage already compiled on this boot of
    the machine (by an earlier call's warm-up: :func:`warmed_up`) is not compiled again: at
    2e83d12 the wave-3 call warmed refine_causal up a second time, 63 s beside twin and recall.
    """
    first = min(waves)
    started = {(STAGES[s].config, STAGES[s].extra) for s in stages if STAGES[s].waves[0] <= first}
    chosen, boot = [], this_boot()
    for name in stages:
        stage = STAGES[name]
        key = (stage.config, stage.extra)
        marker = warmed_up(work, name)
        done = (work / name / "train_seconds.txt").is_file() or (
            bool(boot) and marker.is_file() and marker.read_text() == boot
        )
        # arcap starts in wave 1, and its CLI (the baseline's) takes no --init_from
        if stage.waves[0] > first and key not in started and not done and name != "arcap":
            chosen.append(name)
            started.add(key)
    return chosen


def start_warm_ups(work: Path, stages: list[str], preset: dict) -> threading.Thread:
    """Compile the given stages' graphs one after another in a background thread (a failed
    warm-up is reported and skipped: its stage then compiles at its start)."""

    def chain() -> None:
        for name in stages:
            # an earlier invocation's warm-up folder is scratch: the fit refuses a folder that
            # holds another run, and the graph it compiled is in the compile cache, not there
            shutil.rmtree(work / WARM_UP / name, ignore_errors=True)
            log = work / WARM_UP / name / "train.log"
            log.parent.mkdir(parents=True)
            began = time.time()
            with log.open("w") as out:
                code = subprocess.call(
                    stage_command(work, name, preset, warm_up=True),
                    cwd=ROOT,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            took = time.time() - began
            status = "compiled" if code == 0 else f"failed (exit {code}; see {log})"
            if code == 0:
                warmed_up(work, name).write_text(this_boot())
            print(f"[bench] warm-up {name}: {status} in {took:.0f} s", flush=True)

    thread = threading.Thread(target=chain, name="warm-up", daemon=True)
    thread.start()
    return thread


def train_waves(work: Path, stages: list[str], preset: dict, waves: tuple[int, ...]) -> None:
    """Train the chosen stages wave by wave: a stage starts with its first wave (side by side
    with the other stages of that wave on the GPU preset, one after another on ``toy``) and
    must have finished by the end of its last wave."""
    parallel = preset["minutes"] is not None
    running: dict[str, object] = {}
    warm = warm_up_stages(work, stages, waves) if preset.get("warm_up") else []
    warming = start_warm_ups(work, warm, preset) if warm else None
    for wave in waves:
        for name in stages:
            if STAGES[name].waves[0] == wave:
                if warming is not None and name in warm:
                    warming.join()  # its graph compiled (or its warm-up failed): start
                running[name] = start_training(work, name, stage_command(work, name, preset))
                if not parallel:
                    finish_training(work, name, running.pop(name))
        wait_for_stages(work, running, [n for n in running if STAGES[n].waves[-1] == wave])
    wait_for_stages(work, running, list(running))  # stages whose last wave was not asked for
    if warming is not None:  # warm-ups for waves not asked for in this invocation
        warming.join()


POLL_SECONDS = 5.0  # how often the stages training side by side are checked for a failure


def wait_for_stages(work: Path, running: dict, names: list[str]) -> None:
    """Wait until the stages ``names`` of ``running`` (name -> process, ``None``: trained
    before) have finished, and take them out of it. Every running stage is watched: when one
    fails, the others are stopped (each resumes from its last checkpoint in the next
    invocation) and the failure is raised with its log's end at once, so that a device call
    does not spend the rest of a wave beside a stage that cannot finish (at bea2a94 a stage that
    failed at its first step was reported only at the end of its two waves)."""
    while any(name in running for name in names):
        failed = [n for n, p in running.items() if p is not None and p.poll() not in (None, 0)]
        if failed:
            stop_stages(work, {n: p for n, p in running.items() if n != failed[0]})
            print(f"[bench] {failed[0]} failed: the other stages were stopped", flush=True)
            finish_training(work, failed[0], running.pop(failed[0]))  # raises with its log
        for name in [n for n in names if n in running]:
            if running[name] is None or running[name].poll() is not None:
                finish_training(work, name, running.pop(name))
        if any(name in running for name in names):
            time.sleep(POLL_SECONDS)


def stop_stages(work: Path, running: dict) -> None:
    """Stop the running stages (their seconds so far recorded for their resumption)."""
    procs = {n: p for n, p in running.items() if p is not None}
    for proc in procs.values():
        proc.terminate()
    for name, proc in procs.items():
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        with contextlib.suppress(RuntimeError):  # stopped here, not failed
            finish_training(work, name, proc)


SAMPLES = 4  # clips per split whose generated videos and captions go into the sample grid
FEATURES = "fvd_features.pt"  # beside the raw file: each scoring's FVD features per clip
BASELINE = "twin"  # the stage whose differences from the others are read against noise


def scored_key(stage: str, variant: str) -> str:
    """A scoring's name in the raw file: the stage, and the variant unless ``ema``."""
    return stage if variant == "ema" else f"{stage} ({variant})"


def keep(path: Path, key: str, value) -> None:
    """Store ``value`` under ``key`` in the torch file ``path`` (made when missing)."""
    kept = torch.load(path, weights_only=True) if path.is_file() else {}
    kept[key] = value
    torch.save(kept, path)


def evaluate_stage(
    work: Path, stage: str, preset: dict, data_args: dict, fvd, variant: str = "ema"
) -> dict:
    """Evaluate one stage's ``last.ckpt`` on the test and unseen splits: ``{split: metrics}``,
    with the (reference, prediction) pairs under ``_predictions_v2t`` and the generated
    clips' keys and adherence checks under ``_per_clip_t2v`` (:data:`noise.PER_CLIP`) for
    ``report``. Scored as :data:`VARIANTS` ``[variant]`` says; the plain ``ema`` scoring adds
    its samples to ``<work>/samples.pt`` (uint8 videos and texts, rendered by ``report``);
    with FVD, the clips' features go to ``<work>/fvd_features.pt`` (:data:`FEATURES`)."""
    weights, sampler = VARIANTS[variant]
    ckpt = work / stage / "checkpoints" / "last.ckpt"
    out = evaluate_checkpoint(
        ckpt,
        data_args,
        preset["eval_clips"],
        preset["sample_steps"],
        fvd,
        label=f"{stage} ({variant})",
        baseline=stage == "arcap",
        keep_samples=SAMPLES if variant == "ema" else 0,
        weights=weights,
        sampler=sampler,
    )
    if variant == "ema":
        test = out.get("test")  # the grid shows the test split
        keep(work / "samples.pt", stage, {"test": test.samples if test else {}})
    features = {
        split: {"key": res.per_clip["key"], **res.fvd_features}
        for split, res in out.items()
        if res.fvd_features
    }
    if features:
        keep(work / FEATURES, scored_key(stage, variant), features)
    return {
        split: {
            **res.metrics,
            **({} if res.predictions_v2t is None else {"_predictions_v2t": res.predictions_v2t}),
            **({noise.PER_CLIP: res.per_clip} if res.per_clip else {}),
        }
        for split, res in out.items()
    }


def run(args) -> Path:
    preset = dict(PRESETS[args.preset])
    if args.minutes:
        preset["minutes"] = args.minutes
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LIGHTNING_VIGU_CACHE", str(work / "cache"))
    stages = [s for s in STAGES if s in args.stages]
    needed = set(stages)
    todo_deps = list(stages)  # a stage needs the stage it starts from, and whose steps it takes
    while todo_deps:
        stage = STAGES[todo_deps.pop()]
        for dep in (stage.init, stage.steps_of):
            if dep and dep not in needed:
                needed.add(dep)
                todo_deps.append(dep)
    data_file, data_overrides = preset["data"]  # the world every stage trains on
    data_cfg = {**yaml.safe_load((ROOT / data_file).read_text())["init_args"], **data_overrides}
    from datamodules import SyntheticDataModule

    data = SyntheticDataModule(**data_cfg)
    data.prepare_data()  # once, before stages start side by side
    if data.in_memory:  # decoded once here and kept: every stage loads it in a second
        data.setup()
        data.memory_stream()
    del data
    train_waves(work, [s for s in STAGES if s in needed], preset, tuple(args.waves))
    if args.skip_eval:
        return work / "quality_raw.json"
    fvd = None
    if args.i3d_weights and Path(args.i3d_weights).is_file():
        from lightning_vigu.metrics import FrechetVideoDistance, FVDProtocol

        fvd = FrechetVideoDistance(
            i3d_weights=args.i3d_weights,
            protocol=FVDProtocol(real_set="synthetic world, same split, same prompts"),
        ).to("cuda" if torch.cuda.is_available() else "cpu")
    raw_path = work / "quality_raw.json"
    raw = json.loads(raw_path.read_text()) if raw_path.is_file() else {"stages": {}}
    todo = [(s, "ema") for s in stages]
    todo += [(s, v) for v, names in SCORED_AGAIN.items() for s in names if s in stages]
    for stage, variant in todo:
        key = scored_key(stage, variant)
        if key in raw["stages"] and not args.reevaluate:
            continue
        seconds = (
            (work / stage / "train_seconds.txt").read_text().strip()
            if (work / stage / "train_seconds.txt").is_file()
            else None
        )
        raw["stages"][key] = {
            "eval": evaluate_stage(work, stage, preset, data_cfg, fvd, variant),
            "loss": loss_curve(work, stage),
            "train_seconds": seconds,
            **budget_timing(work / stage / "train.log"),
            "budget_minutes": preset["minutes"] and preset["minutes"] * len(STAGES[stage].waves),
        }
        raw.update(
            stamp=stamp(),
            preset={k: v for k, v in preset.items() if "overlay" not in k},
            fvd_protocol=fvd.protocol_dict() if fvd else None,
            detector=asdict(DetectorSettings()),
        )
        raw_path.write_text(json.dumps(raw, indent=1, default=str))
    return raw_path


_TRAINED = re.compile(
    r"\[TimeBudget\] trained (\d+) steps in ([\d.]+) s; first step after ([\d.]+) s"
)


def budget_timing(log: Path) -> dict:
    """Where a stage's wall clock went, from the last ``[TimeBudget] trained ...`` line of its
    log (:class:`callbacks.TimeBudget`): ``fit_seconds`` from the start of training (the
    process's start-up before it is ``train_seconds - fit_seconds``), ``first_step_seconds``
    (compilation included) and ``seconds_per_step`` after the first step. Empty without it."""
    found = _TRAINED.findall(log.read_text(errors="replace")) if log.is_file() else []
    if not found:
        return {}
    steps, fit, first = int(found[-1][0]), float(found[-1][1]), float(found[-1][2])
    return {
        "fit_seconds": fit,
        "first_step_seconds": first,
        "seconds_per_step": (fit - first) / max(steps - 1, 1),
    }


def report(raw_path: Path, out_dir: Path | None = None) -> Path:
    """Caption metrics from the kept predictions, the results table, the differences from the
    twin against evaluation noise (:func:`benchmarks.noise.versus_baseline`) and the plots."""
    from lightning_vigu.metrics import CaptionMetrics

    raw = json.loads(Path(raw_path).read_text())
    rows = []
    names = list(STAGES)

    def rank(key: str) -> tuple[int, str]:
        base = key.split(" (")[0]
        return (names.index(base) if base in names else len(names), key)

    order = sorted(raw["stages"], key=rank)
    path = Path(raw_path).parent / FEATURES  # written by `run` beside its raw file
    features = torch.load(path, weights_only=True) if path.is_file() else {}
    evals = {s: raw["stages"][s]["eval"] for s in order}
    versus_twin = noise.versus_baseline(evals, features, BASELINE)
    equal_steps = equal_step_rows(evals, features)
    for stage in order:
        for split, res in raw["stages"][stage]["eval"].items():
            res.pop(noise.PER_CLIP, None)  # in the raw file only; quality.json: the intervals
            preds = res.pop("_predictions_v2t", None)
            if preds:
                metric = CaptionMetrics()
                metric.update([p for _, p in preds], [[r] for r, _ in preds])
                res.update({f"v2t/{k}": float(v) for k, v in metric.compute().items()})
                res["caption_examples"] = preds[:6]
            entry = raw["stages"][stage]
            rows.append(
                {
                    "stage": stage,
                    "split": split,
                    "steps": max(
                        (c[-1][0] for c in entry.get("loss", {}).values() if c), default=None
                    ),
                    "minutes": entry.get("budget_minutes"),
                    "first_step_s": entry.get("first_step_seconds"),
                    "s_per_step": entry.get("seconds_per_step"),
                    **{k: v for k, v in res.items() if isinstance(v, float)},
                }
            )
    cols = [
        "stage",
        "split",
        "minutes",
        "steps",
        "first_step_s",
        "s_per_step",
        "v2t/attr_accuracy",
        "v2t/attr_ceiling",
        "v2t/stated_accuracy",
        "v2t/cider",
        "v2t/bleu4",
        "v2t/meteor",
        "t2v/adherence_accuracy",
        "t2v/adherence_floor",
        "t2v/travel_ratio",
        "t2v/fvd",
        "joint/agreement",
    ]
    table = markdown_table(rows, cols)
    generated = [r for r in rows if "t2v/adherence_accuracy" in r]
    if generated:  # what holds adherence down: the attributes, and how far objects travel
        per_attribute = ["stage", "split", "t2v/adherence_accuracy"]
        per_attribute += [f"t2v/adherence_{a}" for a in ("colour", "shape", "motion", "speed")]
        per_attribute += ["t2v/adherence_floor_speed"]
        per_attribute += ["t2v/travel_ratio_slow", "t2v/travel_ratio_fast"]
        table += (
            "\n\nPrompt adherence per attribute the prompt states (`adherence_floor_speed`: "
            "real clips against other clips' prompts, for speed; `travel_ratio_slow` / "
            "`_fast`: the median travel over the distance asked, of objects asked to move "
            "slowly / quickly):\n\n" + markdown_table(generated, per_attribute)
        )
    payload = {
        "measured_on": raw.get("stamp"),
        "preset": raw.get("preset"),
        "fvd_protocol": raw.get("fvd_protocol"),
        "rows": rows,
        "evaluation_noise": {
            "baseline": BASELINE,
            "resamples": noise.RESAMPLES,
            "seed": noise.SEED,
            "level": noise.LEVEL,
            "rows": versus_twin,
        },
        "equal_steps": equal_steps,
        "stages": raw["stages"],
    }
    m = raw.get("stamp") or {}
    p = raw.get("preset", {})
    head = (
        "# Quality (synthetic world)\n\n"
        f"Trained and evaluated on {m.get('machine')} (commit {m.get('commit')}, {m.get('date')}); "
        "BLEU-4 / METEOR / CIDEr-D computed from the kept captions by `report` on the machine "
        f"in the stamp above. Each stage trains for `minutes` of wall clock ({p.get('minutes')} "
        "per wave, stages of a wave side by side on the GPU), its schedule planned to end at its "
        f"last step (`steps`), and is scored with its EMA weights on {p.get('eval_clips')} clips "
        "per split (`(raw weights)`: the live weights of the same run; `(ddim eta 1)`: the "
        "DDIM video sampler re-drawing noise at every step instead of Euler; `(guidance 5)`: "
        "classifier-free guidance 5 instead of 3). `attr_accuracy`: "
        "attributes the target states (the prompt for recall, the detailed caption otherwise); "
        "`attr_ceiling`: what true prompts written for the same clips score on it; "
        "`stated_accuracy`: the share of what the caption says that is true of the clip; "
        "`adherence_floor`: the adherence of real clips scored against other clips' prompts "
        "(chance for a valid video); `travel_ratio`: the median distance a moving object the "
        "prompt names travels over the distance asked (1: as asked, 0: still). FVD protocol "
        "in quality.json.\n\n"
    )
    if raw.get("detector") is None:
        head += (
            "**Adherence caveat:** this run's detector settings were not recorded: it predates "
            "the detector's track check (`DetectorSettings.max_track_residual`), without which "
            "colour noise scores 0.37-0.46 prompt adherence and a real clip of another prompt "
            "0.30, so adherence (and joint agreement, which reads videos with the same detector) below "
            "~0.45 here is no evidence of prompt following.\n\n"
        )
    samples = Path(raw_path).parent / "samples.pt"  # written by `run` beside its raw file
    kept = torch.load(samples, weights_only=True) if samples.is_file() else None
    ran = {key for key in raw["stages"] if " (" not in key}
    if kept is not None and set(kept) != ran:
        print(
            f"warning: {samples} holds the samples of {sorted(kept)}, not of this run's stages "
            f"{sorted(ran)}: no sample grid drawn (keep a run's samples.pt beside its raw file)"
        )
        kept = None
    if kept is None:
        head += "No sample grid for this run: `quality_samples.png` is not from it.\n\n"
    body = head + table + "\n\n" + noise.markdown(versus_twin, BASELINE)
    for capped, rows_of_pair in equal_steps.items():
        body += "\n\n" + equal_step_section(capped, rows_of_pair)
    out = write_results("quality", payload, body, out_dir)
    plot(raw, rows, Path(out).parent)
    if kept is not None:
        sample_grid(kept, Path(out).parent)
    print(table)
    return out


def equal_step_rows(evals: dict[str, dict], features: dict) -> dict[str, list[dict]]:
    """For each stage capped at another's steps (:attr:`Stage.steps_of`) that this run scored
    with the stage it copies: that stage's difference from the capped one, with the intervals
    of :func:`benchmarks.noise.versus_baseline` (``{capped stage: rows}``)."""
    pairs = {}
    for name, stage in STAGES.items():
        if stage.steps_of and name in evals and stage.steps_of in evals:
            pair = {stage.steps_of: evals[stage.steps_of], name: evals[name]}
            pairs[name] = noise.versus_baseline(pair, features, baseline=name)
    return pairs


def equal_step_section(capped: str, rows: list[dict]) -> str:
    """The section of ``quality.md`` that reads a stage against the one capped at its steps."""
    copied = STAGES[capped].steps_of
    return (
        f"At equal steps: `{copied}` against `{capped}`, which trained as many steps as "
        f"`{copied}` did from the same start (and so had less wall clock than the twin): a "
        f"difference within noise here, beside one beyond it against the twin, puts the gap "
        f"on `{copied}`'s steps per second, not on its objective. "
        + noise.markdown(rows, capped, explain=False)
    )


def plot(raw: dict, rows: list[dict], out_dir: Path) -> None:
    """Loss curves per stage and metric bars per stage/split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
    for stage, data in raw["stages"].items():
        if " (" in stage:  # a variant scores a stage again: the same run, the same curves
            continue
        losses = data.get("loss", {})
        # the AR baseline logs its caption loss as its only loss
        panels = {"train/loss_video": 0, "train/loss_text": 1}
        if stage == "arcap":
            panels = {"train/loss": 1}
        for key, panel in panels.items():
            curve = losses.get(key)
            if curve and any(v for _, v in curve):  # a stage without captions logs zeros
                s, v = zip(*curve)
                ax[panel].plot(s, v, label=stage, lw=1)
    for a, title in zip(ax, ("video loss", "caption loss")):
        a.set_title(title), a.set_xlabel("step (from the stage's start)"), a.set_yscale("log")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "quality_losses.png", dpi=110)
    metrics = ["v2t/attr_accuracy", "t2v/adherence_accuracy", "joint/agreement"]
    fig, ax = plt.subplots(1, len(metrics), figsize=(12, 3.5))
    for a, m in zip(ax, metrics):
        labels = [f"{r['stage']}\n{r['split']}" for r in rows if m in r]
        a.bar(range(len(labels)), [r[m] for r in rows if m in r])
        a.set_xticks(range(len(labels)), labels, fontsize=6)
        a.set_ylim(0, 1), a.set_title(m)
    fig.tight_layout()
    fig.savefig(out_dir / "quality_metrics.png", dpi=110)


def sample_grid(samples: dict, out_dir: Path, split: str = "test", frames: int = 4) -> Path:
    """``quality_samples.png``: per clip, the real video and each stage's generated video for
    its prompt (``frames`` frames across time), the joint caption under each generated video and
    every captioner's caption of the real video below the real one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in samples if split in samples[s]]
    ref = next((samples[s][split] for s in stages if "real" in samples[s][split]), None)
    if ref is None:
        raise ValueError(f"no kept samples for split '{split}'")
    makers = [s for s in stages if "t2v" in samples[s][split]]
    n = len(ref["prompts"])

    def wrap(text: str) -> str:
        return textwrap.fill(text, 60)

    def strip(video: Tensor):
        return frame_strip(video, frames).numpy()

    fig, axes = plt.subplots(
        1 + len(makers), n, figsize=(3.4 * n, 1.9 * (1 + len(makers)) + 0.6), squeeze=False
    )
    for j in range(n):
        caps = [
            f"{s}: {samples[s][split]['captions'][j]}"
            for s in stages
            if "captions" in samples[s][split]
        ]
        axes[0, j].imshow(strip(ref["real"][j]))
        axes[0, j].set_title(wrap(f"real: {ref['prompts'][j]}"), fontsize=6)
        axes[0, j].set_xlabel("\n".join(wrap(c) for c in caps), fontsize=5)
        for i, s in enumerate(makers, start=1):
            kept = samples[s][split]
            axes[i, j].imshow(strip(kept["t2v"][j]))
            axes[i, j].set_title(f"{s} (t2v)", fontsize=6)
            if "joint_captions" in kept:
                axes[i, j].set_xlabel(wrap(f"joint: {kept['joint_captions'][j]}"), fontsize=5)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    path = out_dir / "quality_samples.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("part", choices=["run", "report", "all"])
    p.add_argument("--preset", default="toy", choices=sorted(PRESETS))
    p.add_argument(
        "--stages",
        nargs="+",
        default=list(MAIN),
        choices=list(STAGES),
        help="default: the main stages; ablations: e.g. --stages generator generator_fine",
    )
    p.add_argument("--waves", nargs="+", type=int, default=list(WAVES), choices=WAVES)
    p.add_argument("--minutes", type=float, default=None, help="override the budget of a wave")
    p.add_argument("--work", default="runs/quality")
    p.add_argument(
        "--i3d-weights", default=None, help="local I3D weights for FVD (see README, Metrics)"
    )
    p.add_argument("--raw", default=None, help="quality_raw.json for 'report'")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--reevaluate", action="store_true")
    p.add_argument(
        "--skip-eval", action="store_true", help="train only (split a run over device calls)"
    )
    run_then_report(p.parse_args(argv), run, report, "quality_raw.json")


if __name__ == "__main__":
    main()
