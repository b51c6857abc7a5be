"""Evaluation metrics, all torchmetrics ``Metric``s that sync across DDP ranks.

* :class:`FrechetVideoDistance` (with :class:`FVDProtocol`): FVD on Inception-I3D features
  (:class:`InceptionI3D`, weights converted once by ``python -m lightning_vigu.metrics.convert_i3d``).
* :class:`CaptionMetrics`: BLEU-4, METEOR, ROUGE-L, CIDEr-D with pycocoevalcap.
* :class:`VideoCLIPScore`: frame-averaged CLIPScore with open_clip weights from a local file.

Weights are local files named in config and never downloaded. A metric whose weights are not
there raises :class:`MetricUnavailable` (its message says how to make them); ``available(path)``
checks first, so evaluation code can skip such a metric and say why once.
"""

from lightning_vigu.metrics.availability import MetricUnavailable
from lightning_vigu.metrics.captions import CaptionMetrics, java_available, score_captions
from lightning_vigu.metrics.clipscore import VideoCLIPScore
from lightning_vigu.metrics.fvd import (
    FrechetVideoDistance,
    FVDProtocol,
    frechet_distance,
    frechet_distance_of_features,
    preprocess_videos,
)
from lightning_vigu.metrics.i3d import I3DOutput, InceptionI3D, load_i3d

__all__ = [
    "CaptionMetrics",
    "FVDProtocol",
    "FrechetVideoDistance",
    "I3DOutput",
    "InceptionI3D",
    "MetricUnavailable",
    "VideoCLIPScore",
    "frechet_distance",
    "frechet_distance_of_features",
    "java_available",
    "load_i3d",
    "preprocess_videos",
    "score_captions",
]
