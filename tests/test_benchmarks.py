"""The benchmark suites at toy scale on CPU: each one's documented command runs end to end and
writes a result whose numbers are measured (positive times, metrics in [0, 1]), with a stamp."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from benchmarks import quality, scaling, step_timer, throughput, train_loop


def test_throughput_toy_measures_steps_ratios_and_sampling_latency(tmp_path):
    throughput.main(["--preset", "toy", "--suites", "train", "latency", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "throughput_toy.json").read_text())
    assert result["stamp"]["machine"].startswith("CPU")
    timed = [r for r in result["rows"] if "seconds" in r]
    assert {r["impl"] for r in timed} == {"diffusers", "ours-video", "ours"}
    assert all(r["seconds"] > 0 and r["tokens_per_s"] > 0 for r in timed)
    assert all(r["unified_over_video"] > 0 for r in result["ratios"])
    latency = result["latency"]
    tasks = {"caption", "t2v", "caption_causal", "caption_causal_full"}
    assert {r["task"] for r in latency} == tasks
    assert all(r["seconds_per_video"] > 0 for r in latency)
    assert "Sampling latency" in (tmp_path / "throughput_toy.md").read_text()


def test_scaling_toy_scores_every_kept_checkpoint_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_VIGU_CACHE", str(tmp_path / "cache"))
    work, out = tmp_path / "work", tmp_path / "out"
    scaling.main(["all", "--preset", "toy", "--work", str(work), "--out", str(out)])
    result = json.loads((out / "scaling.json").read_text())
    assert [(r["size"], r["step"]) for r in result["rows"]] == [("tiny", 2), ("tiny", 4)]
    for row in result["rows"]:
        assert row["params_M"] > 0 and row["train_s"] > 0
        for metric in scaling.METRICS:
            assert math.isnan(row[metric]) or 0.0 <= row[metric] <= 1.0
    assert (out / "scaling.png").stat().st_size > 0
    # a second run finds the trained size and the scored checkpoints and redoes nothing
    before = (work / "scaling_raw.json").read_text()
    scaling.main(["run", "--preset", "toy", "--work", str(work)])
    assert (
        json.loads((work / "scaling_raw.json").read_text())["sizes"] == json.loads(before)["sizes"]
    )
    # a run cut off before it finished resumes from its last.ckpt through the CLI
    (work / "tiny" / "train_seconds.txt").unlink()
    last = work / "tiny" / "checkpoints" / "last.ckpt"
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    scaling.main(["run", "--preset", "toy", "--work", str(work)])
    assert (work / "tiny" / "train_seconds.txt").is_file()
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == step


def test_quality_warms_up_the_graphs_of_later_stages(tmp_path, monkeypatch):
    """Stages that start after the first wave and share no earlier stage's config are compiled
    beforehand; the warm-up command trains a few steps from no checkpoint, in its own folder."""
    main = [s for s in quality.STAGES if s in quality.MAIN]
    # the twin trains the generator's graph (cached by then); arcap starts in wave 1
    assert quality.warm_up_stages(tmp_path, main, quality.WAVES) == [
        "recall_causal",
        "refine_causal",
    ]
    assert quality.warm_up_stages(tmp_path, main, (4,)) == []
    with pytest.raises(FileNotFoundError, match="recall_causal.*train 'recall_causal' first"):
        quality.stage_command(tmp_path, "twin_recall_steps", quality.PRESETS["toy"])
    (tmp_path / "recall_causal").mkdir()
    (tmp_path / "recall_causal" / "train_seconds.txt").write_text("1\n")  # finished before
    assert quality.warm_up_stages(tmp_path, main, (1, 2)) == ["refine_causal"]
    preset = quality.PRESETS["toy"]
    cmd = quality.stage_command(tmp_path, "refine_causal", preset, warm_up=True)
    assert "--init_from=null" in cmd and not any(str(tmp_path / "recall_causal") in a for a in cmd)
    # the command runs: a few steps of the stage's CLI, in <work>/_warm_up/<stage>, replacing
    # the warm-up of an earlier invocation (a later wave's call warms the same stage again)
    monkeypatch.setenv("LIGHTNING_VIGU_CACHE", str(tmp_path / "cache"))
    earlier = tmp_path / quality.WARM_UP / "generator"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "config.yaml").write_text("seed_everything: 0\n")
    (earlier / "checkpoints" / "last.ckpt").write_bytes(b"an earlier warm-up")
    quality.start_warm_ups(tmp_path, ["generator"], preset).join()
    log = (tmp_path / quality.WARM_UP / "generator" / "train.log").read_text()
    assert f"max_steps={quality.WARM_UP_STEPS}` reached" in log, log[-2000:]
    assert not (tmp_path / "generator").exists()  # the stage's own folder is untouched
    # a stage warmed up on this boot of the machine is not warmed up again by a later call;
    # on another boot (a new machine, an empty compile cache) it is
    assert quality.warmed_up(tmp_path, "generator").read_text() == quality.this_boot()
    quality.warmed_up(tmp_path, "refine_causal").write_text(quality.this_boot())
    assert quality.warm_up_stages(tmp_path, main, (1, 2)) == []
    quality.warmed_up(tmp_path, "refine_causal").write_text("another boot")
    assert quality.warm_up_stages(tmp_path, main, (1, 2)) == ["refine_causal"]


def test_quality_toy_trains_evaluates_and_reports(tmp_path, monkeypatch):
    """Three stages (each scored variant once) keep CI short; the other stages run the same
    train/evaluate code."""
    monkeypatch.setenv("LIGHTNING_VIGU_CACHE", str(tmp_path / "cache"))
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["all", "--preset", "toy", "--stages", "generator", "twin", "recall_causal"]
    quality.main([*args, "--work", str(work), "--out", str(out)])
    result = json.loads((out / "quality.json").read_text())
    rows = {(r["stage"], r["split"]): r for r in result["rows"]}
    # raw: the EMA ablation; ddim: the sampler ablation
    stages = (
        "generator",
        "twin",
        "twin (ddim eta 1)",
        "recall_causal",
        "recall_causal (raw weights)",
    )
    assert set(rows) == {(s, split) for s in stages for split in ("test", "unseen")}
    for split in ("test", "unseen"):
        assert 0.0 <= rows["recall_causal", split]["v2t/attr_accuracy"] <= 1.0
        assert 0.0 < rows["recall_causal", split]["v2t/attr_ceiling"] <= 1.0  # true prompts'

        assert "v2t/attr_accuracy" not in rows["generator", split]  # no caption stream
        for stage in ("generator", "twin", "recall_causal"):
            assert 0.0 <= rows[stage, split]["t2v/adherence_accuracy"] <= 1.0
    for plot in ("quality_losses.png", "quality_metrics.png", "quality_samples.png"):
        assert (out / plot).stat().st_size > 0
    # the per-attribute table: a header and one row per scored generation (every row here)
    text = (out / "quality.md").read_text().split("Prompt adherence per attribute")[1]
    per_attribute, versus_twin = text.split("Evaluation noise")
    assert "t2v/adherence_speed" in per_attribute and "t2v/travel_ratio_fast" in per_attribute
    assert sum(line.startswith("| ") for line in per_attribute.splitlines()) == 1 + len(rows)
    # the evaluation noise: every other scoring against the twin, on each split's same clips
    raw = json.loads((work / "quality_raw.json").read_text())["stages"]
    for res in (r for stage in raw.values() for r in stage["eval"].values()):
        if "t2v/adherence_accuracy" in res:  # its per-clip sums are the adherence
            clips = res["_per_clip_t2v"]
            accuracy = sum(clips["adherence_correct"]) / sum(clips["adherence_checks"])
            assert accuracy == res["t2v/adherence_accuracy"]
    noise = {(r["stage"], r["split"]): r for r in result["evaluation_noise"]["rows"]}
    assert set(noise) == {key for key in rows if key[0] != "twin"}
    for r in noise.values():
        assert r["clips"] == 4 and -1 <= r["adherence_low"] <= r["adherence_high"] <= 1
    assert sum(line.startswith("| ") for line in versus_twin.splitlines()) == 1 + len(noise)
    # twin_recall_steps trains as many steps as recall_causal did, within its time budget
    toy = {**quality.PRESETS["toy"], "max_steps": 1000}
    cmd = quality.stage_command(work, "twin_recall_steps", toy)
    trainer = yaml.safe_load(Path(cmd[-1]).read_text())["trainer"]
    assert trainer["max_steps"] == quality.trained_steps(work, "recall_causal") == 6
    assert f"--init_from={work / 'generator' / 'checkpoints' / 'last.ckpt'}" in cmd
    # samples of other stages beside the raw file (another run's) are not drawn as this run's
    grid = (out / "quality_samples.png").read_bytes()
    torch.save({"recall_scratch": {}}, work / "samples.pt")
    quality.main(["report", "--raw", str(work / "quality_raw.json"), "--out", str(out)])
    assert (out / "quality_samples.png").read_bytes() == grid
    assert "No sample grid for this run" in (out / "quality.md").read_text()


def test_train_loop_toy_times_each_loop_and_their_loss_curves_agree():
    """The issue's check of the eager path: the same seed gives the same loss curve over the
    first 100 steps, whichever loop (optimiser, EMA, host reads) runs them."""
    case = train_loop.Case("tiny", "cpu", 2, ("eager", "eager fused"))
    rows = [train_loop.run_one(case, name, steps=100, timed_from=98) for name in case.loops]
    train_loop.compare(rows)
    for row in rows:
        assert "error" not in row and row["seconds"] > 0 and len(row["losses"]) == 100
        assert all(math.isfinite(v) for v in row["losses"])
    assert len(set(rows[0]["losses"])) > 1  # the weights move
    # the same weights, batches and per-step randomness: fused AdamW, the callback's EMA and
    # no host reads give the loss curve of the default loop
    assert rows[1]["max_rel_loss_diff"] < 1e-4


@pytest.mark.parametrize("phase", ["recall", "generator"])
def test_the_split_rope_loop_is_the_rope_before_it_ran_in_one_pass(phase):
    """``split rope`` gives the attentions the rope as it was before fb9772d (the joint sequence
    split, each part in its textbook form): the same loss curve, bit for bit in the eager
    loop, over the joint sequence (recall) and the video alone (generator); and only the
    model it was given has it."""
    from lightning_vigu.model.attention import WanAttention

    case = train_loop.Case("tiny", "cpu", 2, ("eager fused", "eager split rope"), phase=phase)
    rows = [train_loop.run_one(case, name, steps=6, timed_from=4) for name in case.loops]
    train_loop.compare(rows)
    assert all("error" not in row for row in rows) and len(set(rows[0]["losses"])) > 1
    assert rows[1]["losses"] == rows[0]["losses"]
    fresh = train_loop.build(case, train_loop.LOOPS["eager fused"], torch.device("cpu"))
    split = train_loop.build(case, train_loop.LOOPS["eager split rope"], torch.device("cpu"))
    attentions = [m for m in fresh.modules() if isinstance(m, WanAttention)]
    assert attentions and all("_rope" not in vars(m) for m in attentions)
    assert all(
        vars(m)["_rope"] is train_loop.textbook_rope
        for m in split.modules()
        if isinstance(m, WanAttention)
    )


def test_causal_captions_of_the_rows_that_train_them_give_every_row_s_loss_curve():
    """Next-token captions held by the rows that train them only (the step since 7bf44e3)
    give the loss curve of every row holding one in a masked joint pass (the step before), and
    so do those rows packed with the video tokens."""
    case = train_loop.Case(
        "tiny",
        "cpu",
        4,
        ("eager fused", "eager every row", "eager packed"),
        caption_objective="autoregressive",
    )
    rows = [train_loop.run_one(case, name, steps=12, timed_from=10) for name in case.loops]
    train_loop.compare(rows)
    assert all("error" not in row for row in rows) and len(set(rows[0]["losses"])) > 1
    assert rows[1]["max_rel_loss_diff"] < 1e-4 and rows[2]["max_rel_loss_diff"] < 1e-4


def test_loops_side_by_side_each_count_their_steps_in_the_same_window():
    """The quality suite's stages share one GPU; the suite times its phases that way too."""
    preset = dict(
        cases=[
            train_loop.Case("tiny", "cpu", 2, ("eager fused",), phase="generator"),
            train_loop.Case("tiny", "cpu", 2, ("eager fused",)),
        ],
        steps=4,
        timed_from=2,
    )
    rows = train_loop.run_side_by_side(preset, 1.0)
    train_loop.compare(rows)
    assert [r["phase"] for r in rows] == ["generator", "recall"]
    for row in rows:
        assert "error" not in row and row["side_by_side"] == 2 and row["window_steps"] >= 1
        # the window's steps over its seconds (at least the window, at most a step more)
        assert row["seconds"] * row["window_steps"] >= 1.0
        assert "max_rel_loss_diff" not in row  # the loops ran different numbers of steps
    # the generator phase has no caption stream: fewer model FLOPs a step than recall's
    assert rows[0]["tflops"] * rows[0]["seconds"] < rows[1]["tflops"] * rows[1]["seconds"]


def test_the_cli_loop_times_the_real_fit_command_with_an_injected_timer(tmp_path):
    """benchmarks.cli_loop runs ``fit`` as a user would, in a tree, with the step timer added
    to its callbacks (CPU: the main job without the GPU overlay, a few steps)."""
    from benchmarks import cli_loop

    args = ["--sizes", "tiny", "--overlay", "none", "--loops", "now", "--steps", "4"]
    args += ["--timed", "1", "3", "--num-train", "16", "--work", str(tmp_path / "w")]
    cli_loop.main([*args, "--out", str(tmp_path / "out")])
    row = json.loads((tmp_path / "out" / "cli_loop.json").read_text())["rows"][0]
    assert "error" not in row, row
    record = json.loads((tmp_path / "w" / "tiny-now.json").read_text())
    assert record["first"] == 1 and record["last"] == 3 and record["batch"] == 16
    assert row["seconds"] == record["seconds"] > 0
    assert row["examples_per_s"] == pytest.approx(16 / record["seconds"])
    assert row["caption_length"] == 64  # conf/model/tiny.yaml's canvas, read from the run
    assert row["gc_ms"] == record["gc_ms_per_step"]
    assert row["full_gcs"] == record["gc"]["2"]["collections"]
    with pytest.raises(ValueError, match="first < last"):
        step_timer.StepTimer(3, 3, str(tmp_path / "x.json"))


def test_the_cli_loop_runs_each_earlier_tree_under_its_own_label(tmp_path):
    """``--before a b`` makes one ``before`` run per tree, named by ``--before-label`` (or the
    folder), before this tree's loops; labels must match the trees."""
    from benchmarks import cli_loop

    trees = [tmp_path / "x", tmp_path / "y"]
    runs = cli_loop.runs(["before", "now"], list(zip(["d1ccd57", "y"], trees)))
    assert [(label, tree) for label, tree, _ in runs] == [
        ("d1ccd57", trees[0]),
        ("y", trees[1]),
        ("now", cli_loop.ROOT),
    ]
    with pytest.raises(SystemExit):
        cli_loop.main(["--before", *map(str, trees), "--before-label", "one"])


def test_the_step_timer_counts_the_collectors_time_inside_its_window_only(tmp_path):
    """Collections between the timer's two steps are counted per generation with their time;
    collections before or after it are not, and the timer leaves ``gc.callbacks`` as it was."""
    import gc
    from types import SimpleNamespace

    timer = step_timer.StepTimer(1, 3, str(tmp_path / "t.json"))
    trainer = SimpleNamespace(global_step=0)
    module = SimpleNamespace(hparams={"size": "tiny"})
    batch = {"video": torch.zeros(2, 3, 1, 1, 1)}
    watching = list(gc.callbacks)
    gc.disable()  # only the collections asked for below (gc.collect still runs)
    try:
        for step, collections in ((0, (2,)), (1, (2, 2, 0)), (3, (2,))):  # before, in, after
            trainer.global_step = step
            timer.on_train_batch_end(trainer, module, None, batch, step)
            for generation in collections:
                gc.collect(generation)
    finally:
        gc.enable()
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["gc"]["2"]["collections"] == 2 and record["gc"]["0"]["collections"] == 1
    assert record["gc"]["1"]["collections"] == 0
    spent = sum(g["seconds"] for g in record["gc"].values())
    assert spent > 0 and record["gc_ms_per_step"] == pytest.approx(1e3 * spent / 2)
    assert gc.callbacks == watching


def test_the_step_timer_profiles_the_steps_after_its_window(tmp_path):
    """With ``profile=N`` the N steps after ``last`` run under pyinstrument, whose call tree
    and session are written beside the timing; the timed window is not profiled."""
    from types import SimpleNamespace

    timer = step_timer.StepTimer(1, 2, str(tmp_path / "t.json"), profile=2)
    trainer = SimpleNamespace(global_step=0)
    module = SimpleNamespace(hparams={"size": "tiny"})
    batch = {"video": torch.zeros(2, 3, 1, 1, 1)}
    running = []
    for step in range(6):
        trainer.global_step = step
        timer.on_train_batch_end(trainer, module, None, batch, step)
        running.append(timer._profiler.is_running)
        sum(i * i for i in range(20000))  # the step's work
    assert running == [False, False, True, True, False, False]
    text = (tmp_path / "t_profile.txt").read_text()
    assert text.startswith("# pyinstrument, steps 3-4 (2 steps)")
    assert "test_the_step_timer_profiles" in text  # the work's frame
    assert json.loads((tmp_path / "t_profile.json").read_text())["sample_count"] > 0
    with pytest.raises(ValueError, match="profile"):
        step_timer.StepTimer(1, 2, str(tmp_path / "x.json"), profile=-1)


def test_a_step_profile_charges_each_kernel_to_its_part_and_kind():
    from benchmarks.step_profile import summarise

    part = {"cat": "user_annotation", "name": "step/forward", "ts": 0, "dur": 100}
    events = [
        part,
        {**part, "name": "step/backward", "ts": 100},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 10, "args": {"correlation": 1}},
        {"cat": "cuda_runtime", "name": "cuLaunchKernel", "ts": 150, "args": {"correlation": 2}},
        {"cat": "kernel", "name": "nvjet_sm90_tst_192x192", "dur": 30, "args": {"correlation": 1}},
        {"cat": "kernel", "name": "triton_poi_fused_add_0", "dur": 10, "args": {"correlation": 2}},
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "dur": 4, "args": {"correlation": 9}},
    ]
    out = summarise(events, steps=2)
    assert out["gpu_ms"] == pytest.approx(0.022) and out["launches"] == 1.5
    assert out["gpu_ms_by_kind"] == pytest.approx({"matmul": 0.015, "triton": 0.005, "copy": 0.002})
    assert out["gpu_ms_by_part"] == pytest.approx(
        {"forward": 0.015, "backward": 0.005, "outside": 0.002}
    )
    assert out["host_ms_by_part"] == pytest.approx({"forward": 0.05, "backward": 0.05})
    # a real (CPU) step: every part of the training loop shows up on the host's side
    case = train_loop.Case("tiny", "cpu", 2, ("eager fused",))
    row = train_loop.run_one(case, "eager fused", steps=3, timed_from=1, profile=2)
    assert "error" not in row and len(row["losses"]) == 3
    host = row["profile"]["host_ms_by_part"]
    assert set(host) == {"batch", "forward", "backward", "optimizer", "ema"}
    assert all(v > 0 for v in host.values())


def test_a_stamp_names_its_commit_and_says_when_the_tree_differs(tmp_path, monkeypatch):
    from benchmarks.common import commit

    monkeypatch.delenv("LIGHTNING_VIGU_COMMIT", raising=False)
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "r.md").write_text("old\n")
    git("add", "a.py", "benchmarks")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True
    ).stdout.strip()
    assert commit(tmp_path) == head
    (tmp_path / "benchmarks" / "results" / "r.md").write_text("new\n")  # results: no matter
    assert commit(tmp_path / "benchmarks") == head
    (tmp_path / "a.py").write_text("x = 2\n")  # the tree that runs is not the commit
    assert commit(tmp_path) == f"{head}+uncommitted"
    assert commit(tmp_path / "nowhere") == "unknown"


def test_denoise_probe_scores_one_step_predictions_and_can_fail(tmp_path):
    from benchmarks import denoise
    from datamodules.synthetic.generate import make_clip
    from datamodules.synthetic.world import world_config
    from lightning_vigu.flows.convention import FlowPrediction
    from lightning_vigu.module import UniViGU

    world = world_config("cpu")
    made = [make_clip(world, 0, "test", i) for i in range(6)]
    videos = torch.stack(
        [torch.from_numpy(v).permute(3, 0, 1, 2).float() / 127.5 - 1 for v, _ in made]
    )
    clips = {
        "video": videos,
        "prompt": [r["prompt"] for _, r in made],
        "meta": [r for _, r in made],
    }
    module = UniViGU(size="tiny", video_shape=(16, 32, 32), prompt_length=8, caption_length=8)
    clean = module.codec.encode(videos)

    class Oracle:  # predicts the clean clip exactly: velocity (x - x_t) / (1 - t)
        def __call__(self, x_t, t, *args):
            return FlowPrediction(
                velocity=(clean - x_t) / (1 - t.view(-1, 1, 1, 1, 1)), text_logits=None
            )

    class Copy:  # returns its input as the clean clip
        def __call__(self, x_t, t, *args):
            return FlowPrediction(velocity=torch.zeros_like(x_t), text_logits=None)

    module.flow = Oracle()
    rows, kept = denoise.probe(module, clips, times=(0.05, 0.5))
    assert [r["accuracy"] for r in rows] == [1.0, 1.0] and max(r["mse"] for r in rows) < 1e-8
    module.flow = Copy()
    noisy, _ = denoise.probe(module, clips, times=(0.05, 0.5))
    assert noisy[0]["accuracy"] < 0.5 and noisy[0]["mse"] > 0.5  # x_t at t = 0.05 is mostly noise
    assert set(kept) == {0.05, 0.5} and kept[0.05].shape == (4, 3, 16, 32, 32)
    path = denoise.picture(kept, videos, tmp_path / "denoise.png")
    assert path.stat().st_size > 0


def test_denoise_probe_tells_whether_the_prompt_steers_the_motion():
    from benchmarks import denoise
    from datamodules.synthetic.generate import make_clip
    from datamodules.synthetic.world import world_config
    from lightning_vigu.flows.convention import FlowPrediction
    from lightning_vigu.module import UniViGU

    assert denoise.reverse_directions("a red cross drifts to the left, a square moving upward") == (
        "a red cross drifts to the right, a square moving downward"
    )
    world = world_config("cpu")
    made = [make_clip(world, 0, "test", i) for i in range(12)]
    made = [(v, r) for v, r in made if denoise.moving_mention(r)][:4]
    videos = torch.stack(
        [torch.from_numpy(v).permute(3, 0, 1, 2).float() / 127.5 - 1 for v, _ in made]
    )
    records = [r for _, r in made]
    for video, r in zip(videos, records):  # the real clip travels as its record says
        obj = denoise.moving_mention(r)
        (x0, y0), (x1, y1) = obj["centre_start"], obj["centre_end"]
        assert denoise.travel(video, r, obj) == pytest.approx(abs(x1 - x0) + abs(y1 - y0), abs=1.2)
    clips = {"video": videos, "prompt": [r["prompt"] for r in records], "meta": records}
    module = UniViGU(size="tiny", video_shape=(16, 32, 32), prompt_length=24, caption_length=8)
    clean = module.codec.encode(videos)
    told = module.encode_prompts(clips["prompt"])

    def oracle(obeys: bool):  # the clean clip; played backwards for reversed prompts if obeys
        def flow(x_t, t, context, *args):
            x = clean.flip(2) if obeys and not torch.equal(context, told) else clean
            return FlowPrediction(
                velocity=(x - x_t) / (1 - t.view(-1, 1, 1, 1, 1)), text_logits=None
            )

        return flow

    module.flow = oracle(obeys=False)
    (deaf,), _ = denoise.probe(module, clips, times=(0.05,))
    module.flow = oracle(obeys=True)
    (steered,), _ = denoise.probe(module, clips, times=(0.05,))
    assert deaf["travel"] > 3 and deaf["travel_reversed_prompt"] == deaf["travel"]
    assert steered["travel"] == deaf["travel"]
    assert steered["travel_reversed_prompt"] == pytest.approx(-steered["travel"])


def test_motion_probe_reads_real_clips_exactly_and_writes_its_table(tmp_path):
    from benchmarks import motion

    motions = list(motion.MOTIONS) * 2
    clips = motion.render(motions, frames=4, travel=12.0, rng=np.random.default_rng(0))
    assert motion.classify(clips, travel=12.0) == motions
    moving = [i for i, m in enumerate(motions) if m != "still"]
    travelled = motion.along(clips[moving], [motions[i] for i in moving])
    assert torch.allclose(travelled, torch.full_like(travelled, 12.0), atol=0.05)
    assert motion.classify(torch.full_like(clips[:1], -1.0), travel=12.0) == ["none"]
    args = ["--steps", "2", "--frames", "2", "--batch", "4", "--guidance", "3", "1"]
    motion.main([*args, "--loss-weighting", "data", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "motion_positions_weightdata_cpu.json").read_text())
    assert 0.0 <= result["motion_accuracy"] <= 1.0 and sum(result["drawn"].values()) == 60
    by_scale = result["motion_accuracy_by_guidance"]
    assert set(by_scale) == {"3.0", "1.0"} and by_scale["3.0"] == result["motion_accuracy"]
    assert result["args"]["loss_weighting"] == "data"
    assert [r["t"] for r in result["rows"]] == list(motion.TIMES) and result["steps"] == 2
    # a wall-clock budget plans the schedule's length from the first 50 steps (at least 100)
    module = motion.build(frames=2, video_positions=True, seed=0)
    loss, steps = motion.train(module, 1000, 2, 12.0, batch=2, seed=0, minutes=1e-4)
    assert steps == 100 and math.isfinite(loss)
    spanning = motion.build(frames=2, video_positions=True, seed=0, patch_size=(2, 2, 2))
    assert tuple(spanning.model.config.patch_size) == (2, 2, 2)  # a token spans two frames
    # --colours: each square in a named colour, the prompt naming it; the recipe's rope
    green = motion.render(["left"], 4, 12.0, np.random.default_rng(0), colours=["green"])
    red = motion.render(["left"], 4, 12.0, np.random.default_rng(0))
    assert torch.equal(green[:, 1], red[:, 0]) and (green[:, [0, 2]] == -1).all()
    assert motion.prompt("left", "green") == "a green square moves left"
    assert list(motion.COLOURS)[0] == "red" and motion.COLOURS["yellow"] == (1, 1, 0)
    extra = ["--colours", "3", "--video-rope", "mixed", "--pooled-prompt", "--out", str(tmp_path)]
    motion.main([*args, *extra])
    result = json.loads(
        (tmp_path / "motion_positions_pooled_ropemixed_colours3_cpu.json").read_text()
    )
    assert result["args"]["colours"] == 3 and result["args"]["video_rope"] == "mixed"
    # --speeds: a slow square travels half as far, the prompt says which; real clips score 1
    assert motion.prompt("left", speed="slow") == "a red square moves slowly left"
    assert motion.prompt("still", speed="fast") == "a red square does not move"
    asked = [("left", "slow"), ("up", "fast"), ("still", None), ("right", "slow")]
    travels = [12.0 * motion.SPEEDS[v] if v else 12.0 for _, v in asked]
    clips = motion.render([m for m, _ in asked], 4, travels, np.random.default_rng(0))
    assert motion.classify(clips, 12.0, still_below=0.25) == [m for m, _ in asked]
    gone = motion.along(clips, [m for m, _ in asked]).tolist()
    assert gone == pytest.approx([6.0, 12.0, 0.0, 6.0], abs=0.05)
    motion.main([*args, "--speeds", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "motion_positions_speeds_cpu.json").read_text())
    assert 0.0 <= result["speed_accuracy"] <= 1.0 and sum(result["drawn"].values()) == 108
    assert {"travel_ratio_slow", "travel_ratio_fast"} <= set(result)
    speed = result["speed_by_guidance"]
    assert (
        set(speed) == {"3.0", "1.0"} and speed["3.0"]["speed_accuracy"] == result["speed_accuracy"]
    )


def test_a_timed_stage_checkpoints_by_training_time(tmp_path, monkeypatch):
    """A quality stage with a wall-clock budget writes its last.ckpt every CHECKPOINT_SECONDS
    of training (Lightning's ``train_time_interval``, parsed from the overlay by the CLI), not
    every N steps; an untimed stage keeps its step interval."""
    import datetime

    from lightning_vigu.cli import ViGUCLI

    monkeypatch.setattr("sys.argv", ["lightning_vigu"])
    cmd = quality.stage_command(tmp_path, "generator", quality.PRESETS["gpu"])
    cli = ViGUCLI(args=["-c", "conf/generator.yaml", "-c", cmd[-1]], run=False)  # its overlay
    ckpt = cli.trainer.checkpoint_callback
    seconds = datetime.timedelta(seconds=quality.CHECKPOINT_SECONDS)
    assert ckpt._train_time_interval == seconds and not ckpt._every_n_train_steps
    toy = quality.stage_command(tmp_path / "toy", "generator", quality.PRESETS["toy"])
    written = yaml.safe_load(Path(toy[-1]).read_text())["trainer"]["callbacks"][0]["init_args"]
    assert "train_time_interval" not in written and written["every_n_train_steps"] >= 1


def test_quality_stages_start_after_the_stage_they_start_from(tmp_path):
    """A stage trains in its waves from its ``init`` stage's last checkpoint: that stage must
    have finished in an earlier wave, and every wave is one ``--waves`` can ask for."""
    for name, stage in quality.STAGES.items():
        assert set(stage.waves) <= set(quality.WAVES), name
        assert list(stage.waves) == sorted(stage.waves), name
        if stage.init:
            assert quality.STAGES[stage.init].waves[-1] < stage.waves[0], name
    # an ablation's own overrides come after the preset's (the generator_b64 batch wins)
    cmd = quality.stage_command(tmp_path, "generator_b64", quality.PRESETS["gpu"])
    assert cmd.index("--data.init_args.batch_size=64") > cmd.index(
        "--data.init_args.batch_size=256"
    )


def test_a_stage_that_fails_stops_its_wave_at_once(tmp_path, monkeypatch):
    """Stages side by side are watched together: one that fails at its start stops the others
    (their seconds kept for their resumption) and raises with its log, instead of the suite
    waiting out the others' budgets first."""
    import time

    commands = {
        "generator": [sys.executable, "-c", "import time; time.sleep(120)"],
        "arcap": [sys.executable, "-c", "raise SystemExit('the optimiser refused to clip')"],
    }

    def stage_command(work, name, preset):  # as the real one, which writes the stage's overlay
        (work / name).mkdir(exist_ok=True)
        return commands[name]

    monkeypatch.setattr(quality, "stage_command", stage_command)
    monkeypatch.setattr(quality, "POLL_SECONDS", 0.1)
    began = time.time()
    with pytest.raises(RuntimeError, match=r"training 'arcap' failed[\s\S]*refused to clip"):
        quality.train_waves(tmp_path, ["generator", "arcap"], {"minutes": 1.0}, (1, 2))
    assert time.time() - began < 60
    assert float((tmp_path / "generator" / "partial_seconds.txt").read_text()) < 60
    assert not (tmp_path / "generator" / "train_seconds.txt").exists()  # not finished
