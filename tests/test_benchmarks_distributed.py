"""The several-device suite's toy preset on CPU (gloo, 2 processes): DDP curves, scaling, the
checkpoint / resume path of the FSDP part (Lightning's FSDP needs a GPU), the memory table and
the command-line run that ends in generate and caption."""

from __future__ import annotations

import json
import os

from benchmarks import distributed


def test_toy_preset_runs_all_parts_on_two_gloo_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LIGHTNING_VIGU_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    distributed.main(["all", "--preset", "toy", "--work", str(tmp_path), "--out", str(out)])
    for key in distributed.NO_MULTICAST:
        assert key in os.environ
    parts = {
        p: json.loads((out / f"distributed_{p}_toy.json").read_text()) for p in distributed.PARTS
    }
    assert all("machine" in p["stamp"] and "commit" in p["stamp"] for p in parts.values())

    (curves,) = parts["ddp_curves"]["rows"]
    assert "error" not in curves, curves
    steps = distributed.PRESETS["toy"]["curves"].steps
    assert len(curves["losses_2ranks"]) == len(curves["losses_1rank"]) == steps
    assert len(curves["losses_1rank_seed1"]) == steps
    assert curves["rank_overlap_per_epoch"] == 0 and curves["same_batches_as_1rank"] is True
    # the noise floor: same weights and batches, other per-step draws, so the losses differ
    assert 0 < curves["floor_median_rel_diff"] <= curves["floor_max_rel_diff"]
    assert 0 < curves["floor_mean_rel_diff"] <= curves["floor_max_rel_diff"]
    # 2 ranks against 1: the same data, other noise, so differences of the floor's order. A fresh
    # model's per-step loss is heavy-tailed (one draw near the end of its times can multiply it:
    # 4.2 against 1.2 at 1911eae), so the median step is compared, not the worst or the mean
    assert 0 <= curves["median_rel_diff"] <= curves["max_rel_diff"]
    assert curves["median_rel_diff"] < 2 * curves["floor_median_rel_diff"], curves

    evaluation = {r["metric"]: r for r in parts["ddp_eval"]["rows"]}
    assert "error" not in evaluation.get("all", {}), evaluation
    assert evaluation["val/num_videos"]["1_rank"] == distributed.PRESETS["toy"]["eval_clips"]
    assert evaluation["val/v2t/attr_ceiling"]["1_rank"] > 0  # the world's records are there
    for key, row in evaluation.items():  # the evaluation's numbers, not the noisy val losses
        if key.split("/")[1] in ("v2t", "t2v", "joint", "num_videos"):
            assert row["abs_diff"] == 0 and row["ranks_agree"], row

    scaling = parts["ddp_scaling"]["rows"]
    assert [r["ranks"] for r in scaling] == [1, 2]
    assert all(r["examples_per_s"] > 0 for r in scaling) and scaling[1]["speedup"] > 0

    (fsdp,) = parts["fsdp"]["rows"]
    assert "error" not in fsdp, fsdp
    assert fsdp["strategy"].startswith("ddp") and "FSDP needs a GPU" in fsdp["strategy"]
    assert fsdp["resumed_steps"] == [2, 3]
    assert fsdp["resume_max_rel_diff"] < 1e-5  # same batches and per-step randomness
    assert fsdp["loads_for_sampling"] is True  # with the injected parts passed again

    (memory,) = parts["memory"]["rows"]
    assert "error" not in memory, memory
    assert memory["seconds"] > 0 and memory["params_b"] > 0

    (cli,) = parts["fsdp_cli"]["rows"]
    assert "error" not in cli, cli
    assert cli["checkpoint"] == "file" and cli["generated"] == "0000.mp4"  # DDP on CPU: one file
    assert isinstance(cli["caption"], str)


def test_only_keeps_the_cases_whose_label_matches():
    gpu = distributed.PRESETS["gpu"]
    cut = distributed.select(gpu, ["17x480x832"])
    assert [c.label for c in cut["fsdp"]] == ["17x480x832"]
    assert [c.label for _, c in cut["memory"]] == [
        "full 17x480x832",
        "refine_frozen 17x480x832",
        "lora 17x480x832",
    ]
    assert [c.label for c in cut["scaling"]] == ["wan1.3b 17x480x832"]
    assert cut["curves"] is gpu["curves"] and distributed.select(gpu, None) is gpu
