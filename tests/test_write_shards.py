"""write_shards: a folder of videos + captions -> shards, with a report of what was skipped."""

from __future__ import annotations

import csv
import json

import pytest

from datamodules import WebVideoDataModule
from datamodules.synthetic.generate import make_clip
from datamodules.synthetic.world import world_config
from datamodules.write_shards import main, read_captions, write_shards
from lightning_vigu.video_io import encode_video

CPU = world_config("cpu")


@pytest.fixture()
def data_video_folder(tmp_path):
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.mp4", "sub/b.v2.mp4", "c.mp4"]):
        frames, _ = make_clip(CPU, 0, "train", i)
        (videos / name).write_bytes(encode_video(frames, CPU.fps))
    frames, _ = make_clip(CPU, 0, "train", 9)
    (videos / "short.mp4").write_bytes(encode_video(frames[:5], CPU.fps))
    (videos / "broken.mp4").write_bytes(b"\x00" * 500)
    rows = [
        {"file": "a.mp4", "prompt": "a red circle", "caption": "a large red circle on black"},
        {"file": "sub/b.v2.mp4", "prompt": "a blue square", "caption": ""},
        {"file": "c.mp4", "prompt": "a cyan cross", "caption": "a cyan cross moves up"},
        {"file": "short.mp4", "prompt": "too short", "caption": ""},
        {"file": "broken.mp4", "prompt": "garbage", "caption": ""},
        {"file": "gone.mp4", "prompt": "missing", "caption": ""},
        {"file": "c.mp4", "prompt": "", "caption": "no prompt"},
    ]
    with (tmp_path / "captions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "prompt", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_cli_writes_shards_and_a_skip_report(data_video_folder, capsys):
    out = data_video_folder / "shards"
    main(
        [
            "--videos",
            str(data_video_folder / "videos"),
            "--captions",
            str(data_video_folder / "captions.csv"),
            "--out",
            str(out),
            "--samples-per-shard",
            "2",
            "--min-frames",
            "16",
        ]
    )
    printed = capsys.readouterr().out
    assert "wrote 3 samples in 2 shards" in printed and "gone.mp4: missing file" in printed
    report = json.loads((out / "report.json").read_text())
    reasons = {s["file"]: s["reason"].split(":")[0] for s in report["skipped"]}
    assert reasons == {
        "short.mp4": "too short",
        "broken.mp4": "undecodable",
        "gone.mp4": "missing file",
        "c.mp4": "no prompt",
    }
    assert report["skipped_by_reason"] == {
        "too short": 1,
        "undecodable": 1,
        "missing file": 1,
        "no prompt": 1,
    }
    dm = WebVideoDataModule(val_shards=str(out), batch_size=4, num_workers=0)
    batch = next(iter(dm.val_dataloader()))
    assert batch["key"] == ["a", "sub_b_v2", "c"]  # no dots or slashes in keys
    assert batch["prompt"] == ["a red circle", "a blue square", "a cyan cross"]
    assert batch["caption"] == [
        "a large red circle on black",
        "a blue square",
        "a cyan cross moves up",
    ]
    assert batch["meta"][1]["source"] == "sub/b.v2.mp4" and batch["meta"][0]["frames"] == 16
    assert batch["video"].shape == (3, 3, 16, 32, 32)


def test_jsonl_captions_and_parallel_validation(data_video_folder):
    out = data_video_folder / "from_jsonl"
    report = write_shards(
        data_video_folder / "videos",
        data_video_folder / "captions.jsonl",
        out,
        100,
        16,
        workers=2,
        progress=False,
    )
    assert report["written"] == 3 and report["shards"] == ["shard-000000.tar"]
    assert len(read_captions(data_video_folder / "captions.jsonl")) == 7


def test_bad_caption_files_are_explained(tmp_path):
    (tmp_path / "bad.csv").write_text("path,text\nx.mp4,hello\n")
    with pytest.raises(ValueError, match="columns 'file' and 'prompt'"):
        read_captions(tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text('{"file": "x.mp4"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 is not valid json"):
        read_captions(tmp_path / "bad.jsonl")
