"""The first learning gate (DESIGN §6): the recipe memorises on the CPU in seconds.

A model that cannot reproduce one clip from its prompt, give each of a handful of prompts its
own clip, or rewrite a handful of captions exactly has a bug or a wrong parametrisation, and no
amount of GPU time fixes it. These run the real objective (:meth:`UniViGU.compute_loss`) and
the real samplers on clips of the synthetic world, scored by its detector.

With the video head predicting velocity (Wan's parametrisation), one clip of 16 frames trained
for 300 steps plateaus at a loss of 0.43 and its sample stays far from the clip (MSE 0.28, no
attribute found): pixel tokens carry 192 values each, which a velocity head must carry through
the network as noise. ``prediction: data`` memorises it (MSE 0.01, every attribute).
"""

import pytest
import torch

from datamodules.synthetic import WorldTokenizer, make_clip, mean_accuracy, score_video, words
from datamodules.synthetic.world import world_config
from lightning_vigu.flows import SamplerConfig
from lightning_vigu.module import UniViGU
from lightning_vigu.objective import ObjectiveConfig

# the `gate` size (tiny's layout, 4 layers of width 128) with the recipe's positions, rope and
# pooled prompt (conf/model/tiny.yaml)
MODEL = {
    "text_absolute_positions": True,
    "video_absolute_positions": True,
    "video_rope": "mixed",
    "pooled_prompt": True,
}


def world_clips(num: int, frames: int) -> tuple[torch.Tensor, list[dict]]:
    """The first ``num`` training clips of the CPU world with ``frames`` frames: videos
    ``(num, 3, frames, 32, 32)`` in [-1, 1] and their records."""
    config = world_config("cpu", num_frames=frames)
    clips = [make_clip(config, 0, "train", i) for i in range(num)]
    videos = [torch.from_numpy(v).permute(3, 0, 1, 2).float() / 127.5 - 1 for v, _ in clips]
    return torch.stack(videos), [r for _, r in clips]


def memorise(phase, videos, records, steps: int, frames: int, **module_args) -> UniViGU:
    """Train a small unified model on the clips (each batch holds every clip twice) with the
    recipe's objective (x-prediction, shifted training times) and plain AdamW."""
    torch.manual_seed(0)
    module = UniViGU(
        size="gate",
        model_overrides=MODEL,
        tokenizer=WorldTokenizer(),
        caption_length=64,
        prompt_length=24,
        phase=phase,
        video_shape=(frames, 32, 32),
        objective=ObjectiveConfig(prediction="data", time_shift=3.0, cfg_dropout=0.0),
        sampler=SamplerConfig(video_steps=20, text_steps=20, guidance_scale=1.0, temperature=0.0),
        **module_args,
    )
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    index = torch.arange(8) % len(records)
    batch = {
        "video": videos[index],
        "prompt": [records[i]["prompt"] for i in index],
        "caption": [records[i]["caption"] for i in index],
    }
    for step in range(steps):
        out = module.compute_loss(batch, module.phase, module.step_generator("train", step))
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return module.eval()


def test_generator_reproduces_one_clip_from_its_prompt():
    videos, records = world_clips(1, frames=8)
    module = memorise("generator", videos, records, steps=150, frames=8)
    sample = module.generate_video([records[0]["prompt"]], seed=1)
    assert ((sample - videos) ** 2).mean().item() <= 0.05
    assert score_video(sample[0], records[0], "all").accuracy == 1.0  # every attribute


def test_generator_gives_each_of_a_handful_of_prompts_its_own_clip():
    videos, records = world_clips(4, frames=4)
    module = memorise("generator", videos, records, steps=400, frames=4)
    samples = module.generate_video([r["prompt"] for r in records], seed=1)
    mse = ((samples[:, None] - videos[None]) ** 2).flatten(2).mean(-1)  # (sample, clip)
    assert mse.argmin(1).tolist() == [0, 1, 2, 3], mse  # each prompt -> its own clip
    assert mse.diag().max().item() <= 0.06 and mse.diag().mean().item() <= 0.04, mse.diag()
    adherence = mean_accuracy([score_video(v, r, "prompt") for v, r in zip(samples, records)])
    assert adherence["accuracy"] >= 0.75, adherence


@pytest.mark.parametrize("caption_objective", ["flow", "autoregressive"])
def test_captioner_rewrites_a_handful_of_detailed_captions_exactly(caption_objective):
    videos, records = world_clips(4, frames=4)
    phase = {"preset": "refine", "task_mix": {"v2t": 1.0}}
    module = memorise(
        phase, videos, records, steps=160, frames=4, caption_objective=caption_objective
    )
    captions = module.caption(videos, seed=1)
    assert [words(c) for c in captions] == [words(r["caption"]) for r in records], captions
