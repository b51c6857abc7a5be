"""The synthetic video-caption world: procedural clips with known ground truth.

* :mod:`~datamodules.synthetic.world` -- attribute sets, presets, scene sampling, held-out pairs.
* :mod:`~datamodules.synthetic.render` -- anti-aliased shapes on a plain background.
* :mod:`~datamodules.synthetic.text` -- prompt and caption templates, the vocabulary.
* :mod:`~datamodules.synthetic.generate` -- clips -> WebDataset shards, the cache.
* :mod:`~datamodules.synthetic.detector` -- read a video back, ``score_video``.
* :mod:`~datamodules.synthetic.parse` -- read a caption back, ``score_caption``.
* :mod:`~datamodules.synthetic.tokenizer` -- :class:`WorldTokenizer`, BPE over the world's words.
* :mod:`~datamodules.synthetic.datamodule` -- :class:`SyntheticDataModule`.
* ``python -m datamodules.synthetic --out DIR --num N`` writes shards from the command line.
"""

from __future__ import annotations

import importlib

from datamodules.synthetic.detector import DetectorSettings, detect, score_video, travel_ratios
from datamodules.synthetic.generate import clip_record, make_clip, write_split
from datamodules.synthetic.parse import parse_text, score_caption
from datamodules.synthetic.scoring import AttributeScore, expected_attributes, mean_accuracy
from datamodules.synthetic.text import VOCABULARY, words
from datamodules.synthetic.tokenizer import WorldTokenizer
from datamodules.synthetic.world import PRESETS, WorldConfig, world_config

__all__ = [
    "PRESETS",
    "VOCABULARY",
    "AttributeScore",
    "DetectorSettings",
    "SyntheticDataModule",
    "WorldConfig",
    "WorldTokenizer",
    "clip_record",
    "detect",
    "expected_attributes",
    "make_clip",
    "mean_accuracy",
    "parse_text",
    "score_caption",
    "score_video",
    "travel_ratios",
    "words",
    "world_config",
    "write_split",
]


def __getattr__(name: str):
    # The DataModule (and Lightning with it) is imported on first use only, so the world,
    # the detector and the command line start fast.
    if name == "SyntheticDataModule":
        return importlib.import_module("datamodules.synthetic.datamodule").SyntheticDataModule
    raise AttributeError(f"module 'datamodules.synthetic' has no attribute '{name}'")
