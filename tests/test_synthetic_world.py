"""The synthetic world: determinism, geometry, held-out combinations, texts, shards, cache."""

from __future__ import annotations

import copy
import itertools
import json
import tarfile

import numpy as np
import pytest
import torch

from datamodules.synthetic import VOCABULARY, SyntheticDataModule, words, world_config
from datamodules.synthetic.__main__ import main as synthetic_main
from datamodules.synthetic.generate import clip_record, completed_split, ensure_split, make_clip
from datamodules.synthetic.world import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    WorldConfig,
    sample_scene,
    trajectory,
)
from lightning_vigu.batch import check_batch
from lightning_vigu.video_io import ClipSpec, decode_clip

CPU = world_config("cpu")


def _combos(scene: dict) -> set[tuple[str, str]]:
    pairs = set()
    for obj in scene["objects"]:
        pairs |= {(obj["shape"], obj["colour"]), (obj["colour"], obj["motion"])}
    return pairs


def test_same_seed_and_index_give_the_same_clip():
    frames_a, record_a = make_clip(CPU, 3, "train", 7)
    frames_b, record_b = make_clip(CPU, 3, "train", 7)
    assert np.array_equal(frames_a, frames_b) and record_a == record_b
    frames_c, record_c = make_clip(CPU, 3, "train", 8)
    _, record_d = make_clip(CPU, 4, "train", 7)
    assert not np.array_equal(frames_a, frames_c)
    assert record_a["caption"] != record_c["caption"] or record_a["objects"] != record_c["objects"]
    assert (
        record_a["objects"] != record_d["objects"]
        or record_a["background"] != record_d["background"]
    )


def test_presets_and_overrides():
    gpu = world_config("gpu")
    assert (gpu.num_frames, gpu.height, gpu.width) == (16, 64, 64)
    assert (CPU.num_frames, CPU.height, CPU.width, CPU.fps) == (16, 32, 32, 8)
    short = world_config("cpu", num_frames=8)
    frames, record = make_clip(short, 0, "train", 0)
    assert frames.shape == (8, 32, 32, 3) and record["num_frames"] == 8
    assert short.fingerprint() != CPU.fingerprint()
    with pytest.raises(ValueError, match="unknown synthetic-world preset"):
        world_config("tpu")


def test_palette_is_well_separated():
    assert len(SHAPES) >= 4 and len(COLOURS) >= 6 and len(BACKGROUNDS) >= 3
    colours = np.asarray(list(COLOURS.values()), dtype=float)
    backgrounds = np.asarray(list(BACKGROUNDS.values()), dtype=float)
    palette = np.concatenate([colours, backgrounds])
    gaps = np.linalg.norm(colours[:, None] - palette[None], axis=-1)  # (6, 10)
    assert np.sort(gaps, axis=1)[:, 1].min() > 120  # each object colour vs everything else
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(backgrounds, 2)) > 80


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_objects_stay_inside_and_apart(preset):
    config = world_config(preset)
    for index in range(150):
        scene = sample_scene(config, 0, "train", index)
        assert 1 <= scene["count"] == len(scene["objects"]) <= 3
        assert len({o["colour"] for o in scene["objects"]}) == scene["count"]
        paths = []
        for obj in scene["objects"]:
            half = config.side(obj["size"]) / 2
            path = trajectory(config, obj)  # (T, 2)
            assert (path >= half - 1e-6).all() and (path[:, 0] <= config.width - half + 1e-6).all()
            assert (path[:, 1] <= config.height - half + 1e-6).all()
            paths.append((path, half))
        for (pa, ha), (pb, hb) in itertools.combinations(paths, 2):
            overlap = (np.abs(pa - pb) < ha + hb).all(axis=1)
            assert not overlap.any(), f"objects overlap in clip {index}"


def test_unseen_split_is_disjoint_from_training_combinations():
    config = CPU
    held = set(config.held_out_shape_colour) | set(config.held_out_colour_motion)
    seen = set()
    for split, n in (("train", 1000), ("val", 200), ("test", 200)):
        for index in range(n):
            seen |= _combos(sample_scene(config, 0, split, index))
    assert not seen & held
    for index in range(200):
        scene = sample_scene(config, 0, "unseen", index)
        first = scene["objects"][0]
        assert first["held_out"], f"unseen clip {index} has no held-out combination"
        assert {tuple(c) for c in first["held_out"]} <= held
        assert _combos(scene) - seen, f"unseen clip {index} only has training combinations"


def test_texts_use_the_vocabulary_and_prompts_are_shorter():
    vocab = set(VOCABULARY)
    for index in range(300):
        record = clip_record(CPU, 0, "train", index)
        for text in (record["prompt"], record["caption"]):
            assert set(words(text)) <= vocab, text
        assert len(record["prompt"]) < len(record["caption"])
        assert record["prompt_objects"][0] == 0 and "colour" in record["prompt_attributes"]
    assert {"circle", "red", "left", "slowly", "background"} <= vocab


def test_cli_writes_real_shards(tmp_path):
    synthetic_main(
        [
            "--out",
            str(tmp_path),
            "--num",
            "6",
            "--split",
            "val",
            "--samples-per-shard",
            "4",
            "--workers",
            "1",
        ]
    )
    tars = sorted(tmp_path.glob("val-*.tar"))
    assert [t.name for t in tars] == ["val-000000.tar", "val-000001.tar"]
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
        assert set(names[:3]) == {"val-000000.mp4", "val-000000.txt", "val-000000.json"}
        mp4 = tar.extractfile("val-000000.mp4").read()
        record = json.loads(tar.extractfile("val-000000.json").read())
        prompt = tar.extractfile("val-000000.txt").read().decode()
    frames, expected = make_clip(CPU, 0, "val", 0)
    assert record == expected and prompt == record["prompt"]
    for field in (
        "prompt",
        "caption",
        "objects",
        "background",
        "count",
        "num_frames",
        "fps",
        "seed",
    ):
        assert field in record
    decoded = decode_clip(mp4, ClipSpec(16))
    assert (
        np.abs(decoded.astype(int) - frames.astype(int)).max() <= 3
    )  # lossless x264 + YUV rounding
    assert completed_split(tmp_path, "val")["num"] == 6


def test_cache_is_reused_and_a_half_written_split_regenerated(tmp_path):
    paths = ensure_split(tmp_path, CPU, "test", 4, 0, 2, workers=1, progress=False)
    stamp = [p.stat().st_mtime_ns for p in paths]
    again = ensure_split(tmp_path, CPU, "test", 4, 0, 2, workers=1, progress=False)
    assert again == paths and [p.stat().st_mtime_ns for p in again] == stamp
    (tmp_path / "test.done.json").unlink()  # as if generation had been interrupted
    (tmp_path / "test-000001.tar").write_bytes(b"half")
    regenerated = ensure_split(tmp_path, CPU, "test", 4, 0, 2, workers=1, progress=False)
    assert regenerated[1].stat().st_size > 1000 and completed_split(tmp_path, "test") is not None


def test_synthetic_datamodule_end_to_end(tmp_path):
    dm = SyntheticDataModule(
        num_train=16, num_val=8, num_test=8, num_unseen=8, cache_dir=str(tmp_path), batch_size=4,
        num_workers=0, test_split="unseen", progress=False,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="prepare_data"):
        dm.setup("fit")
    dm.prepare_data()
    dm.setup("fit")
    assert dm.root.parent == tmp_path and (dm.root / "train.done.json").is_file()
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch)
    assert batch["video"].shape == (4, 3, 16, 32, 32) and batch["video"].dtype == torch.float32
    assert batch["video"].min() >= -1.0 and batch["video"].max() <= 1.0
    # training batches leave the records out (train_records), evaluation batches keep them
    assert "meta" not in batch
    batch = next(iter(dm.val_dataloader()))
    assert all(c == m["caption"] for c, m in zip(batch["caption"], batch["meta"]))
    assert all(p == m["prompt"] for p, m in zip(batch["prompt"], batch["meta"]))
    assert all(k.startswith("unseen-") for b in dm.test_dataloader() for k in b["key"])
    assert sum(len(b["key"]) for b in dm.unseen_dataloader()) == 8
    recall = SyntheticDataModule(
        num_train=16,
        num_val=8,
        num_test=8,
        num_unseen=8,
        cache_dir=str(tmp_path),
        caption_key="prompt",
        batch_size=4,
        num_workers=0,
    )
    recall.prepare_data()  # reuses the cache
    batch = next(iter(recall.val_dataloader()))
    assert batch["caption"] == batch["prompt"]


def test_world_config_is_hashable_and_fingerprint_stable():
    assert hash(CPU) == hash(WorldConfig())
    assert CPU.fingerprint() == world_config("cpu").fingerprint()


def test_tokenizer_remembers_texts_without_changing_canvases():
    from datamodules.synthetic import WorldTokenizer

    tok = WorldTokenizer()
    tok.cache_size = 2
    texts = ["a red circle moves left", "a blue square does not move", "a red circle moves left"]
    first = tok.encode(texts, 16)
    assert torch.equal(tok.encode(texts, 16), first)  # remembered ids give the same canvas
    short = tok.encode(texts, 4)  # the same remembered text cut to another canvas length
    assert torch.equal(short[:, :3], first[:, :3]) and (short[:, 3] == tok.eos_id).all()
    assert all(len(rows) <= tok.cache_size for rows in tok._rows_cache.values())
    assert tok.decode(first) == [t for t in texts]
    first[0, 0] = -1  # a canvas is the caller's: the remembered rows stay as they were
    assert torch.equal(tok.encode(texts[:1], 16)[0], tok.encode(texts[2:], 16)[0])
    assert tok.encode(texts[:1], 16)[0, 0] != -1
    assert tok.encode([], 16).shape == (0, 16)
    copied = copy.deepcopy(tok)  # EMA copies and worker processes leave the remembered rows behind
    assert "_rows_cache" not in copied.__dict__
    assert torch.equal(copied.encode(texts, 16), tok.encode(texts, 16))
