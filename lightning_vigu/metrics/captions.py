"""Captioning metrics (BLEU-4, METEOR, ROUGE-L, CIDEr-D) as a DDP-syncable torchmetrics ``Metric``.

Scores come from pycocoevalcap, the MS-COCO caption evaluation code, on captions tokenized by its
Stanford PTB tokenizer (lower-cased, punctuation removed), so numbers compare with the captioning
literature. BLEU-4, METEOR and ROUGE-L are on a 0-1 scale; CIDEr-D is reported as pycocoevalcap
reports it (``"CIDEr"``, x10 scale, document frequencies from the whole reference set).

Strings cannot be gathered by ``torch.distributed``, so the metric stores captions as UTF-8 bytes
in ``uint8`` tensors plus ``int64`` lengths; these ``cat`` states gather with torchmetrics' own
sync, and ``compute()`` decodes the full set on every rank (CIDEr-D needs all references).

Java: the PTB tokenizer and METEOR run in Java (METEOR once per process: its start loads a
paraphrase table, ~10 s, and the process is reused). Without ``java`` on ``PATH`` the metric warns
once per process, tokenizes with :func:`simple_tokenize` and leaves the ``meteor`` key out of the
result; ``use_java=False`` chooses that fallback without a warning.
"""

from __future__ import annotations

import atexit
import re
import shutil
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_vigu.metrics.availability import MetricUnavailable

_JAVA_WARNING = (
    "java not found on PATH: caption metrics use a simple lower-case tokenizer instead of the "
    "PTB tokenizer and skip METEOR (install Java 17, e.g. `apt-get install openjdk-17-jre-headless`)"
)
_java_warned = False
_meteor_lock = threading.Lock()
_meteor_scorer: Any = None


def java_available() -> bool:
    """Whether a ``java`` executable is on ``PATH`` (needed by METEOR and the PTB tokenizer)."""
    return shutil.which("java") is not None


def _warn_no_java_once() -> None:
    global _java_warned
    if not _java_warned:
        _java_warned = True
        warnings.warn(_JAVA_WARNING, RuntimeWarning, stacklevel=3)


def simple_tokenize(text: str) -> str:
    """Fallback tokenizer without Java: lower-case, keep runs of letters/digits, join by spaces."""
    return " ".join(re.findall(r"[^\W_]+", text.lower()))


def _ptb_tokenize(groups: dict[int, list[str]]) -> dict[int, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in groups.items()})


def _meteor() -> Any:
    """One METEOR Java process per Python process (starting it loads the paraphrase table,
    ~10 s), stopped at exit."""
    global _meteor_scorer
    if _meteor_scorer is None:
        from pycocoevalcap.meteor.meteor import Meteor

        _meteor_scorer = Meteor()
        atexit.register(_stop_meteor)
    return _meteor_scorer


def _stop_meteor() -> None:
    global _meteor_scorer
    _meteor_scorer = None  # Meteor.__del__ closes stdin and kills the Java process


def score_captions(
    predictions: Sequence[str], references: Sequence[Sequence[str]], use_java: bool | None = None
) -> dict[str, float]:
    """Corpus-level BLEU-4, METEOR, ROUGE-L and CIDEr-D with pycocoevalcap's scorers.

    Args:
        predictions: ``N`` generated captions.
        references: ``N`` lists of one or more reference captions.
        use_java: PTB tokenizer + METEOR (True), the Java-free fallback (False), or True when
            ``java`` is on ``PATH`` (None).

    Returns:
        ``{"bleu4", "meteor", "rougeL", "cider"}``; ``meteor`` is absent without Java.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"need the same non-zero number of predictions and reference lists, got "
            f"{len(predictions)} and {len(references)}"
        )
    if use_java is None:
        use_java = java_available()
        if not use_java:
            _warn_no_java_once()
    elif use_java and not java_available():
        raise MetricUnavailable(f"use_java=True but {_JAVA_WARNING}")
    n = len(predictions)
    # METEOR's stdin protocol splits on "|||" and lines; keep captions single-segment.
    clean = [" ".join(p.replace("|||", " ").split()) for p in predictions]
    refs = [[" ".join(r.replace("|||", " ").split()) for r in rs] for rs in references]
    if use_java:
        # One Java call for predictions (keys 0..n-1) and references (keys n..2n-1).
        groups = {i: [p] for i, p in enumerate(clean)} | {n + i: r for i, r in enumerate(refs)}
        tokens = _ptb_tokenize(groups)
        res = {i: tokens[i] for i in range(n)}
        gts = {i: tokens[n + i] for i in range(n)}
    else:
        res = {i: [simple_tokenize(p)] for i, p in enumerate(clean)}
        gts = {i: [simple_tokenize(r) for r in rs] for i, rs in enumerate(refs)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    scores = {"bleu4": float(bleu[3])}
    if use_java:
        with _meteor_lock:
            scores["meteor"] = float(_meteor().compute_score(gts, res)[0])
    return scores | {"rougeL": float(rouge), "cider": float(cider)}


def encode_texts(texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Strings -> (concatenated UTF-8 bytes ``(B,)`` uint8, byte lengths ``(len(texts),)`` int64)."""
    encoded = [t.encode("utf-8") for t in texts]
    lengths = torch.tensor([len(b) for b in encoded], dtype=torch.long)
    return torch.tensor(list(b"".join(encoded)), dtype=torch.uint8), lengths


def decode_texts(data: Tensor, lengths: Tensor) -> list[str]:
    """Inverse of :func:`encode_texts`."""
    raw = bytes(data.cpu().to(torch.uint8).tolist())
    texts, start = [], 0
    for length in lengths.cpu().tolist():
        texts.append(raw[start : start + length].decode("utf-8"))
        start += length
    return texts


_STATES = {
    "pred_bytes": torch.uint8,
    "pred_lengths": torch.long,
    "ref_bytes": torch.uint8,
    "ref_lengths": torch.long,
    "ref_counts": torch.long,
}


class CaptionMetrics(Metric):
    """BLEU-4 / METEOR / ROUGE-L / CIDEr-D over all captions seen (gathered across ranks).

    ``update(predictions, references)``: ``predictions`` is a list of ``N`` strings,
    ``references`` a list of ``N`` items, each a string or a list of one or more strings.
    ``compute()`` returns ``{"bleu4", "meteor", "rougeL", "cider"}`` as 0-d float64 tensors
    (see the module docstring for scales and the no-Java fallback, where ``meteor`` is absent).

    Args:
        use_java: force the PTB tokenizer + METEOR on (True) or off (False); None uses them
            when ``java`` is on ``PATH``.
        **kwargs: torchmetrics ``Metric`` options.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, use_java: bool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.use_java = use_java
        for name in _STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> None:
        """Add ``N`` predictions and their references (see the class docstring)."""
        if isinstance(predictions, str) or len(predictions) != len(references):
            raise ValueError(
                f"predictions must be a list of N strings matching N references, got "
                f"{type(predictions).__name__} of {len(predictions)} and {len(references)} references"
            )
        ref_lists = [[r] if isinstance(r, str) else list(r) for r in references]
        for i, refs in enumerate(ref_lists):
            if not refs or not all(isinstance(r, str) for r in refs):
                raise ValueError(f"references[{i}] must be a string or a non-empty list of strings")
        pred_bytes, pred_lengths = encode_texts(predictions)
        ref_bytes, ref_lengths = encode_texts([r for refs in ref_lists for r in refs])
        counts = torch.tensor([len(refs) for refs in ref_lists], dtype=torch.long)
        for name, value in zip(
            _STATES, (pred_bytes, pred_lengths, ref_bytes, ref_lengths, counts), strict=True
        ):
            getattr(self, name).append(value.to(self.device))

    def _sync_dist(self, dist_sync_fn: Any = gather_all_tensors, process_group: Any = None) -> None:
        # A rank that saw no captions would send torchmetrics' float32 placeholder; give it
        # empty tensors of the right dtypes so every rank gathers the same dtype.
        for name, dtype in _STATES.items():
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                setattr(self, name, [torch.zeros(0, dtype=dtype, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)

    def texts(self) -> tuple[list[str], list[list[str]]]:
        """The predictions and reference lists held now (all ranks' after a sync)."""
        states = {name: getattr(self, name) for name in _STATES}
        if any(isinstance(v, list) and not v for v in states.values()):
            return [], []
        cat = {name: dim_zero_cat(v) for name, v in states.items()}
        predictions = decode_texts(cat["pred_bytes"], cat["pred_lengths"])
        flat_refs = decode_texts(cat["ref_bytes"], cat["ref_lengths"])
        references, start = [], 0
        for count in cat["ref_counts"].tolist():
            references.append(flat_refs[start : start + count])
            start += count
        return predictions, references

    def compute(self) -> dict[str, Tensor]:
        """Corpus-level scores over every caption seen (see the class docstring)."""
        predictions, references = self.texts()
        if not predictions:
            raise ValueError("CaptionMetrics.compute() called before any update() with captions")
        scores = score_captions(predictions, references, use_java=self.use_java)
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in scores.items()}
