"""Shared fixtures: small real synthetic shards (``data_`` prefix) and two-rank gloo runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.multiprocessing as mp

from datamodules.synthetic.generate import write_split
from datamodules.synthetic.world import world_config


@pytest.fixture(scope="session")
def data_synthetic_shards(tmp_path_factory) -> Path:
    """A folder with ``train-*.tar`` (24 clips in 6 shards) and ``val-*.tar`` (8 clips in 2
    shards) of the CPU preset: real lossless mp4s, prompts and json records."""
    out = tmp_path_factory.mktemp("synthetic")
    config = world_config("cpu")
    write_split(out, config, "train", 24, seed=0, samples_per_shard=4, workers=1, progress=False)
    write_split(out, config, "val", 8, seed=0, samples_per_shard=4, workers=1, progress=False)
    return out


@pytest.fixture
def run_two_gloo_ranks(tmp_path):
    """Run ``worker(rank, init_dir, out_dir)`` in two forked processes (a gloo group is the
    worker's to make) and fail, killing both, if they do not finish within 120 s."""

    def run(worker) -> None:
        ctx = mp.start_processes(
            worker,
            args=(str(tmp_path / "init"), str(tmp_path)),
            nprocs=2,
            join=False,
            start_method="fork",
        )
        for _ in range(120):
            if ctx.join(timeout=1):
                return
        for process in ctx.processes:
            process.kill()
        pytest.fail("the two gloo ranks did not finish within 120 s")

    return run
