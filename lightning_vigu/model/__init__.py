"""The unified transformer: Wan-style video DiT, modality router and experts, heads.

``build_model(size, **overrides)`` builds a named size from ``sizes.yaml``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lightning_vigu.model.blocks import ModalityRouter, UnifiedBlock
from lightning_vigu.model.transformer import (
    UniViGUConfig,
    UniViGUOutput,
    UniViGUTransformer,
    parameter_group,
)

SIZES: dict[str, dict] = yaml.safe_load((Path(__file__).parent / "sizes.yaml").read_text())


def model_config(size: str, **overrides) -> UniViGUConfig:
    """The :class:`UniViGUConfig` of a named size with ``overrides`` applied."""
    if size not in SIZES:
        raise ValueError(f"unknown model size '{size}'; choose one of {sorted(SIZES)}")
    fields = set(UniViGUConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; valid options: {sorted(fields)}")
    values = {**SIZES[size], **overrides}
    values["patch_size"] = tuple(values["patch_size"])
    return UniViGUConfig(**values)


def build_model(size: str, **overrides) -> UniViGUTransformer:
    """Build the unified transformer of a named size (``tiny``, ``small``, ``base``, ``wan1.3b``).

    Args:
        size: a key of ``sizes.yaml``.
        **overrides: any :class:`UniViGUConfig` field, e.g. ``vocab_size=None`` for the
            video-only generator or ``text_ffn_dim=2048`` for a lighter text expert.
    """
    return UniViGUTransformer(model_config(size, **overrides))


__all__ = [
    "SIZES",
    "ModalityRouter",
    "UniViGUConfig",
    "UniViGUOutput",
    "UniViGUTransformer",
    "UnifiedBlock",
    "build_model",
    "model_config",
    "parameter_group",
]
