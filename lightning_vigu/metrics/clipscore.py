"""Frame-averaged CLIPScore for videos (Hessel et al. 2021) with open_clip weights from a local file.

For a video with frames ``f_1..f_F`` and a text ``c``::

    score = mean_i  w * max(cos(E_img(f_i), E_txt(c)), 0)      with w = 100

i.e. the per-frame CLIPScore averaged over the frames, on torchmetrics' ``CLIPScore`` scale
(0-100; Hessel et al. use ``w = 2.5``, which is ``score * 0.025``). The metric reports the mean
over all videos seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lightning_vigu.metrics.availability import MetricUnavailable
from lightning_vigu.metrics.fvd import select_frames, to_float_video


class VideoCLIPScore(Metric):
    """Mean frame-averaged CLIPScore of ``(video, text)`` pairs.

    ``update(videos, texts)``: ``videos`` ``(N, C, T, H, W)`` float in ``[-1, 1]`` (or
    ``(N, T, H, W, C)`` uint8), ``texts`` ``N`` strings. Frames are resized, cropped and
    normalised in torch as the model's open_clip preprocessing config says (``size``, ``mean``,
    ``std``, ``interpolation``, ``resize_mode``), and both towers run in float32 with autocast off.

    Args:
        model_name: an open_clip model config name (``"ViT-B-32"``, or one added by ``model_config``).
        checkpoint: local weights file for that model (a state dict, as open_clip loads it with
            ``pretrained=<path>``).
        model_config: optional JSON config file (or folder of them) for a custom architecture,
            registered with ``open_clip.add_model_config`` before the model is built.
        num_frames: frames scored per video, evenly spaced; None scores every frame.
        weight: the CLIPScore ``w`` (100 as in torchmetrics).
        **kwargs: torchmetrics ``Metric`` options.

    Raises:
        MetricUnavailable: the checkpoint file does not exist.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(
        self,
        model_name: str,
        checkpoint: str | Path,
        model_config: str | Path | None = None,
        num_frames: int | None = 8,
        weight: float = 100.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        import open_clip

        checkpoint = Path(checkpoint).expanduser()
        if not checkpoint.is_file():
            raise MetricUnavailable(
                f"CLIP checkpoint not found at {checkpoint}. Point `checkpoint` at a local open_clip "
                f"weights file for {model_name!r} (weights are never downloaded at run time)."
            )
        if ":" in model_name:
            raise ValueError(
                f"model_name {model_name!r} has a schema; give a plain open_clip config name and the "
                "weights file as `checkpoint` (hub models would be downloaded)"
            )
        if model_config is not None:
            open_clip.add_model_config(Path(model_config).expanduser())
        if model_name not in open_clip.list_models():
            raise ValueError(
                f"unknown open_clip model {model_name!r}; pass model_config=<its JSON config file>"
            )
        model = open_clip.create_model(model_name, pretrained=str(checkpoint))
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
        self.num_frames, self.weight = num_frames, weight
        self.add_state("score_sum", torch.zeros((), dtype=torch.double), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def available(checkpoint: str | Path | None) -> bool:
        """Whether the CLIP weights file exists (never downloads anything)."""
        return checkpoint is not None and Path(checkpoint).expanduser().is_file()

    def preprocess(self, frames: Tensor) -> Tensor:
        """``(M, 3, H, W)`` in ``[-1, 1]`` -> ``(M, 3, S, S)`` normalised CLIP input."""
        cfg = self.preprocess_cfg
        size = cfg["size"]
        out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
        mode = cfg.get("interpolation", "bicubic")
        if mode not in ("bicubic", "bilinear"):
            raise ValueError(f"unsupported CLIP interpolation {mode!r} (bicubic or bilinear)")
        resize_mode = cfg.get("resize_mode", "shortest")
        x = (frames + 1.0) / 2.0  # [0, 1]
        h, w = x.shape[-2:]
        if resize_mode == "squash":
            x = F.interpolate(x, (out_h, out_w), mode=mode, antialias=True)
        elif resize_mode in ("shortest", "longest"):
            # "shortest": the short side fits and the rest is cropped; "longest": the long side
            # fits and the rest is padded. The other side is truncated like torchvision's Resize.
            if (out_h / h >= out_w / w) == (resize_mode == "shortest"):
                new_h, new_w = out_h, max(int(w * out_h / h), 1)
            else:
                new_h, new_w = max(int(h * out_w / w), 1), out_w
            x = F.interpolate(x, (new_h, new_w), mode=mode, antialias=True)
            if resize_mode == "longest":  # pad to the target with the fill colour
                fill = cfg.get("fill_color", 0) / 255.0
                pad_h, pad_w = out_h - new_h, out_w - new_w
                x = F.pad(
                    x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill
                )
            top, left = round((x.shape[-2] - out_h) / 2), round((x.shape[-1] - out_w) / 2)
            x = x[..., top : top + out_h, left : left + out_w]  # (M, 3, out_h, out_w)
        else:
            raise ValueError(f"unsupported open_clip resize_mode {resize_mode!r}")
        x = x.clamp(0.0, 1.0)
        mean = torch.tensor(cfg["mean"], device=x.device, dtype=x.dtype)[:, None, None]
        std = torch.tensor(cfg["std"], device=x.device, dtype=x.dtype)[:, None, None]
        return (x - mean) / std

    def scores(self, videos: Tensor, texts: Sequence[str]) -> Tensor:
        """Per-video frame-averaged CLIPScore, ``(N,)`` float32 (see the module docstring)."""
        videos = to_float_video(videos)
        n, c, t, h, w = videos.shape
        if isinstance(texts, str) or len(texts) != n:
            raise ValueError(f"need one text per video: {n} videos, got {len(texts)} texts")
        if self.num_frames is not None:
            videos = select_frames(videos, self.num_frames, "uniform")
        f = videos.shape[2]
        device = self.score_sum.device
        frames = videos.transpose(1, 2).reshape(n * f, c, h, w).to(device)  # (N*F, C, H, W)
        tokens = self.tokenizer(list(texts)).to(device)  # (N, L)
        dtype = next(self.model.parameters()).dtype
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            pixels = self.preprocess(frames.float()).to(dtype)
            image = self.model.encode_image(pixels, normalize=True)  # (N*F, D)
            text = self.model.encode_text(tokens, normalize=True)  # (N, D)
        cos = (image.float().reshape(n, f, -1) * text.float()[:, None, :]).sum(-1)  # (N, F)
        return (self.weight * cos.clamp(min=0)).mean(dim=1)

    def update(self, videos: Tensor, texts: Sequence[str]) -> None:
        """Add ``N`` videos and their texts (see the class docstring)."""
        scores = self.scores(videos, texts)
        self.score_sum = self.score_sum + scores.double().sum()
        self.count = self.count + scores.numel()

    def compute(self) -> Tensor:
        """Mean frame-averaged CLIPScore over all videos seen (0-d float64)."""
        if int(self.count) == 0:
            raise ValueError("VideoCLIPScore.compute() called before any update()")
        return self.score_sum / self.count
