"""The unified training objective (pure PyTorch): one forward, both flow-matching losses.

Per example a task is drawn from the phase's mix:

* ``t2v``  -- video on the path at ``t_v``; caption stream holds the clean prompt (``t_x = 1``;
  with causal captions, which the video never reads, the row holds no caption at all);
  video loss only; the prompt is dropped for CFG (:func:`prompt_dropout`) -- from the
  cross-attention condition *and* the caption stream (which then holds the empty canvas), so
  the unconditional branch of classifier-free guidance is a true null.
* ``v2t``  -- clean video (``t_v = 1``); caption target on the mixture path at ``t_x`` (or,
  with causal captions, teacher-forced: see :mod:`lightning_vigu.flows.causal`); text loss
  only; the condition is **always** the empty prompt.
* ``joint`` -- both streams on their paths at independent times; both losses; the condition is
  the empty prompt when the caption target is the prompt, else the prompt (with CFG dropout).

No copying: whenever the caption stream must reconstruct the prompt (``v2t`` always, ``joint``
in Knowledge Recall) the cross-attention condition is the empty prompt, so the prompt can only
reach the caption through the video. :func:`condition_mask` is the single place this is decided.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_vigu.batch import to_device
from lightning_vigu.flows import FlowTimeModel, continuous, discrete
from lightning_vigu.flows.draws import on_device
from lightning_vigu.phases import TASKS, Phase

T2V, V2T, JOINT = (TASKS.index(t) for t in ("t2v", "v2t", "joint"))


@dataclass
class ObjectiveConfig:
    """Options of the objective.

    Attributes:
        prediction: what the video head predicts, ``velocity`` (Wan) or ``data``
            (x-prediction; the loss stays on the velocity). Read by every sampler too.
        time_scheme: video training-time sampling, ``uniform`` or ``logit_normal``.
        time_shift: Wan's shift applied to training times (1 = none).
        loss_weighting: video loss weighting (``none``, ``snr`` or ``data``: the loss on the
            implied clean video, see :func:`~lightning_vigu.flows.continuous.velocity_loss`).
        text_loss: ``cross_entropy`` or ``generalized_kl``.
        text_time_eps: caption times are drawn from ``[0, 1 - eps]`` (the KL weight diverges at 1).
        cfg_dropout: the share of the rows that train the video whose condition is the empty
            prompt (classifier-free guidance's unconditional branch; see
            :func:`prompt_dropout`).
    """

    prediction: str = "velocity"
    time_scheme: str = "logit_normal"
    time_shift: float = 1.0
    loss_weighting: str = "none"
    text_loss: str = "cross_entropy"
    text_time_eps: float = 1e-3
    cfg_dropout: float = 0.1


@dataclass
class LossOutput:
    """Losses of one batch (scalars) and how many examples fed each (0-d tensors: reading
    them on the host would wait for the device)."""

    loss: Tensor
    video: Tensor
    text: Tensor
    text_accuracy: Tensor
    num_video: Tensor
    num_text: Tensor
    tasks: Tensor


def draw_tasks(b: int, phase: Phase, generator: torch.Generator) -> Tensor:
    """``(B,)`` task ids (indices of :data:`TASKS`, on the CPU) from the phase's mix.

    Systematic sampling: ``B`` evenly spaced points, offset by one uniform draw, are read off
    the mix's cumulative distribution. Each task gets ``floor`` or ``ceil`` of ``B`` times its
    share, exactly its share on average, in a random order. A batch's task counts then vary by
    one at most, so the rows that hold causal captions pad to one count (:func:`caption_rows`),
    and a small batch of a rare task's share is not left to chance. A one-task mix draws
    nothing from ``generator``.
    """
    drawn = [i for i, t in enumerate(TASKS) if phase.task_mix.get(t, 0.0) > 0]
    if len(drawn) == 1:  # nothing to draw: the step's other draws stay the same as a model
        # without a caption stream draws them (validation's t2v loss is comparable)
        return torch.full((b,), drawn[0])
    probs = torch.tensor([phase.task_mix.get(t, 0.0) for t in TASKS], dtype=torch.float64)
    bounds = (probs.cumsum(0) / probs.sum())[:-1]
    points = (torch.arange(b, dtype=torch.float64) + torch.rand((), generator=generator)) / b
    # the bounds at or below each point (``bucketize(right=True)``): bucketize splits even 256
    # points over the intra-op threads, which cost an H200's host ~4 ms a step (profiled)
    # while the loader's workers held the cores; on a busy 2-core CPU 8 ms against 2 us on
    # one thread (benchmarks/results/ablation.md, part 24)
    tasks = (points[:, None] >= bounds[None, :]).sum(1)
    return tasks[torch.randperm(b, generator=generator)]


def caption_row_count(batch: int, phase: Phase) -> int:
    """How many rows of a batch of ``batch`` hold causal captions at every step: the ``ceil``
    of the caption tasks' share (:func:`caption_rows`)."""
    share = 1.0 - phase.task_mix.get("t2v", 0.0)  # the mix is normalised (Phase)
    return math.ceil(batch * share - 1e-9)


def caption_rows(tasks: Tensor, phase: Phase) -> tuple[Tensor, Tensor]:
    """The rows that hold causal captions (``tasks`` ``(B,)`` on the CPU), padded to the same
    count at every step: ``(rows, keep)``, ``(N,)`` each, ``keep`` 1 on a row whose task trains
    the captions and 0 on padding (a repeat of one row, weighed 0).

    :func:`draw_tasks` gives the caption tasks (``v2t``, ``joint``: one stretch of the mix's
    cumulative distribution, after ``t2v``) ``floor`` or ``ceil`` of ``B`` times their share;
    padding to the ``ceil`` keeps one shape for the compiled step (a count that changes
    compiles a second, dynamic graph: a `small` recall step's first compile took 121 s
    against 74 s on an H200, ``benchmarks/results/caption_rows_h200.md``).
    """
    real = torch.nonzero(tasks != T2V).squeeze(1)
    count = max(caption_row_count(len(tasks), phase), len(real))
    pad = real[:1] if len(real) else torch.zeros(1, dtype=torch.long)  # any row: weighed 0
    rows = torch.cat([real, pad.expand(count - len(real))])
    keep = (torch.arange(count) < len(real)).float()
    return rows, keep


def prompt_dropout(phase: Phase, cfg_dropout: float) -> float:
    """The probability that a row free to keep its prompt drops it, so that ``cfg_dropout`` of
    the rows that train the video (``t2v``, ``joint``) see the empty prompt, as in a
    generator's training.

    Where the caption target is the prompt, the ``joint`` rows hide it already (the caption
    must not copy it): they are unconditional video rows, and the ``t2v`` rows drop their prompt
    less to make up. Knowledge Recall at ``t2v 0.8 / joint 0.05`` and ``cfg_dropout`` 0.1 would
    otherwise train the video unconditionally on 15% of its rows, not 10%. Elsewhere it is
    ``cfg_dropout``.
    """
    t2v, joint = (phase.task_mix.get(t, 0.0) for t in ("t2v", "joint"))  # shares: it sums to 1
    video = t2v + joint
    hidden = joint if phase.caption_target == "prompt" else 0.0
    free = video - hidden
    if free <= 0:
        return cfg_dropout
    return min(max((cfg_dropout * video - hidden) / free, 0.0), 1.0)


def condition_mask(
    tasks: Tensor, phase: Phase, cfg_dropout: float, generator: torch.Generator
) -> Tensor:
    """``(B,)`` bool: True where the example gets the empty-prompt condition.

    The caption stream never sees the prompt it must reconstruct (see module docstring); the
    remaining examples drop their prompt for CFG with the probability of
    :func:`prompt_dropout`, so that ``cfg_dropout`` of the video's rows are unconditional.
    """
    must_hide = tasks == V2T
    if phase.caption_target == "prompt":
        must_hide |= tasks == JOINT
    p = prompt_dropout(phase, cfg_dropout)
    dropout = to_device(torch.rand(tasks.shape, generator=generator), tasks.device) < p
    return must_hide | dropout


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1)


@dataclass
class StepDraws:
    """One step's random draws: all that :meth:`UnifiedObjective.loss` reads besides the batch
    and the weights (drawn by :meth:`UnifiedObjective.draw`, on the device).

    Attributes:
        tasks: ``(B,)`` task ids.
        t_v: ``(B,)`` video flow times (1 for ``v2t``).
        noise: the video path's ``x_0``, shaped like the latents.
        hide: ``(B,)`` bool, True where the condition is the empty prompt.
        t_x: caption flow times, ``(B,)`` (1 for ``t2v``), or ``(N,)`` ones for causal
            captions; ``None`` without a caption stream.
        path_x: the mixture path's sample of the caption target (discrete-flow captions).
        rows, keep: causal captions: the rows that hold them and their weights (see
            :func:`caption_rows`).
    """

    tasks: Tensor
    t_v: Tensor
    noise: Tensor
    hide: Tensor
    t_x: Tensor | None = None
    path_x: discrete.DiscretePathSample | None = None
    rows: Tensor | None = None
    keep: Tensor | None = None


class UnifiedObjective:
    """Computes the phase-weighted unified loss: :meth:`draw` draws a step's randomness (host
    generators, device copies), :meth:`loss` computes the losses from it (tensor work only, so
    it can be traced as one graph with the transformer); calling the objective does both.

    Args:
        config: objective options.
        path: the caption stream's mixture path (source + scheduler), or
            :class:`~lightning_vigu.flows.causal.CausalCaptions` (next-token prediction: the
            caption loss is the cross-entropy of each next token, whatever ``text_loss``).
    """

    def __init__(self, config: ObjectiveConfig, path: discrete.MixtureDiscretePath) -> None:
        self.config = config
        self.path = path

    def __call__(
        self,
        model: FlowTimeModel,
        latents: Tensor,
        context: Tensor,
        empty_context: Tensor,
        target_tokens: Tensor | None,
        prompt_tokens: Tensor | None,
        phase: Phase,
        generator: torch.Generator,
        null_tokens: Tensor | None = None,
    ) -> LossOutput:
        """Args:
        model: the flow-time model.
        latents: ``(B, c, t, h, w)`` clean latents ``x_1``.
        context: ``(B, Lc, D)`` prompt condition; ``empty_context`` the same for ``""``.
        target_tokens: ``(B, L)`` caption canvas of the phase's target (``None``: no text).
        prompt_tokens: ``(B, L)`` prompt canvas held clean in the caption stream for ``t2v``.
        phase: the active phase.
        generator: CPU generator for every random draw (deterministic per step); the
            per-example draws reach the device without a host synchronisation.
        null_tokens: ``(1, L)`` the empty prompt's canvas, held instead of the prompt by
            ``t2v`` examples whose prompt is dropped (default: keep the prompt).
        """
        draws = self.draw(latents, target_tokens, phase, generator)
        return self.loss(
            model,
            latents,
            context,
            empty_context,
            target_tokens,
            prompt_tokens,
            phase,
            draws,
            null_tokens,
        )

    def draw(
        self,
        latents: Tensor,
        target_tokens: Tensor | None,
        phase: Phase,
        generator: torch.Generator,
    ) -> StepDraws:
        """A step's draws, in a fixed order from ``generator`` (see :meth:`__call__`)."""
        c, b, dev = self.config, latents.shape[0], latents.device
        use_text = target_tokens is not None and phase.uses_text
        tasks_cpu = draw_tasks(b, phase, generator) if use_text else torch.full((b,), T2V)
        tasks = to_device(tasks_cpu, dev)
        # 1. video times: clean for v2t, else sampled (Wan-style logit-normal / shift)
        t_v = to_device(
            continuous.sample_time(b, c.time_scheme, c.time_shift, generator=generator), dev
        )
        t_v = torch.where(tasks == V2T, torch.ones_like(t_v), t_v)
        # drawn where the latents live: a CPU draw + copy of a GPU batch's noise costs more than
        # the step of a small model (on CPU this is the step generator itself)
        noise_gen = on_device(generator, dev)
        noise = torch.randn(latents.shape, generator=noise_gen, device=dev, dtype=latents.dtype)
        # 2. condition: empty prompt where the caption must not copy it, or for CFG dropout
        draws = StepDraws(tasks, t_v, noise, condition_mask(tasks, phase, c.cfg_dropout, generator))
        if use_text:  # 3. caption times, and the caption target's path sample or rows
            t_x = to_device(torch.rand(b, generator=generator), dev) * (1 - c.text_time_eps)
            if self.path.causal:  # t_x was still drawn: the step's other draws stay the same
                draws.rows, draws.keep = (to_device(t, dev) for t in caption_rows(tasks_cpu, phase))
                draws.t_x = torch.ones(len(draws.rows), device=dev)
            else:
                draws.path_x = self.path.sample(target_tokens, t_x, noise_gen)
                draws.t_x = torch.where(tasks == T2V, torch.ones_like(t_x), t_x)
        return draws

    def loss(
        self,
        model: FlowTimeModel,
        latents: Tensor,
        context: Tensor,
        empty_context: Tensor,
        target_tokens: Tensor | None,
        prompt_tokens: Tensor | None,
        phase: Phase,
        draws: StepDraws,
        null_tokens: Tensor | None = None,
    ) -> LossOutput:
        """The losses of one batch given its step's ``draws`` (arguments as :meth:`__call__`)."""
        c, dev = self.config, latents.device
        use_text = target_tokens is not None and phase.uses_text
        tasks, t_v, t_x, rows = draws.tasks, draws.t_v, draws.t_x, draws.rows
        path_v = continuous.sample_path(latents, t_v, x_0=draws.noise)
        cond = torch.where(draws.hide[:, None, None], empty_context, context)
        # the caption stream: the clean prompt for t2v (the empty canvas when the prompt is
        # dropped), the target on the mixture path otherwise. Causal captions: the target
        # shifted right behind the start token, clean, held only by the rows that train the
        # captions (the video never reads them: the other rows cost what the generator's cost)
        x_text = None
        if use_text:
            if self.path.causal:
                target_tokens = target_tokens.index_select(0, rows)
                x_text = self.path.inputs(target_tokens)
            else:
                clean = prompt_tokens
                if null_tokens is not None:
                    clean = torch.where(draws.hide[:, None], null_tokens.to(dev), prompt_tokens)
                x_text = torch.where((tasks == T2V)[:, None], clean, draws.path_x.x_t)
        # 4. one forward over [video | caption]
        if rows is not None and len(rows) == 0:  # the phase never trains the captions
            out = model(path_v.x_t, t_v, cond)
        elif rows is not None:
            out = model(path_v.x_t, t_v, cond, x_text, t_x, text_rows=rows)
        else:
            out = model(path_v.x_t, t_v, cond, x_text, t_x)
        # 5. losses, each over the examples whose task trains it
        video_mask = (tasks != V2T).float()
        per_v = continuous.velocity_loss(out.velocity, path_v.dx_t, t_v, c.loss_weighting)
        video = _masked_mean(per_v, video_mask)
        text = acc = torch.zeros((), device=dev)
        text_mask = (tasks != T2V).float() if rows is None else draws.keep
        if use_text and out.text_logits is not None:
            logits = self.path.posterior_logits(out.text_logits)
            x_1 = target_tokens
            # None: every position; causal: the caption's tokens and its first end-of-text
            weight = self.path.loss_weight(target_tokens if self.path.causal else draws.path_x)
            if c.text_loss == "cross_entropy" or self.path.causal:
                per_x = discrete.cross_entropy_loss(logits, x_1, weight)
            elif c.text_loss == "generalized_kl":
                per_x = discrete.generalized_kl_loss(logits, x_1, x_text, t_x, self.path.scheduler)
            else:
                raise ValueError(
                    f"unknown text_loss '{c.text_loss}'; choose 'cross_entropy' or 'generalized_kl'"
                )
            text = _masked_mean(per_x, text_mask)
            hits = (logits.argmax(-1) == x_1).float()  # (B, L)
            per_acc = (
                hits.mean(1)
                if weight is None
                else (hits * weight).sum(1) / weight.sum(1).clamp_min(1)
            )
            acc = _masked_mean(per_acc, text_mask)
        w = phase.loss_weights
        loss = w.get("video", 0.0) * video + w.get("text", 0.0) * text
        return LossOutput(
            loss=loss,
            video=video.detach(),
            text=text.detach(),
            text_accuracy=acc.detach(),
            num_video=video_mask.sum(),
            num_text=text_mask.sum() if use_text else torch.zeros((), device=dev),
            tasks=tasks,
        )
