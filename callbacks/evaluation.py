"""Evaluation of both directions: caption metrics, FVD, CLIPScore and ground-truth checks.

:func:`evaluate` runs one round on ``num_videos`` held-out clips:

* video -> text: the module captions the real clips; CaptionMetrics (BLEU-4, METEOR, ROUGE-L,
  CIDEr-D) against the target text, and -- on the synthetic world, whose clips carry their json
  record -- caption attribute accuracy from the caption parser (``attr_*``: every attribute the
  target states; ``stated_accuracy``: how much of what the caption states is true of the clip).
  A prompt target names one object of several at random, so ``attr_ceiling`` reports what a
  perfect prompt writer scores on the same clips;
* text -> video: the module generates a video per prompt; prompt adherence from the analytic
  detector (synthetic world) next to its chance level ``adherence_floor`` (real clips scored
  against other clips' prompts: a valid video that ignores the prompt) and ``travel_ratio``
  (median distance a named moving object travels over the distance its prompt asks for; also
  ``travel_ratio_slow`` / ``_fast`` per asked speed), FVD against the real clips and CLIPScore
  when their weights are configured;
* joint: a video and a caption generated together; agreement between what the detector sees
  and what the caption says.

On latent-cache data the real clips are the cached latents decoded by the module's codec
(captioning reads the latents themselves). Under FSDP the callback is off (said once): the
weights are sharded; evaluate a consolidated checkpoint with ``validate`` / ``test`` instead.

Each clip is sampled from its own seed (the round's seed and the clip's key), and under DDP
every rank evaluates its part of the clips and reports the numbers of all of them: the same
clips give the same numbers on one GPU or several.

:class:`Evaluation` calls it during ``fit`` (every N steps, at validation) and in
``validate`` / ``test``, logs the numbers and writes them as JSON next to the run. Metrics whose
weights are not configured are skipped with one message, never a crash or a download.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor

from callbacks.sample_logger import off_under_fsdp, run_dir
from lightning_vigu.batch import video_as_float
from lightning_vigu.metrics import (
    CaptionMetrics,
    FrechetVideoDistance,
    FVDProtocol,
    MetricUnavailable,
    VideoCLIPScore,
)
from lightning_vigu.video_io import quantize

DIRECTIONS = ("v2t", "t2v", "joint")
HEADLINE = {  # the numbers printed after each round
    "v2t/attr_accuracy": "caption attribute accuracy",
    "t2v/adherence_accuracy": "prompt adherence",
    "t2v/adherence_colour": "colour adherence",
    "t2v/adherence_floor_colour": "colour of a real clip of another prompt",
    "joint/agreement": "joint agreement",
}


def collect(
    loader: Iterable[dict],
    num: int,
    codec: torch.nn.Module | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """The first ``num`` clips of a loader: videos ``(N, 3, T, H, W)``, prompts, captions,
    records, sample keys; from a latent cache also the ``latents``, decoded to videos by
    ``codec`` on ``device``."""
    out: dict = {"video": [], "latents": [], "prompt": [], "caption": [], "meta": [], "key": []}
    n = 0
    for batch in loader:
        k = min(num - n, len(batch["prompt"]))
        if "video" in batch:
            out["video"].append(video_as_float(batch["video"][:k]).cpu())  # uint8 in memory
        elif "latents" in batch and codec is not None:
            latents = batch["latents"][:k].float()
            out["latents"].append(latents.cpu())
            with torch.no_grad():
                out["video"].append(codec.decode(latents.to(device)).float().cpu())
        else:
            raise ValueError(
                "evaluation needs videos: shards with mp4 members, or latent-cache shards and "
                "the module's codec to decode them (collect(loader, num, codec=module.codec))"
            )
        for key in ("prompt", "caption"):
            out[key] += list(batch[key][:k])
        out["meta"] += list(batch.get("meta", [{}] * k))[:k]
        out["key"] += [str(key) for key in batch.get("key", [])][:k]
        n += k
        if n >= num:
            break
    if n == 0:
        raise ValueError("the evaluation loader yielded no clips")
    out["video"] = torch.cat(out["video"])
    out["latents"] = torch.cat(out["latents"]) if out["latents"] else None
    out["key"] = out["key"] if len(out["key"]) == n else None  # batches without keys
    return out


def agreement(video_scene: dict, caption_scene: dict) -> float:
    """Fraction of the attributes a caption states that the detector sees in the video.

    Objects are matched by colour (every object of a synthetic clip has its own colour).
    """
    checks = [
        video_scene.get(k) == v
        for k in ("background", "count")
        if (v := caption_scene.get(k)) is not None
    ]
    seen = {o.get("colour"): o for o in video_scene.get("objects", [])}
    for obj in caption_scene.get("objects", []):
        match = seen.get(obj.get("colour"))
        checks += [match is not None and match.get(a) == v for a, v in obj.items() if v is not None]
    return sum(checks) / len(checks) if checks else math.nan


@dataclass
class EvalResult:
    """One evaluation round: its numbers and what the model said and drew.

    Attributes:
        metrics: ``{"<direction>/<metric>": value}`` and ``num_videos``.
        predictions_v2t: ``(reference, prediction)`` per clip when ``v2t`` ran, else ``None``.
        samples: with ``keep_samples``, the first clips' uint8 videos ``(N, T, H, W, 3)``
            under ``real`` / ``t2v`` / ``joint`` and their ``prompts`` / ``captions`` /
            ``joint_captions``; empty otherwise.
        per_clip: ``t2v`` per clip, every rank's in key order: ``key`` and, on the synthetic
            world, ``adherence_correct`` / ``adherence_checks`` (the prompt's attributes the
            video shows / states: their sums over clips give ``t2v/adherence_accuracy``); empty
            when ``t2v`` did not run.
        fvd_features: with FVD, the features of the ``real`` and ``generated`` clips, ``(N, d)``
            float32 in the order of ``per_clip["key"]``; empty otherwise.
    """

    metrics: dict[str, float]
    predictions_v2t: list[tuple[str, str]] | None = None
    samples: dict = field(default_factory=dict)
    per_clip: dict[str, list] = field(default_factory=dict)
    fvd_features: dict[str, Tensor] = field(default_factory=dict)


def _chunks(n: int, size: int) -> Iterable[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def clip_seeds(seed: int, keys: Sequence[str]) -> list[int]:
    """One sampling seed per clip, from the round's seed and the clip's key: a clip's sample
    does not depend on the batch it is drawn in, nor on the rank that draws it."""
    return [zlib.crc32(f"{seed}/{key}".encode()) for key in keys]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather(items: list) -> list:
    """Every rank's ``items``, concatenated (``items`` itself outside a process group)."""
    if not _distributed():
        return list(items)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def _by_key(rows: list[tuple]) -> list[tuple]:
    """``(key, ...)`` rows of every rank in key order (the order one process would give)."""
    return sorted(_gather(rows), key=lambda row: row[0])


@torch.no_grad()
def evaluate(
    module: L.LightningModule,
    clips: dict,
    directions: Iterable[str] = DIRECTIONS,
    fvd: FrechetVideoDistance | None = None,
    clipscore: VideoCLIPScore | None = None,
    batch_size: int = 16,
    seed: int = 0,
    steps: int | None = None,
    keep_samples: int = 0,
) -> EvalResult:
    """One evaluation round on collected clips (see :func:`collect`).

    Inside a process group (DDP) each rank passes its own clips and every rank returns the
    numbers of all ranks' clips together: per-clip scores and predictions are gathered, FVD,
    CLIPScore and the caption metrics sync their states. Each clip is sampled from its own
    seed (:func:`clip_seeds`), so the same clips give the same numbers on any number of ranks,
    up to floating-point summation order in FVD.

    Args:
        module: a trained :class:`~lightning_vigu.module.UniViGU` (or anything with the same
            ``caption`` / ``generate_video`` / ``generate_joint`` methods, taking one seed per
            clip).
        clips: held-out clips (``key`` names each clip; without keys, their rank and index).
        directions: any of ``v2t``, ``t2v``, ``joint``.
        fvd: an FVD metric (reset here), or ``None`` to skip FVD.
        clipscore: a CLIPScore metric (reset here), or ``None``.
        batch_size: clips per sampling call.
        seed: the round's sampling seed.
        steps: sampling steps (``None``: the module's settings).
        keep_samples: also return the first this many clips' generated videos (uint8) and
            captions in :attr:`EvalResult.samples` (for sample grids; this rank's clips).
    """
    from datamodules.synthetic.detector import detect, score_video, travel_ratios
    from datamodules.synthetic.parse import parse_text, prompt_ceiling, score_caption
    from datamodules.synthetic.scoring import mean_accuracy, score_scene

    directions = set(directions)
    n, device = len(clips["prompt"]), module.device
    if clips.get("key"):
        keys = [str(k) for k in clips["key"]]
    else:  # unnamed clips: numbered on this rank (their order then depends on the ranks)
        rank = dist.get_rank() if _distributed() else 0
        keys = [f"{rank}:{i:06d}" for i in range(n)]
    seeds = clip_seeds(seed, keys)
    has_truth = all(_gather([all(m and "objects" in m for m in clips["meta"])]))
    target_key = (
        "prompt"
        if getattr(getattr(module, "phase", None), "caption_target", "caption") == "prompt"
        else "caption"
    )
    scope = "prompt" if target_key == "prompt" else "all"
    overrides = {"video_steps": steps, "text_steps": steps}
    results: dict[str, float] = {"num_videos": float(len(_gather(keys)))}
    samples: dict = {}
    per_clip: dict[str, list] = {}
    fvd_features: dict[str, Tensor] = {}
    predictions: list[tuple[str, str]] | None = None
    preds: list[str] = []
    if "v2t" in directions and getattr(getattr(module, "model", None), "has_text", True):
        latents = clips.get("latents")  # a latent cache: caption the cached latents themselves
        for sl in _chunks(n, batch_size):
            if latents is not None and hasattr(module, "caption_latents"):
                preds += module.caption_latents(latents[sl].to(device), seed=seeds[sl], **overrides)  # fmt: skip
            else:
                preds += module.caption(clips["video"][sl].to(device), seed=seeds[sl], **overrides)  # fmt: skip
        try:
            metric = CaptionMetrics().to(device)  # NCCL gathers CUDA tensors only
            metric.update(preds, [[t] for t in clips[target_key]])
            results.update({f"v2t/{k}": float(v) for k, v in metric.compute().items()})
        except (ImportError, MetricUnavailable) as exn:  # pycocoevalcap missing: keep predictions
            rank_zero_info(f"[Evaluation] caption metrics skipped ({exn}); predictions are kept")
        rows = list(zip(keys, clips[target_key], preds))
        if has_truth:
            rows = [
                (
                    *row,
                    score_caption(p, m, scope),
                    score_caption(p, m, "stated"),
                    prompt_ceiling(m),
                )  # fmt: skip
                for row, p, m in zip(rows, preds, clips["meta"])
            ]
        rows = _by_key(rows)
        if has_truth:
            results.update({f"v2t/attr_{k}": v for k, v in mean_accuracy([r[3] for r in rows]).items()})  # fmt: skip
            results["v2t/stated_accuracy"] = mean_accuracy([r[4] for r in rows])["accuracy"]
            if scope == "prompt":
                results["v2t/attr_ceiling"] = sum(r[5] for r in rows) / len(rows)
        predictions = [(r[1], r[2]) for r in rows]
    if "t2v" in directions:
        videos: list[Tensor] = []
        for sl in _chunks(n, batch_size):
            videos.append(module.generate_video(clips["prompt"][sl], seed=seeds[sl], **overrides).cpu())  # fmt: skip
        gen = torch.cat(videos)
        per_clip["key"] = sorted(_gather(keys))
        if keep_samples:
            samples["t2v"] = quantize(gen[:keep_samples])
        if has_truth:
            # chance: the clip's own real video scored against the next clip's prompt (next in
            # key order over all ranks): a valid video of the world that ignores the prompt
            order = _by_key(list(zip(keys, clips["meta"])))
            after = {k: order[(i + 1) % len(order)][1] for i, (k, _) in enumerate(order)}
            scenes = [detect(v) for v in gen]
            scores = _by_key(
                [
                    (
                        k,
                        score_scene(scene, m, "prompt"),
                        score_video(real, after[k], "prompt"),
                        travel_ratios(scene, m),
                    )
                    for k, scene, m, real in zip(keys, scenes, clips["meta"], clips["video"])
                ]
            )
            per_clip.update(
                adherence_correct=[sum(s[1].correct.values()) for s in scores],
                adherence_checks=[len(s[1].correct) for s in scores],
            )
            acc = mean_accuracy([s[1] for s in scores])
            results.update({f"t2v/adherence_{k}": v for k, v in acc.items()})
            floor = mean_accuracy([s[2] for s in scores])  # and per attribute (colour: chance)
            results["t2v/adherence_floor"] = floor.pop("accuracy")
            results.update({f"t2v/adherence_floor_{k}": v for k, v in floor.items()})
            # how far the named moving objects travel against how far asked: all, and per speed
            ratios = [r for s in scores for r in s[3]]
            groups = {"": ("slow", "fast"), "_slow": ("slow",), "_fast": ("fast",)}
            for suffix, speeds in groups.items():
                picked = [r for speed, r in ratios if speed in speeds]
                if picked:
                    results[f"t2v/travel_ratio{suffix}"] = float(np.median(picked))
        if fvd is not None:
            fvd.reset()
            features = []  # this rank's (real, generated) per clip, as lists to gather
            for sl in _chunks(n, batch_size):
                fvd.update(clips["video"][sl].to(fvd.device), real=True)
                real = fvd.last_features.float().tolist()  # B lists of d
                fvd.update(gen[sl].to(fvd.device), real=False)
                features += zip(real, fvd.last_features.float().tolist())
            results["t2v/fvd"] = float(fvd.compute())
            rows = _by_key([(k, *f) for k, f in zip(keys, features)])  # per_clip's order
            fvd_features = {
                "real": torch.tensor([r[1] for r in rows]),  # (N, d) float32
                "generated": torch.tensor([r[2] for r in rows]),  # (N, d) float32
            }
        if clipscore is not None:
            clipscore.reset()
            for sl in _chunks(n, batch_size):
                clipscore.update(gen[sl].to(clipscore.device), clips["prompt"][sl])
            results["t2v/clipscore"] = float(clipscore.compute())
    if (
        "joint" in directions
        and has_truth
        and getattr(getattr(module, "model", None), "has_text", False)
    ):
        scores = []
        for sl in _chunks(n, batch_size):
            vids, caps = module.generate_joint(clips["prompt"][sl], seed=seeds[sl], **overrides)
            scores += [agreement(detect(v.cpu()), parse_text(c)) for v, c in zip(vids, caps)]
            if keep_samples and "joint" not in samples:
                samples["joint"] = quantize(vids[:keep_samples])
                samples["joint_captions"] = list(caps[:keep_samples])
        scores = [s for _, s in _by_key(list(zip(keys, scores)))]
        valid = [s for s in scores if not math.isnan(s)]
        results["joint/agreement"] = sum(valid) / len(valid) if valid else math.nan
        results["joint/stated_fraction"] = len(valid) / len(scores)
    if keep_samples:
        samples["real"] = quantize(clips["video"][:keep_samples])
        samples["prompts"] = list(clips["prompt"][:keep_samples])
        if predictions is not None:
            samples["captions"] = preds[:keep_samples]
    return EvalResult(results, predictions, samples, per_clip, fvd_features)


class Evaluation(L.Callback):
    """Run :func:`evaluate` during ``fit`` and in ``validate`` / ``test``.

    Args:
        every_n_steps: in ``fit``, evaluate at the first validation after every this many
            steps (0 = only in validate/test and at the end of training).
        num_videos: held-out clips per round, over all ranks (each rank takes its share of its
            own part of the split; evaluate a whole split for numbers that do not depend on
            the number of ranks).
        directions: which of ``v2t``, ``t2v``, ``joint`` to evaluate.
        i3d_weights: local I3D weights for FVD (``None`` skips FVD, said once).
        fvd_protocol: FVD protocol (frames, resize, value range...), written next to each value.
        clip_model: open_clip model name for CLIPScore, with ``clip_checkpoint`` (local file).
        clip_checkpoint: local open_clip weights (``None`` skips CLIPScore).
        batch_size: clips per sampling call.
        steps: sampling steps (``None``: the module's settings).
        seed: sampling seed.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_videos: int = 32,
        directions: list[str] | None = None,
        i3d_weights: str | None = None,
        fvd_protocol: FVDProtocol | None = None,
        clip_model: str = "ViT-B-32",
        clip_checkpoint: str | None = None,
        batch_size: int = 16,
        steps: int | None = None,
        seed: int = 0,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.num_videos = num_videos
        self.directions = list(directions or DIRECTIONS)
        bad = sorted(set(self.directions) - set(DIRECTIONS))
        if bad:
            raise ValueError(
                f"unknown evaluation direction(s) {bad}; choose from {list(DIRECTIONS)}"
            )
        self.i3d_weights = i3d_weights
        self.fvd_protocol = fvd_protocol or FVDProtocol()
        self.clip_model, self.clip_checkpoint = clip_model, clip_checkpoint
        self.batch_size, self.steps, self.seed = batch_size, steps, seed
        self._fvd: FrechetVideoDistance | None = None
        self._clip: VideoCLIPScore | None = None
        self._last = -1
        self._said: set[str] = set()
        self._off = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._off = off_under_fsdp(
            trainer,
            "Evaluation",
            "evaluate a consolidated checkpoint with 'python -m lightning_vigu validate/test' "
            "on one device or DDP",
        )
        if self._off:
            return
        if self._fvd is None and self.i3d_weights is not None:
            try:
                self._fvd = FrechetVideoDistance(
                    i3d_weights=self.i3d_weights, protocol=self.fvd_protocol
                )
            except MetricUnavailable as exn:
                self._say("fvd", f"[Evaluation] FVD skipped: {exn}")
        elif self.i3d_weights is None:
            self._say(
                "fvd", "[Evaluation] FVD skipped: no i3d_weights configured (see README, 'Metrics')"
            )
        if self._clip is None and self.clip_checkpoint is not None:
            try:
                self._clip = VideoCLIPScore(self.clip_model, self.clip_checkpoint)
            except MetricUnavailable as exn:
                self._say("clip", f"[Evaluation] CLIPScore skipped: {exn}")

    def _say(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            rank_zero_info(message)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        step = trainer.global_step
        in_fit = trainer.state.fn == "fit"
        if (
            in_fit
            and (self.every_n_steps <= 0 or step - self._last < self.every_n_steps)
            and step < (trainer.max_steps or 0)
        ):
            return
        self.run(trainer, pl_module, "val", trainer.datamodule.val_dataloader())

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module, "test", trainer.datamodule.test_dataloader())

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, loader) -> dict:
        """Evaluate, log ``<stage>/<metric>`` and write ``<run>/eval/<stage>_stepN.json``."""
        if self._off:
            return {}
        self._last = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        for m in (self._fvd, self._clip):
            if m is not None:
                m.to(pl_module.device)
        try:
            codec = getattr(pl_module, "codec", None)
            # this rank's share of num_videos: the ranks' clips together make the round
            world, rank = trainer.world_size, trainer.global_rank
            share = max(1, self.num_videos // world + (rank < self.num_videos % world))
            clips = collect(loader, share, codec, pl_module.device)
            result = evaluate(
                pl_module,
                clips,
                self.directions,
                self._fvd,
                self._clip,
                self.batch_size,
                self.seed,
                self.steps,
            )
        finally:
            pl_module.train(was_training)
        numbers = result.metrics
        # every rank logs the same keys (NaN included): differing keys would hang sync_dist
        pl_module.log_dict({f"{stage}/{k}": v for k, v in numbers.items()}, sync_dist=True)
        headline = {k: numbers[k] for k in HEADLINE if k in numbers}
        rank_zero_info(
            f"[Evaluation] {stage} at step {trainer.global_step} on {numbers['num_videos']:.0f} clips: "
            + ", ".join(f"{HEADLINE[k]} {v:.3f}" for k, v in headline.items())
        )
        self._write(trainer, stage, numbers, result.predictions_v2t)
        return numbers

    @rank_zero_only
    def _write(self, trainer: L.Trainer, stage: str, results: dict, examples) -> None:
        out = run_dir(trainer) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "stage": stage,
            "step": trainer.global_step,
            "results": results,
            "caption_examples": examples,
        }
        if "t2v/fvd" in results and self._fvd is not None:
            payload["fvd_protocol"] = self._fvd.protocol_dict()
        (out / f"{stage}_step{trainer.global_step:06d}.json").write_text(
            json.dumps(payload, indent=2, default=str)
        )
