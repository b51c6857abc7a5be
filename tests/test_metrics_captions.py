"""Caption metrics: known values, pycocoevalcap's direct call, shard merging and a real 2-rank gather."""

from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lightning_vigu.metrics import CaptionMetrics, MetricUnavailable, java_available
from lightning_vigu.metrics import captions as captions_module
from lightning_vigu.metrics.captions import decode_texts, encode_texts, simple_tokenize

needs_java = pytest.mark.skipif(not java_available(), reason="java is not installed")

PREDICTIONS = [
    "A red circle moves to the left.",
    "two blue squares grow slowly",
    "a green triangle spins in place",
    "The yellow star bounces, then stops!",
]
REFERENCES = [
    ["a red circle moves to the left", "A red ball is moving left."],
    ["Two blue squares are growing.", "two squares, both blue, get bigger"],
    ["a green triangle rotates", "A triangle spins around its centre."],
    ["a yellow star bounces and stops", "The star bounces up and down."],
]


def metric_over(
    predictions: list[str], references: list, use_java: bool | None
) -> dict[str, float]:
    metric = CaptionMetrics(use_java=use_java)
    metric.update(predictions, references)
    return {k: v.item() for k, v in metric.compute().items()}


def test_hand_computed_bleu4_and_rouge_l() -> None:
    predictions = ["a red circle moves to the left", "a red circle moves"]
    references = ["a red circle moves to the right", "a red circle moves to the left"]
    # Clipped n-gram matches over the corpus: 1-g 10/11, 2-g 8/9, 3-g 6/7, 4-g 4/5; hypothesis
    # length 11 against reference length 14 gives a brevity penalty exp(1 - 14/11).
    precisions = (10 / 11) * (8 / 9) * (6 / 7) * (4 / 5)
    bleu4 = math.exp(1 - 14 / 11) * precisions**0.25
    # ROUGE-L (beta = 1.2): LCS 6 of 7/7 -> F = 6/7; LCS 4, P = 1, R = 4/7 -> F = 2.44 R / (R + 1.44).
    rouge = (6 / 7 + 2.44 * (4 / 7) / (4 / 7 + 1.44)) / 2
    scores = metric_over(predictions, references, use_java=False)
    assert scores["bleu4"] == pytest.approx(bleu4, rel=1e-6)
    assert scores["rougeL"] == pytest.approx(rouge, rel=1e-9)
    assert set(scores) == {"bleu4", "rougeL", "cider"}


@needs_java
def test_identical_captions_score_one() -> None:
    texts = [r[0] for r in REFERENCES]
    scores = metric_over(texts, texts, use_java=True)
    assert list(scores) == ["bleu4", "meteor", "rougeL", "cider"]
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["rougeL"] == pytest.approx(1.0)
    assert scores["meteor"] == pytest.approx(1.0)


@needs_java
def test_matches_pycocoevalcap_called_directly() -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize(
        {i: [{"caption": r} for r in refs] for i, refs in enumerate(REFERENCES)}
    )
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(PREDICTIONS)})
    direct = {
        "bleu4": Bleu(4).compute_score(gts, res, verbose=0)[0][3],
        "meteor": captions_module._meteor().compute_score(gts, res)[0],
        "rougeL": Rouge().compute_score(gts, res)[0],
        "cider": Cider().compute_score(gts, res)[0],
    }
    scores = metric_over(PREDICTIONS, REFERENCES, use_java=True)
    for key, value in direct.items():
        assert scores[key] == pytest.approx(float(value), rel=1e-12), key
    assert 0 < scores["cider"] < 10 and 0 < scores["meteor"] < 1


def test_two_shards_merged_equal_one_metric() -> None:
    shards = [CaptionMetrics(use_java=False) for _ in range(2)]
    shards[0].update(PREDICTIONS[:1], REFERENCES[:1])
    shards[0].update(PREDICTIONS[1:3], [REFERENCES[1], REFERENCES[2][0]])  # a plain string
    shards[1].update(PREDICTIONS[3:], REFERENCES[3:])
    shards[0].merge_state(shards[1])
    expected_refs = [REFERENCES[0], REFERENCES[1], REFERENCES[2][:1], REFERENCES[3]]
    predictions, references = shards[0].texts()  # merge order is up to torchmetrics
    assert sorted(zip(predictions, references)) == sorted(zip(PREDICTIONS, expected_refs))
    whole = CaptionMetrics(use_java=False)
    whole.update(PREDICTIONS, expected_refs)
    merged = shards[0].compute()
    for key, value in whole.compute().items():
        assert merged[key].item() == pytest.approx(value.item(), rel=1e-12), key


def _gather_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    both, one_empty = CaptionMetrics(), CaptionMetrics()
    shard = slice(0, 3) if rank == 0 else slice(3, 4)
    both.update(PREDICTIONS[shard], REFERENCES[shard])
    if rank == 0:
        one_empty.update(["ünïcode — ok", ""], [["ü"], ["x", "y", "z"]])
    gathered = []
    for metric in (both, one_empty):
        metric.sync()
        gathered.append(metric.texts())
        metric.unsync()
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(gathered))
    dist.destroy_process_group()


def test_two_process_gather_with_an_empty_rank(tmp_path: Path, run_two_gloo_ranks) -> None:
    run_two_gloo_ranks(_gather_worker)
    for rank in range(2):
        both, one_empty = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        assert both == (PREDICTIONS, REFERENCES)
        assert one_empty == (["ünïcode — ok", ""], [["ü"], ["x", "y", "z"]])


def test_without_java_warns_once_and_skips_meteor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(captions_module, "java_available", lambda: False)
    monkeypatch.setattr(captions_module, "_java_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = metric_over(PREDICTIONS, REFERENCES, use_java=None)
        second = metric_over(PREDICTIONS[:2], REFERENCES[:2], use_java=None)
    assert [str(w.message) for w in caught].count(captions_module._JAVA_WARNING) == 1
    assert set(first) == set(second) == {"bleu4", "rougeL", "cider"}
    with pytest.raises(MetricUnavailable, match="java"):
        metric_over(PREDICTIONS, REFERENCES, use_java=True)


def test_inputs_are_checked_and_texts_round_trip() -> None:
    metric = CaptionMetrics(use_java=False)
    with pytest.raises(ValueError, match="N references"):
        metric.update(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        metric.update(["a"], [[]])
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()
    texts = ["", "plain", "ünïcode — ✓", "multi\nline"]
    assert decode_texts(*encode_texts(texts)) == texts
    assert simple_tokenize("The CAT's hat, (red)!") == "the cat s hat red"
