"""An analytic detector: recover a clip's scene from its pixels, then score it against a record.

1. Every pixel gets the nearest palette colour (object colours and backgrounds); the most
   frequent background colour is the background.
2. For each object colour, the dominant connected blob of each frame (tiny specks ignored)
   is grown by one pixel, and its soft coverage ``alpha`` is read from where each pixel lies
   on the line between the background and the object colour (this undoes anti-aliasing).
3. Shape: for each candidate shape, the template the renderer would draw with the blob's
   area and centroid is compared to ``alpha`` (soft IoU); the best shape wins. Its side
   gives the size.
4. Motion: a straight line fitted to the per-frame centres gives the start cell (the fit at
   frame 0) and the displacement over the clip: still, or a direction and slow/fast. A blob
   whose centres wander off that line (``max_track_residual``) is not an object of the world
   -- colourful noise, flicker -- and is left out: otherwise a video of blobs in every colour
   would "show" whatever colour a prompt asks for.

Colour, size, start, motion and speed thresholds sit halfway between the world's values,
so moderately imperfect (generated) videos are still read correctly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from datamodules.synthetic.render import SHAPE_AREA, SHAPE_CENTROID_V, coverage
from datamodules.synthetic.scoring import AttributeScore, Scope, score_scene
from datamodules.synthetic.world import (
    BACKGROUNDS,
    CELL_X,
    CELL_Y,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SIZES,
    SPEEDS,
)

_NAMES = (*COLOURS, *BACKGROUNDS)
_PALETTE = np.asarray([*COLOURS.values(), *BACKGROUNDS.values()], dtype=np.float32)  # (K, 3)
_N_OBJ = len(COLOURS)


@dataclass(frozen=True)
class DetectorSettings:
    """Tolerances of the detector (fractions of the frame unless said otherwise).

    Args:
        min_area: smallest blob area that counts as an object in a frame (fraction of the
            frame's area); smaller specks are ignored.
        min_presence: fraction of frames in which a colour must be found to be an object.
        max_residual: pixels farther than this fraction of ``|colour - background|`` from the
            background-to-colour line get no coverage (they belong to something else).
        shape_frames: frames (evenly spaced) used to classify the shape.
        max_track_residual: the largest RMS distance (fraction of the frame side) of a blob's
            per-frame centres from their fitted straight line for it to count as an object.
            Rendered objects stay within 0.003 (all of 300 clips); blobs of upsampled colour
            noise wander 0.22 or more (99% of them).
    """

    min_area: float = 0.012
    min_presence: float = 0.5
    max_residual: float = 0.3
    shape_frames: int = 8
    max_track_residual: float = 0.05


def frames_rgb(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(T, H, W, 3)`` float32 RGB in ``[0, 255]`` from a ``(3, T, H, W)`` float video in
    ``[-1, 1]`` or ``(T, H, W, 3)`` uint8 frames."""
    x = video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if x.dtype == np.uint8:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be (T, H, W, 3), got {x.shape}")
        return x.astype(np.float32)
    if x.ndim != 4 or x.shape[0] != 3:
        raise ValueError(f"a float video must be (3, T, H, W) in [-1, 1], got {x.shape}")
    return ((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.float32).transpose(1, 2, 3, 0)


@dataclass(frozen=True)
class Blob:
    """One object's coverage in one frame: a crop ``window`` at ``origin`` ``(x, y)``, its
    area in pixels and its centroid ``(x, y)`` in frame pixels."""

    window: np.ndarray
    origin: tuple[int, int]
    area: float
    centroid: tuple[float, float]


def _colour_alpha(
    frames: np.ndarray, labels: np.ndarray, j: int, bg: np.ndarray, settings: DetectorSettings
) -> np.ndarray:
    """Coverage ``(T, H, W)`` of object colour ``j`` read off the background-to-colour line;
    pixels far from that line or labelled as another object colour get 0."""
    axis = _PALETTE[j] - bg  # (3,)
    rel = frames - bg  # (T, H, W, 3)
    alpha = np.clip(rel @ axis / float(axis @ axis), 0.0, 1.0)  # (T, H, W)
    residual = np.linalg.norm(rel - alpha[..., None] * axis, axis=-1)  # (T, H, W)
    keep = (residual <= settings.max_residual * np.linalg.norm(axis)) & ~(
        (labels < _N_OBJ) & (labels != j)
    )
    return np.where(keep, alpha, 0.0)


def _blob(alpha: np.ndarray, labelled: np.ndarray, min_mass: float) -> Blob | None:
    """The dominant blob of one frame: the connected component of pixels labelled with the
    colour that carries the most coverage, grown by one pixel."""
    comps, n = ndimage.label(labelled, structure=np.ones((3, 3)))
    if n == 0:
        return None
    mass = ndimage.sum_labels(alpha, comps, index=np.arange(1, n + 1))  # (n,)
    if mass.max() < min_mass:
        return None
    region = ndimage.binary_dilation(comps == int(mass.argmax()) + 1, structure=np.ones((3, 3)))
    rows, cols = np.nonzero(region)
    h, w = alpha.shape
    top, left = max(int(rows.min()) - 2, 0), max(int(cols.min()) - 2, 0)
    bottom, right = min(int(rows.max()) + 3, h), min(int(cols.max()) + 3, w)
    window = (alpha * region)[top:bottom, left:right]  # (h', w') crop around the blob
    area = float(window.sum())
    ys, xs = np.mgrid[top:bottom, left:right] + 0.5  # pixel centres
    centroid = (float((window * xs).sum() / area), float((window * ys).sum() / area))
    return Blob(window, (left, top), area, centroid)


def _placement(blob: Blob, shape: str) -> tuple[tuple[float, float], float]:
    """Bounding-square centre ``(x, y)`` and side of ``shape`` with the blob's area/centroid."""
    half = float(np.sqrt(blob.area / SHAPE_AREA[shape]))
    cx, cy = blob.centroid
    return (cx, cy - SHAPE_CENTROID_V.get(shape, 0.0) * half), 2 * half


def _shape_iou(blob: Blob, shape: str) -> float:
    """Soft IoU of the blob with the template of ``shape`` drawn at its placement."""
    (cx, cy), side = _placement(blob, shape)
    h, w = blob.window.shape
    template = coverage(shape, (cx - blob.origin[0], cy - blob.origin[1]), side, h, w)
    return float(np.minimum(blob.window, template).sum() / np.maximum(blob.window, template).sum())


def _nearest(value: float, grid: dict[str, float]) -> str:
    """The grid name (e.g. ``CELL_X``) nearest to a coordinate given as a fraction of the frame."""
    return min(grid, key=lambda name: abs(grid[name] - value))


def _object(
    blobs: dict[int, Blob], colour: str, t: int, h: int, w: int, settings: DetectorSettings
) -> dict:
    present = sorted(blobs)
    n_picks = min(settings.shape_frames, len(present))
    picks = [present[i] for i in np.linspace(0, len(present) - 1, n_picks).round().astype(int)]
    ious = {s: float(np.mean([_shape_iou(blobs[k], s) for k in picks])) for s in SHAPES}
    shape = max(ious, key=ious.get)
    placements = [_placement(blobs[k], shape) for k in present]
    side = float(np.median([p[1] for p in placements])) / min(h, w)
    small, large = sorted(SIZES.values())
    centres = np.asarray([p[0] for p in placements])  # (n, 2) x, y
    if len(present) > 1:
        frames_at = np.asarray(present, dtype=np.float64)
        slope, start = np.polyfit(frames_at, centres, 1)  # each (2,)
        off_line = centres - (start + frames_at[:, None] * slope)  # (n, 2) pixels
        residual = float(np.sqrt((off_line**2).sum(1).mean())) / min(h, w)
    else:
        slope, start, residual = np.zeros(2), centres[0], 0.0
    travel = slope * (t - 1) / np.asarray([w, h])  # fraction of the frame side per axis
    slow, fast = sorted(SPEEDS.values())
    axis = int(np.argmax(np.abs(travel)))
    if abs(travel[axis]) < slow / 2:
        motion, speed = "still", "none"
    else:
        motion = (
            ("left", "right")[int(travel[0] > 0)]
            if axis == 0
            else ("up", "down")[int(travel[1] > 0)]
        )
        speed = "fast" if abs(travel[axis]) >= (slow + fast) / 2 else "slow"
    row, col = _nearest(start[1] / h, CELL_Y), _nearest(start[0] / w, CELL_X)
    return {
        "colour": colour,
        "shape": shape,
        "size": "large" if side >= (small + large) / 2 else "small",
        "start": f"{row}-{col}",
        "motion": motion,
        "speed": speed,
        "shape_iou": {s: round(v, 3) for s, v in ious.items()},
        "side": round(side, 4),
        "travel": [round(float(v), 4) for v in travel],
        "track_residual": round(residual, 4),
        "frames_found": len(present),
    }


def detect(video: torch.Tensor | np.ndarray, settings: DetectorSettings | None = None) -> dict:
    """Detect the scene in one clip.

    Args:
        video: ``(3, T, H, W)`` float in ``[-1, 1]`` or ``(T, H, W, 3)`` uint8 frames.
        settings: tolerances (defaults suit the world's clips and blurry generations).

    Returns:
        A scene description ``{"background", "count", "objects": [...]}``; each object also
        carries diagnostics (``shape_iou``, ``side``, ``travel``, ``frames_found``).
    """
    settings = settings or DetectorSettings()
    frames = frames_rgb(video)
    t, h, w, _ = frames.shape
    dist = ((frames[..., None, :] - _PALETTE) ** 2).sum(-1)  # (T, H, W, K)
    labels = dist.argmin(-1)  # (T, H, W)
    counts = np.bincount(labels.ravel(), minlength=len(_NAMES))
    b = _N_OBJ + int(counts[_N_OBJ:].argmax())
    bg_pixels = frames[labels == b]
    bg = bg_pixels.mean(0) if len(bg_pixels) else _PALETTE[b]
    min_mass = settings.min_area * h * w
    objects = []
    for j, colour in enumerate(COLOURS):
        if counts[j] < min_mass * t * settings.min_presence / 2:
            continue  # too few pixels of this colour anywhere: skip the per-frame work
        alpha = _colour_alpha(frames, labels, j, bg, settings)  # (T, H, W)
        blobs = {k: _blob(alpha[k], labels[k] == j, min_mass) for k in range(t)}
        blobs = {k: b for k, b in blobs.items() if b is not None}
        if len(blobs) >= settings.min_presence * t:
            found = _object(blobs, colour, t, h, w, settings)
            if found["track_residual"] <= settings.max_track_residual:
                objects.append(found)
    return {"background": _NAMES[b], "count": len(objects), "objects": objects}


def score_video(
    video: torch.Tensor | np.ndarray,
    record: dict,
    scope: Scope = "all",
    settings: DetectorSettings | None = None,
) -> AttributeScore:
    """Detect the scene in ``video`` and score it against ``record`` attribute by attribute.

    Args:
        video: ``(3, T, H, W)`` float in ``[-1, 1]`` or ``(T, H, W, 3)`` uint8 frames.
        record: the clip's json record (or any record with the same fields).
        scope: ``"all"`` scores every attribute; ``"prompt"`` only what the prompt states
            (use it for videos generated from the record's prompt).
        settings: detector tolerances.
    """
    return score_scene(detect(video, settings), record, scope)


def travel_ratios(scene: dict, record: dict) -> list[tuple[str, float]]:
    """How far each moving object the prompt names travels in a detected ``scene``, as a
    fraction of how far the record says it moves: ``(asked speed, ratio)`` per object, the
    ratio being the found displacement along the record's direction over the record's
    distance (1: as asked; 0: still; below 0: the wrong way).

    Objects are matched by colour (every object of a clip has its own colour); a named object
    whose colour was not found, or that the record keeps still, has no ratio. Speed adherence
    says only whether a track crossed the slow/fast threshold; the ratios say whether sampled
    objects move too little (a mean of possible tracks) or too much, and, per asked speed,
    whether slow and fast are told apart (a fast object that travels a slow distance: 0.5).
    """
    found = {o["colour"]: o for o in scene.get("objects", [])}
    ratios = []
    for i in record["prompt_objects"]:
        obj = record["objects"][i]
        if obj["motion"] == "still" or obj["colour"] not in found:
            continue
        dx, dy = DIRECTIONS[obj["motion"]]
        tx, ty = found[obj["colour"]]["travel"]
        ratios.append((obj["speed"], float((dx * tx + dy * ty) / SPEEDS[obj["speed"]])))
    return ratios
