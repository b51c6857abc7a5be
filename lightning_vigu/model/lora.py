"""LoRA on the video path of the unified transformer (peft), caption stream fully trainable.

:func:`apply_lora` injects peft LoRA layers in place with ``inject_adapter_in_model``: the model
stays a :class:`UniViGUTransformer` with the same ``forward``; only the wrapped linears gain a
``base_layer.`` in their parameter names (``blocks.0.attn1.to_q.base_layer.weight``) next to
``lora_A`` / ``lora_B``. Targets are matched as name suffixes, so ``ffn.net.0.proj`` adapts the
video FFN but not the caption expert ``ffn_t``. :func:`merge_lora` folds the adapters into the
base weights and restores the original module tree and names.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_vigu.model.transformer import UniViGUTransformer, parameter_group

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
CAPTION_GROUPS = ("text_experts", "text_embed")


def apply_lora(
    model: UniViGUTransformer,
    rank: int = 16,
    alpha: float = 16,
    targets: Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    trainable_groups: Sequence[str] = CAPTION_GROUPS,
) -> UniViGUTransformer:
    """Add LoRA adapters to the video path and freeze its base weights, in place.

    Attention layers are shared by both streams, so adapting ``to_q``... adapts them for
    captions too; the caption FFN experts and embeddings stay fully trainable.

    Args:
        model: the transformer (pretrained video path).
        rank: LoRA rank ``r``.
        alpha: LoRA scale numerator (the update is ``alpha / r * B A``).
        targets: module-name suffixes to adapt (linears of the video path).
        dropout: dropout on the LoRA branch input.
        trainable_groups: parameter groups (see :meth:`UniViGUTransformer.parameter_groups`)
            left fully trainable; ``()`` trains the adapters only.

    Returns:
        The same model object, with adapters.
    """
    from peft import LoraConfig, inject_adapter_in_model

    unknown = sorted(set(trainable_groups) - {"video", *CAPTION_GROUPS})
    if unknown:
        raise ValueError(
            f"unknown parameter group(s) {unknown}; choose from video, {CAPTION_GROUPS}"
        )
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for target in targets:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            raise ValueError(
                f"LoRA target '{target}' matches no linear layer of the model; valid suffixes "
                f"include {list(DEFAULT_TARGETS)}"
            )
        caption = [n for n in hits if parameter_group(n + ".weight") != "video"]
        if caption:
            raise ValueError(
                f"LoRA target '{target}' matches caption-stream layers {caption[:3]}, which are "
                "trained in full; target video-path layers only"
            )
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none"
    )
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora(name) or parameter_group(name) in trainable_groups)
    return model


def is_lora(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA adapter."""
    return ".lora_A." in name or ".lora_B." in name


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors (to save a LoRA next to the frozen base)."""
    return {k: v for k, v in model.state_dict().items() if is_lora(k)}


def merge_lora(model: UniViGUTransformer) -> UniViGUTransformer:
    """Fold every adapter into its base linear and unwrap it, in place.

    After merging the model has exactly its original modules and parameter names (a plain
    state dict that :func:`~lightning_vigu.pretrained` loaders and diffusers understand).
    """
    from peft.tuners.lora import LoraLayer

    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in wrapped:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return model
