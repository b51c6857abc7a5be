"""Generating Knowledge Recall shards from a (tiny, random) pretrained generator."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from tiny_wan import save_univigu_checkpoint, tiny_wan_folder

from datamodules.generate_shards import main, read_prompts
from lightning_vigu.pretrained import load_wan_transformer
from lightning_vigu.video_io import ClipSpec, decode_clip, probe_video

PROMPTS = ["a red circle moves left", "two white balls bounce", "a small green square jumps"]


@pytest.fixture(scope="session")
def wan(tmp_path_factory):
    return tiny_wan_folder(tmp_path_factory)


def _args(wan, prompts, out, *extra):
    return [
        "--prompts", str(prompts), "--out", str(out), "--wan-folder", str(wan),
        "--steps", "2", "--guidance", "2.0", "--num-frames", "5", "--height", "32",
        "--width", "32", "--samples-per-shard", "2", "--seed", "7", "--device", "cpu",
        "--dtype", "float32", *extra,
    ]  # fmt: skip


def _members(shard):
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_generate_shards_end_to_end(wan, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([PROMPTS[0], "", *PROMPTS[1:]]) + "\n")
    shards = main(_args(wan, prompts, tmp_path / "out"))
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar"]
    samples = {**_members(shards[0]), **_members(shards[1])}
    assert sorted(samples) == sorted(
        f"{i:08d}.{ext}" for i in range(3) for ext in ["mp4", "txt", "json"]
    )
    for i, prompt in enumerate(PROMPTS):
        assert samples[f"{i:08d}.txt"].decode() == prompt
        meta = json.loads(samples[f"{i:08d}.json"])
        assert meta["prompt"] == prompt and meta["seed"] == 7 + i
        assert (meta["steps"], meta["guidance_scale"], meta["num_frames"]) == (2, 2.0, 5)
        assert meta["generator"] == wan.name
        info = probe_video(samples[f"{i:08d}.mp4"])
        assert (info["frames"], info["height"], info["width"]) == (5, 32, 32)

    # sample i depends only on its prompt and seed + i: regenerate sample 1 alone
    single = tmp_path / "single.txt"
    single.write_text(PROMPTS[1])
    again = _members(main(_args(wan, single, tmp_path / "again", "--seed", "8"))[0])
    spec = ClipSpec(num_frames=5)
    a, b = decode_clip(samples["00000001.mp4"], spec), decode_clip(again["00000000.mp4"], spec)
    assert abs(a.astype(int) - b.astype(int)).max() <= 2


def test_generate_with_univigu_checkpoint(wan, tmp_path):
    checkpoint = save_univigu_checkpoint(
        load_wan_transformer(wan, vocab_size=56), tmp_path / "uni-vigu.pth"
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0])
    extra = ("--checkpoint", str(checkpoint), "--caption-length", "8")
    shards = main(_args(wan, prompts, tmp_path / "out", *extra))
    meta = json.loads(_members(shards[0])["00000000.json"])
    assert meta["generator"] == "uni-vigu.pth" and meta["caption_length"] == 8


def test_clear_errors(wan, tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file"):
        read_prompts(tmp_path / "missing.txt")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0])
    with pytest.raises(ValueError, match="--num-frames 6"):
        main(_args(wan, prompts, tmp_path / "out", "--num-frames", "6"))
    with pytest.raises(ValueError, match="--height 24 must be a multiple of 16"):
        main(_args(wan, prompts, tmp_path / "out", "--height", "24"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "shard-000000.tar").write_bytes(io.BytesIO().getvalue())
    with pytest.raises(FileExistsError, match="already holds shards"):
        main(_args(wan, prompts, tmp_path / "full"))
