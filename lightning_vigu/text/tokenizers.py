"""Caption tokenizers with a fixed-length canvas: ``tokens..., EOS, EOS, ...``.

The caption stream works on a fixed canvas of ``length`` tokens with no attention mask: the
text is followed by EOS tokens up to the end, so the model learns where a caption stops and
:meth:`CaptionTokenizer.decode` cuts at the first EOS.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class CaptionTokenizer:
    """Interface of a caption tokenizer.

    Attributes:
        vocab_size: number of token ids the tokenizer can produce (the model's vocabulary,
            not counting the optional mask token of a mask source).
        eos_id: the end-of-text id that fills the canvas after the text.
    """

    vocab_size: int
    eos_id: int

    def _encode_one(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_ids(self, ids: list[int]) -> str:
        raise NotImplementedError

    #: texts whose canvases are remembered, per canvas length (captions repeat every epoch;
    #: BPE costs ~0.2 ms a text, which at batch 64 and three encodes a step is tens of ms of
    #: the training loop)
    cache_size: int = 200_000

    def __getstate__(self) -> dict:
        """Copies and pickles (EMA copies, worker processes) leave the remembered canvases
        behind."""
        state = self.__dict__.copy()
        state.pop("_rows_cache", None)
        return state

    def encode(self, texts: Sequence[str], length: int) -> Tensor:
        """Tokenize ``texts`` into a ``(B, length)`` canvas; text longer than ``length - 1``
        tokens is truncated so that at least one EOS always marks the end.

        Each text's row is remembered as a tensor and a batch stacks them: building the
        batch from Python lists took ~1 ms for 257 texts of 64 tokens (2.3 ms on an H200's host
        under a sampling profiler, once or twice a training step), stacking 0.04 ms."""
        if length < 2:
            raise ValueError(f"caption canvas length must be >= 2, got {length}")
        cache: dict[str, Tensor] = self.__dict__.setdefault("_rows_cache", {}).setdefault(
            length, {}
        )
        rows = []
        for text in texts:
            row = cache.get(text)
            if row is None:
                if len(cache) >= self.cache_size:
                    cache.clear()
                ids = self._encode_one(text)[: length - 1]
                row = torch.tensor([*ids, *([self.eos_id] * (length - len(ids)))])
                cache[text] = row
            rows.append(row)
        if not rows:
            return torch.zeros(0, length, dtype=torch.long)
        return torch.stack(rows)

    def decode(self, tokens: Tensor) -> list[str]:
        """Decode a ``(B, L)`` canvas into strings, cutting each at its first EOS."""
        texts = []
        for row in tokens.tolist():
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            row = [i for i in row if 0 <= i < self.vocab_size]
            texts.append(self._decode_ids(row).strip())
        return texts


class OpenCLIPTokenizer(CaptionTokenizer):
    """open_clip's bundled BPE vocabulary (49,408 ids), available offline with the package.

    The canvas holds the BPE ids of the lower-cased, cleaned text (no start token) followed by
    ``<end_of_text>``.

    Args:
        vocabulary: optional texts whose BPE tokens form a *compact* vocabulary: ids are
            remapped to ``0..n-1`` in BPE order, plus ``<unk>`` (``n``) and EOS (``n + 1``).
            Small closed worlds (the synthetic data) then train a head over ~100 ids instead
            of 49,408; tokenization itself is unchanged. Tokens outside it encode as ``<unk>``
            and decode to nothing.
    """

    def __init__(self, vocabulary: Sequence[str] | None = None) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self._tok = SimpleTokenizer()
        self._local: dict[int, int] | None = None
        if vocabulary is None:
            self.vocab_size = len(self._tok.encoder)
            self.eos_id = self._tok.eot_token_id
            return
        bpe = sorted({i for text in vocabulary for i in self._tok.encode(text)})
        if not bpe:
            raise ValueError(
                "OpenCLIPTokenizer(vocabulary=...) got no tokens; pass the texts of your world"
            )
        self._bpe = bpe
        self._local = {b: k for k, b in enumerate(bpe)}
        self.unk_id = len(bpe)
        self.eos_id = len(bpe) + 1
        self.vocab_size = len(bpe) + 2

    def _encode_one(self, text: str) -> list[int]:
        ids = self._tok.encode(text)
        if self._local is None:
            return ids
        return [self._local.get(i, self.unk_id) for i in ids]

    def _decode_ids(self, ids: list[int]) -> str:
        if self._local is not None:
            ids = [self._bpe[i] for i in ids if i < len(self._bpe)]
        return self._tok.decode(ids)


class HFTokenizer(CaptionTokenizer):
    """A Hugging Face tokenizer from a local folder (e.g. Wan's umT5 ``tokenizer/``).

    Args:
        path: local folder holding the tokenizer files; nothing is downloaded.
        vocab_size: the model's vocabulary size; defaults to ``len(tokenizer)``. Uni-ViGU's
            released checkpoint uses umT5's full vocabulary.
    """

    def __init__(self, path: str, vocab_size: int | None = None) -> None:
        from pathlib import Path

        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"tokenizer folder '{path}' does not exist; pass the local folder holding "
                "tokenizer.json / spiece.model (e.g. <Wan2.1 folder>/tokenizer)"
            )
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = int(vocab_size or len(self._tok))
        eos = self._tok.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer at '{path}' has no eos token; caption canvases need one")
        self.eos_id = int(eos)

    def _encode_one(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def _decode_ids(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
