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

    Only the clip's frames are kept, each converted to RGB at the output size as soon as it is
    decoded; a clip that starts past :data:`SEEK_MIN_FRAMES` is reached by seeking to the
    keyframe before it (memory stays at one clip, however long the video).

    Args:
        data: the bytes of a video file (mp4, webm...).
        spec: frames, rate and size to cut.
        start: clip position in ``[0, 1]`` (see :func:`frame_indices`); ``None`` centres it.

    Returns:
        ``(T, H, W, 3)`` uint8 RGB frames, resized to cover ``spec.size`` and centre-cropped.

    Raises:
        VideoDecodeError: undecodable bytes, or a video cut short (fewer frames decode than its
            header promises: a truncated or half-downloaded file).
        ClipTooShortError: too few frames for the clip.
    """
    container, stream = _open(data)
    with container:
        total = stream.frames
        counted = total <= 0
        if counted:  # no frame count in the header: count the packets
            total = _count_packets(container, stream)
            if total == 0:
                raise VideoDecodeError("the video has no frames")
        source_fps = float(stream.average_rate or stream.base_rate or Fraction(25))
        wanted = frame_indices(total, source_fps, spec, start)
        out_h, out_w = _output_size(stream.height, stream.width, spec.size)
        sws = _sws_options(max(out_h, stream.height), max(out_w, stream.width))
        convert = _converter(out_w, out_h, sws)
        frames = None
        seek = wanted[0] >= SEEK_MIN_FRAMES
        if seek:
            frames = _decode_after_seek(container, stream, wanted, source_fps, convert)
        if frames is None and not (counted or seek):
            frames = _decode_in_order(container, stream, wanted, total, convert)
    if frames is None:  # start over from the first frame
        container, stream = _open(data)
        with container:
            frames = _decode_in_order(container, stream, wanted, total, convert)
    return center_crop(np.stack([frames[i] for i in wanted]), spec.size)  # (T, h, w, 3)


SEEK_MIN_FRAMES = 48
"""Clips starting at this frame or later are reached by seeking instead of decoding from 0."""


def _converter(width: int, height: int, sws: dict):
    reformatter = VideoReformatter()  # one swscale context for the clip (much faster)

    def convert(frame) -> np.ndarray:
        return reformatter.reformat(
            frame,
            width=width,
            height=height,
            format="rgb24",
            interpolation=Interpolation.AREA,
            **sws,
        ).to_ndarray()  # (h, w, 3)

    return convert


def _count_packets(container, stream) -> int:
    try:
        return sum(1 for packet in container.demux(stream) if packet.size)
    except (av.FFmpegError, ValueError, OSError) as exn:
        raise VideoDecodeError(f"demuxing failed: {exn}") from exn


def _decode_in_order(container, stream, wanted: list[int], total: int, convert) -> dict:
    """Decode from the start, counting frames, keeping the wanted ones (converted)."""
    keep, frames, count, error = set(wanted), {}, 0, None
    try:
        for frame in container.decode(stream):
            if count in keep:
                frames[count] = convert(frame)
            count += 1
            if count > wanted[-1]:
                break
    except (av.FFmpegError, ValueError, OSError) as exn:
        error = exn
    if len(frames) < len(keep):
        why = f": {error}" if error is not None else ""
        raise VideoDecodeError(
            f"the video is cut short: its header says {total} frames but decoding stops after "
            f"{count}{why}, and the clip needs frame {wanted[-1]} (a truncated or "
            "half-downloaded file?)"
        )
    return frames


def _decode_after_seek(container, stream, wanted: list[int], fps: float, convert) -> dict | None:
    """Seek to the keyframe before ``wanted[0]`` and keep the wanted frames, numbered by their
    timestamps; ``None`` when timestamps do not allow it (the caller decodes in order)."""
    base = stream.time_base
    if base is None or not fps:
        return None
    first_pts = stream.start_time or 0
    try:
        container.seek(first_pts + int(wanted[0] / fps / base), stream=stream, backward=True)
        keep, frames, previous = set(wanted), {}, None
        for frame in container.decode(stream):
            if frame.pts is None:
                return None
            index = round(float((frame.pts - first_pts) * base) * fps)
            if (previous is None and index > wanted[0]) or (
                previous is not None and index <= previous
            ):
                return None  # landed past the clip, or timestamps that are no frame numbers
            previous = index
            if index in keep:
                frames[index] = convert(frame)
            if index >= wanted[-1]:
                break
    except (av.FFmpegError, ValueError, OSError):
        return None
    return frames if len(frames) == len(keep) else None


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
