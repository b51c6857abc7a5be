"""Quality suite: does it learn both directions, and does understanding cost generation anything?

    python -m benchmarks.quality run --preset gpu --work runs/quality     # on one GPU (device)
    python -m benchmarks.quality report --raw runs/quality/quality_raw.json  # caption metrics, table, plots
    python -m benchmarks.quality all --preset toy                         # CPU smoke test

``run`` trains through the real entry points (``python -m lightning_vigu fit -c conf/...``):

1. ``generator``  -- the video path alone (the stand-in for a pretrained Wan);
2. ``twin``       -- the generator trained on for as many steps as Knowledge Recall takes,
   generation only: baseline (a), the claim being that understanding costs generation nothing;
3. ``recall``     -- Knowledge Recall from the generator;
4. ``refine``     -- Capability Refinement from recall (video path frozen);
5. ``arcap``      -- baseline (b): an autoregressive captioner with the caption budget of
   recall + refine;

then evaluates every stage on the test split and the held-out-combinations (``unseen``) split:
caption attribute accuracy (parser), prompt adherence (detector), FVD against real clips of the
same split, joint agreement. A finished stage is skipped, a stage cut off part-way resumes from
its ``last.ckpt`` and an evaluated stage is not evaluated again, so a run split over several
device calls (``--skip-eval`` for the training-only calls) goes on where the last one stopped.
``report`` adds BLEU-4 / METEOR / ROUGE-L / CIDEr-D (pycocoevalcap, Java) from the kept
predictions and writes the table, the plots and the sample grid (``quality_samples.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

import torch
import yaml
from torch import Tensor

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
    # steps per stage; eval clips per split; sampling steps; extra CLI overrides
    "gpu": dict(
        max_time="00:00:02:30",
        arcap_overlay=[
            "--data=conf/data/synthetic_gpu.yaml",
            "--trainer.accelerator=gpu",
            "--trainer.precision=bf16-mixed",
            "--model.size=small",
            "--model.caption_length=48",
            "--model.warmup_steps=200",
            "--model.lr=5e-4",
        ],
        generator=1500,
        recall=1500,
        refine=800,
        arcap=2300,
        eval_clips=128,
        sample_steps=30,
        overlay=["-c", "conf/gpu.yaml"],
    ),
    "toy": dict(
        generator=6,
        recall=6,
        refine=4,
        arcap=10,
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
    ),
}
STAGES = ("generator", "twin", "recall", "refine", "arcap")


def train(work: Path, stage: str, preset: dict) -> Path:
    """Train one quality stage through the CLI (see :func:`run_training`)."""
    g, r = work / "generator/checkpoints/last.ckpt", work / "recall/checkpoints/last.ckpt"
    steps = {"twin": preset["recall"]}.get(stage, preset.get(stage))
    extra = {
        "generator": ["fit", "-c", "conf/generator.yaml"],
        "twin": ["fit", "-c", "conf/generator.yaml", f"--init_from={g}"],
        "recall": ["fit", "-c", "conf/recall.yaml", f"--init_from={g}"],
        "refine": ["fit", "-c", "conf/refine.yaml", f"--init_from={r}"],
        "arcap": ["fit", "-c", "conf/arcap.yaml"],
    }[stage]
    module = "benchmarks.baselines" if stage == "arcap" else "lightning_vigu"
    # the baseline takes data/trainer settings but no UniViGU model options
    overlay = preset["arcap_overlay"] if stage == "arcap" else preset["overlay"]
    cmd = [sys.executable, "-m", module, *extra, *overlay]
    cmd += ["-c", str(stage_overlay(work, stage, steps, preset.get("max_time")))]
    return run_training(work, stage, cmd)


SAMPLES = 4  # clips per split whose generated videos and captions go into the sample grid


def evaluate_stage(work: Path, stage: str, preset: dict, data_args: dict, fvd) -> dict:
    """Evaluate one stage's ``last.ckpt`` on the test and unseen splits; its samples are added
    to ``<work>/samples.pt`` (uint8 videos and texts, rendered by ``report``)."""
    ckpt = work / stage / "checkpoints" / "last.ckpt"
    out = evaluate_checkpoint(
        ckpt,
        data_args,
        preset["eval_clips"],
        preset["sample_steps"],
        fvd,
        label=stage,
        baseline=stage == "arcap",
        keep_samples=SAMPLES,
    )
    path = work / "samples.pt"
    kept = torch.load(path, weights_only=False) if path.is_file() else {}
    samples = {split: res.pop("_samples", {}) for split, res in out.items()}
    kept[stage] = {"test": samples.get("test", {})}  # the grid shows the test split
    torch.save(kept, path)
    return out


def run(args) -> Path:
    preset = PRESETS[args.preset]
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LIGHTNING_VIGU_CACHE", str(work / "cache"))
    for stage in args.stages:
        if stage == "twin":
            train(work, "generator", preset)
        if stage == "refine":
            train(work, "recall", preset)
        train(work, stage, preset)
    if args.skip_eval:
        return work / "quality_raw.json"
    data_cfg = yaml.safe_load(
        (
            ROOT
            / "conf/data"
            / ("synthetic_gpu.yaml" if args.preset == "gpu" else "synthetic_cpu.yaml")
        ).read_text()
    )["init_args"]
    if args.preset == "toy":
        data_cfg.update(num_train=64, num_test=8, num_unseen=8)
    fvd = None
    if args.i3d_weights and Path(args.i3d_weights).is_file():
        from lightning_vigu.metrics import FrechetVideoDistance, FVDProtocol

        fvd = FrechetVideoDistance(
            i3d_weights=args.i3d_weights,
            protocol=FVDProtocol(real_set="synthetic world, same split, same prompts"),
        ).to("cuda" if torch.cuda.is_available() else "cpu")
    raw_path = work / "quality_raw.json"
    raw = json.loads(raw_path.read_text()) if raw_path.is_file() else {"stages": {}}
    for stage in args.stages:
        if stage in raw["stages"] and not args.reevaluate:
            continue
        seconds = (
            (work / stage / "train_seconds.txt").read_text().strip()
            if (work / stage / "train_seconds.txt").is_file()
            else None
        )
        raw["stages"][stage] = {
            "eval": evaluate_stage(work, stage, preset, data_cfg, fvd),
            "loss": loss_curve(work, stage),
            "train_seconds": seconds,
        }
        raw.update(
            stamp=stamp(),
            preset={k: v for k, v in preset.items() if k != "overlay"},
            fvd_protocol=fvd.protocol_dict() if fvd else None,
        )
        raw_path.write_text(json.dumps(raw, indent=1, default=str))
    return raw_path


def report(raw_path: Path, out_dir: Path | None = None) -> Path:
    """Caption metrics from the kept predictions, the results table and the plots."""
    from lightning_vigu.metrics import CaptionMetrics

    raw = json.loads(Path(raw_path).read_text())
    rows = []
    order = sorted(raw["stages"], key=lambda s: STAGES.index(s) if s in STAGES else len(STAGES))
    for stage in order:
        for split, res in raw["stages"][stage]["eval"].items():
            preds = res.pop("_predictions_v2t", None)
            if preds:
                metric = CaptionMetrics()
                metric.update([p for _, p in preds], [[r] for r, _ in preds])
                res.update({f"v2t/{k}": float(v) for k, v in metric.compute().items()})
                res["caption_examples"] = preds[:6]
            rows.append(
                {
                    "stage": stage,
                    "split": split,
                    "steps": max(
                        (c[-1][0] for c in raw["stages"][stage].get("loss", {}).values() if c),
                        default=None,
                    ),
                    **{k: v for k, v in res.items() if isinstance(v, float)},
                }
            )
    cols = [
        "stage",
        "split",
        "steps",
        "v2t/attr_accuracy",
        "v2t/cider",
        "v2t/bleu4",
        "v2t/meteor",
        "t2v/adherence_accuracy",
        "t2v/fvd",
        "joint/agreement",
    ]
    table = markdown_table(rows, cols)
    payload = {
        "measured_on": raw.get("stamp"),
        "preset": raw.get("preset"),
        "fvd_protocol": raw.get("fvd_protocol"),
        "rows": rows,
        "stages": raw["stages"],
    }
    m = raw.get("stamp") or {}
    head = (
        "# Quality (synthetic world)\n\n"
        f"Trained and evaluated on {m.get('machine')} (commit {m.get('commit')}, {m.get('date')}); "
        "BLEU-4 / METEOR / CIDEr-D computed from the kept captions by `report` on the machine "
        f"in the stamp above. Budget per stage: {raw.get('preset', {}).get('max_time')} (h:m:s) of "
        f"training or the stage's step limit ({raw.get('preset', {}).get('eval_clips')} clips per "
        "split scored; `steps` = the last logged step); FVD protocol in quality.json.\n\n"
    )
    out = write_results("quality", payload, head + table, out_dir)
    plot(raw, rows, Path(out).parent)
    samples = Path(raw_path).parent / "samples.pt"
    if samples.is_file():
        sample_grid(torch.load(samples, weights_only=False), Path(out).parent)
    print(table)
    return out


def plot(raw: dict, rows: list[dict], out_dir: Path) -> None:
    """Loss curves per stage and metric bars per stage/split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
    for stage, data in raw["stages"].items():
        for key, curve in data.get("loss", {}).items():
            if key in ("train/loss_video", "train/loss_text") and curve:
                s, v = zip(*curve)
                ax[0 if key.endswith("video") else 1].plot(s, v, label=stage)
    for a, title in zip(ax, ("video loss", "caption loss")):
        a.set_title(title), a.set_xlabel("step"), a.legend(fontsize=7)
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
        t = video.shape[1]
        idx = [round(i * (t - 1) / max(frames - 1, 1)) for i in range(frames)]
        return torch.cat([video[:, i] for i in idx], dim=2).permute(1, 2, 0).numpy()

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
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
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
