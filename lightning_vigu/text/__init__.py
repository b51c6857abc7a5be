"""Tokenizers for the caption stream and prompt encoders for the condition."""

from lightning_vigu.text.encoders import (
    LearnedPromptEncoder,
    PrecomputedPromptEncoder,
    PromptEncoder,
    UMT5PromptEncoder,
)
from lightning_vigu.text.tokenizers import CaptionTokenizer, HFTokenizer, OpenCLIPTokenizer

__all__ = [
    "CaptionTokenizer",
    "HFTokenizer",
    "LearnedPromptEncoder",
    "PrecomputedPromptEncoder",
    "OpenCLIPTokenizer",
    "PromptEncoder",
    "UMT5PromptEncoder",
]
