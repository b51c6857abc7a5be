"""Shared helpers of the benchmark suites: run stamps, JSON/markdown results, timing."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """A one-line description of the machine (GPU name when there is one)."""
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{torch.cuda.device_count()}x {p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}, torch {torch.__version__}"


def commit() -> str:
    """The git commit of the repo (``unknown`` outside a checkout, e.g. on the device)."""
    env = os.environ.get("LIGHTNING_VIGU_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=RESULTS.parent,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
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
