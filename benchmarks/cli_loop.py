"""The training loop through the CLI: an earlier commit's against today's, in the same run.

    git archive 583442d | tar -x -C /tmp/before     # the loop issue 15 measured (H100, 0.174 s)
    python -m benchmarks.cli_loop --before /tmp/before --sizes small base
    python -m benchmarks.cli_loop --before /tmp/a /tmp/b --before-label d1ccd57 fbbb4cd

Each run is the README's job on the GPU overlay, ``fit -c conf/recall.yaml -c conf/gpu.yaml``
(``small`` or ``base``, 64 clips of 16x64x64 a step, recall's objective, from scratch), in its own tree: its
own code, configs and data cache, as a user of that commit would run it. A run trains
``--steps`` steps on ``--num-train`` clips with :class:`benchmarks.step_timer.StepTimer` added
to its callbacks, which reads the clock after the two ``--timed`` steps (the device
synchronised there only), so the step's cost includes everything ``fit`` does per step: the
loader, Lightning's bookkeeping, the callbacks. The runs (``--loops``):

* ``before``: each ``--before`` tree as it was (a row per tree, named by ``--before-label``);
* ``now``: this tree (``conf/gpu.yaml``: ``model.compile: step`` since b6b67e5);
* ``now, cuda graphs``: this tree with ``--model.compile=cudagraphs``.

The runs go one after another, and the table is written after each. MFU counts this tree's
model FLOPs (:mod:`benchmarks.flops`) at each run's caption and prompt lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, markdown_table, write_results
from benchmarks.flops import clip_train_flops, peak_flops
from lightning_vigu.codecs.pixel import PixelCodec
from lightning_vigu.model import model_config
from lightning_vigu.phases import get_phase

_SCRATCH = ("--init_from=null",)  # conf/recall.yaml starts from the tiny prior; sizes differ
LOOPS = {
    "before": ("before", ()),
    "now": ("now", _SCRATCH),
    "now, cuda graphs": ("now", (*_SCRATCH, "--model.compile=cudagraphs")),
}
"""Each loop: the tree it runs in and its extra CLI arguments (every loop from scratch)."""


def command(a, size: str, out: Path, run: Path) -> list[str]:
    """The ``fit`` command of one run (the timer module must be importable as
    ``lv_step_timer``)."""
    overlay = [] if a.overlay == "none" else ["-c", a.overlay]
    return [
        sys.executable,
        "-m",
        "lightning_vigu",
        "fit",
        "-c",
        a.config,
        *overlay,
        f"--model.size={size}",
        f"--trainer.max_steps={a.steps}",
        f"--trainer.default_root_dir={run}",
        f"--data.init_args.num_train={a.num_train}",
        "--trainer.callbacks+=lv_step_timer.StepTimer",
        f"--trainer.callbacks.first={a.timed[0]}",
        f"--trainer.callbacks.last={a.timed[1]}",
        f"--trainer.callbacks.out={out}",
        *([f"--trainer.callbacks.profile={a.profile}"] if a.profile else []),
        *a.extra,
    ]


def step_flops(record: dict) -> float:
    """Model FLOPs of one training step of the run the timer recorded."""
    hp = record["hparams"]
    latent = PixelCodec().latent_shape(*hp["video_shape"])
    text = hp["caption_length"] if get_phase(hp.get("phase", "recall")).uses_text else 0
    return clip_train_flops(
        model_config(hp["size"]), latent, text, hp["prompt_length"], record["batch"]
    )


def runs(loops: list[str], befores: list[tuple[str, Path]]) -> list[tuple[str, Path, tuple]]:
    """``(label, tree, extra CLI arguments)`` of every run: ``before`` once per earlier tree
    (labelled with its name), the other loops in this tree."""
    out = []
    for loop in loops:
        tree_name, extra = LOOPS[loop]
        if tree_name == "before":
            out += [(label, tree, extra) for label, tree in befores]
        else:
            out.append((loop, ROOT, extra))
    return out


def run(label: str, tree: Path, extra: tuple, size: str, a, work: Path, timer_dir: Path) -> dict:
    """One ``fit`` run labelled ``label`` in ``tree``; its row (or the error and the log's
    tail)."""
    name = f"{size}-{label}".replace(", ", "-").replace(" ", "-")
    # a data cache per tree (their data formats may differ), one with --shared-cache
    cache = "shared" if a.shared_cache else "now" if tree == ROOT else name.removeprefix(f"{size}-")
    if tree != ROOT:  # a fresh copy: an earlier commit's configs may name fixed run folders
        tree = shutil.copytree(tree, work / "trees" / name, ignore=shutil.ignore_patterns("runs"))
    out = work / f"{name}.json"
    cmd = command(a, size, out, work / "runs" / name)
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != ROOT]
    env["PYTHONPATH"] = os.pathsep.join([str(timer_dir), *paths])
    env["LIGHTNING_VIGU_CACHE"] = str(work / f"cache-{cache}")
    row = {"size": size, "loop": label}
    start = time.perf_counter()
    log = work / f"{name}.log"
    with log.open("w") as f:
        try:
            proc = subprocess.run(
                [*cmd, *extra],
                cwd=tree,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=a.run_timeout,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    row["wall_s"] = time.perf_counter() - start
    if not out.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        row["error"] = f"exit {code}, no timing: " + " / ".join(tail)[-300:]
        return row
    record = json.loads(out.read_text())
    flops = step_flops(record)
    row.update(
        seconds=record["seconds"],
        examples_per_s=record["batch"] / record["seconds"],
        caption_length=record["hparams"]["caption_length"],
        tflops=flops / record["seconds"] / 1e12,
        peak_gib=record.get("peak_gib"),
        gc_ms=record.get("gc_ms_per_step"),  # the garbage collector's host time a step
        full_gcs=record.get("gc", {}).get("2", {}).get("collections"),
    )
    peak = peak_flops(record.get("device", ""))
    if peak:
        row["mfu"] = flops / record["seconds"] / peak
    return row


def befores(a) -> list[tuple[str, Path]]:
    """``(label, tree)`` of each ``--before`` tree."""
    labels = a.before_label or [Path(t).name for t in a.before]
    return [(label, Path(t).resolve()) for label, t in zip(labels, a.before, strict=True)]


def report(rows: list[dict], a) -> Path:
    """The table so far (speed-up over the size's first row) and the results files."""
    for row in rows:
        first = next(r for r in rows if r["size"] == row["size"])
        if "seconds" in row and "seconds" in first:
            row["speedup"] = first["seconds"] / row["seconds"]
    cols = ["size", "loop", "caption_length", "seconds", "examples_per_s", "speedup", "tflops"]
    table = markdown_table(rows, [*cols, "mfu", "peak_gib", "gc_ms", "full_gcs", "wall_s", "error"])
    table += (
        f"\n\n`python -m lightning_vigu fit -c {a.config} -c {a.overlay} --model.size=SIZE "
        f"--data.init_args.num_train={a.num_train} --trainer.max_steps={a.steps} "
        f"{' '.join(a.extra)}` in each tree "
        f"({', '.join(f'`{label}`' for label, _ in befores(a)) or 'this tree only'}: "
        f"earlier trees); seconds per step between steps {a.timed[0]} and "
        f"{a.timed[1]} (`benchmarks/step_timer.py`); `wall_s`: the whole command, data "
        f"generation and compilation included. MFU: this tree's model FLOPs at the run's "
        f"caption length over the GPU's dense bf16 peak. `gc_ms`: the garbage collector's "
        f"time a step in the same window; `full_gcs`: its full (generation-2) collections there."
    )
    print(table, flush=True)
    args = {
        k: [str(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v
        for k, v in vars(a).items()
    }
    return write_results(f"cli_loop{a.tag}", {"rows": rows, "args": args}, table, a.out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--before",
        type=Path,
        nargs="+",
        default=[],
        help="earlier commits' trees (the `before` loop)",
    )
    p.add_argument(
        "--before-label", nargs="+", default=[], help="their names in the table (default: folders')"
    )
    p.add_argument(
        "--shared-cache",
        action="store_true",
        help="one synthetic-data cache for every run (trees whose data formats agree)",
    )
    p.add_argument("--sizes", nargs="+", default=["small"])
    p.add_argument("--loops", nargs="+", default=list(LOOPS), choices=list(LOOPS))
    p.add_argument("--steps", type=int, default=245, help="below 250: no validation or checkpoint")
    p.add_argument("--timed", type=int, nargs=2, default=[60, 240])
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--config", default="conf/recall.yaml", help="the phase config")
    p.add_argument("--overlay", default="conf/gpu.yaml", help="'none': the CPU job (smoke test)")
    p.add_argument(
        "--extra", nargs=argparse.REMAINDER, default=[], help="CLI arguments for every run"
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        help="profile this many steps after the timed ones with pyinstrument (the host's "
        "time by call stack; <run>_profile.txt beside the timings in --work)",
    )
    p.add_argument("--run-timeout", type=float, default=420.0, help="seconds a run may take")
    p.add_argument("--work", type=Path, default=None, help="run folders (default: a temp dir)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    a = p.parse_args(argv)
    if a.steps < a.timed[1] + a.profile:
        p.error(f"--steps {a.steps} ends before the profiled steps ({a.timed[1]} + {a.profile})")
    if "before" in a.loops and not a.before:
        p.error("the `before` loop needs --before <tree of an earlier commit>")
    if a.before_label and len(a.before_label) != len(a.before):
        p.error(f"{len(a.before)} --before trees but {len(a.before_label)} --before-label names")
    work = a.work or Path(tempfile.mkdtemp(prefix="cli_loop_"))
    work.mkdir(parents=True, exist_ok=True)
    timer_dir = work / "timer"
    timer_dir.mkdir(exist_ok=True)
    shutil.copy(Path(__file__).with_name("step_timer.py"), timer_dir / "lv_step_timer.py")
    rows: list[dict] = []
    for size in a.sizes:
        for label, tree, extra in runs(a.loops, befores(a)):
            rows.append(run(label, tree, extra, size, a, work, timer_dir))
            print({k: v for k, v in rows[-1].items()}, flush=True)
            path = report(rows, a)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
