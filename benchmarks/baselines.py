"""Baselines of the quality benchmark: a small autoregressive video captioner.

``ARCaptioner`` is a plain encoder-decoder: the codec's latents are cut into patches, a
transformer encoder reads them, and a causal transformer decoder writes the caption token by
token with cross-attention to the video. ``ARCaptionerModule`` trains it on the same Batch
contract, tokenizer, codec and lr schedule as :class:`~lightning_vigu.module.UniViGU`, and its
``caption`` is called like ``UniViGU.caption``. Sizes are named in ``baselines.yaml``.

    python -m benchmarks.baselines fit -c <config with model: and data: sections>
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.cli import LightningCLI, OptimizerCallable
from torch import Tensor, nn

from lightning_vigu.batch import Batch, check_batch, video_as_float
from lightning_vigu.codecs import LatentCodec, PixelCodec
from lightning_vigu.loggers import log_step_values
from lightning_vigu.model.embeddings import sincos_3d
from lightning_vigu.text import CaptionTokenizer, OpenCLIPTokenizer
from lightning_vigu.training import (
    CompiledTrainingStep,
    InjectedOptimizerModule,
    NonFiniteSteps,
    save_config_hyperparameters,
    warmup_cosine,
)

SIZES: dict[str, dict] = yaml.safe_load(Path(__file__).with_name("baselines.yaml").read_text())
CAPTION_TARGETS = ("caption", "prompt")


class ARCaptioner(nn.Module):
    """Video encoder + causal text decoder, trained with teacher forcing.

    The end-of-text id doubles as the start token, so any :class:`CaptionTokenizer` works.

    Args:
        vocab_size: caption vocabulary (the tokenizer's ``vocab_size``).
        eos_id: end-of-text id; also the first decoder input (BOS).
        in_channels: latent channels of the codec (48 for ``PixelCodec((1, 4, 4))``).
        dim: model width.
        num_heads: attention heads of every layer.
        ffn_dim: hidden width of the feed-forward networks.
        encoder_layers: pre-norm transformer layers over the video patches.
        decoder_layers: pre-norm decoder layers (causal self-attention, cross-attention, FFN).
        patch_size: ``(pt, ph, pw)`` patch of the latent video.
        max_text_length: learned text positions, the longest caption canvas.
        dropout: dropout of every layer (0 like the unified model).
        tie_embeddings: share the output head with the token embedding.
    """

    def __init__(
        self,
        vocab_size: int,
        eos_id: int,
        in_channels: int = 48,
        dim: int = 384,
        num_heads: int = 6,
        ffn_dim: int = 1536,
        encoder_layers: int = 4,
        decoder_layers: int = 4,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        max_text_length: int = 64,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
    ) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"ARCaptioner dim must be even (sine-cosine positions), got {dim}")
        self.eos_id, self.in_channels, self.patch_size = eos_id, in_channels, tuple(patch_size)
        # 1. video encoder
        self.patch_embedding = nn.Conv3d(in_channels, dim, self.patch_size, self.patch_size)
        layer = dict(d_model=dim, nhead=num_heads, dim_feedforward=ffn_dim, dropout=dropout)
        layer.update(activation="gelu", batch_first=True, norm_first=True)  # pre-norm
        encoder_layer = nn.TransformerEncoderLayer(**layer)
        self.encoder = nn.TransformerEncoder(
            encoder_layer, encoder_layers, nn.LayerNorm(dim), enable_nested_tensor=False
        )
        # 2. causal text decoder
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.text_positions = nn.Parameter(torch.zeros(max_text_length, dim))
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(**layer), decoder_layers, norm=nn.LayerNorm(dim)
        )
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.initialize_weights()
        if tie_embeddings:
            self.head.weight = self.token_embedding.weight

    def initialize_weights(self) -> None:
        """Xavier for every linear map, zero biases, small normal embeddings."""
        # 1. linear layers (FFNs, attention output projections; MultiheadAttention already
        #    gives its fused input projection Xavier weights and zero bias)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # 2. patch embedding: Xavier on the flattened kernel, like a linear layer
        w = self.patch_embedding.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embedding.bias)
        # 3. token embedding (the tied head) and learned text positions
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text_positions, std=0.02)

    def encode_video(self, latents: Tensor) -> Tensor:
        """Latents ``(B, in_channels, T, H, W)`` -> video tokens ``(B, N, dim)``."""
        b, c, t, h, w = latents.shape
        pt, ph, pw = self.patch_size
        if c != self.in_channels or t % pt or h % ph or w % pw:
            raise ValueError(
                f"ARCaptioner expects latents (B, {self.in_channels}, T, H, W) with T, H, W "
                f"divisible by the patch {self.patch_size}, got {tuple(latents.shape)}"
            )
        x = self.patch_embedding(latents)  # (B, dim, T/pt, H/ph, W/pw)
        x = x.flatten(2).transpose(1, 2)  # (B, N, dim)
        x = x + sincos_3d(t // pt, h // ph, w // pw, x.shape[-1], x.device).to(x.dtype)
        return self.encoder(x)  # (B, N, dim)

    def decode_tokens(self, tokens: Tensor, memory: Tensor) -> Tensor:
        """Decoder inputs ``(B, L)`` (BOS first) and video tokens ``(B, N, dim)`` -> next-token
        logits ``(B, L, vocab_size)``."""
        n = tokens.shape[1]
        if n > len(self.text_positions):
            raise ValueError(
                f"caption of {n} tokens exceeds max_text_length={len(self.text_positions)}; "
                "build the ARCaptioner with a larger max_text_length"
            )
        x = self.token_embedding(tokens) + self.text_positions[:n]  # (B, L, dim)
        mask = nn.Transformer.generate_square_subsequent_mask(n, tokens.device, x.dtype)
        x = self.decoder(x, memory, tgt_mask=mask, tgt_is_causal=True)  # (B, L, dim)
        return self.head(x)  # (B, L, vocab_size)

    def forward(self, latents: Tensor, targets: Tensor) -> Tensor:
        """Teacher forcing: ``logits[:, i]`` predicts ``targets[:, i]`` from the video and
        ``targets[:, :i]``.

        Args:
            latents: ``(B, in_channels, T, H, W)``.
            targets: ``(B, L)`` caption canvas.

        Returns:
            Logits ``(B, L, vocab_size)``.
        """
        bos = targets.new_full((targets.shape[0], 1), self.eos_id)  # (B, 1)
        inputs = torch.cat([bos, targets[:, :-1]], dim=1)  # (B, L)
        return self.decode_tokens(inputs, self.encode_video(latents))

    @torch.no_grad()
    def generate(self, latents: Tensor, max_length: int) -> Tensor:
        """Greedy decoding -> canvas ``(B, max_length)``: tokens, then EOS to the end. Stops
        as soon as every caption has produced its EOS (no KV cache: each step re-reads the
        prefix, which is cheap at caption lengths)."""
        memory = self.encode_video(latents)  # (B, N, dim)
        b = memory.shape[0]
        canvas = torch.full((b, max_length), self.eos_id, dtype=torch.long, device=memory.device)
        inputs = canvas[:, :1].clone()  # (B, 1) BOS
        done = torch.zeros(b, dtype=torch.bool, device=memory.device)
        for i in range(max_length):
            logits = self.decode_tokens(inputs, memory)[:, -1]  # (B, vocab_size)
            token = logits.argmax(-1).masked_fill(done, self.eos_id)  # (B,)
            canvas[:, i] = token
            done |= token == self.eos_id
            if bool(done.all()):
                break
            inputs = torch.cat([inputs, token[:, None]], dim=1)  # (B, i + 2)
        return canvas


def build_ar_captioner(size: str, **kwargs) -> ARCaptioner:
    """An :class:`ARCaptioner` of a named size from ``baselines.yaml``; ``kwargs`` (the
    vocabulary, EOS id and any constructor argument) override the preset."""
    if size not in SIZES:
        raise ValueError(f"unknown ARCaptioner size '{size}'; choose one of {sorted(SIZES)}")
    values = {**SIZES[size], **kwargs}
    values["patch_size"] = tuple(values["patch_size"])
    return ARCaptioner(**values)


class ARCaptionerModule(NonFiniteSteps, CompiledTrainingStep, InjectedOptimizerModule):
    """Trains an :class:`ARCaptioner` with teacher-forced cross-entropy on the Batch contract.

    The loss covers each caption's tokens and its first EOS (the EOS fill after it is
    ignored). The optimiser, warm-up and cosine decay match :class:`UniViGU`'s defaults, and so
    do gradient clipping and the skipping of non-finite steps
    (:class:`~lightning_vigu.training.NonFiniteSteps`: a fused AdamW under bf16 clips and skips
    on the device, as conf/gpu.yaml trains both).

    Args:
        size: preset in ``benchmarks/baselines.yaml`` (``tiny``, ``small``).
        model_overrides: :class:`ARCaptioner` arguments overriding the preset.
        codec: latent codec (default: :class:`PixelCodec` with factors (1, 4, 4)).
        tokenizer: caption tokenizer (default: open_clip's bundled BPE).
        caption_length: caption canvas length (tokens, EOS-padded) and default decode length.
        caption_target: ``caption`` (the detailed caption) or ``prompt``.
        optimizer: optimiser factory called with the parameters (default AdamW).
        lr: peak learning rate.
        warmup_steps: linear warm-up steps.
        decay_steps: cosine decay horizon (default: the trainer's ``max_steps``).
        min_lr_ratio: final lr as a fraction of the peak.
        compile: the training step's loop, as :class:`~lightning_vigu.module.UniViGU`'s
            ``compile``: ``none``, ``model`` (the captioner compiled as one graph),
            ``cudagraphs`` (replayed as CUDA graphs) or ``autotune``; greedy decoding and
            validation run it eagerly. The quality suite trains the baseline with the unified
            model's loop, so that "the same time" buys both the same kind of step.
        max_nonfinite_steps: stop after this many consecutive non-finite losses (skipped).
    """

    def __init__(
        self,
        size: str = "small",
        model_overrides: dict | None = None,
        codec: LatentCodec | None = None,
        tokenizer: CaptionTokenizer | None = None,
        caption_length: int = 32,
        caption_target: str = "caption",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr: float = 3e-4,
        warmup_steps: int = 100,
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        compile: str = "none",
        max_nonfinite_steps: int = 5,
    ) -> None:
        super().__init__()
        if caption_target not in CAPTION_TARGETS:
            raise ValueError(
                f"caption_target must be one of {CAPTION_TARGETS}, got '{caption_target}'"
            )
        save_config_hyperparameters(self, injected=["codec", "tokenizer", "optimizer"])
        self.codec = codec if codec is not None else PixelCodec((1, 4, 4))
        self.codec.requires_grad_(False)
        self.tokenizer = tokenizer if tokenizer is not None else OpenCLIPTokenizer()
        overrides = dict(model_overrides or {})
        overrides.setdefault("in_channels", self.codec.latent_channels)
        overrides.setdefault("max_text_length", caption_length)
        self.model = build_ar_captioner(
            size, vocab_size=self.tokenizer.vocab_size, eos_id=self.tokenizer.eos_id, **overrides
        )
        self._optimizer_factory = optimizer
        self.compile_for_training(self.model, compile)

    def batch_latents(self, batch: Batch) -> Tensor:
        """Latents ``(B, c, t, h, w)`` of a batch carrying ``latents`` or ``video``."""
        check_batch(batch)
        if "latents" in batch:
            return batch["latents"].float()
        with torch.no_grad():
            return self.codec.encode(video_as_float(batch["video"]).float())

    def _shared_step(self, batch: Batch, stage: str) -> Tensor | None:
        texts = batch[self.hparams.caption_target]
        target = self.tokenizer.encode(texts, self.hparams.caption_length).to(self.device)
        logits = self.for_training(self.model)(self.batch_latents(batch), target)  # (B, L, V)
        is_eos = (target == self.tokenizer.eos_id).long()  # (B, L)
        keep = ((is_eos.cumsum(1) - is_eos) == 0).float()  # (B, L) text and its first EOS
        # means over the kept tokens by weights, not by selecting them: a selection's size is
        # read on the host, a wait for the device at every step
        count = keep.sum().clamp_min(1)
        per_token = F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none")
        loss = (per_token * keep).sum() / count
        accuracy = ((logits.argmax(-1) == target).float() * keep).sum() / count
        values = {f"{stage}/loss": loss, f"{stage}/token_accuracy": accuracy}
        if stage == "train":  # on the steps the loggers write
            log_step_values(self, values, prog_bar=True, batch_size=len(texts))
        else:
            self.log_dict(values, batch_size=len(texts), sync_dist=True)
        if stage == "train" and self.skip_nonfinite(loss, len(texts)):
            return None
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        self.begin_training_step()
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def configure_optimizers(self):
        opt = self._optimizer_factory(
            [{"params": list(self.model.parameters()), "lr": self.hparams.lr}]
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_ratio`` over the horizon."""
        hp = self.hparams
        horizon = hp.decay_steps or (self.trainer.max_steps if self._trainer is not None else -1)
        return warmup_cosine(step, hp.warmup_steps, horizon, hp.min_lr_ratio)

    @torch.no_grad()
    def caption(self, videos: Tensor, max_length: int | None = None, **_) -> list[str]:
        """Videos ``(B, 3, T, H, W)`` in [-1, 1] -> greedy captions (cut at EOS).

        Called like ``UniViGU.caption``: ``seed`` and sampler options are accepted and
        ignored (greedy decoding is deterministic). Call ``.eval()`` first when dropout > 0.
        """
        latents = self.codec.encode(videos.to(self.device).float())
        canvas = self.model.generate(latents, max_length or self.hparams.caption_length)
        return self.tokenizer.decode(canvas)


def main(args: list[str] | None = None) -> None:
    """LightningCLI for the baseline: the same ``data:`` and ``trainer:`` sections as a
    UniViGU config, with a ``model:`` section of :class:`ARCaptionerModule` arguments."""
    LightningCLI(
        ARCaptionerModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
