"""Turn one raw WebDataset sample (bytes per member) into a Batch sample, and count the bad ones.

A raw sample is what ``webdataset`` groups from a tar: ``{"__key__", "__url__", "mp4": bytes,
"txt": bytes, "json": bytes, ...}``. :class:`SampleDecoder` turns it into the per-sample dict
of :mod:`lightning_vigu.batch` (``video`` or ``latents``, ``prompt``, ``caption``, ``key``,
``meta``) or raises :class:`BadSample` with a reason from :data:`SKIP_REASONS`.
:class:`SkipCounter` counts skips in shared memory, so DataLoader worker processes add to the
counts the main process reads.
"""

from __future__ import annotations

import io
import json
import multiprocessing
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_vigu.video_io import (
    VIDEO_EXTENSIONS,
    ClipSpec,
    ClipTooShortError,
    VideoDecodeError,
    decode_clip,
    to_tensor,
)

SKIP_REASONS = (
    "corrupt_shard",  # the tar stream broke (cut inside a member, corrupt header): rest skipped
    "truncated_shard",  # the tar ends without its end marker (cut between members): rest missing
    "missing_video",  # no video (or latents) member
    "missing_text",  # no prompt (or, with require_caption, no caption)
    "undecodable",  # video bytes PyAV cannot decode (garbage, a cut-off / half-downloaded mp4)
    "too_short",  # fewer frames than the clip needs
    "bad_member",  # unreadable json / npy / pth member
)


class SkippedSampleWarning(UserWarning):
    """A sample or the rest of a shard was skipped (the message names shard, key and reason)."""


class BadSampleError(RuntimeError):
    """Raised instead of skipping when the DataModule runs with ``strict=True``."""


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Skip counts by reason in shared memory (one ``multiprocessing.Array``).

    Create it in the main process before the DataLoader starts its workers (the DataModule
    does so in ``setup``); workers inherit it and their increments are visible to
    :meth:`as_dict` in the main process.
    """

    def __init__(self) -> None:
        self._values = multiprocessing.Array("q", len(SKIP_REASONS))

    def add(self, reason: str, count: int = 1) -> None:
        """Count ``count`` skips for ``reason``."""
        with self._values.get_lock():
            self._values[SKIP_REASONS.index(reason)] += count

    def as_dict(self) -> dict[str, int]:
        """``{reason: count}`` for every reason (zeros included)."""
        with self._values.get_lock():
            return dict(zip(SKIP_REASONS, self._values[:]))


def _load_array(data: bytes, name: str) -> Tensor:
    """A float32 tensor from ``.npy`` or ``.pth`` member bytes."""
    if name.endswith(".npy"):
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))
    return torch.load(io.BytesIO(data), weights_only=True).float()


@dataclass(frozen=True)
class SampleDecoder:
    """How to read one sample.

    Args:
        clip: frames, rate and size to cut from videos.
        prompt_key: text member holding the prompt (``"txt"``) or ``"json:<field>"``.
        caption_key: the same for the detailed caption; when absent the caption is the prompt.
        require_caption: skip samples without a caption instead of using the prompt.
        latents: ``None`` auto-detects ``latents.npy``/``latents.pth`` members and reads them
            instead of the video; ``True`` requires them; ``False`` always decodes the video.
        video_key: member name of the video; ``None`` takes the first of
            :data:`~lightning_vigu.video_io.VIDEO_EXTENSIONS` present.
    """

    clip: ClipSpec
    prompt_key: str = "txt"
    caption_key: str = "json:caption"
    require_caption: bool = False
    latents: bool | None = None
    video_key: str | None = None

    def __call__(self, raw: dict, start: float | None = None) -> dict:
        """Decode ``raw``; ``start`` places the clip in a longer video (``None``: centred).

        Raises:
            BadSample: the sample cannot be used (the reason says why).
        """
        meta = self._meta(raw)
        prompt = self._text(raw, meta, self.prompt_key)
        if prompt is None:
            raise BadSample("missing_text", f"no prompt (prompt_key '{self.prompt_key}')")
        caption = self._text(raw, meta, self.caption_key)
        if caption is None and self.require_caption:
            raise BadSample("missing_text", f"no caption (caption_key '{self.caption_key}')")
        out = {"prompt": prompt, "caption": prompt if caption is None else caption}
        out |= {"key": str(raw.get("__key__", "")), "meta": meta}
        latent_member = next((k for k in ("latents.npy", "latents.pth") if k in raw), None)
        if self.latents is True and latent_member is None:
            raise BadSample("missing_video", "no latents.npy / latents.pth member (latents=True)")
        if latent_member is not None and self.latents is not False:
            out["latents"] = self._array(raw, latent_member)
            emb = next((k for k in ("prompt_emb.npy", "prompt_emb.pth") if k in raw), None)
            if emb is not None:
                out["prompt_emb"] = self._array(raw, emb)
            return out
        out["video"] = to_tensor(self._frames(raw, start))  # (3, T, H, W)
        return out

    def _frames(self, raw: dict, start: float | None) -> np.ndarray:
        names = [self.video_key] if self.video_key else VIDEO_EXTENSIONS
        member = next((k for k in names if k in raw), None)
        if member is None:
            found = sorted(k for k in raw if not k.startswith("__"))
            raise BadSample(
                "missing_video", f"no video member (looked for {list(names)}, found {found})"
            )
        try:
            return decode_clip(raw[member], self.clip, start)
        except VideoDecodeError as exn:
            raise BadSample("undecodable", f"'{member}' does not decode: {exn}") from exn
        except ClipTooShortError as exn:
            raise BadSample("too_short", f"'{member}' is too short: {exn}") from exn

    @staticmethod
    def _meta(raw: dict) -> dict:
        if "json" not in raw:
            return {}
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError) as exn:
            raise BadSample("bad_member", f"json member is not valid json: {exn}") from exn
        if not isinstance(meta, dict):
            raise BadSample("bad_member", f"json member is a {type(meta).__name__}, not an object")
        return meta

    @staticmethod
    def _text(raw: dict, meta: dict, key: str) -> str | None:
        if key.startswith("json:"):
            value = meta.get(key[len("json:") :])
            return None if value is None else str(value)
        if key not in raw:
            return None
        try:
            return raw[key].decode("utf-8").strip()
        except UnicodeDecodeError as exn:
            raise BadSample("bad_member", f"'{key}' is not utf-8 text: {exn}") from exn

    @staticmethod
    def _array(raw: dict, member: str) -> Tensor:
        try:
            return _load_array(raw[member], member)
        except Exception as exn:  # numpy/torch raise many types for corrupt bytes
            raise BadSample("bad_member", f"'{member}' does not load: {exn}") from exn
