"""Shared fixtures of the data tests (prefixed ``data_``): small real synthetic shards."""

from __future__ import annotations

from pathlib import Path

import pytest

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
