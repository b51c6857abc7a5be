"""Make clips (frames + json record) and write them as WebDataset shards, with a cache.

Every clip is a pure function of ``(world config, seed, split, index)``; shards hold
``KEY.mp4`` (lossless x264, yuv444p), ``KEY.txt`` (the prompt) and ``KEY.json`` (the record).
A split is complete when its marker ``<split>.done.json`` exists; a missing or different
marker means the split is (re)generated, so a half-written cache never gets used.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm.auto import tqdm

from datamodules.in_memory import cache_root
from datamodules.synthetic.render import render_scene
from datamodules.synthetic.text import write_caption, write_prompt
from datamodules.synthetic.world import (
    GENERATOR_VERSION,
    SPLITS,
    WorldConfig,
    sample_scene,
    trajectory,
)
from lightning_vigu.video_io import encode_video


def default_cache_root() -> Path:
    """``$LIGHTNING_VIGU_CACHE/synthetic`` or ``~/.cache/lightning_vigu/synthetic``."""
    return cache_root() / "synthetic"


def dataset_dir(config: WorldConfig, seed: int, cache_root: str | Path | None = None) -> Path:
    """The cache folder of one world and seed: ``<root>/<config hash>-seed<seed>``."""
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    return root / f"{config.fingerprint()}-seed{seed}"


def clip_record(config: WorldConfig, seed: int, split: str, index: int) -> dict:
    """The json record of one clip: ground truth, prompt and caption (no pixels)."""
    scene = sample_scene(config, seed, split, index)
    text_rng = np.random.default_rng([seed, SPLITS[split], index, 1])
    prompt, prompt_objects, prompt_attributes = write_prompt(text_rng, scene)
    caption = write_caption(text_rng, scene)
    for obj in scene["objects"]:
        path = trajectory(config, obj)
        obj["side"] = round(config.side(obj["size"]), 3)
        obj["centre_start"] = [round(float(v), 3) for v in path[0]]
        obj["centre_end"] = [round(float(v), 3) for v in path[-1]]
    return {
        "key": f"{split}-{index:06d}",
        "split": split,
        "index": index,
        "seed": seed,
        "world": config.fingerprint(),
        "generator_version": GENERATOR_VERSION,
        "height": config.height,
        "width": config.width,
        "num_frames": config.num_frames,
        "fps": config.fps,
        "prompt": prompt,
        "caption": caption,
        "prompt_objects": prompt_objects,
        "prompt_attributes": prompt_attributes,
        **scene,
    }


def make_clip(config: WorldConfig, seed: int, split: str, index: int) -> tuple[np.ndarray, dict]:
    """Frames ``(T, H, W, 3)`` uint8 and the record of one clip."""
    record = clip_record(config, seed, split, index)
    return render_scene(config, record), record


def write_shard(path: Path, config: WorldConfig, seed: int, split: str, indices: list[int]) -> int:
    """Write the clips ``indices`` of ``split`` into one tar (atomically, via a temp file)."""
    tmp = path.with_name(path.name + ".tmp")
    with wds.TarWriter(str(tmp), encoder=False, mtime=0) as sink:
        for index in indices:
            frames, record = make_clip(config, seed, split, index)
            sink.write(
                {
                    "__key__": record["key"],
                    "mp4": encode_video(frames, config.fps),
                    "txt": record["prompt"].encode(),
                    "json": json.dumps(record).encode(),
                }
            )
    tmp.replace(path)
    return len(indices)


def _shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.tar"


def write_split(
    out_dir: str | Path,
    config: WorldConfig,
    split: str,
    num: int,
    seed: int = 0,
    samples_per_shard: int = 100,
    workers: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Generate ``num`` clips of ``split`` into ``out_dir/<split>-NNNNNN.tar`` shards.

    Args:
        out_dir: output folder (created).
        config: the world.
        split: ``train``, ``val``, ``test`` or ``unseen``.
        num: number of clips.
        seed: dataset seed.
        samples_per_shard: clips per tar (the last one may hold fewer).
        workers: processes; default ``min(os.cpu_count(), number of shards)``.
        progress: show a tqdm progress bar.

    Returns:
        The shard paths, in order. A marker ``<split>.done.json`` is written last.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose one of {sorted(SPLITS)}")
    if num < 1 or samples_per_shard < 1:
        raise ValueError(
            f"need num >= 1 and samples_per_shard >= 1, got {num} and {samples_per_shard}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _marker(out, split).unlink(missing_ok=True)
    for old in out.glob(f"{split}-*.tar*"):
        old.unlink()
    n_shards = math.ceil(num / samples_per_shard)
    jobs = [
        (
            out / _shard_name(split, s),
            list(range(s * samples_per_shard, min(num, (s + 1) * samples_per_shard))),
        )
        for s in range(n_shards)
    ]
    workers = max(1, min(workers or os.cpu_count() or 1, n_shards))
    start = time.perf_counter()
    with tqdm(total=num, desc=f"synthetic {split}", unit="clip", disable=not progress) as bar:
        if workers == 1:
            for path, indices in jobs:
                bar.update(write_shard(path, config, seed, split, indices))
        else:
            with ProcessPoolExecutor(workers) as pool:
                futures = [pool.submit(write_shard, p, config, seed, split, ix) for p, ix in jobs]
                for future in as_completed(futures):
                    bar.update(future.result())
    info = {
        "split": split,
        "num": num,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "world": config.fingerprint(),
        "shards": [p.name for p, _ in jobs],
        "seconds": round(time.perf_counter() - start, 3),
    }
    _marker(out, split).write_text(json.dumps(info, indent=1))
    return [p for p, _ in jobs]


def _marker(out: Path, split: str) -> Path:
    return out / f"{split}.done.json"


def completed_split(out_dir: str | Path, split: str) -> dict | None:
    """The marker of a finished split (``None`` when absent or unreadable)."""
    try:
        return json.loads(_marker(Path(out_dir), split).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def ensure_split(
    out_dir: str | Path,
    config: WorldConfig,
    split: str,
    num: int,
    seed: int,
    samples_per_shard: int,
    workers: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Reuse the split in ``out_dir`` when its marker matches, else generate it.

    Runs that share the cache take turns: a lock file (``<split>.lock``, held with ``flock``)
    makes a second run wait for the first one's split and then reuse it, rather than delete
    its half-written shards.
    """
    wanted = {
        "num": num,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "world": config.fingerprint(),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{split}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        marker = completed_split(out, split)
        if marker is not None and all(marker.get(k) == v for k, v in wanted.items()):
            paths = [out / name for name in marker["shards"]]
            if all(p.is_file() for p in paths):
                return paths
        return write_split(out, config, split, num, seed, samples_per_shard, workers, progress)
