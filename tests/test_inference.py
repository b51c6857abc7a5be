"""generate / caption on a Wan2.1 folder plus Uni-ViGU weights in the release format, with the
official script's options (dtype, batch size, frames/height/width, negative prompt)."""

from __future__ import annotations

import json

import av
import pytest
import torch
from test_training import tiny_module
from tiny_wan import tiny_wan_folder

from lightning_vigu.cli import main
from lightning_vigu.export import base_vocabulary, export_univigu
from lightning_vigu.pretrained import load_wan_transformer


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return tiny_wan_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def release(wan, tmp_path_factory):
    """A Uni-ViGU checkpoint in the release format, written by our exporter (vocabulary rows
    cut to the tokenizer's base vocabulary, as the official loader builds them)."""
    model = load_wan_transformer(wan, vocab_size=base_vocabulary(wan / "tokenizer") + 2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("vocab_embed", "text_head")):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("release") / "step-00001000.pth"
    return export_univigu(model, path, vocab_rows=base_vocabulary(wan / "tokenizer"))


def _probe(path) -> dict:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return {
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
            "size": (stream.height, stream.width),
            "frames": frames,
        }


def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {c} " in out for c in ("fit", "generate", "caption", "export"))


def test_generate_and_caption_with_wan_folder_and_release_weights(wan, release, tmp_path):
    common = [f"--wan-folder={wan}", f"--checkpoint={release}", "--steps=2", "--device=cpu"]
    shape = ["--frames=5", "--height=32", "--width=32"]
    out = tmp_path / "gen"
    main(
        [
            "generate",
            *common,
            *shape,
            "--prompts=[a red circle moves left, two white balls bounce, a small green square]",
            "--negative-prompt=blurry",
            "--batch-size=2",
            "--joint=true",
            "--eta=0.5",  # the DDIM video sampler (re-draws part of the noise)
            f"--out={out}",
        ]
    )
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["0000.mp4", "0001.mp4", "0002.mp4"]
    assert all(isinstance(r["caption"], str) for r in records)
    info = _probe(out / "0000.mp4")
    assert info == {"codec": "h264", "pix_fmt": "yuv420p", "size": (32, 32), "frames": 5}
    caps = tmp_path / "caps.jsonl"
    videos = ",".join(str(out / r["file"]) for r in records)
    main(["caption", *common, *shape, f"--videos=[{videos}]", "--batch-size=2", f"--out={caps}"])
    lines = [json.loads(line) for line in caps.read_text().splitlines()]
    assert len(lines) == 3 and all(isinstance(r["caption"], str) for r in lines)


def test_bfloat16_lossless_and_video_only_wan(wan, tmp_path):
    main(
        [
            "generate",
            f"--wan-folder={wan}",  # no --checkpoint: the folder's own video generator
            "--steps=2",
            "--device=cpu",
            "--dtype=bfloat16",
            "--frames=5",
            "--height=16",
            "--width=48",
            "--video-format=lossless",
            "--eta=1.0",
            "--prompts",  # one prompt as a plain value, as the README writes it
            "a red circle moves left",
            f"--out={tmp_path}",
        ]
    )
    info = _probe(tmp_path / "0000.mp4")
    assert info == {"codec": "h264", "pix_fmt": "yuv444p", "size": (16, 48), "frames": 5}


def test_negative_prompt_is_the_unconditional_branch():
    module = tiny_module().eval()
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a = module.generate_video(["red circle"], seed=0, video_steps=2)
    b = module.generate_video(["red circle"], seed=0, video_steps=2, negative_prompt="")
    c = module.generate_video(["red circle"], seed=0, video_steps=2, negative_prompt="blue")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_weight_arguments_say_what_to_pass(wan, release, tmp_path):
    args = ["generate", "--prompts=[x]", f"--out={tmp_path}", "--device=cpu"]
    with pytest.raises(ValueError, match="either --ckpt .* or --wan-folder"):
        main(args)
    with pytest.raises(ValueError, match="--checkpoint .* needs --wan-folder"):
        main([*args, f"--ckpt={release}", f"--checkpoint={release}"])
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        main(["caption", f"--wan-folder={wan}", f"--checkpoint={release}", "--videos=[nope.mp4]"])


@pytest.mark.parametrize("objective", ["flow", "autoregressive"])
def test_per_row_seeds_make_each_sample_independent_of_its_batch(objective):
    """Evaluation split over any number of ranks samples a clip alone or among others: with one
    seed per row a sample depends on its seed alone; one int seed draws the batch's noise at
    once, so a row's sample changes with its batch."""
    torch.manual_seed(0)
    module = tiny_module(caption_objective=objective).eval()
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts, seeds, kw = ["red circle", "blue square", "green"], [5, 6, 7], dict(video_steps=2)
    videos = module.generate_video(prompts, seed=seeds, **kw)
    captions = module.caption(videos, seed=seeds, text_steps=2)
    joint_videos, joint_captions = module.generate_joint(prompts, seed=seeds, **kw)
    for i in range(3):
        row = slice(i, i + 1)
        assert torch.allclose(
            module.generate_video(prompts[row], seed=seeds[row], **kw), videos[row], atol=1e-4
        )
        assert module.caption(videos[row], seed=seeds[row], text_steps=2) == captions[row]
        video, caption = module.generate_joint(prompts[row], seed=seeds[row], **kw)
        assert torch.allclose(video, joint_videos[row], atol=1e-4)
        assert caption == joint_captions[row]
    assert len(set(captions)) == 3 and len(set(joint_captions)) == 3
    # one int seed: row 1 of the batch is not what the prompt gives alone
    alone = module.generate_video(prompts[1:2], seed=6, **kw)
    assert not torch.allclose(module.generate_video(prompts, seed=6, **kw)[1:2], alone, atol=1e-2)
    alone = module.caption(videos[1:2], seed=6, text_steps=2)
    assert module.caption(videos, seed=6, text_steps=2)[1:2] != alone


def test_a_seed_list_must_give_one_seed_per_row():
    module = tiny_module().eval()
    with pytest.raises(ValueError, match="got 2 seeds for a batch of 3"):
        module.generate_video(["a", "b", "c"], seed=[1, 2], video_steps=1)
    with pytest.raises(ValueError, match="got 1 seeds for a batch of 2"):
        module.caption(torch.zeros(2, 3, 2, 8, 8), seed=[1], text_steps=1)


def test_the_ddim_video_sampler_draws_each_rows_fresh_noise_from_its_own_seed():
    torch.manual_seed(0)
    module = tiny_module().eval()
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts, seeds, kw = ["red circle", "blue square"], [5, 6], dict(video_steps=3)
    ddim = module.generate_video(prompts, seed=seeds, video_eta=1.0, **kw)
    for i in range(2):
        alone = module.generate_video(
            prompts[i : i + 1], seed=seeds[i : i + 1], video_eta=1.0, **kw
        )
        assert torch.allclose(alone, ddim[i : i + 1], atol=1e-4)
    euler = module.generate_video(prompts, seed=seeds, **kw)
    assert not torch.allclose(ddim, euler, atol=1e-2)  # fresh noise was drawn
