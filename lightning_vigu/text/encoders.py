"""Prompt encoders: map prompts to the condition sequence the cross-attention reads.

* :class:`LearnedPromptEncoder` -- a small trainable transformer over caption-tokenizer ids,
  the default for the synthetic world (no weights to download).
* :class:`UMT5PromptEncoder` -- Wan's frozen umT5-XXL encoder from a local folder.

Both return ``(B, max_length, dim)``; padded positions are zeroed, as Wan does for umT5.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_vigu.batch import to_device
from lightning_vigu.text.tokenizers import CaptionTokenizer


class PromptEncoder(nn.Module):
    """Interface: ``forward(prompts) -> (B, max_length, dim)``; ``trainable`` says whether
    its parameters belong to the model's optimiser (frozen encoders can be cached).

    An encoder may split its work in two: :meth:`token_ids` (the host's part: texts to ids on
    the encoder's device) and :meth:`embed` (the tensor work on those ids), with ``forward(p)
    == embed(token_ids(p))``. A compiled training step (``model.compile: step``) then takes the
    ids and runs :meth:`embed` inside its graph. Encoders that do not split return ``None``.
    """

    dim: int
    max_length: int
    trainable: bool = False

    def forward(self, prompts: Sequence[str]) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def token_ids(self, prompts: Sequence[str]) -> Tensor | None:
        """``(B, max_length)`` ids on the encoder's device, or ``None`` (no split)."""
        return None

    def embed(self, ids: Tensor) -> Tensor:  # pragma: no cover - interface
        """``(B, max_length, dim)`` from :meth:`token_ids`'s ids."""
        raise NotImplementedError(f"{type(self).__name__} does not split tokenising from embedding")


class LearnedPromptEncoder(PromptEncoder):
    """Token embedding + a few pre-norm transformer layers, trained with the generator.

    Args:
        tokenizer: the caption tokenizer (its EOS fills the canvas and is masked out).
        dim: output width (the transformer's ``text_dim``).
        num_layers: encoder layers.
        num_heads: attention heads.
        max_length: prompt tokens kept.
    """

    trainable = True

    def __init__(
        self,
        tokenizer: CaptionTokenizer,
        dim: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        max_length: int = 32,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.dim = dim
        self.max_length = max_length
        self.token_embedding = nn.Embedding(tokenizer.vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.zeros(1, max_length, dim))
        layer = nn.TransformerEncoderLayer(
            dim,
            num_heads,
            4 * dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)

    def forward(self, prompts: Sequence[str]) -> Tensor:
        return self.embed(self.token_ids(prompts))

    def token_ids(self, prompts: Sequence[str]) -> Tensor:
        """``(B, max_length)`` caption-tokenizer ids, EOS-padded, on the encoder's device."""
        device = self.token_embedding.weight.device
        return to_device(self.tokenizer.encode(list(prompts), self.max_length), device)

    def embed(self, ids: Tensor) -> Tensor:
        """``(B, max_length, dim)`` condition of ``ids``; padding zeroed."""
        keep = ids != self.tokenizer.eos_id
        keep[:, 0] = True  # the empty prompt still has one (EOS) token to attend to
        x = self.token_embedding(ids) + self.position_embedding  # (B, L, dim)
        x = self.layers(x, src_key_padding_mask=~keep)
        return self.norm(x) * keep.unsqueeze(-1)  # (B, L, dim), padding zeroed


class UMT5PromptEncoder(PromptEncoder):
    """Wan's umT5 text encoder (frozen) from a local diffusers folder.

    Args:
        path: the Wan2.1 diffusers folder (holding ``text_encoder/`` and ``tokenizer/``), or a
            folder that is itself a ``UMT5EncoderModel`` with a tokenizer.
        max_length: tokens per prompt (Wan uses 512).
        dtype: weights dtype (``bfloat16`` on GPU).
    """

    def __init__(self, path: str, max_length: int = 512, dtype: str = "float32") -> None:
        super().__init__()
        from transformers import AutoTokenizer, UMT5EncoderModel

        root = Path(path)
        enc_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
        tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        if not (enc_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"no umT5 encoder at '{enc_dir}' (missing config.json); pass the Wan2.1 "
                "diffusers folder that holds text_encoder/ and tokenizer/"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        self.encoder = UMT5EncoderModel.from_pretrained(
            str(enc_dir), torch_dtype=getattr(torch, dtype), local_files_only=True
        )
        self.encoder.requires_grad_(False).eval()
        self.dim = int(self.encoder.config.d_model)
        self.max_length = max_length

    def train(self, mode: bool = True) -> UMT5PromptEncoder:
        super().train(mode)
        self.encoder.eval()  # always frozen
        return self

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Tensor:
        device = next(self.encoder.parameters()).device
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        hidden = self.encoder(ids, mask).last_hidden_state  # (B, L, d_model)
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)  # zero the padding, as Wan does


class PrecomputedPromptEncoder(PromptEncoder):
    """For runs whose batches carry ``prompt_emb`` from the latent cache (frozen umT5).

    It never loads the text encoder: the empty prompt's embedding (needed for the video->text
    condition and classifier-free guidance) comes from a file written once, e.g. by
    ``python -m datamodules.latent_cache`` or ``torch.save(UMT5PromptEncoder(path)([""])[0], f)``.

    Args:
        empty_embedding: path of a ``(max_length, dim)`` tensor saved with ``torch.save``.
    """

    def __init__(self, empty_embedding: str) -> None:
        super().__init__()
        path = Path(empty_embedding)
        if not path.is_file():
            raise FileNotFoundError(
                f"empty-prompt embedding '{path}' does not exist; write it once with the latent "
                "cache command (it saves empty_prompt_emb.pt next to the shards)"
            )
        emb = torch.load(path, map_location="cpu", weights_only=True)
        if emb.ndim == 3:
            emb = emb[0]
        if emb.ndim != 2:
            raise ValueError(
                f"'{path}' must hold a (max_length, dim) tensor, got {tuple(emb.shape)}"
            )
        self.register_buffer("empty", emb.float(), persistent=False)
        self.max_length, self.dim = emb.shape

    def forward(self, prompts: Sequence[str]) -> Tensor:
        if any(p for p in prompts):
            raise ValueError(
                "PrecomputedPromptEncoder only knows the empty prompt; batches must carry "
                "'prompt_emb' (build them with python -m datamodules.latent_cache) or configure "
                "a real prompt encoder such as UMT5PromptEncoder"
            )
        return self.empty.expand(len(prompts), -1, -1)
