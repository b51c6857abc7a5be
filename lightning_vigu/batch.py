"""The batch contract shared by every DataModule and the LightningModule.

A DataModule yields dictionaries with these keys (collated by ``collate_batch``). Either
``video`` or ``latents`` is present; tokenization happens in the LightningModule, not here.
"""

from __future__ import annotations

from typing import TypedDict

import torch
from torch import Tensor

try:  # Python 3.11+
    from typing import NotRequired
except ImportError:  # pragma: no cover - Python 3.10
    from typing_extensions import NotRequired


class Batch(TypedDict):
    """One batch of paired videos and texts.

    Attributes:
        video: ``(B, C, T, H, W)`` float in ``[-1, 1]`` (raw pixels), or ``uint8`` pixels
            ``0..255`` (4x less to copy to the GPU; :func:`batch_to_device` and the module read
            them as ``x / 127.5 - 1``), or absent.
        latents: ``(B, c, t, h, w)`` latents of a codec (from the latent cache), or absent.
        prompt: ``B`` short generation prompts (what a user would type).
        caption: ``B`` detailed captions (equal to ``prompt`` when the data has only one text).
        prompt_emb: optional ``(B, L, D)`` precomputed prompt-encoder embeddings.
        key: optional ``B`` sample keys (WebDataset ``__key__``), for logging.
        meta: optional ``B`` json records (the synthetic world's ground truth); the project's
            DataModules leave them out of training batches (``train_records``).
    """

    prompt: list[str]
    caption: list[str]
    video: NotRequired[Tensor]
    latents: NotRequired[Tensor]
    prompt_emb: NotRequired[Tensor]
    key: NotRequired[list[str]]
    meta: NotRequired[list[dict]]


_TENSOR_KEYS = ("video", "latents", "prompt_emb")


def collate_batch(samples: list[dict], drop: tuple[str, ...] = ()) -> Batch:
    """Collate per-sample dicts (each holding the keys of :class:`Batch`, unbatched) into a Batch.

    Tensors are stacked along a new batch dimension; strings and records become lists. Keys in
    ``drop`` are left out (checked for agreement like the others).

    Raises:
        ValueError: when samples disagree on which keys they carry, or tensors differ in shape.
    """
    if not samples:
        raise ValueError("collate_batch got an empty list of samples")
    keys = set(samples[0])
    for s in samples[1:]:
        if set(s) != keys:
            raise ValueError(
                f"samples in one batch carry different keys: {sorted(keys)} vs {sorted(s)}; "
                "every sample of a DataModule must yield the same Batch keys"
            )
    out: dict = {}
    for k in keys.difference(drop):
        values = [s[k] for s in samples]
        if k in _TENSOR_KEYS:
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"batch key '{k}' has samples of different shapes {sorted(shapes)}"
                )
            out[k] = torch.stack(values)
        else:
            out[k] = values
    return out  # type: ignore[return-value]


def check_batch(batch: Batch) -> None:
    """Validate a batch against the contract, with messages that name the key and the fix."""
    if "video" not in batch and "latents" not in batch:
        raise ValueError(
            f"batch has neither 'video' nor 'latents' (keys: {sorted(batch)}); a DataModule must "
            "yield one of them, see lightning_vigu.batch.Batch"
        )
    n = len(batch["prompt"])
    if len(batch.get("caption", [])) != n:
        raise ValueError(f"batch has {n} prompts but {len(batch.get('caption', []))} captions")
    for k in ("video", "latents"):
        if k in batch:
            x = batch[k]
            if x.ndim != 5 or x.shape[0] != n:
                raise ValueError(
                    f"batch['{k}'] must be (B, C, T, H, W) with B={n}, got {tuple(x.shape)}"
                )


def video_as_float(video: Tensor) -> Tensor:
    """Pixels as float in ``[-1, 1]``: ``uint8`` ``0..255`` is rescaled, float passes as is."""
    return video.float() / 127.5 - 1.0 if video.dtype == torch.uint8 else video


def batch_to_device(batch: Batch, device: torch.device | str) -> Batch:
    """The batch with its tensors on ``device``; texts and records are passed on as they are.

    Lightning's default transfer walks every value of a batch, so the synthetic world's
    ground-truth records (64 nested dicts a batch) cost the host several milliseconds a step
    for nothing; the project's DataModules transfer with this instead. The copies are
    non-blocking (from pinned memory they overlap the GPU). ``uint8`` videos are copied as
    they are and made float in ``[-1, 1]`` on the device.
    """
    device = torch.device(device)
    out = {
        k: v.to(device, non_blocking=device.type == "cuda") if isinstance(v, Tensor) else v
        for k, v in batch.items()
    }
    if "video" in out:
        out["video"] = video_as_float(out["video"])
    return out  # type: ignore[return-value]


def to_device(x: Tensor, device: torch.device | str) -> Tensor:
    """``x`` (made on the host) on ``device`` without waiting for the device.

    A copy from ordinary host memory to a GPU waits until the GPU has finished all queued
    work, so one such copy per step stops the host from running ahead of the GPU. From
    page-locked memory the copy is queued like a kernel (the caching host allocator keeps the
    buffer until the copy is done). On the CPU, or when ``x`` is already there, ``x`` itself.
    """
    device = torch.device(device)
    if x.device == device or device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)
