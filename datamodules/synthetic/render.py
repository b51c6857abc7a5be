"""Render a scene into RGB frames: anti-aliased shapes composited on a plain background.

Shapes are defined in coordinates ``(u, v)`` relative to the centre of the object's bounding
square, scaled so that the square spans ``[-1, 1]^2`` (``v`` points down, like image rows).
Coverage is estimated by supersampling each pixel, so edges are soft and sub-pixel motion
is smooth; the detector renders the same templates to classify shapes.
"""

from __future__ import annotations

import numpy as np

from datamodules.synthetic.world import BACKGROUNDS, COLOURS, WorldConfig, trajectory

SUPERSAMPLE = 4
CROSS_ARM = 1.0 / 3.0
"""Half-width of the cross's arms in ``(u, v)`` units."""

SHAPE_AREA: dict[str, float] = {
    "circle": float(np.pi),
    "square": 4.0,
    "triangle": 2.0,
    "diamond": 2.0,
    "cross": 8 * CROSS_ARM - 4 * CROSS_ARM**2,
}
"""Area of each shape in ``(u, v)`` units (the bounding square has area 4)."""
SHAPE_CENTROID_V: dict[str, float] = {"triangle": 1.0 / 3.0}
"""Offset of the centroid from the bounding square's centre along ``v`` (0 when absent)."""


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean inside-test of ``shape`` at points ``(u, v)`` (any matching shapes)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (au <= 1.0) & (av <= 1.0)
    if shape == "triangle":  # apex at the top (v = -1), base at the bottom (v = 1)
        return (v <= 1.0) & (au <= (v + 1.0) / 2.0)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "cross":
        return ((au <= CROSS_ARM) & (av <= 1.0)) | ((av <= CROSS_ARM) & (au <= 1.0))
    raise ValueError(f"unknown shape '{shape}'")


def coverage(
    shape: str, centre: tuple[float, float], side: float, height: int, width: int
) -> np.ndarray:
    """Fraction ``(H, W)`` of each pixel covered by ``shape`` with its bounding square of
    ``side`` pixels centred at ``centre`` ``(x, y)``."""
    s = SUPERSAMPLE
    offsets = (np.arange(s) + 0.5) / s  # sub-pixel sample positions inside a pixel
    xs = (np.arange(width)[:, None] + offsets).reshape(-1)  # (W * s,)
    ys = (np.arange(height)[:, None] + offsets).reshape(-1)  # (H * s,)
    half = side / 2.0
    u = (xs[None, :] - centre[0]) / half  # (1, W * s)
    v = (ys[:, None] - centre[1]) / half  # (H * s, 1)
    inside = shape_mask(shape, u, v).astype(np.float32)  # (H * s, W * s)
    return inside.reshape(height, s, width, s).mean(axis=(1, 3))  # (H, W)


def _paint(
    frame: np.ndarray, shape: str, centre: np.ndarray, side: float, colour: np.ndarray
) -> None:
    """Composite one shape onto ``frame`` ``(H, W, 3)`` in place, inside its bounding window."""
    h, w = frame.shape[:2]
    half = side / 2.0
    left, top = (
        max(int(np.floor(centre[0] - half)) - 1, 0),
        max(int(np.floor(centre[1] - half)) - 1, 0),
    )
    right = min(int(np.ceil(centre[0] + half)) + 1, w)
    bottom = min(int(np.ceil(centre[1] + half)) + 1, h)
    local = (float(centre[0]) - left, float(centre[1]) - top)
    alpha = coverage(shape, local, side, bottom - top, right - left)[..., None]  # (h', w', 1)
    window = frame[top:bottom, left:right]
    window[:] = alpha * colour + (1.0 - alpha) * window


def render_scene(config: WorldConfig, scene: dict) -> np.ndarray:
    """Render a scene (from :func:`~datamodules.synthetic.world.sample_scene`).

    Returns:
        ``(T, H, W, 3)`` uint8 RGB frames.
    """
    t, h, w = config.num_frames, config.height, config.width
    frames = np.empty((t, h, w, 3), dtype=np.float32)
    frames[:] = np.asarray(BACKGROUNDS[scene["background"]], dtype=np.float32)
    for obj in scene["objects"]:
        colour = np.asarray(COLOURS[obj["colour"]], dtype=np.float32)
        side = config.side(obj["size"])
        for k, centre in enumerate(trajectory(config, obj)):
            _paint(frames[k], obj["shape"], centre, side, colour)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)
