"""The synthetic world: attribute sets, presets and the sampling of one clip's scene.

A clip shows one to three objects on a plain background. Every object has a distinct colour
(so colour segmentation identifies it), a shape, a size, a start cell on a 3 x 3 grid and a
motion (left/right/up/down at a slow or fast speed, or still). Objects move in straight lines
at constant speed, stay fully inside the frame and keep a gap between each other for the
whole clip, so the analytic detector can recover every attribute.

Scenes are sampled from ``numpy.random.default_rng([seed, split_id, index])``: the same seed,
split and index always give the same scene, independently of how clips are sharded.

Held-out combinations: some ``(shape, colour)`` and ``(colour, motion)`` pairs never occur
in the ``train``/``val``/``test`` splits; every clip of the ``unseen`` split has at least one
of them on its first object (the one every prompt mentions).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np

GENERATOR_VERSION = 1
"""Bumped whenever rendering, templates or sampling change, so cached shards are rebuilt."""

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 240),
    "yellow": (240, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 210, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (250, 250, 250),
    "grey": (128, 128, 128),
    "navy": (20, 20, 90),
}
SIZES: dict[str, float] = {"small": 0.25, "large": 0.375}
"""Side of the object's bounding square as a fraction of the frame's shorter side."""
SPEEDS: dict[str, float] = {"slow": 0.15, "fast": 0.30}
"""Distance travelled over the whole clip as a fraction of the frame side along the motion."""
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
CELL_X: dict[str, float] = {"left": 0.2, "centre": 0.5, "right": 0.8}
CELL_Y: dict[str, float] = {"top": 0.2, "middle": 0.5, "bottom": 0.8}
CELLS = tuple(f"{y}-{x}" for y in CELL_Y for x in CELL_X)
"""Start cells, named ``"<row>-<column>"``, e.g. ``"top-left"`` or ``"middle-centre"``."""
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2, "unseen": 3}
OBJECT_ATTRIBUTES = ("colour", "shape", "size", "start", "motion", "speed")

HELD_OUT_SHAPE_COLOUR = (
    ("circle", "green"),
    ("square", "magenta"),
    ("triangle", "cyan"),
    ("cross", "yellow"),
)
HELD_OUT_COLOUR_MOTION = (("red", "up"), ("blue", "left"), ("yellow", "down"))


@dataclass(frozen=True)
class WorldConfig:
    """Geometry and sampling settings of the world (everything that changes the clips).

    Args:
        height: frame height in pixels.
        width: frame width in pixels.
        num_frames: frames per clip.
        fps: frame rate written into the mp4 and the record.
        count_weights: probabilities of 1, 2, 3 objects per clip.
        still_probability: probability that an object does not move.
        gap: minimum free space between two objects' bounding squares at every frame, as a
            fraction of the frame's shorter side.
        held_out_shape_colour: ``(shape, colour)`` pairs reserved for the unseen split.
        held_out_colour_motion: ``(colour, motion)`` pairs reserved for the unseen split.
    """

    height: int = 32
    width: int = 32
    num_frames: int = 16
    fps: int = 8
    count_weights: tuple[float, ...] = (0.4, 0.35, 0.25)
    still_probability: float = 0.2
    gap: float = 0.0625
    held_out_shape_colour: tuple[tuple[str, str], ...] = field(default=HELD_OUT_SHAPE_COLOUR)
    held_out_colour_motion: tuple[tuple[str, str], ...] = field(default=HELD_OUT_COLOUR_MOTION)

    def fingerprint(self) -> str:
        """A short hash of this config and the generator version (names the cache folder)."""
        text = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def side(self, size: str) -> float:
        """Bounding-square side in pixels of an object of ``size``."""
        return SIZES[size] * min(self.height, self.width)

    def held_out(self, obj: dict) -> list[list[str]]:
        """The held-out combinations an object (a record's object dict) carries."""
        found = []
        if (obj["shape"], obj["colour"]) in self.held_out_shape_colour:
            found.append([obj["shape"], obj["colour"]])
        if (obj["colour"], obj["motion"]) in self.held_out_colour_motion:
            found.append([obj["colour"], obj["motion"]])
        return found


PRESETS: dict[str, WorldConfig] = {
    "cpu": WorldConfig(height=32, width=32, num_frames=16, fps=8),
    "gpu": WorldConfig(height=64, width=64, num_frames=16, fps=8),
}


def world_config(preset: str = "cpu", **overrides) -> WorldConfig:
    """The named preset (``"cpu"``: 16 frames of 32x32 at 8 fps, ``"gpu"``: 16 of 64x64),
    with ``overrides`` (e.g. ``num_frames=8``) applied; ``None`` overrides are ignored."""
    if preset not in PRESETS:
        raise ValueError(
            f"unknown synthetic-world preset '{preset}'; choose one of {sorted(PRESETS)}"
        )
    base = asdict(PRESETS[preset])
    base.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("held_out_shape_colour", "held_out_colour_motion"):
        base[key] = tuple(tuple(pair) for pair in base[key])
    base["count_weights"] = tuple(base["count_weights"])
    return WorldConfig(**base)


def cell_centre(config: WorldConfig, cell: str) -> tuple[float, float]:
    """Pixel centre ``(x, y)`` of a start cell (pixel ``i`` spans ``[i, i + 1)``)."""
    row, col = cell.split("-")
    return CELL_X[col] * config.width, CELL_Y[row] * config.height


def _endpoints(config: WorldConfig, obj: dict) -> tuple[float, float, float, float]:
    """Start centre ``(x0, y0)`` and displacement ``(dx, dy)`` over the clip, in pixels."""
    x0, y0 = cell_centre(config, obj["start"])
    if obj["motion"] == "still":
        return x0, y0, 0.0, 0.0
    ux, uy = DIRECTIONS[obj["motion"]]
    dist = SPEEDS[obj["speed"]] * (config.width if ux else config.height)
    return x0, y0, ux * dist, uy * dist


def trajectory(config: WorldConfig, obj: dict) -> np.ndarray:
    """Centres ``(T, 2)`` of an object's bounding square, ``(x, y)`` in pixels, per frame."""
    x0, y0, dx, dy = _endpoints(config, obj)
    f = np.linspace(0.0, 1.0, config.num_frames)  # (T,) fraction of the way
    return np.stack([x0 + dx * f, y0 + dy * f], axis=1)  # (T, 2)


def _inside(config: WorldConfig, obj: dict) -> bool:
    half = config.side(obj["size"]) / 2
    x0, y0, dx, dy = _endpoints(config, obj)
    xs, ys = (x0, x0 + dx), (y0, y0 + dy)  # motion is linear: the end points bound it
    inside_x = min(xs) >= half and max(xs) <= config.width - half
    return inside_x and min(ys) >= half and max(ys) <= config.height - half


def _apart(config: WorldConfig, a: dict, b: dict) -> bool:
    ax, ay, adx, ady = _endpoints(config, a)
    bx, by, bdx, bdy = _endpoints(config, b)
    reach = (config.side(a["size"]) + config.side(b["size"])) / 2 + config.gap * min(
        config.height, config.width
    )
    last = max(config.num_frames - 1, 1)
    for k in range(config.num_frames):
        f = k / last
        if abs(ax - bx + f * (adx - bdx)) < reach and abs(ay - by + f * (ady - bdy)) < reach:
            return False
    return True


@functools.lru_cache(maxsize=256)
def _moves(config: WorldConfig, size: str, start: str) -> tuple[tuple[str, str], ...]:
    """The ``(motion, speed)`` pairs that keep an object of ``size`` from ``start`` in frame."""
    obj = {"size": size, "start": start}
    return tuple(
        (m, s)
        for m in DIRECTIONS
        for s in SPEEDS
        if _inside(config, {**obj, "motion": m, "speed": s})
    )


def _sample_object(rng: np.random.Generator, config: WorldConfig, colour: str) -> dict:
    obj = {
        "colour": colour,
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "size": list(SIZES)[rng.integers(len(SIZES))],
        "start": CELLS[rng.integers(len(CELLS))],
        "motion": "still",
        "speed": "none",
    }
    if rng.random() >= config.still_probability:
        moves = _moves(config, obj["size"], obj["start"])
        if moves:
            obj["motion"], obj["speed"] = moves[rng.integers(len(moves))]
    return obj


def _place_object(
    rng: np.random.Generator,
    config: WorldConfig,
    colour: str,
    placed: list[dict],
    need_held_out: bool | None,
) -> dict | None:
    """Sample an object that keeps clear of ``placed``; ``need_held_out`` True/False demands
    that it has / has no held-out combination (``None``: either)."""
    for _ in range(200):
        obj = _sample_object(rng, config, colour)
        held = bool(config.held_out(obj))
        if need_held_out is not None and held != need_held_out:
            continue
        if all(_apart(config, obj, other) for other in placed):
            return obj
    return None


def sample_scene(config: WorldConfig, seed: int, split: str, index: int) -> dict:
    """Sample the ground truth of one clip (no pixels, no text).

    Args:
        config: the world.
        seed: the dataset seed.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"unseen"``.
        index: clip index inside the split.

    Returns:
        ``{"background": str, "count": int, "objects": [{"colour", "shape", "size", "start",
        "motion", "speed", "held_out"}, ...]}``; ``speed`` is ``"none"`` for still objects and
        ``held_out`` lists the object's held-out combinations (empty outside ``unseen``).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose one of {sorted(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    background = str(rng.choice(list(BACKGROUNDS)))
    weights = np.asarray(config.count_weights, dtype=float)
    count = int(rng.choice(len(weights), p=weights / weights.sum())) + 1
    for _ in range(100):
        colours = [str(c) for c in rng.permutation(list(COLOURS))[:count]]
        objects: list[dict] = []
        for k, colour in enumerate(colours):
            need = True if split == "unseen" and k == 0 else (None if split == "unseen" else False)
            obj = _place_object(rng, config, colour, objects, need)
            if obj is None:
                break
            objects.append(obj)
        if len(objects) == count:
            for obj in objects:
                obj["held_out"] = config.held_out(obj)
            return {"background": background, "count": count, "objects": objects}
    raise RuntimeError(
        f"could not place objects without overlap for clip {split}/{index} (seed {seed}) in a "
        f"{config.width}x{config.height} frame; use a larger frame or a smaller gap"
    )
