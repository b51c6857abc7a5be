"""Video bytes <-> frames with PyAV, frame sampling and resize + centre-crop.

Everything works in memory on the bytes of one tar member: :func:`decode_clip` decodes only
the frames a clip needs (at a target fps or a frame stride) and converts them to RGB at the
target size in one swscale pass; :func:`encode_video` writes mp4 bytes (used by the
synthetic world and the tests).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import torch
from av.video.reformatter import Interpolation, VideoReformatter
from torch import Tensor

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v", "gif")
_THREADED_PIXELS = 256 * 256
_SWS_HAS_THREADS = int(av.__version__.split(".")[0]) >= 17  # reformat(threads=) since PyAV 17


def _sws_options(height: int, width: int) -> dict:
    """swscale options: frames smaller than ``_THREADED_PIXELS`` are converted on one thread,
    because PyAV >= 17's default thread pool costs more than it saves there (10x slower on
    32x32 frames)."""
    return {"threads": 1} if _SWS_HAS_THREADS and height * width < _THREADED_PIXELS else {}


class VideoDecodeError(ValueError):
    """The bytes are not a decodable video (garbage, truncated, no video stream)."""


class ClipTooShortError(ValueError):
    """The video has fewer frames than the clip needs."""


@dataclass(frozen=True)
class ClipSpec:
    """What to cut out of a video.

    Args:
        num_frames: frames per clip.
        fps: target frame rate; frames are picked at this rate from the source. ``None``
            uses ``frame_stride`` source frames between picked frames instead.
        frame_stride: source frames between picked frames when ``fps`` is ``None``.
        size: output ``(height, width)``; the video is resized so that it covers this size
            and centre-cropped. ``None`` keeps the source size.
    """

    num_frames: int = 16
    fps: float | None = None
    frame_stride: int = 1
    size: tuple[int, int] | None = None


def encode_video(
    frames: np.ndarray,
    fps: int,
    codec: str = "libx264",
    pix_fmt: str = "yuv444p",
    options: dict[str, str] | None = None,
) -> bytes:
    """Encode ``(T, H, W, 3)`` uint8 RGB frames into mp4 bytes.

    Args:
        frames: RGB frames.
        fps: frame rate of the stream.
        codec: an ffmpeg encoder available to PyAV (``libx264``, ``mpeg4``...).
        pix_fmt: pixel format; ``yuv444p`` keeps full-resolution chroma, so the colours of
            small objects survive (``yuv420p`` halves chroma resolution).
        options: encoder options; the default ``{"crf": "0"}`` is lossless x264 (only the
            RGB <-> YUV rounding remains: at most 2 levels off per channel).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"encode_video expects (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}"
        )
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=int(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.options = options if options is not None else {"crf": "0"}
        reformatter = VideoReformatter()  # one swscale context for all frames (much faster)
        sws = _sws_options(frames.shape[1], frames.shape[2])
        for frame in frames:
            rgb = av.VideoFrame.from_ndarray(frame, format="rgb24")
            for packet in stream.encode(reformatter.reformat(rgb, format=pix_fmt, **sws)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _open(data: bytes) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as exn:
        raise VideoDecodeError(f"cannot open video ({len(data)} bytes): {exn}") from exn
    if not container.streams.video:
        container.close()
        raise VideoDecodeError("the file has no video stream")
    return container, container.streams.video[0]


def probe_video(data: bytes) -> dict:
    """Decode every frame once (without colour conversion) and report what is there.

    Returns:
        ``{"frames": int, "fps": float, "width": int, "height": int}``.

    Raises:
        VideoDecodeError: when the bytes cannot be decoded or hold no frame.
    """
    container, stream = _open(data)
    with container:
        try:
            count = sum(1 for _ in container.decode(stream))
        except (av.FFmpegError, ValueError, OSError) as exn:
            raise VideoDecodeError(f"decoding failed: {exn}") from exn
        fps = float(stream.average_rate or stream.base_rate or 0)
        info = {"frames": count, "fps": fps, "width": stream.width, "height": stream.height}
    if count == 0:
        raise VideoDecodeError("the video has no decodable frame")
    return info


def frame_indices(total: int, source_fps: float, spec: ClipSpec, start: float | None) -> list[int]:
    """Source frame indices of a clip.

    Args:
        total: frames in the source video.
        source_fps: the source frame rate (only used when ``spec.fps`` is set).
        spec: the clip to cut.
        start: position of the clip's first frame as a fraction of the free range
            (0 = beginning, 0.5 = centred, 1 = end); ``None`` means centred.

    Raises:
        ClipTooShortError: when the source is too short for the clip.
    """
    step = spec.frame_stride if spec.fps is None else max(source_fps, 1e-6) / spec.fps
    span = int(round((spec.num_frames - 1) * step)) + 1
    if total < span:
        rate = f"{spec.fps:.3g} fps" if spec.fps else f"stride {spec.frame_stride}"
        raise ClipTooShortError(
            f"video has {total} frames but a clip of {spec.num_frames} frames ({rate}) needs {span}"
        )
    first = int(round((total - span) * (0.5 if start is None else start)))
    return [first + int(round(i * step)) for i in range(spec.num_frames)]


def _output_size(src_h: int, src_w: int, size: tuple[int, int] | None) -> tuple[int, int]:
    """Size ``(h, w)`` to resize to before centre-cropping to ``size`` (covers it)."""
    if size is None:
        return src_h, src_w
    scale = max(size[0] / src_h, size[1] / src_w)
    return max(size[0], math.ceil(src_h * scale - 1e-6)), max(
        size[1], math.ceil(src_w * scale - 1e-6)
    )


def decode_clip(data: bytes, spec: ClipSpec, start: float | None = None) -> np.ndarray:
    """Decode the frames of one clip from video bytes.

    Args:
        data: the bytes of a video file (mp4, webm...).
        spec: frames, rate and size to cut.
        start: clip position in ``[0, 1]`` (see :func:`frame_indices`); ``None`` centres it.

    Returns:
        ``(T, H, W, 3)`` uint8 RGB frames, resized to cover ``spec.size`` and centre-cropped.

    Raises:
        VideoDecodeError: undecodable or truncated bytes.
        ClipTooShortError: too few frames for the clip.
    """
    container, stream = _open(data)
    with container:
        total = stream.frames
        source_fps = float(stream.average_rate or stream.base_rate or Fraction(25))
        decoded = None
        if total <= 0:  # no frame count in the header: decode everything once
            decoded = _decode_all(container, stream)
            total = len(decoded)
        wanted = frame_indices(total, source_fps, spec, start)
        out_h, out_w = _output_size(stream.height, stream.width, spec.size)
        frames = decoded if decoded is not None else _decode_until(container, stream, max(wanted))
    if len(frames) <= max(wanted):
        raise ClipTooShortError(
            f"video header says {total} frames but only {len(frames)} decode; "
            f"the clip needs frame {max(wanted)}"
        )
    reformatter = VideoReformatter()  # one swscale context for the clip (much faster)
    sws = _sws_options(max(out_h, frames[0].height), max(out_w, frames[0].width))
    rgb = np.stack(
        [
            reformatter.reformat(
                frames[i],
                width=out_w,
                height=out_h,
                format="rgb24",
                interpolation=Interpolation.AREA,
                **sws,
            ).to_ndarray()
            for i in wanted
        ]
    )  # (T, out_h, out_w, 3)
    return center_crop(rgb, spec.size)


def _decode_all(container, stream) -> list:
    try:
        return list(container.decode(stream))
    except (av.FFmpegError, ValueError, OSError) as exn:
        raise VideoDecodeError(f"decoding failed: {exn}") from exn


def _decode_until(container, stream, last: int) -> list:
    frames = []
    try:
        for frame in container.decode(stream):
            frames.append(frame)
            if len(frames) > last:
                break
    except (av.FFmpegError, ValueError, OSError) as exn:
        if not frames:
            raise VideoDecodeError(f"decoding failed: {exn}") from exn
    return frames


def center_crop(frames: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Centre-crop ``(T, H, W, C)`` frames to ``size`` ``(h, w)`` (no-op for ``None``)."""
    if size is None:
        return frames
    h, w = frames.shape[1:3]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return frames[:, top : top + size[0], left : left + size[1]]


def to_tensor(frames: np.ndarray) -> Tensor:
    """``(T, H, W, 3)`` uint8 frames -> ``(3, T, H, W)`` float32 in ``[-1, 1]``.

    The arithmetic runs in numpy: torch's intra-op thread pool makes these small element-wise
    ops several times slower on a busy CPU (the data path of ``num_workers=0``).
    """
    x = np.ascontiguousarray(frames.transpose(3, 0, 1, 2), dtype=np.float32)  # (3, T, H, W)
    x *= 1.0 / 127.5
    x -= 1.0
    return torch.from_numpy(x)


def quantize(videos: Tensor) -> Tensor:
    """Float videos in ``[-1, 1]`` -> uint8 on the CPU, any layout kept."""
    return ((videos.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def to_uint8(video: Tensor) -> np.ndarray:
    """``(3, T, H, W)`` float in ``[-1, 1]`` -> ``(T, H, W, 3)`` uint8 frames."""
    return quantize(video).permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
