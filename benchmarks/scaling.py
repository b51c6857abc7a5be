"""Scaling suite: quality vs model size and vs training steps on the synthetic world.

    python -m benchmarks.scaling run --preset gpu --work runs/scaling       # on one GPU (device)
    python -m benchmarks.scaling report --raw runs/scaling/scaling_raw.json  # table + plot
    python -m benchmarks.scaling all --preset toy                           # CPU smoke test

``run`` trains each size from scratch with the same recipe (``conf/recall.yaml``: both
directions at once, the same data, batch, learning rate and schedule) through the real CLI,
keeping a checkpoint at every ``eval_every`` steps, then scores every kept checkpoint on the test
split: caption attribute accuracy (parser), prompt adherence (detector) and joint agreement.
The x axes are optimiser steps and training seconds, so a reader can compare sizes at equal
steps or at equal compute. A size whose ``max_time`` runs out before ``steps`` is scored at the
checkpoints it reached. Finished sizes are skipped, a size cut off part-way resumes from its
``last.ckpt`` and already-scored checkpoints are not scored again, so a run split over several
device calls goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
import yaml

from benchmarks.common import (
    ROOT,
    evaluate_checkpoint,
    loss_curve,
    markdown_table,
    run_then_report,
    run_training,
    stage_overlay,
    stamp,
    write_results,
)

PRESETS = {
    # The world at 16x32x32 (256 video tokens per clip) keeps steps cheap enough for three sizes
    # in a few device minutes; the detector and parser are exact at this resolution too.
    "gpu": dict(
        sizes=["tiny", "small", "base"],
        steps=3200,
        eval_every=400,
        max_time="00:00:02:30",
        eval_clips=128,
        sample_steps=20,
        data=dict(num_train=20000, batch_size=64, num_workers=8, pin_memory=True),
        model={
            "model.lr": 5.0e-4,
            "model.warmup_steps": 200,
            "model.sampler": {
                "video_steps": 20,
                "text_steps": 20,
                "shift": 3.0,
                "guidance_scale": 3.0,
                "temperature": 0.5,
            },
            "model.compile": "model",
            "model.optimizer.init_args.fused": True,
            "trainer.accelerator": "gpu",
            "trainer.precision": "bf16-mixed",
        },
    ),
    "toy": dict(
        sizes=["tiny"],
        steps=4,
        eval_every=2,
        max_time=None,
        eval_clips=4,
        sample_steps=2,
        data=dict(num_train=64, num_val=8, num_test=8, num_unseen=8, num_workers=0),
        model={"model.sampler": {"video_steps": 2, "text_steps": 2}},
    ),
}
METRICS = ["v2t/attr_accuracy", "t2v/adherence_accuracy", "joint/agreement"]


def data_args(preset: dict) -> dict:
    """The synthetic world's init args used for training and scoring (the CPU-resolution world)."""
    cfg = yaml.safe_load((ROOT / "conf/data/synthetic_cpu.yaml").read_text())["init_args"]
    return {**cfg, **preset["data"]}


def size_overlay(work: Path, size: str, preset: dict) -> Path:
    """The per-size model/data overlay (dotted keys, like ``conf/gpu.yaml``)."""
    cfg = {"model.size": size, **preset["model"]}
    cfg.update({f"data.init_args.{k}": v for k, v in preset["data"].items()})
    path = work / size / "size.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(work: Path, size: str, preset: dict) -> None:
    """Train one size through the CLI (finished sizes are skipped, cut-off ones resume)."""
    cmd = [sys.executable, "-m", "lightning_vigu", "fit", "-c", "conf/recall.yaml"]
    cmd += ["-c", str(size_overlay(work, size, preset)), "--init_from=null"]  # from scratch
    overlay = stage_overlay(
        work, size, preset["steps"], preset["max_time"], preset["eval_every"], keep_all=True
    )
    cmd += ["-c", str(overlay)]
    if not (work / size / "train_seconds.txt").is_file():
        (work / size / "max_time.txt").write_text(f"{preset['max_time']}\n")
    run_training(work, size, cmd)


def checkpoints(work: Path, size: str) -> list[tuple[int, Path]]:
    """``(step, path)`` of the kept interval checkpoints of one size, by step."""
    found = []
    for path in (work / size / "checkpoints").glob("step=*.ckpt"):
        m = re.fullmatch(r"step=(\d+)(-v\d+)?\.ckpt", path.name)
        if m and not m.group(2):
            found.append((int(m.group(1)), path))
    return sorted(found)


def parameter_count(ckpt: Path) -> int:
    """Parameters of the unified model (video path + caption stream) in a checkpoint."""
    # memory-mapped: only the tensors' sizes are read, not a checkpoint of a GiB or more
    state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)["state_dict"]
    return sum(v.numel() for k, v in state.items() if k.startswith("model."))


def seconds_per_step(kept: list[tuple[int, Path]]) -> float | None:
    """Training seconds per step, from the write times of the first and last kept checkpoints
    (start-up, data generation and validation before the first one are left out)."""
    if len(kept) < 2:
        return None
    (s0, p0), (s1, p1) = kept[0], kept[-1]
    return (p1.stat().st_mtime - p0.stat().st_mtime) / (s1 - s0)


def run(args) -> Path:
    preset = dict(PRESETS[args.preset])
    if args.max_time:
        preset["max_time"] = args.max_time
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LIGHTNING_VIGU_CACHE", str(work / "cache"))
    sizes = args.sizes or preset["sizes"]
    for size in sizes:
        train(work, size, preset)
    raw_path = work / "scaling_raw.json"
    raw = json.loads(raw_path.read_text()) if raw_path.is_file() else {"sizes": {}}
    world = data_args(preset)
    for size in sizes:
        entry = raw["sizes"].setdefault(size, {"evals": {}})
        kept = checkpoints(work, size)
        if not kept:
            print(f"[scaling] {size}: no checkpoint reached; nothing to score", flush=True)
            continue
        entry["parameters"] = parameter_count(kept[-1][1])
        entry["seconds_per_step"] = seconds_per_step(kept)
        if (work / size / "max_time.txt").is_file():
            entry["max_time"] = (work / size / "max_time.txt").read_text().strip()
        entry["loss"] = loss_curve(work, size)
        for step, path in kept:
            if str(step) in entry["evals"]:
                continue
            res = evaluate_checkpoint(
                path,
                world,
                preset["eval_clips"],
                preset["sample_steps"],
                splits=("test",),
                label=f"{size}@{step}",
            )["test"]
            entry["evals"][str(step)] = res.metrics
            entry["stamp"] = stamp()
            raw.update(stamp=stamp(), preset={k: v for k, v in preset.items() if k != "model"})
            raw_path.write_text(json.dumps(raw, indent=1))
    return raw_path


def rows_of(raw: dict) -> list[dict]:
    """One row per (size, step)."""
    rows = []
    for size, entry in raw["sizes"].items():
        per_step = entry.get("seconds_per_step")
        for step, res in sorted(entry.get("evals", {}).items(), key=lambda kv: int(kv[0])):
            rows.append(
                {
                    "size": size,
                    "params_M": entry.get("parameters", 0) / 1e6,
                    "step": int(step),
                    "max_time": entry.get("max_time"),
                    "train_s": per_step * int(step) if per_step else None,
                    **{m: res.get(m) for m in METRICS},
                }
            )
    return rows


def report(raw_path: Path, out_dir: Path | None = None) -> Path:
    """The table (JSON + markdown) and ``scaling.png``: each metric vs steps, a line per size."""
    raw = json.loads(Path(raw_path).read_text())
    rows = rows_of(raw)
    m = raw.get("stamp") or {}
    p = raw.get("preset") or {}
    head = (
        "# Scaling (synthetic world, 16x32x32 clips)\n\n"
        f"Trained and scored on {m.get('machine')} (commit {m.get('commit')}, {m.get('date')}). "
        f"Each size trained from scratch with `conf/recall.yaml` (both directions), batch "
        f"{(p.get('data') or {}).get('batch_size')}, at most {p.get('steps')} steps or its "
        "`max_time` (h:m:s, start-up and compilation included) of training; "
        f"scored on {p.get('eval_clips')} test clips "
        f"with {p.get('sample_steps')} sampling steps. `train_s` = step x the seconds per step "
        "measured between the first and last kept checkpoints (validation included).\n\n"
    )
    runs = "".join(
        f"- `{size}`: {e['stamp']['machine']}, commit {e['stamp']['commit']}, {e['stamp']['date']}\n"
        for size, e in raw["sizes"].items()
        if e.get("stamp")
    )
    head += (
        f"Per size (a run split over device calls can differ by call):\n\n{runs}\n" if runs else ""
    )
    table = markdown_table(rows, ["size", "params_M", "max_time", "step", "train_s", *METRICS])
    out = write_results("scaling", {"preset": p, "rows": rows, "raw": raw}, head + table, out_dir)
    plot(rows, Path(out).parent)
    print(table)
    return out


def plot(rows: list[dict], out_dir: Path) -> None:
    """``scaling.png``: one panel per metric, quality vs steps, one line per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(12, 3.5))
    for ax, metric in zip(axes, METRICS):
        for size in dict.fromkeys(r["size"] for r in rows):
            pts = [
                (r["step"], r[metric]) for r in rows if r["size"] == size and r[metric] is not None
            ]
            if pts:
                params = next(r["params_M"] for r in rows if r["size"] == size)
                ax.plot(*zip(*pts), marker="o", label=f"{size} ({params:.1f}M)")
        ax.set_title(metric), ax.set_xlabel("step"), ax.set_ylim(0, 1), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "scaling.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("part", choices=["run", "report", "all"])
    p.add_argument("--preset", default="toy", choices=sorted(PRESETS))
    p.add_argument("--sizes", nargs="+", default=None, help="override the preset's sizes")
    p.add_argument("--max-time", default=None, help="override the preset's training time per size")
    p.add_argument("--work", default="runs/scaling")
    p.add_argument("--raw", default=None, help="scaling_raw.json for 'report'")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    run_then_report(p.parse_args(argv), run, report, "scaling_raw.json")


if __name__ == "__main__":
    main()
