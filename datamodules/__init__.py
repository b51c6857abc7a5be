"""DataModules of lightning_vigu: WebDataset video shards and the synthetic video-caption world.

* :class:`WebVideoDataModule` reads any ``KEY.mp4`` + ``KEY.txt`` / ``KEY.json`` shards (or
  latent-cache shards) into :class:`lightning_vigu.batch.Batch`.
* :class:`SyntheticDataModule` generates the synthetic world on first use and reads it the
  same way.
* ``python -m datamodules.write_shards`` packs a folder of videos + captions into shards;
  ``python -m datamodules.latent_cache`` precomputes codec latents and prompt embeddings.
"""

from __future__ import annotations

import importlib

__all__ = ["SyntheticDataModule", "WebVideoDataModule"]

_LAZY = {
    "SyntheticDataModule": "datamodules.synthetic.datamodule",
    "WebVideoDataModule": "datamodules.webvideo",
}


def __getattr__(name: str):
    # Lightning is imported only when a DataModule is asked for, so the synthetic world and
    # the command-line tools start fast (and leave Lightning's logging set-up to the caller).
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute '{name}'")
