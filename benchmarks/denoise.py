"""One-step denoising probe: what the video path predicts from real clips noised to each level.

    python -m benchmarks.denoise --ckpt runs/generator/checkpoints/last.ckpt   # any trained run

Sampling can fail where denoising does not: the network may draw a clip well from a half-noised
real one and still never commit to a layout on its own path. This probe separates the two. For
each flow time ``t`` it noises real test clips to ``x_t = t x + (1 - t) eps``, lets the model
predict the clean clip in one step from ``x_t`` and the clip's prompt (no guidance), and scores
that prediction with the world's detector against the clip's record, attribute by attribute
(colour, shape, size, start, motion, speed: what the clip shows, not only what the prompt
states), next to the prediction's mean squared error. Low ``t`` is high noise, where a sampler
settles the layout. ``--out`` gets ``denoise_<label>.{json,md}`` and a picture of the
predictions (``denoise_<label>.png``).

**Does the prompt steer the motion?** For the clips whose prompt names a moving object, the
probe also predicts from the same noised clip with the prompt's direction words reversed
(``left`` <-> ``right``, ``up`` <-> ``down``) and measures how far that object's colour travels
along its true direction in each prediction (pixels, first to last frame). A model that reads
the motion from the prompt travels backwards under the reversed prompt at high noise; one that
ignores it travels the same distance under both.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from benchmarks.common import frame_strip, load_for_eval, markdown_table, write_results
from datamodules.synthetic.detector import frames_rgb, score_video
from datamodules.synthetic.scoring import mean_accuracy
from datamodules.synthetic.world import BACKGROUNDS, COLOURS, DIRECTIONS

TIMES = (0.02, 0.05, 0.1, 0.2, 0.4, 0.7)
ATTRIBUTES = ("colour", "shape", "size", "start", "motion", "speed")
OPPOSITE = {"left": "right", "up": "down"}
OPPOSITE |= {b: a for a, b in OPPOSITE.items()}
_DIRECTION_WORD = re.compile(r"\b(left|right|up|down)(wards?)?\b")


def reverse_directions(prompt: str) -> str:
    """``prompt`` with every direction word turned around (``drifts to the left`` ->
    ``drifts to the right``, ``upward`` -> ``downward``)."""
    return _DIRECTION_WORD.sub(lambda m: OPPOSITE[m.group(1)] + (m.group(2) or ""), prompt)


def moving_mention(record: dict) -> dict | None:
    """The first object the prompt names that moves, or ``None``."""
    for i in record.get("prompt_objects", [0]):
        if record["objects"][i]["motion"] != "still":
            return record["objects"][i]
    return None


def travel(video: Tensor, record: dict, obj: dict, max_residual: float = 0.15) -> float:
    """How far ``obj``'s colour moves along its own direction in ``video`` ``(3, T, H, W)``,
    first frame to last, in pixels: coverage read off the background-to-colour line (pixels
    far from that line count 0), centroid per frame."""
    frames = frames_rgb(video)  # (T, H, W, 3) in [0, 255]
    bg = np.asarray(BACKGROUNDS[record["background"]], np.float32)
    axis = np.asarray(COLOURS[obj["colour"]], np.float32) - bg
    rel = frames - bg
    alpha = np.clip(rel @ axis / float(axis @ axis), 0.0, 1.0)  # (T, H, W)
    residual = np.linalg.norm(rel - alpha[..., None] * axis, axis=-1)
    alpha = np.where(residual <= max_residual * np.linalg.norm(axis), alpha, 0.0)
    mass = alpha.sum(axis=(1, 2))  # (T,)
    if mass[0] <= 0 or mass[-1] <= 0:
        return 0.0
    ys, xs = np.mgrid[: alpha.shape[1], : alpha.shape[2]] + 0.5
    cx, cy = (alpha * xs).sum(axis=(1, 2)) / mass, (alpha * ys).sum(axis=(1, 2)) / mass
    ux, uy = DIRECTIONS[obj["motion"]]
    return float((cx[-1] - cx[0]) * ux + (cy[-1] - cy[0]) * uy)


@torch.no_grad()
def one_step_predictions(module, videos: Tensor, prompts: list[str], t: float, seed: int = 0):
    """The clean clips ``(B, 3, T, H, W)`` the module predicts in one step from ``videos``
    noised to flow time ``t`` (the caption stream, when there is one, holds the clean prompt)."""
    device = module.device
    x = module.codec.encode(videos.to(device).float())
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    x_t = t * x + (1 - t) * noise
    b = x.shape[0]
    context = module.encode_prompts(prompts)
    text = t_text = None
    if module.model.has_text:
        text, t_text = module.encode_canvas(prompts), torch.ones(b, device=device)
    tv = torch.full((b,), t, device=device)
    velocity = module.flow(x_t, tv, context, text, t_text).velocity
    return module.codec.decode(x_t + (1 - t) * velocity).clamp(-1, 1)


def probe(
    module, clips: dict, times=TIMES, batch_size: int = 32, seed: int = 0
) -> tuple[list[dict], dict]:
    """Rows ``{t, mse, accuracy, <attribute>...}`` per flow time, and the predictions of the
    first four clips per time (for the picture)."""
    rows, kept = [], {}
    n = len(clips["prompt"])
    movers = [moving_mention(m) for m in clips["meta"]]
    for t in times:
        scores, errors, first, along, reversed_ = [], [], None, [], []
        for i in range(0, n, batch_size):
            videos, prompts = (
                clips["video"][i : i + batch_size],
                clips["prompt"][i : i + batch_size],
            )
            meta, obj = clips["meta"][i : i + batch_size], movers[i : i + batch_size]
            pred = one_step_predictions(module, videos, prompts, t, seed + i).cpu()
            first = pred[:4] if first is None else first
            errors.append((pred - videos).pow(2).flatten(1).mean(1))
            scores += [score_video(v, m, "all") for v, m in zip(pred, meta)]
            flipped = one_step_predictions(
                module, videos, [reverse_directions(p) for p in prompts], t, seed + i
            ).cpu()
            for v, w, m, o in zip(pred, flipped, meta, obj):
                if o is not None:
                    along.append(travel(v, m, o))
                    reversed_.append(travel(w, m, o))
        acc = mean_accuracy(scores)
        row = {"t": t, "mse": torch.cat(errors).mean().item(), "accuracy": acc["accuracy"]}
        row |= {a: acc.get(a) for a in ATTRIBUTES}
        row["travel"] = float(np.mean(along)) if along else None
        row["travel_reversed_prompt"] = float(np.mean(reversed_)) if reversed_ else None
        rows.append(row)
        kept[t] = first
    return rows, kept


def picture(kept: dict, real: Tensor, path: Path, frames: int = 4) -> Path:
    """Rows: the real clips, then the one-step predictions at each flow time; each cell shows
    ``frames`` frames across the clip side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def strip(video: Tensor):  # [-1, 1] -> [0, 1]
        return ((frame_strip(video, frames) + 1) / 2).numpy()

    rows = [("real", real[:4])] + [(f"x̂ from t = {t}", v) for t, v in kept.items()]
    fig, axes = plt.subplots(len(rows), 4, figsize=(13, 1.1 * len(rows) + 0.4), squeeze=False)
    for r, (name, videos) in enumerate(rows):
        for c in range(4):
            ax = axes[r, c]
            if c < len(videos):
                ax.imshow(strip(videos[c]).clip(0, 1))
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    from callbacks.evaluation import collect
    from datamodules import SyntheticDataModule

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a trained UniViGU checkpoint")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--times", nargs="+", type=float, default=list(TIMES))
    p.add_argument("--clips", type=int, default=64, help="test clips scored per time")
    p.add_argument("--preset", default="cpu", help="the synthetic world the run trained on")
    p.add_argument("--split", choices=("test", "unseen"), default="test")
    p.add_argument("--label", default="probe", help="names the result files")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    if any(not 0.0 <= t < 1.0 for t in args.times):
        p.error(f"--times must lie in [0, 1) (flow time: 0 = noise, 1 = data), got {args.times}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module, _ = load_for_eval(Path(args.ckpt), device, weights=args.weights)
    dm = SyntheticDataModule(
        preset=args.preset,
        num_test=max(args.clips, 8),
        num_unseen=max(args.clips, 8),
        test_split=args.split,
        num_workers=0,
        progress=False,
    )
    dm.prepare_data()
    dm.setup("test")
    clips = collect(dm.test_dataloader(), args.clips)
    rows, kept = probe(module, clips, args.times)
    columns = ["t", "mse", "accuracy", *ATTRIBUTES, "travel", "travel_reversed_prompt"]
    movers = [(v, m, o) for v, m in zip(clips["video"], clips["meta"]) if (o := moving_mention(m))]
    real = float(np.mean([travel(v, m, o) for v, m, o in movers])) if movers else None
    table = (
        f"# One-step denoising probe: {args.label}\n\n`{args.ckpt}` ({args.weights} weights), "
        f"{len(clips['prompt'])} {args.split} clips of the `{args.preset}` world; detector "
        "accuracy of the one-step prediction over every attribute of the clip. `travel`: how "
        "far the first moving object the prompt names moves along its direction in the "
        "prediction (pixels, first to last frame; "
        f"{len(movers)} clips, {real if real is None else round(real, 2)} in the real clips); "
        "`travel_reversed_prompt`: the same from the same noised clip with the prompt's "
        "direction words reversed (negative: the prompt steers the motion).\n\n"
        + markdown_table(rows, columns)
    )
    out = write_results(
        f"denoise_{args.label}",
        {"ckpt": args.ckpt, "rows": rows, "real_travel": real},
        table,
        args.out,
    )
    picture(kept, clips["video"], out.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
