"""Data-loading throughput: synthetic-world generation and WebVideoDataModule clips/s.

Usage::

    python -m benchmarks.loader [--preset cpu gpu] [--workers 0 1 2] \
        [--out benchmarks/results/loader_cpu.json]

For each preset it (1) generates a training split (timed: the cost of a first run), (2) reads
one epoch of it through ``WebVideoDataModule.train_dataloader()`` for each worker count
(mp4 decode + collate, shuffle buffer on), and (3) caches PixelCodec latents of the split and
reads those. Throughput counts clips per second of wall time; ``steady`` excludes the first
batch (worker start-up); ``per worker`` divides by ``max(workers, 1)``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import RESULTS, markdown_table, write_results
from datamodules.latent_cache import cache_latents
from datamodules.synthetic.generate import write_split
from datamodules.synthetic.world import world_config
from datamodules.webvideo import WebVideoDataModule
from lightning_vigu.codecs import PixelCodec

DEFAULT_CLIPS = {"cpu": 2000, "gpu": 512}
"""Clips per preset: the cpu count is SyntheticDataModule's default training set."""


def read_epoch(shards: str, workers: int, batch_size: int) -> dict:
    """Read every clip of ``shards`` once through a training DataLoader and time it."""
    dm = WebVideoDataModule(
        train_shards=shards, batch_size=batch_size, num_workers=workers, shuffle_buffer=256
    )
    dm.setup("fit")
    start = time.perf_counter()
    batches = iter(dm.train_dataloader())
    clips = len(next(batches)["prompt"])
    first = time.perf_counter()
    for batch in batches:
        clips += len(batch["prompt"])
    end = time.perf_counter()
    return {
        "workers": workers,
        "clips": clips,
        "seconds": round(end - start, 3),
        "startup_s": round(first - start, 3),
        "clips_per_s": clips / (end - start),
        "steady_clips_per_s": (clips - batch_size) / max(end - first, 1e-9),
        "clips_per_s_per_worker": clips / (end - start) / max(workers, 1),
        "skipped": sum(dm.skipped_counts().values()),
    }


def bench_preset(
    preset: str, clips: int, workers: Sequence[int], batch_size: int, root: Path
) -> dict:
    """Generation, video loading and latent loading rows of one preset."""
    world = world_config(preset)
    procs = os.cpu_count() or 1
    start = time.perf_counter()
    write_split(
        root / preset,
        world,
        "train",
        clips,
        seed=0,
        samples_per_shard=100,
        workers=procs,
        progress=False,
    )
    gen_s = time.perf_counter() - start
    generation = {
        "preset": preset,
        "clips": clips,
        "processes": procs,
        "seconds": round(gen_s, 2),
        "clips_per_s": clips / gen_s,
    }
    shards = str(root / preset / "train-*.tar")
    rows = [
        {"preset": preset, "input": "mp4", **read_epoch(shards, w, batch_size)} for w in workers
    ]
    start = time.perf_counter()
    cache_latents(
        shards,
        root / f"{preset}-latents",
        PixelCodec((1, 4, 4)),
        clip=None,
        batch_size=batch_size,
        progress=False,
    )
    generation["latent_cache_seconds"] = round(time.perf_counter() - start, 2)
    latent_shards = str(root / f"{preset}-latents" / "latents-*.tar")
    rows += [
        {"preset": preset, "input": "latents.npy", **read_epoch(latent_shards, w, batch_size)}
        for w in workers
    ]
    return {"generation": generation, "loading": rows}


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and write ``<out>.json`` and ``<out>.md``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loader", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--preset", nargs="+", default=["cpu", "gpu"], choices=sorted(DEFAULT_CLIPS)
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--clips", type=int, default=None, help="clips per preset (default: 2000 cpu, 512 gpu)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS / "loader_cpu.json"))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        results = [
            bench_preset(
                p, args.clips or DEFAULT_CLIPS[p], args.workers, args.batch_size, Path(tmp)
            )
            for p in args.preset
        ]
    generation = [r["generation"] for r in results]
    loading = [row for r in results for row in r["loading"]]
    table = "\n\n".join(
        [
            "Synthetic-world generation (render + lossless x264 + tar, all cores):",
            markdown_table(
                generation,
                ["preset", "clips", "processes", "seconds", "clips_per_s", "latent_cache_seconds"],
            ),
            f"Loading one epoch through WebVideoDataModule (batch {args.batch_size}, shuffle buffer 256):",
            markdown_table(
                loading,
                [
                    "preset",
                    "input",
                    "workers",
                    "clips",
                    "seconds",
                    "clips_per_s",
                    "steady_clips_per_s",
                    "clips_per_s_per_worker",
                ],
            ),
            f"Load average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} "
            f"(the machine is shared; other jobs inflate the times).",
        ]
    )
    out = Path(args.out)
    payload = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "settings": {"batch_size": args.batch_size, "workers": args.workers},
        "generation": generation,
        "loading": loading,
    }
    path = write_results(out.stem, payload, table, out.parent)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
