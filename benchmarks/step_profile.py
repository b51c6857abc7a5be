"""Where a training step goes: GPU time by kind of kernel and by part of the step, host time by
part, from one torch.profiler trace.

    parts = ("batch", "forward", "backward", "optimizer", "ema")
    summary = profile_steps(lambda i: run_step(i, part), steps=5)

``run_step(i, part)`` runs step ``i`` and wraps each of its parts in ``part(name)`` (a
``record_function`` context). Each kernel is charged to the part that launched it (the trace
links a kernel to its launch call by a correlation id) and to a kind read off its name. Timings
under the profiler are slower than without it on the host's side; the GPU's kernel times are
not, so ``gpu_ms`` is the GPU's own work a step and ``host_ms`` says which part of the host's
work is largest, not how long it takes unprofiled.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

KINDS = (  # (kind, substrings of a kernel's name), first match wins
    ("attention", ("sdpa", "flash", "fmha", "attention", "cudnn::fusion")),
    ("matmul", ("nvjet", "gemm", "cutlass", "cublas", "splitk")),
    ("triton", ("triton",)),
    ("copy", ("memcpy", "memset")),
)
_PREFIX = "step/"
TOP_KERNELS = 60  # the largest kernels kept by name


def kernel_kind(name: str) -> str:
    """The kind of a GPU kernel (or copy) from its name; ``other`` when none matches."""
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def profile_steps(
    run_step: Callable[[int, Callable[[str], AbstractContextManager]], None], steps: int
) -> dict:
    """Profile ``steps`` calls of ``run_step(i, part)``; returns per-step milliseconds:
    ``gpu_ms`` (total, by kind, by part), ``host_ms`` by part, ``launches`` and the
    ``top_kernels`` by GPU time (name, ms a step, launches a step)."""
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def part(name: str) -> AbstractContextManager:
        return record_function(_PREFIX + name)

    with profile(activities=activities) as prof:
        for i in range(steps):
            run_step(i, part)
        if cuda:
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    return summarise(events, steps)


def summarise(events: list[dict], steps: int) -> dict:
    """Per-step milliseconds of a chrome trace's events (see :func:`profile_steps`)."""
    parts = sorted(
        (e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith(_PREFIX)),
        key=lambda e: e["ts"],
    )
    launched_at = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }

    def part_of(ts: float | None) -> str:
        for p in parts:
            if ts is not None and p["ts"] <= ts <= p["ts"] + p["dur"]:
                return p["name"][len(_PREFIX) :]
        return "outside"

    by_kind, by_part, by_name, calls, launches = Counter(), Counter(), Counter(), Counter(), 0
    for e in events:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        launches += 1
        by_kind[kernel_kind(e["name"])] += e["dur"]
        by_part[part_of(launched_at.get(e.get("args", {}).get("correlation")))] += e["dur"]
        by_name[e["name"]] += e["dur"]
        calls[e["name"]] += 1
    host = Counter()
    for p in parts:
        host[p["name"][len(_PREFIX) :]] += p["dur"]

    def per_step(counter: Counter) -> dict[str, float]:
        return {k: v / 1e3 / steps for k, v in counter.most_common()}

    return {
        "gpu_ms": sum(by_kind.values()) / 1e3 / steps,
        "gpu_ms_by_kind": per_step(by_kind),
        "gpu_ms_by_part": per_step(by_part),
        "host_ms_by_part": per_step(host),
        "launches": launches / steps,
        "top_kernels": [
            [name[:120], ms, calls[name] / steps] for name, ms in per_step(by_name).items()
        ][:TOP_KERNELS],
    }
