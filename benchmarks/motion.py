"""Motion probe: the smallest world in which a generator must take an object's motion from
its prompt, trained on the CPU in minutes.

    python -m benchmarks.motion --steps 1200                     # the recipe (conf/model/tiny.yaml)
    python -m benchmarks.motion --steps 1200 --no-video-positions  # Wan's rope alone

One red square on black, ``--frames`` frames of 32x32, starting anywhere and either still or
moving ``--travel`` pixels left, right, up or down over the clip; the prompt names the motion
and nothing else varies. The ``gate`` model (width 128, four layers: the memorisation gate's,
``tests/test_memorisation.py``) learns it with the recipe's objective (x-prediction, shift 3,
prompt dropout 0.1) from freshly drawn clips. Two numbers come out:

- ``motion_accuracy``: the motion of sampled clips (the centroid's first-to-last-frame
  displacement), 12 prompts per motion; 0.2 is chance;
- ``travel`` / ``travel_reversed_prompt`` per flow time: how far the square moves along its
  true direction in the one-step prediction from a noised real clip, with the true prompt and
  with its direction reversed. Equal values mean the prompt does not steer the motion (what
  the network draws comes from the noised clip alone); a model that reads its prompt moves
  the square backwards under the reversed prompt at high noise (low ``t``). At ``t = 0`` the
  input is pure noise and the best prediction is the mean clip of the prompt's motion, whose
  square travels nearly the full ``--travel``: any travel there comes from the prompt alone.

With ``--colours N`` the square's colour is drawn from the first ``N`` of :data:`COLOURS` and the
prompt names it ("a green square moves left"), one step toward the GPU world, whose prompts
state colour and shape too; sampling and the travel are still measured on red squares.

With ``--speeds`` a moving square travels either ``--travel`` pixels ("a red square moves
quickly left") or half of it ("... moves slowly left"), as the world's fast and slow objects
(0.30 and 0.15 of the frame); ``speed_accuracy`` then counts sampled clips that move the asked
way at the asked speed (fast from three quarters of the travel on, slow from a quarter to
three quarters), and ``travel_ratio_slow`` / ``_fast`` give the median travel over the asked
distance per asked speed (the GPU world's twin moved every object the slow distance,
``ablation.md`` part 14).

The same failure as the GPU world's static samples (``ablation.md``: the reversed prompt
changes nothing) shows here in minutes, so a recipe change aimed at motion is tried here first.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from torch import Tensor

from benchmarks.common import markdown_table, write_results
from benchmarks.denoise import one_step_predictions, reverse_directions
from datamodules.synthetic.world import COLOURS as WORLD_COLOURS

SIZE, SIDE = 32, 10
MOTIONS = {"still": (0, 0), "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PROMPTS = {m: f"a red square moves {m}" for m in MOTIONS} | {"still": "a red square does not move"}
# the square's colour: the synthetic world's six names (red first, the probe's only colour by
# default), each drawn at full strength in the channels where the world's shade is bright
COLOURS = {name: tuple(int(v > 127) for v in rgb) for name, rgb in WORLD_COLOURS.items()}
TIMES = (0.0, 0.03, 0.06, 0.1, 0.2)  # 0: pure noise, where the prompt is all there is to read


SPEEDS = {"slow": 0.5, "fast": 1.0}  # a moving square's travel, as a fraction of --travel
SPEED_WORDS = {"slow": "slowly", "fast": "quickly"}


def prompt(motion: str, colour: str = "red", speed: str | None = None) -> str:
    """The prompt of a clip: its motion (at ``speed``, when given and the square moves), and
    the square's colour."""
    text = PROMPTS[motion].replace("red", colour)
    if speed is not None and motion != "still":
        text = text.replace(" moves ", f" moves {SPEED_WORDS[speed]} ")
    return text


def render(
    motions: list[str],
    frames: int,
    travel: float | list[float],
    rng: np.random.Generator,
    colours: list[str] | None = None,
) -> Tensor:
    """Clips ``(B, 3, frames, 32, 32)`` in [-1, 1]: the square's start is uniform over the
    places that keep its whole track inside the frame; edges are anti-aliased; ``travel`` is
    one distance for all clips or one per clip; ``colours`` (default: all red) names each
    square's colour in :data:`COLOURS`."""
    travels = travel if isinstance(travel, list) else [travel] * len(motions)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    clips = np.full((len(motions), 3, frames, SIZE, SIZE), -1.0, np.float32)
    lo, hi = SIDE / 2, SIZE - SIDE / 2
    for i, m in enumerate(motions):
        dx, dy = MOTIONS[m]
        travel = travels[i]
        x0 = rng.uniform(lo + max(0, -dx) * travel, hi - max(0, dx) * travel)
        y0 = rng.uniform(lo + max(0, -dy) * travel, hi - max(0, dy) * travel)
        for f in range(frames):
            c = f / max(frames - 1, 1)
            cx, cy = x0 + dx * travel * c, y0 + dy * travel * c
            cover = np.clip(SIDE / 2 - np.abs(xx - cx) + 0.5, 0, 1)
            cover = cover * np.clip(SIDE / 2 - np.abs(yy - cy) + 0.5, 0, 1)
            for channel, on in enumerate(COLOURS[colours[i] if colours else "red"]):
                if on:
                    clips[i, channel, f] = -1 + 1.8 * cover
    return torch.from_numpy(clips)


def centroids(videos: Tensor) -> Tensor:
    """``(B, T, 2)`` centroid ``(x, y)`` of the red coverage per frame (NaN on empty frames)."""
    w = ((videos[:, 0] - videos[:, 1:].amax(1)) / 1.8).clamp(0, 1)  # (B, T, H, W)
    grid = torch.arange(SIZE, dtype=torch.float32) + 0.5
    mass = w.sum((-1, -2))
    x = (w.sum(-2) * grid).sum(-1) / mass
    y = (w.sum(-1) * grid).sum(-1) / mass
    return torch.stack([x, y], -1)


def classify(videos: Tensor, travel: float, still_below: float = 0.5) -> list[str]:
    """The motion of each clip: still below ``still_below`` of the travel, else the main axis'
    direction; ``none`` when a frame shows no square."""
    out = []
    for c in centroids(videos):
        if torch.isnan(c).any():
            out.append("none")
            continue
        dx, dy = (c[-1] - c[0]).tolist()
        if max(abs(dx), abs(dy)) < travel * still_below:
            out.append("still")
        elif abs(dx) > abs(dy):
            out.append("right" if dx > 0 else "left")
        else:
            out.append("down" if dy > 0 else "up")
    return out


def along(videos: Tensor, motions: list[str]) -> Tensor:
    """Displacement (pixels) of each clip's square along its motion's direction, first to last
    frame (moving clips only)."""
    d = centroids(videos)
    d = torch.nan_to_num(d[:, -1] - d[:, 0])
    unit = torch.tensor([MOTIONS[m] for m in motions], dtype=torch.float32)
    return (d * unit).sum(-1)


def build(
    frames: int,
    video_positions: bool,
    seed: int,
    patch_size=(1, 2, 2),
    pooled_prompt=False,
    loss_weighting: str = "none",
    video_rope: str = "axial",
):
    from datamodules.synthetic import WorldTokenizer
    from lightning_vigu.flows import SamplerConfig
    from lightning_vigu.module import UniViGU
    from lightning_vigu.objective import ObjectiveConfig

    torch.manual_seed(seed)
    return UniViGU(
        size="gate",  # the memorisation gate's model
        model_overrides={
            "text_absolute_positions": True,
            "video_absolute_positions": video_positions,
            "patch_size": list(patch_size),
            "pooled_prompt": pooled_prompt,
            "video_rope": video_rope,
        },
        tokenizer=WorldTokenizer(),
        caption_length=16,
        prompt_length=12,
        phase="generator",
        video_shape=(frames, SIZE, SIZE),
        objective=ObjectiveConfig(
            prediction="data", time_shift=3.0, cfg_dropout=0.1, loss_weighting=loss_weighting
        ),
        sampler=SamplerConfig(video_steps=20, guidance_scale=3.0, shift=3.0),
    )


def train(
    module,
    steps: int,
    frames: int,
    travel: float,
    batch: int,
    seed: int,
    lr: float = 1e-3,
    minutes: float | None = None,
    colours: int = 1,
    speeds: bool = False,
) -> tuple[float, int]:
    """AdamW with 100 warm-up steps and a cosine to zero over ``steps``, or, with ``minutes``,
    over as many steps as that wall clock holds (planned from steps 10-50); each square's colour
    is one of the first ``colours`` of :data:`COLOURS`; with ``speeds`` each moving square is
    slow or fast (:data:`SPEEDS`), as its prompt says. Returns the mean of the last 100 losses
    and the steps taken."""
    import time

    from tqdm import tqdm

    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    plan = {"steps": steps}
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / plan["steps"])),
    )
    rng, names, losses = np.random.default_rng(seed), list(MOTIONS), []
    module.train()
    bar, step, start = tqdm(total=steps, desc="motion probe", unit="step"), 0, time.perf_counter()
    while step < plan["steps"]:
        motions = [names[i] for i in rng.integers(len(names), size=batch)]
        tints = ["red"] * batch  # drawn only with more colours: the default stream stays as it was
        if colours > 1:
            tints = [list(COLOURS)[i] for i in rng.integers(colours, size=batch)]
        paces = [None] * batch  # drawn only with speeds: the default stream stays as it was
        if speeds:
            paces = [list(SPEEDS)[i] for i in rng.integers(len(SPEEDS), size=batch)]
        prompts = [prompt(m, c, v) for m, c, v in zip(motions, tints, paces)]
        travels = [travel * SPEEDS[v] if v else travel for v in paces]
        video = render(motions, frames, travels, rng, tints).to(module.device)
        data = {"video": video, "prompt": prompts, "caption": prompts}
        out = module.compute_loss(data, module.phase, module.step_generator("train", step))
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
        step += 1
        if step == 10:  # the first steps carry the start-up (allocation, kernel choice)
            warm = time.perf_counter()
        if minutes and step == 50:  # the budget sets the length of the schedule
            now = time.perf_counter()
            per_step = (now - warm) / 40
            plan["steps"] = max(100, step + int((minutes * 60 - (now - start)) / per_step))
            bar.total = plan["steps"]
        bar.update()
    bar.close()
    return float(np.mean(losses[-100:])), step


@torch.no_grad()
def measure(
    module,
    frames: int,
    travel: float,
    per_motion: int = 12,
    clips: int = 100,
    guidance: tuple[float, ...] = (3.0,),
    speeds: bool = False,
) -> dict:
    """Sampled motion accuracy (at each guidance scale; the first is the headline) and the
    one-step travel with true and reversed prompts; with ``speeds``, each moving motion is asked
    at both speeds (``per_motion`` clips each) and the speed is scored too."""
    module.eval()
    paces = list(SPEEDS) if speeds else [None]
    asked = [(m, v) for m in MOTIONS for v in ([None] if m == "still" else paces)]
    asked = [a for a in asked for _ in range(per_motion)]
    prompts = [prompt(m, speed=v) for m, v in asked]
    still_below = SPEEDS["slow"] / 2 if speeds else 0.5  # a slow square must count as moving
    by_scale, videos = {}, {}
    for scale in guidance:  # the same noise at every scale
        videos[scale] = module.generate_video(prompts, seed=0, guidance_scale=scale).cpu()
        by_scale[scale] = classify(videos[scale], travel, still_below)
    drawn = by_scale[guidance[0]]
    result = {}
    if speeds:
        moving = [i for i, (m, _) in enumerate(asked) if m != "still"]
        by_speed = {}
        for scale, video in videos.items():
            gone = along(video[moving], [asked[i][0] for i in moving]) / travel
            fast = (gone >= 0.75).tolist()
            slow = ((gone >= 0.25) & (gone < 0.75)).tolist()
            right = [
                by_scale[scale][i] == asked[i][0]
                and (fast[k] if asked[i][1] == "fast" else slow[k])
                for k, i in enumerate(moving)
            ]
            scored = {"speed_accuracy": float(np.mean(right))}
            for v in SPEEDS:
                ratio = [
                    gone[k].item() / SPEEDS[v] for k, i in enumerate(moving) if asked[i][1] == v
                ]
                scored[f"travel_ratio_{v}"] = float(np.median(ratio))
            by_speed[scale] = scored
        result = {**by_speed[guidance[0]], "speed_by_guidance": by_speed}
    moving_motions = [m for m in MOTIONS if m != "still"]
    motions = [moving_motions[i % len(moving_motions)] for i in range(clips)]
    real = render(motions, frames, travel, np.random.default_rng(7))
    told = [prompt(m, speed="fast" if speeds else None) for m in motions]  # the full travel
    flipped = [reverse_directions(p) for p in told]
    rows = []
    for t in TIMES:  # the same noise (seed 0) under both prompts
        pred = [one_step_predictions(module, real, p, t, seed=0).cpu() for p in (told, flipped)]
        rows.append(
            {
                "t": t,
                "travel": along(pred[0], motions).mean().item(),
                "travel_reversed_prompt": along(pred[1], motions).mean().item(),
            }
        )
    accuracy = {
        s: float(np.mean([d == a[0] for d, a in zip(v, asked)])) for s, v in by_scale.items()
    }
    counts = {m: drawn.count(m) for m in [*MOTIONS, "none"]}
    return {
        "motion_accuracy": accuracy[guidance[0]],
        "motion_accuracy_by_guidance": accuracy,
        "drawn": counts,
        **result,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--minutes", type=float, default=None, help="train for this long instead")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--travel", type=float, default=12.0, help="pixels over the clip")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--video-positions",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sine-cosine positions on the video tokens (the recipe; --no-: Wan's rope alone)",
    )
    p.add_argument(
        "--patch-size",
        nargs=3,
        type=int,
        default=[1, 2, 2],
        metavar=("T", "H", "W"),
        help="latent frames, rows, columns per token (2 2 2: a token spans two frames)",
    )
    p.add_argument(
        "--pooled-prompt",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the prompt's mean feature on the time embedding (model_overrides.pooled_prompt)",
    )
    p.add_argument(
        "--video-rope",
        default="axial",
        choices=["axial", "mixed"],
        help="Wan's axial 3-D rope or pairs turning along oblique directions (model_overrides)",
    )
    p.add_argument(
        "--loss-weighting",
        default="none",
        choices=["none", "snr", "data"],
        help="the video loss weighting (ObjectiveConfig.loss_weighting)",
    )
    p.add_argument(
        "--guidance",
        nargs="+",
        type=float,
        default=[3.0],
        help="guidance scales to sample at (the first is the headline accuracy); 1: no guidance",
    )
    p.add_argument(
        "--colours",
        type=int,
        default=1,
        choices=range(1, len(COLOURS) + 1),
        metavar=f"1..{len(COLOURS)}",
        help="colours the square is drawn in, named in the prompt (1: red only)",
    )
    p.add_argument(
        "--speeds",
        action="store_true",
        help="moving squares go slowly (half the travel) or quickly, as the prompt says",
    )
    p.add_argument("--label", default=None, help="names the result files")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    a = p.parse_args(argv)
    label = a.label or ("positions" if a.video_positions else "rope")
    if a.patch_size != [1, 2, 2]:
        label += "_patch" + "x".join(map(str, a.patch_size))
    if a.pooled_prompt:
        label += "_pooled"
    if a.loss_weighting != "none":
        label += f"_weight{a.loss_weighting}"
    if a.video_rope != "axial":
        label += f"_rope{a.video_rope}"
    if a.colours > 1:
        label += f"_colours{a.colours}"
    if a.speeds:
        label += "_speeds"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = build(
        a.frames,
        a.video_positions,
        a.seed,
        a.patch_size,
        a.pooled_prompt,
        a.loss_weighting,
        a.video_rope,
    ).to(device)
    loss, steps = train(
        module,
        a.steps,
        a.frames,
        a.travel,
        a.batch,
        a.seed,
        minutes=a.minutes,
        colours=a.colours,
        speeds=a.speeds,
    )
    result = measure(module, a.frames, a.travel, guidance=tuple(a.guidance), speeds=a.speeds)
    speed = (
        f" Sampled speed accuracy **{result['speed_accuracy']:.3f}** (direction and speed both "
        f"right; chance about 0.1); median travel over the asked distance: slow "
        f"{result['travel_ratio_slow']:.2f}, fast {result['travel_ratio_fast']:.2f}; by guidance "
        "scale: "
        + ", ".join(
            f"{g}: {r['speed_accuracy']:.3f} ({r['travel_ratio_slow']:.2f} / "
            f"{r['travel_ratio_fast']:.2f})"
            for g, r in result["speed_by_guidance"].items()
        )
        + "."
        if a.speeds
        else ""
    )
    table = (
        f"# Motion probe: {label}\n\n{steps} steps at batch {a.batch}, {a.frames} frames, "
        f"travel {a.travel} px, video positions {'on' if a.video_positions else 'off'}, pooled "
        f"prompt {'on' if a.pooled_prompt else 'off'}, {a.video_rope} video rope, {a.colours} "
        f"colour(s) named in the prompt (measured on red), tokens "
        f"of {'x'.join(map(str, a.patch_size))} latent frames x rows x columns; seed {a.seed}; final "
        f"loss {loss:.4f}, loss weighting {a.loss_weighting}. Sampled motion accuracy "
        f"**{result['motion_accuracy']:.3f}** at guidance {a.guidance[0]} (chance 0.2; drawn: "
        f"{result['drawn']}); by guidance scale: "
        + ", ".join(f"{s}: {v:.3f}" for s, v in result["motion_accuracy_by_guidance"].items())
        + "."
        + speed
        + " One-step travel along the true direction (pixels; "
        f"real clips: {a.travel}), with the true and the reversed prompt:\n\n"
        + markdown_table(result["rows"], ["t", "travel", "travel_reversed_prompt"])
    )
    payload = {"args": vars(a), "steps": steps, "loss": loss, **result}
    write_results(f"motion_{label}_{device}", payload, table, a.out)
    print(table)


if __name__ == "__main__":
    main()
