"""The UniViGU LightningModule: losses per phase, optimiser groups, sampling for users.

Parts are injected through typed arguments (LightningCLI ``class_path``): the latent codec,
the caption tokenizer and the prompt encoder; the transformer is a named size from
``lightning_vigu/model/sizes.yaml`` with overrides. Side effects (phase switches, sample
logging, evaluation, EMA) live in ``callbacks/``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Sequence

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_vigu.batch import Batch, check_batch, to_device, video_as_float
from lightning_vigu.codecs import LatentCodec, PixelCodec
from lightning_vigu.flows import FlowTimeModel, SamplerConfig, UnifiedSampler
from lightning_vigu.flows.causal import make_caption_path
from lightning_vigu.flows.draws import seeded
from lightning_vigu.init_weights import load_init_weights
from lightning_vigu.loggers import log_step_values
from lightning_vigu.model import build_model
from lightning_vigu.objective import LossOutput, ObjectiveConfig, StepDraws, UnifiedObjective
from lightning_vigu.phases import GROUPS, Phase, get_phase
from lightning_vigu.text import (
    CaptionTokenizer,
    LearnedPromptEncoder,
    OpenCLIPTokenizer,
    PromptEncoder,
)
from lightning_vigu.training import (
    CompiledTrainingStep,
    InjectedOptimizerModule,
    NonFiniteSteps,
    save_config_hyperparameters,
    warmup_cosine,
)


def check_learning_rates(lr: float, lr_groups: dict[str, float] | None) -> None:
    """Refuse a learning rate that is not positive (it would train by gradient ascent or not at
    all) and a negative group multiplier (0 freezes a group's updates, which is allowed)."""
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"model.lr must be a positive number, got {lr!r}; e.g. --model.lr=3e-4")
    bad = {k: v for k, v in (lr_groups or {}).items() if not (math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(
            f"model.lr_groups multipliers must be >= 0, got {bad}; 0 freezes a group's updates"
        )


def _condition_and_uncond(both: Tensor) -> tuple[Tensor, Tensor]:
    """The conditions of ``B`` prompts and of one unconditional prompt, encoded together as
    ``(B + 1, L, dim)``: ``(B, L, dim)`` each (the last expanded)."""
    b = both.shape[0] - 1
    return both[:b], both[b:].expand(b, -1, -1)


# parts built outside the module; a config stores them, a Python caller passes them again on load
INJECTED_PARTS = ("codec", "tokenizer", "prompt_encoder")


class UniViGU(NonFiniteSteps, CompiledTrainingStep, InjectedOptimizerModule):
    """Uni-ViGU: one transformer for text -> video, video -> text and joint generation.

    Args:
        size: model size preset (``tiny``, ``small``, ``base``, ``wan1.3b``).
        model_overrides: fields of :class:`~lightning_vigu.model.UniViGUConfig` to override.
        caption_stream: build the caption stream; ``None`` (default) builds it unless the phase
            never uses it (the ``generator`` phase).
        codec: latent codec (default: :class:`PixelCodec` with factors (1, 4, 4)).
        tokenizer: caption tokenizer (default: open_clip's bundled BPE).
        prompt_encoder: prompt encoder (default: a learned encoder over the tokenizer's ids).
        prompt_length: prompt tokens of the default learned encoder.
        prompt_layers: layers of the default learned encoder.
        caption_length: caption canvas length (tokens, EOS-padded).
        caption_objective: ``flow`` (Uni-ViGU's discrete flow over the whole canvas) or
            ``autoregressive`` (next-token prediction in the same stream under a causal mask,
            :mod:`lightning_vigu.flows.causal`: the video path then never reads the caption
            stream; ~5x faster caption learning per step on the synthetic world).
        caption_source: the flow's source, ``uniform`` (Uni-ViGU's default) or ``mask``.
        scheduler_exponent: ``kappa_t = t ** exponent``.
        phase: phase preset name or dict (see ``lightning_vigu/phases.yaml``).
        objective: loss options (time sampling, text loss, CFG dropout).
        sampler: sampling options used by ``generate_video`` / ``caption`` / ``generate_joint``.
        video_shape: ``(frames, height, width)`` of generated videos.
        optimizer: optimiser factory called with per-group parameter dicts (default AdamW).
        lr: base learning rate.
        lr_groups: per-group lr multipliers, e.g. ``{"video": 0.1}``.
        warmup_steps: linear warm-up steps.
        decay_steps: cosine decay horizon (default: the trainer's ``max_steps``).
        min_lr_ratio: final lr as a fraction of the peak.
        init_from: a checkpoint whose weights initialise the model (e.g. the generator for
            Knowledge Recall, a recall run for Capability Refinement). Optimiser state and step
            are not taken from it.
        lora: keyword arguments of :func:`lightning_vigu.model.lora.apply_lora` (e.g.
            ``{"rank": 32}``) to fine-tune the video path through LoRA adapters; the ``video``
            group then means the adapters, and the base weights stay frozen.
        gradient_checkpointing: recompute this many blocks in backward (True = all).
        compile: ``none``; ``blocks`` (``torch.compile`` every transformer block: the
            choice with gradient checkpointing of large models); ``model`` (the whole
            transformer as one graph, see ``benchmarks/results/train_loop_h200.md``);
            ``cudagraphs`` (``model`` replayed as
            CUDA graphs, which removes the kernel launches that bound small models' steps);
            ``autotune`` (``model`` with inductor's max-autotune: each matrix multiply's kernel
            chosen by timing candidates, minutes of compilation); ``step`` (the step's whole
            tensor work, the prompt encoder's layers, transformer and losses, as one graph
            replayed as CUDA graphs: only the step's random draws and the tokenising stay
            outside, :meth:`UnifiedObjective.draw`, :meth:`PromptEncoder.token_ids`). These modes
            compile the training step only: sampling and validation run eagerly (see
            :func:`compile_transformer`).
        attention_backend: ``sdpa`` or ``xformers``.
        triton_kernels: on CUDA, fuse each self-attention's q/k RMS norm and rope into one
            Triton kernel and attend to the prompt's few tokens with another, forward and
            backward (:mod:`lightning_vigu.model.kernels`; the same values within float
            rounding, tested; ``benchmarks/results/kernels_h200.md`` for their speed). Off or
            on the CPU: the PyTorch expressions.
        max_nonfinite_steps: stop after this many consecutive non-finite losses (skipped).
        seed: base seed of the per-step randomness (times, noise, tasks).
        trust_pickle: load ``init_from`` with full pickle (``torch.load(weights_only=False)``),
            which runs code stored in the file: only for files whose origin you trust.
    """

    def __init__(
        self,
        size: str = "tiny",
        model_overrides: dict | None = None,
        caption_stream: bool | None = None,
        codec: LatentCodec | None = None,
        tokenizer: CaptionTokenizer | None = None,
        prompt_encoder: PromptEncoder | None = None,
        prompt_length: int = 32,
        prompt_layers: int = 2,
        caption_length: int = 32,
        caption_objective: str = "flow",
        caption_source: str = "uniform",
        scheduler_exponent: float = 1.0,
        phase: str | dict = "recall",
        objective: ObjectiveConfig | None = None,
        sampler: SamplerConfig | None = None,
        video_shape: tuple[int, int, int] = (16, 32, 32),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr: float = 3e-4,
        lr_groups: dict[str, float] | None = None,
        warmup_steps: int = 100,
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        init_from: str | None = None,
        lora: dict | None = None,
        gradient_checkpointing: int | bool = False,
        compile: str = "none",
        attention_backend: str = "sdpa",
        triton_kernels: bool = False,
        max_nonfinite_steps: int = 5,
        seed: int = 0,
        trust_pickle: bool = False,
    ) -> None:
        super().__init__()
        check_learning_rates(lr, lr_groups)
        save_config_hyperparameters(self, injected=[*INJECTED_PARTS, "optimizer"])
        self.codec = codec if codec is not None else PixelCodec((1, 4, 4))
        self.codec.requires_grad_(False)
        self.tokenizer = tokenizer if tokenizer is not None else OpenCLIPTokenizer()
        if caption_stream is None:
            caption_stream = get_phase(phase).uses_text
        overrides = dict(model_overrides or {})
        overrides.setdefault("in_channels", self.codec.latent_channels)
        overrides.setdefault("out_channels", self.codec.latent_channels)
        self.caption_path = make_caption_path(
            caption_objective,
            caption_source,
            self.tokenizer.vocab_size,
            scheduler_exponent,
            self.tokenizer.eos_id,
        )
        overrides["vocab_size"] = self.tokenizer.vocab_size if caption_stream else None
        overrides["mask_token"] = self.caption_path.mask_id is not None
        overrides["causal_captions"] = self.caption_path.causal
        self.model = build_model(size, **overrides)
        text_dim = self.model.config.text_dim
        if prompt_encoder is None:
            prompt_encoder = LearnedPromptEncoder(
                self.tokenizer, dim=text_dim, num_layers=prompt_layers, max_length=prompt_length
            )
        if prompt_encoder.dim != text_dim:
            raise ValueError(
                f"prompt encoder width {prompt_encoder.dim} != model text_dim {text_dim}; set "
                f"model_overrides.text_dim={prompt_encoder.dim} or use a matching encoder"
            )
        self.prompt_encoder = prompt_encoder
        objective = objective or ObjectiveConfig()
        self.flow = FlowTimeModel(self.model, objective.prediction)
        self.objective = UnifiedObjective(objective, self.caption_path)
        self.sampler_config = sampler or SamplerConfig()
        self._optimizer_factory = optimizer
        self.model.set_attention_backend(attention_backend)
        self.model.set_triton_kernels(triton_kernels)
        if gradient_checkpointing:
            self.model.enable_gradient_checkpointing(gradient_checkpointing)
        if init_from:
            self.load_weights(init_from)
        if lora:
            from lightning_vigu.model.lora import apply_lora

            apply_lora(self.model, **lora)
        self.compile_for_training(self.model, compile, step=self.step_losses)
        self.phase = get_phase(phase)
        self.apply_phase(self.phase)

    # ------------------------------------------------------------------ phases / params
    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Parameters by group: ``video``, ``text_experts``, ``text_embed``, ``prompt_encoder``."""
        groups = self.model.parameter_groups()
        if self.hparams.lora:
            from lightning_vigu.model.lora import is_lora

            groups["video"] = [p for n, p in self.model.named_parameters() if is_lora(n)]
        groups["prompt_encoder"] = list(self.prompt_encoder.parameters())
        return groups

    def apply_phase(self, phase: Phase) -> None:
        """Make ``phase`` current: set which groups train (the optimiser keeps every group, so
        state of groups that stay trainable is kept; frozen ones get no gradient and no update)."""
        if phase.uses_text and not self.model.has_text:
            raise ValueError(
                f"phase '{phase.name}' trains the caption stream but the model was built with caption_stream=False"
            )
        self.phase = phase
        for name, params in self.parameter_groups().items():
            train = name in phase.trainable and (
                name != "prompt_encoder" or self.prompt_encoder.trainable
            )
            for p in params:
                p.requires_grad_(train)

    def load_weights(self, path: str) -> None:
        """Initialise from a checkpoint's weights (see :mod:`lightning_vigu.init_weights`)."""
        load_init_weights(self, path, trust_pickle=self.hparams.get("trust_pickle", False))

    @staticmethod
    def model_group(key: str) -> str:
        from lightning_vigu.model import parameter_group

        return parameter_group(key.removeprefix("model."))

    def configure_optimizers(self):
        scale = dict(self.hparams.lr_groups or {})
        unknown = sorted(set(scale) - set(GROUPS))
        if unknown:
            raise ValueError(f"lr_groups has unknown group(s) {unknown}; groups are {list(GROUPS)}")
        groups = [
            {"params": ps, "lr": self.hparams.lr * scale.get(name, 1.0), "name": name}
            for name, ps in self.parameter_groups().items()
            if ps
        ]
        opt = self._optimizer_factory(groups)
        factors = [functools.partial(self.lr_factor, group=g["name"]) for g in groups]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factors)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_factor(self, step: int, group: str = "video") -> float:
        """Warm-up, then cosine to ``min_lr_ratio``, times the phase's multiplier of ``group``."""
        hp = self.hparams
        horizon = hp.decay_steps or (self.trainer.max_steps if self._trainer is not None else -1)
        schedule = warmup_cosine(step, hp.warmup_steps, horizon, hp.min_lr_ratio)
        return schedule * self.phase.group_lr(group)

    # ------------------------------------------------------------------ training
    def step_generator(self, stage: str, index: int) -> torch.Generator:
        """A CPU generator seeded by (seed, stage, step, rank): a resumed run draws exactly what
        the uninterrupted run would have drawn at the same step."""
        key = f"{self.hparams.seed}/{stage}/{index}/{self.global_rank}".encode()
        return torch.Generator().manual_seed(zlib.crc32(key))

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Prompt condition ``(B, L, text_dim)``."""
        return self.prompt_encoder(list(prompts))

    def encode_prompts_and_uncond(
        self, prompts: Sequence[str], negative_prompt: str = ""
    ) -> tuple[Tensor, Tensor]:
        """Prompt condition ``(B, L, text_dim)`` and the unconditional one (the empty or
        negative prompt's, expanded to ``(B, L, text_dim)``), in one encoder call."""
        return _condition_and_uncond(self.encode_prompts([*prompts, negative_prompt]))

    def _check_data_shape(self, batch: Batch, latents: Tensor) -> None:
        """Warn once per shape when the data's clips differ from ``video_shape`` (the shape that
        generate, caption, sample logging and evaluation use)."""
        expected, got = self._latent_shape(None), tuple(latents.shape[1:])
        seen = self.__dict__.setdefault("_data_shapes_warned", set())
        if got == expected or got in seen:
            return
        seen.add(got)
        data = f"frames {tuple(batch['video'].shape[2:])}" if "video" in batch else f"latents {got}"
        rank_zero_warn(
            f"the data's {data} differ from model.video_shape {tuple(self.hparams.video_shape)} "
            f"(latents {expected}): the model trains on the data's shape, but generate, caption, "
            "samples and evaluation use video_shape. Set model.video_shape=[frames, height, "
            "width] to the data's (or the DataModule's num_frames/size to the model's)"
        )

    def batch_latents(self, batch: Batch) -> Tensor:
        """The latents of a batch (its clips encoded, or its cached latents)."""
        check_batch(batch)
        if "latents" in batch:
            latents = batch["latents"].float()
        else:
            with torch.no_grad():
                latents = self.codec.encode(video_as_float(batch["video"]).float())
        self._check_data_shape(batch, latents)
        return latents

    def _condition_is_cached(self, batch: Batch) -> bool:
        """Whether the batch carries its prompts' condition (a frozen encoder's ``prompt_emb``,
        from the latent cache), so the prompts are not encoded."""
        return "prompt_emb" in batch and not self.prompt_encoder.trainable

    def batch_inputs(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Latents, prompt condition and empty-prompt condition of a batch."""
        latents = self.batch_latents(batch)
        b = latents.shape[0]
        if self._condition_is_cached(batch):
            context = batch["prompt_emb"].float()
            empty = self.encode_prompts([""]).expand(b, -1, -1)
        else:
            context, empty = self.encode_prompts_and_uncond(batch["prompt"])
        return latents, context, empty.to(context.dtype)

    def compute_loss(self, batch: Batch, phase: Phase, generator: torch.Generator):
        step = self.compiled_step()
        # the compiled step encodes the prompts itself when the encoder splits its host part off
        ids = None
        if step is not None and not self._condition_is_cached(batch):
            ids = self.prompt_encoder.token_ids([*batch["prompt"], ""])  # (B + 1, L) or None
        if ids is None:
            latents, context, empty = self.batch_inputs(batch)
        else:
            latents = self.batch_latents(batch)
        target = prompt_tokens = null = None
        if self.model.has_text and phase.uses_text:
            prompt_tokens = self.encode_canvas(batch["prompt"])
            target = (  # recall reconstructs the prompt: one canvas, tokenised and copied once
                prompt_tokens
                if phase.caption_target == "prompt"
                else self.encode_canvas(batch["caption"])
            )
            null = self.encode_canvas([""])
        if step is None:
            flow = self.training_flow  # the eager flow outside training
            return self.objective(
                flow, latents, context, empty, target, prompt_tokens, phase, generator, null
            )
        draws = self.objective.draw(latents, target, phase, generator)
        condition = ids if ids is not None else (context, empty)
        out = step(self.flow, latents, condition, target, prompt_tokens, phase, draws, null)
        # graph outputs are overwritten by the next replay; what the step logs outlives it
        fields = dataclasses.fields(out)
        return dataclasses.replace(out, **{f.name: getattr(out, f.name).clone() for f in fields})

    def step_losses(
        self,
        flow: FlowTimeModel,
        latents: Tensor,
        condition: Tensor | tuple[Tensor, Tensor],
        target: Tensor | None,
        prompt_tokens: Tensor | None,
        phase: Phase,
        draws: StepDraws,
        null: Tensor | None,
    ) -> LossOutput:
        """The training step's tensor work, which ``compile: step`` compiles as one graph: the
        prompt condition, from the prompts' and the empty prompt's token ids ``(B + 1, L)``
        (:meth:`PromptEncoder.token_ids`: the encoder's layers run in the graph) or given as
        ``(context, empty)``, then the objective's losses (:meth:`UnifiedObjective.loss`)."""
        if isinstance(condition, Tensor):
            context, empty = _condition_and_uncond(self.prompt_encoder.embed(condition))
        else:
            context, empty = condition
        args = (target, prompt_tokens, phase, draws, null)
        return self.objective.loss(flow, latents, context, empty, *args)

    @property
    def training_flow(self) -> FlowTimeModel:
        """The flow the step runs: in training :attr:`flow` through the compiled transformer
        (``compile: model | cudagraphs | autotune``), else :attr:`flow` itself."""
        model = self.for_training(self.flow.model)
        if model is self.flow.model:
            return self.flow  # not compiled, or the transformer was replaced after compiling
        return FlowTimeModel(model, self.flow.prediction, self.flow.data_min_noise)

    def encode_canvas(self, texts: Sequence[str]) -> Tensor:
        """Caption canvases ``(B, caption_length)`` of texts, on the module's device."""
        return to_device(
            self.tokenizer.encode(list(texts), self.hparams.caption_length), self.device
        )

    def training_step(self, batch: Batch, batch_idx: int):
        self.begin_training_step()
        out = self.compute_loss(batch, self.phase, self.step_generator("train", self.global_step))
        b = len(batch["prompt"])
        losses = {
            "train/loss": out.loss,
            "train/loss_video": out.video,
            "train/loss_text": out.text,
        }
        if self.skip_nonfinite(
            out.loss, b, lambda: f"video={out.video.item()}, text={out.text.item()}"
        ):
            # a skipped step still counts toward max_steps (Lightning steps the loop): log it as
            # skipped, with its non-finite loss, not the previous step's finite one
            log_step_values(self, losses, prog_bar=True, batch_size=b)
            return None
        losses["train/text_accuracy"] = out.text_accuracy
        log_step_values(self, losses, prog_bar=True, batch_size=b)
        return out.loss

    def _eval_step(self, batch: Batch, batch_idx: int, stage: str) -> None:
        b = len(batch["prompt"])
        logs = {}
        for task, key in (("t2v", "video"), ("v2t", "text")):
            if key == "text" and not self.model.has_text:
                continue
            phase = Phase(
                name=f"{stage}-{task}",
                caption_target=self.phase.caption_target,
                task_mix={task: 1.0},
                trainable=[],
            )
            gen = self.step_generator(f"{stage}-{task}", batch_idx)
            out = self.compute_loss(batch, phase, gen)
            logs[f"{stage}/loss_{key}"] = getattr(out, key)
            if key == "text":
                logs[f"{stage}/text_accuracy"] = out.text_accuracy
        self.log_dict(logs, batch_size=b, sync_dist=True)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def external_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of frozen parts loaded from their own paths (the codec, a frozen
        prompt encoder): checkpoints leave them out and they are re-read from the config."""
        return ("codec.",) + (() if self.prompt_encoder.trainable else ("prompt_encoder.",))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["phase"] = self.phase.to_dict()
        if isinstance(self.trainer.strategy, FSDPStrategy):
            return  # FSDP's sharded loader is strict and loads before on_load_checkpoint runs
        prefixes = self.external_prefixes()
        for key in ("state_dict", "current_model_state"):  # the latter when EMA swaps weights in
            if key in checkpoint:
                checkpoint[key] = {
                    k: v for k, v in checkpoint[key].items() if not k.startswith(prefixes)
                }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "phase" in checkpoint:
            self.apply_phase(Phase(**checkpoint["phase"]))
        external = {
            k: v for k, v in self.state_dict().items() if k.startswith(self.external_prefixes())
        }
        for key in ("state_dict", "current_model_state"):
            if key in checkpoint:
                checkpoint[key] = {**external, **checkpoint[key]}

    # ------------------------------------------------------------------ sampling for users
    def sampler(self, **overrides) -> UnifiedSampler:
        cfg = SamplerConfig(
            **{**vars(self.sampler_config), **{k: v for k, v in overrides.items() if v is not None}}
        )
        return UnifiedSampler(self.flow, self.caption_path, cfg)

    def _latent_shape(self, video_shape: tuple[int, int, int] | None) -> tuple[int, int, int, int]:
        f, h, w = video_shape or self.hparams.video_shape
        return self.codec.latent_shape(f, h, w)

    @torch.no_grad()
    def generate_video(
        self,
        prompts: Sequence[str],
        seed: int | Sequence[int] = 0,
        video_shape: tuple[int, int, int] | None = None,
        negative_prompt: str = "",
        **sampler_overrides,
    ) -> Tensor:
        """Text -> videos ``(B, 3, T, H, W)`` in [-1, 1] (CFG against the empty prompt, or
        ``negative_prompt``; the caption stream, when the model has one, holds the clean prompt,
        and the negative prompt's canvas in the unconditional branch).

        ``seed``: one int for the batch, or one seed per prompt (each video then depends on its
        own seed alone, whatever the batch it is drawn in)."""
        b = len(prompts)
        context, uncond = self.encode_prompts_and_uncond(prompts, negative_prompt)
        text = null = None
        if self.model.has_text:
            text, null = self.encode_canvas(prompts), self.encode_canvas([negative_prompt] * b)
        gen = seeded(seed, b)
        latents = self.sampler(**sampler_overrides).generate_video(
            context, self._latent_shape(video_shape), uncond, text, gen, uncond_text=null
        )
        return self.codec.decode(latents)

    @torch.no_grad()
    def caption(
        self, videos: Tensor, seed: int | Sequence[int] = 0, **sampler_overrides
    ) -> list[str]:
        """Videos ``(B, 3, T, H, W)`` in [-1, 1] -> captions (cut at EOS); ``seed``: one int for
        the batch, or one per video (each caption then depends on its own seed alone)."""
        latents = self.codec.encode(videos.to(self.device).float())
        return self.caption_latents(latents, seed, **sampler_overrides)

    @torch.no_grad()
    def caption_latents(
        self, latents: Tensor, seed: int | Sequence[int] = 0, **sampler_overrides
    ) -> list[str]:
        """Clean codec latents ``(B, c, t, h, w)`` -> captions (cut at EOS); ``seed``: one int
        for the batch, or one per video (each caption then depends on its own seed alone)."""
        if not self.model.has_text:
            raise ValueError("this model has no caption stream (caption_stream=False)")
        latents = latents.to(self.device).float()
        empty = self.encode_prompts([""]).expand(latents.shape[0], -1, -1)
        gen = seeded(seed, latents.shape[0])
        tokens = self.sampler(**sampler_overrides).caption(
            latents, empty, self.hparams.caption_length, gen
        )
        return self.tokenizer.decode(tokens)

    @torch.no_grad()
    def generate_joint(
        self,
        prompts: Sequence[str],
        seed: int | Sequence[int] = 0,
        video_shape: tuple[int, int, int] | None = None,
        negative_prompt: str = "",
        **sampler_overrides,
    ) -> tuple[Tensor, list[str]]:
        """A video and its caption generated together. The prompt conditions the pair when the
        phase's captions are detailed captions (CFG against ``negative_prompt``); in Knowledge
        Recall the pair is generated from the empty prompt (the caption *is* a prompt, so it is
        never shown the prompt). ``seed``: one int for the batch, or one per prompt (each pair
        then depends on its own seed alone)."""
        if not self.model.has_text:
            raise ValueError("this model has no caption stream (caption_stream=False)")
        b = len(prompts)
        use_prompt = self.phase.caption_target == "caption"
        context, uncond = self.encode_prompts_and_uncond(
            list(prompts) if use_prompt else [""] * b, negative_prompt
        )
        gen = seeded(seed, b)
        latents, tokens = self.sampler(**sampler_overrides).generate_joint(
            context,
            self._latent_shape(video_shape),
            self.hparams.caption_length,
            uncond if use_prompt else None,
            gen,
        )
        return self.codec.decode(latents), self.tokenizer.decode(tokens)
