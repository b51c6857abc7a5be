"""Shared helpers of the benchmark suites: run stamps, JSON/markdown results, timing, and
training / scoring runs through the real CLI (used by the quality and scaling suites)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from torch import Tensor

if TYPE_CHECKING:
    from callbacks.evaluation import EvalResult

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """A one-line description of the machine (GPU name when there is one)."""
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{torch.cuda.device_count()}x {p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}, torch {torch.__version__}"


def commit(root: Path | None = None) -> str:
    """The git commit of the repo at ``root`` (default: this one), with ``+uncommitted`` when
    tracked files outside ``benchmarks/results`` differ from it (a copy of the tree whose git metadata lags, as on a remote
    machine, must not pass for the commit); ``$LIGHTNING_VIGU_COMMIT`` when set; ``unknown``
    outside a checkout."""
    env = os.environ.get("LIGHTNING_VIGU_COMMIT")
    if env:
        return env

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=root or RESULTS.parent, timeout=10
        )
        return out.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        if not head:
            return "unknown"
        # results written by an earlier benchmark of the same tree do not count
        changed = git(
            "status", "--porcelain", "-uno", "--", ":/", ":(top,exclude)benchmarks/results"
        )
        return head + ("+uncommitted" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stamp() -> dict:
    """Machine, commit and date of a result."""
    return {
        "machine": machine(),
        "commit": commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_results(name: str, payload: dict, table: str, out_dir: Path | None = None) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` (the table under a stamp) and return the json path."""
    out = Path(out_dir or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"stamp": stamp(), **payload}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    s = payload["stamp"]
    (out / f"{name}.md").write_text(
        f"<!-- {s['machine']} | commit {s['commit']} | {s['date']} -->\n\n{table}\n"
    )
    return out / f"{name}.json"


def frame_strip(video: Tensor, frames: int = 4) -> Tensor:
    """``frames`` evenly spaced frames of a ``(C, T, H, W)`` video side by side: ``(H, frames*W,
    C)``, for a picture cell."""
    idx = [round(i * (video.shape[1] - 1) / max(frames - 1, 1)) for i in range(frames)]
    return torch.cat([video[:, i] for i in idx], dim=2).permute(1, 2, 0)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of ``rows`` over ``columns`` (floats with 3 significant digits)."""

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def timed(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Mean seconds per call of ``fn`` after ``warmup`` calls (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def run_then_report(args, run: Callable, report: Callable, raw_name: str) -> None:
    """The ``run`` / ``report`` / ``all`` parts of a suite's command line: ``run`` trains and
    scores into ``<work>/<raw_name>``, ``report`` turns that file into the result files."""
    raw = Path(args.raw) if args.raw else None
    if args.part in ("run", "all"):
        raw = run(args)
    if args.part in ("report", "all"):
        report(raw or Path(args.work) / raw_name, Path(args.out) if args.out else RESULTS)


def stage_overlay(
    work: Path,
    stage: str,
    steps: int,
    max_time: str | None = None,
    every_n: int | None = None,
    keep_all: bool = False,
    minutes: float | None = None,
    ema: bool = False,
    every_s: float | None = None,
) -> Path:
    """A per-stage config overlay: run folder, CSV logs, a last.ckpt, no progress bars.

    ``every_n`` sets the checkpoint interval (default a tenth of the run), or ``every_s`` in
    seconds of training (``ModelCheckpoint(train_time_interval=...)``); ``keep_all`` keeps
    every interval checkpoint (``step=N.ckpt``) rather than only ``last.ckpt``. ``minutes``
    plans the run's length from a wall-clock budget (:class:`callbacks.TimeBudget`: the lr
    schedule ends at the last step; ``steps`` is then an upper bound) and turns validation off
    (the suites evaluate afterwards); ``ema`` keeps EMA weights (:class:`callbacks.EMA`), which
    the checkpoint then holds as its weights.
    """
    d = work / stage
    d.mkdir(parents=True, exist_ok=True)
    if every_s:
        interval = {"train_time_interval": str(_dt.timedelta(seconds=every_s))}
    else:
        interval = {"every_n_train_steps": every_n or max(steps // 10, 1)}
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(d / "checkpoints"),
                "save_last": True,
                "save_top_k": -1 if keep_all else 0,
                "filename": "{step}",
                **interval,
            },
        }
    ]
    if ema:
        callbacks.append({"class_path": "callbacks.EMA", "init_args": {"decay": 0.999}})
    if minutes:
        callbacks.append({"class_path": "callbacks.TimeBudget", "init_args": {"minutes": minutes}})
    trainer = {
        "max_steps": steps,
        "default_root_dir": str(d),
        "val_check_interval": max(steps // 2, 1),
        "enable_progress_bar": False,
        "logger": [
            {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(d), "name": "", "version": ""},
            }
        ],
        "callbacks": callbacks,
        "max_time": max_time,
    }
    if minutes:
        trainer["limit_val_batches"] = 0
    path = d / "overlay.yaml"
    path.write_text(yaml.safe_dump({"trainer": trainer}))
    return path


def start_training(work: Path, name: str, cmd: list[str]) -> subprocess.Popen | None:
    """Start one training command (a stage, a size) in the background, unless it finished
    before (then ``None``); its output goes to ``<work>/<name>/train.log``.

    A run is finished when ``<work>/<name>/train_seconds.txt`` exists. A run stopped part-way
    (a device call that ran out of time) resumes from its ``last.ckpt``; Lightning restores the
    step, the optimiser and the callbacks' state (time budget, EMA), so it still trains for its
    budget in total. Wait for it with :func:`finish_training`.
    """
    ckpt = work / name / "checkpoints" / "last.ckpt"
    if (work / name / "train_seconds.txt").is_file():
        print(f"[bench] {name}: trained before ({ckpt}), skipping", flush=True)
        return None
    if ckpt.is_file():
        cmd = [*cmd, f"--ckpt_path={ckpt}"]
        print(f"[bench] {name}: resuming from {ckpt}", flush=True)
    print(f"[bench] {name}: {' '.join(cmd)}", flush=True)
    log = (work / name / "train.log").open("a")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    proc.started = time.time()  # type: ignore[attr-defined]
    return proc


def finish_training(work: Path, name: str, proc: subprocess.Popen | None) -> Path:
    """Wait for a run started by :func:`start_training` and record its seconds (a failed run
    raises with the end of its log); returns its ``last.ckpt``."""
    ckpt = work / name / "checkpoints" / "last.ckpt"
    if proc is None:
        return ckpt
    partial = work / name / "partial_seconds.txt"
    earlier = float(partial.read_text()) if partial.is_file() else 0.0
    code = proc.wait()
    seconds = earlier + time.time() - proc.started  # type: ignore[attr-defined]
    partial.write_text(f"{seconds:.1f}\n")
    if code != 0:
        tail = (work / name / "train.log").read_text()[-3000:]
        raise RuntimeError(f"training '{name}' failed (exit {code}); end of its log:\n{tail}")
    (work / name / "train_seconds.txt").write_text(f"{seconds:.1f}\n")
    return ckpt


def run_training(work: Path, name: str, cmd: list[str]) -> Path:
    """Run one training command to its end (see :func:`start_training`); returns its
    ``last.ckpt``."""
    return finish_training(work, name, start_training(work, name, cmd))


def loss_curve(work: Path, stage: str) -> dict[str, list]:
    """``step -> train/loss*`` from the stage's CSV log."""
    import csv

    path = work / stage / "metrics.csv"
    curves: dict[str, list] = {}
    if not path.is_file():
        return curves
    for row in csv.DictReader(path.open()):
        for key, value in row.items():
            if key.startswith("train/loss") and value:
                curves.setdefault(key, []).append((int(row["step"]), float(value)))
    return curves


def load_for_eval(ckpt: Path, device: str, baseline: bool = False, weights: str = "ema"):
    """A trained checkpoint (UniViGU, or the AR baseline when ``baseline``) and the directions
    it can be scored on. ``weights="raw"`` swaps in the live (not averaged) weights of a run
    trained with EMA (kept in the checkpoint's ``current_model_state``)."""
    if baseline:
        from benchmarks.baselines import ARCaptionerModule

        module = ARCaptionerModule.load_from_checkpoint(
            ckpt, map_location=device, weights_only=False
        ).eval()
        directions = ["v2t"]
    else:
        from lightning_vigu.cli import load_module

        module = load_module(str(ckpt), device)
        directions = ["t2v", "v2t", "joint"] if module.model.has_text else ["t2v"]
    if weights == "raw":
        state = torch.load(ckpt, map_location=device, weights_only=False).get("current_model_state")
        if state is None:
            raise ValueError(
                f"'{ckpt}' holds no live weights next to its EMA ones (trained without EMA?)"
            )
        module.load_state_dict(state, strict=False)
    elif weights != "ema":
        raise ValueError(f"weights must be 'ema' or 'raw', got '{weights}'")
    return module, directions


def evaluate_checkpoint(
    ckpt: Path,
    data_args: dict,
    eval_clips: int,
    sample_steps: int,
    fvd=None,
    splits: tuple[str, ...] = ("test", "unseen"),
    label: str = "",
    baseline: bool = False,
    keep_samples: int = 0,
    weights: str = "ema",
    directions: tuple[str, ...] | None = None,
    sampler: dict | None = None,
) -> dict[str, EvalResult]:
    """Evaluate one checkpoint on each split: ``{split: result}`` (its ``samples`` filled when
    ``keep_samples``: see :func:`callbacks.evaluation.evaluate`). ``weights`` and
    ``directions`` (default: all the checkpoint can do) as in :func:`load_for_eval`;
    ``sampler``: options of :class:`~lightning_vigu.flows.SamplerConfig` that replace the
    checkpoint's (e.g. ``{"video_eta": 1.0}``)."""
    from callbacks.evaluation import collect, evaluate
    from datamodules import SyntheticDataModule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    module, possible = load_for_eval(ckpt, device, baseline, weights)
    if sampler:
        module.sampler_config = dataclasses.replace(module.sampler_config, **sampler)
    directions = [d for d in possible if directions is None or d in directions]
    out = {}
    for split in splits:
        dm = SyntheticDataModule(
            **{**data_args, "test_split": split, "num_workers": 0, "progress": False}
        )
        dm.prepare_data()
        dm.setup("test")
        clips = collect(dm.test_dataloader(), eval_clips)
        start = time.time()
        res = evaluate(
            module,
            clips,
            directions,
            fvd=fvd if "t2v" in directions else None,
            batch_size=64,
            seed=0,
            steps=sample_steps,
            keep_samples=keep_samples,
        )
        res.metrics["eval_seconds"] = time.time() - start
        out[split] = res
        print(
            f"[eval] {label or ckpt}/{split}: "
            + ", ".join(f"{k}={v:.3f}" for k, v in res.metrics.items()),
            flush=True,
        )
    return out
