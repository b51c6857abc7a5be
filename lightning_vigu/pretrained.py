"""Load pretrained weights from local paths: Wan2.1 diffusers folders and Uni-ViGU checkpoints.

Nothing is downloaded. Weights are read with ``safetensors`` / ``torch.load`` into a model whose
parameters are first created on the meta device, so loading a 1.3B generator costs one copy.

* :func:`load_wan_transformer` -- the video path from a diffusers ``WanTransformer3DModel``
  folder (same parameter names as ours); the caption stream is initialised from it.
* :func:`load_univigu_checkpoint` -- the released Uni-ViGU weights, renamed by
  :func:`univigu_to_ours`.
* :func:`load_wan_folder` -- model, VAE codec, umT5 prompt encoder and caption tokenizer of a
  Wan2.1 diffusers pipeline folder, as one :class:`WanParts`.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_vigu.codecs.base import LatentCodec
from lightning_vigu.flows import FlowTimeModel, SamplerConfig, UnifiedSampler, discrete
from lightning_vigu.model import (
    SIZES,
    UniViGUConfig,
    UniViGUTransformer,
    model_config,
    parameter_group,
)
from lightning_vigu.text import CaptionTokenizer, HFTokenizer, PromptEncoder, UMT5PromptEncoder

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "tokenizer")
# diffusers config keys that map 1:1 onto UniViGUConfig fields: all but the caption stream's
_WAN_KEYS = {f.name for f in fields(UniViGUConfig)} - {
    "vocab_size",
    "text_ffn_dim",
    "mask_token",
}
# diffusers options we do not implement, with the only value we accept and why
_WAN_FIXED = {
    "image_dim": (None, "image conditioning (Wan2.1 I2V / FLF2V) is not supported"),
    "added_kv_proj_dim": (None, "image key/value projections (Wan2.1 I2V) are not supported"),
    "pos_embed_seq_len": (None, "learned image position embeddings are not supported"),
    "qk_norm": ("rms_norm_across_heads", "only Wan's RMS q/k norm across heads is implemented"),
}
# Uni-ViGU release name -> ours; names ending in "." are prefixes, others whole keys. Everything
# else is identical. Most specific first, so that the inverse maps back unambiguously.
_UNIVIGU_RENAMES = (
    ("cond_text_embedder.", "condition_embedder.text_embedder."),
    ("time_embedding_v.", "condition_embedder."),
    ("scale_shift_table_v", "scale_shift_table"),
    ("video_head.proj_out.", "proj_out."),
)
# buffers of the release that are recomputed, not stored by us
_UNIVIGU_DERIVED = ("rotary_emb_text.", "rotary_emb_video.")
_WRAPPERS = ("_fsdp_wrapped_module.", "_orig_mod.")  # anywhere in a key; DDP's "module." leads


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype '{dtype}'; use e.g. 'float32' or 'bfloat16'")
    return value


# ---------------------------------------------------------------------------- Wan folders
def transformer_folder(folder: str | Path) -> Path:
    """The ``WanTransformer3DModel`` folder: ``folder`` itself or its ``transformer/``."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(
            f"'{root}' is not a folder; pass a Wan2.1 diffusers folder (model_index.json, "
            "transformer/, vae/, text_encoder/, tokenizer/) or its transformer/ folder"
        )
    tdir = root if (root / "config.json").is_file() else root / "transformer"
    if not (tdir / "config.json").is_file():
        raise FileNotFoundError(
            f"no config.json in '{root}' nor in '{root / 'transformer'}': expected a diffusers "
            f"WanTransformer3DModel folder holding config.json and {WEIGHTS_NAME} (or a sharded "
            f"{INDEX_NAME}), or the pipeline root that holds it in transformer/"
        )
    return tdir


def wan_config_to_ours(config: Mapping, origin: str = "config.json") -> dict:
    """Map a diffusers ``WanTransformer3DModel`` config onto :class:`UniViGUConfig` fields.

    Raises:
        ValueError: for another model class or options we do not implement (``image_dim``,
            ``added_kv_proj_dim``, ``pos_embed_seq_len``, another ``qk_norm``).
    """
    name = config.get("_class_name", "WanTransformer3DModel")
    if name != "WanTransformer3DModel":
        raise ValueError(
            f"{origin} describes a '{name}', not a WanTransformer3DModel; pass a Wan2.1 "
            "text-to-video transformer folder"
        )
    for key, (allowed, why) in _WAN_FIXED.items():
        if config.get(key, allowed) != allowed:
            raise ValueError(
                f"{origin} sets {key}={config[key]!r}: {why}. Use a Wan2.1 T2V checkpoint "
                f"(where {key}={allowed!r})."
            )
    values = {k: config[k] for k in _WAN_KEYS if k in config}
    if values.get("out_channels") is None:
        values["out_channels"] = values.get("in_channels", UniViGUConfig.in_channels)
    if "patch_size" in values:
        values["patch_size"] = tuple(values["patch_size"])
    return values


def read_transformer_weights(
    folder: str | Path, device: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """All tensors of a diffusers transformer folder (single file or sharded index)."""
    from safetensors.torch import load_file

    tdir = Path(folder)
    if (tdir / WEIGHTS_NAME).is_file():
        files = [tdir / WEIGHTS_NAME]
    elif (tdir / INDEX_NAME).is_file():
        weight_map = json.loads((tdir / INDEX_NAME).read_text())["weight_map"]
        files = [tdir / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{tdir / INDEX_NAME} names missing shard(s) {missing}")
    else:
        raise FileNotFoundError(
            f"no {WEIGHTS_NAME} (nor a sharded {INDEX_NAME}) in '{tdir}'; save the transformer "
            "with diffusers' save_pretrained(..., safe_serialization=True)"
        )
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f), device=str(device)))
    return state


def _overridden(base: dict, overrides: dict) -> UniViGUConfig:
    valid = {f.name for f in fields(UniViGUConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; valid options: {sorted(valid)}")
    return UniViGUConfig(**{**base, **overrides})


def load_wan_transformer(
    folder: str | Path,
    *,
    vocab_size: int | None = None,
    text_ffn_dim: int | None = None,
    mask_token: bool = False,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    **overrides,
) -> UniViGUTransformer:
    """Our transformer with the video path of a diffusers ``WanTransformer3DModel`` folder.

    The config comes from the folder's ``config.json``. With a ``vocab_size`` the caption
    stream is added and initialised as Uni-ViGU does (text experts = copies of each block's FFN,
    or Xavier-initialised lighter experts when ``text_ffn_dim`` is smaller; text time embedding
    and final modulation table = copies of the video ones; zero text head).

    Args:
        folder: the transformer folder or the pipeline root holding ``transformer/``.
        vocab_size: caption vocabulary (e.g. ``len`` of the folder's umT5 tokenizer); ``None``
            builds the video-only generator.
        text_ffn_dim: width of the text experts (default: the video FFN's, a full copy).
        mask_token: add the mask id row for a mask source.
        dtype: parameter dtype.
        device: where the weights are loaded.
        **overrides: other :class:`UniViGUConfig` fields (e.g. ``rope_max_seq_len``).
    """
    tdir = transformer_folder(folder)
    config_file = tdir / "config.json"
    base = wan_config_to_ours(json.loads(config_file.read_text()), str(config_file))
    base.update(vocab_size=vocab_size, text_ffn_dim=text_ffn_dim, mask_token=mask_token)
    config = _overridden(base, overrides)
    state = read_transformer_weights(tdir, device)
    return _build_from_state(config, state, str(tdir), f"{config_file}", True, dtype, device)


# ---------------------------------------------------------------------------- building
def _describe(state: Mapping[str, Tensor]) -> str:
    """Name the size a state dict of ours belongs to (or its main widths)."""
    try:
        dim, in_ch = state["patch_embedding.weight"].shape[:2]
        layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        ffn = state["blocks.0.ffn.net.0.proj.weight"].shape[0]
        text_dim = state["condition_embedder.text_embedder.linear_1.weight"].shape[1]
    except (KeyError, ValueError):
        return "weights of an unknown layout"
    widths = dict(num_layers=layers, ffn_dim=ffn, text_dim=text_dim, in_channels=in_ch)
    for name, size in SIZES.items():
        same = all(size.get(k) == v for k, v in widths.items())
        if same and size["num_attention_heads"] * size["attention_head_dim"] == dim:
            return f"weights of model size '{name}' (size='{name}')"
    shown = ", ".join(f"{k}={v}" for k, v in widths.items())
    return f"weights with dim={dim}, {shown} (no named size; pass these as overrides)"


def _check_state(
    expected: Mapping[str, Tensor], state: Mapping[str, Tensor], origin: str, config_origin: str
) -> None:
    """Raise when ``state`` holds tensors the model lacks or shapes that differ."""
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(
            f"{origin} holds {len(unexpected)} tensor(s) the model does not have, e.g. "
            f"{unexpected[:5]}; it is not a checkpoint of this model layout"
        )
    for key in (k for k in expected if k in state):  # in model order: embeddings first
        tensor, want = state[key], tuple(expected[key].shape)
        if tuple(tensor.shape) != want:
            raise ValueError(
                f"tensor '{key}' has shape {tuple(tensor.shape)} in {origin} but the model built "
                f"from {config_origin} expects {want}: the file holds {_describe(state)}; build "
                "the model with that size/config"
            )


def _build_from_state(
    config: UniViGUConfig,
    state: dict[str, Tensor],
    origin: str,
    config_origin: str,
    fresh_caption: bool,
    dtype: str | torch.dtype,
    device: str | torch.device,
) -> UniViGUTransformer:
    """Build ``config`` on the meta device, assign ``state`` and initialise what it lacks.

    With ``fresh_caption`` the caption stream may be missing from ``state`` and is initialised
    from the loaded video path; every video tensor must be present either way.
    """
    from accelerate import init_empty_weights

    dtype = _as_dtype(dtype)
    with init_empty_weights(include_buffers=False):
        model = UniViGUTransformer(config)
    expected = model.state_dict()
    _check_state(expected, state, origin, config_origin)
    missing = [k for k in expected if k not in state]
    if fresh_caption:
        missing = [k for k in missing if parameter_group(k) == "video"]
    if missing:
        raise ValueError(
            f"{origin} lacks {len(missing)} tensor(s) of the model, e.g. {missing[:5]}; it holds "
            f"{_describe(state)}"
        )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    fresh = [n for n, p in model.named_parameters() if p.is_meta]
    for name in fresh:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        shape = getattr(module, attr).shape
        setattr(module, attr, nn.Parameter(torch.empty(shape, device=device)))
    if fresh:
        model.initialize_caption_weights()  # in float32, then cast (buffers such as rope keep theirs)
        for name in fresh:
            param = model.get_parameter(name)
            param.data = param.data.to(dtype)
    return model.to(device)


# ---------------------------------------------------------------------------- Uni-ViGU format
def univigu_to_ours(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a Uni-ViGU ``WanUnifiedTransformer`` state dict to our parameter names.

    The release keeps diffusers' Wan names for the blocks (``blocks.N.attn1/attn2/norm2/ffn``,
    plus ``ffn_t`` / ``norm3_t``), ``patch_embedding``, ``vocab_embed``, ``time_embedding_t``,
    ``scale_shift_table_t`` and ``text_head``; those are unchanged. The rest::

        time_embedding_v.*          -> condition_embedder.*        (time_embedder, time_proj)
        cond_text_embedder.*        -> condition_embedder.text_embedder.*
        scale_shift_table_v         -> scale_shift_table
        video_head.proj_out.*       -> proj_out.*
        rotary_emb_text.inv_freq    -> dropped (derived: 1 / 10000^(2i/head_dim))

    Wrapper prefixes of FSDP / ``torch.compile`` / DDP (``_fsdp_wrapped_module.``,
    ``_orig_mod.``, ``module.``) are removed first, as the reference loader does.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for wrapper in _WRAPPERS:
            key = key.replace(wrapper, "")
        key = key.removeprefix("module.")
        if key.startswith(_UNIVIGU_DERIVED):
            continue
        key = _rename(key, _UNIVIGU_RENAMES)
        out[key] = value
    return out


def _rename(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    """Apply the first matching ``(old, new)`` rule: a prefix rule when ``old`` ends in "."."""
    for old, new in renames:
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old) :]
    return key


def ours_to_univigu(state_dict: Mapping[str, Tensor], attention_head_dim: int) -> dict[str, Tensor]:
    """Inverse of :func:`univigu_to_ours` (adds the derived ``rotary_emb_text.inv_freq``)."""
    inverse = tuple((ours, theirs) for theirs, ours in _UNIVIGU_RENAMES)
    out = {_rename(key, inverse): value for key, value in state_dict.items()}
    d = attention_head_dim
    out["rotary_emb_text.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)  # (d/2,)
    return out


def read_univigu_state_dict(
    path: str | Path, key: str = "model", trust_pickle: bool = False
) -> dict[str, Tensor]:
    """The raw state dict of a Uni-ViGU checkpoint file (release names, wrappers kept).

    Accepts the reference trainer's ``torch.save`` file (a dict with the weights under
    ``"model"`` next to optimizer state and step), a flat state dict (``.pth``/``.pt``/``.bin``
    or ``.safetensors``), or a folder holding exactly one such file.

    Args:
        path: the file or folder.
        key: the entry holding the weights in a training checkpoint.
        trust_pickle: allow arbitrary pickled objects (``torch.load(weights_only=False)``);
            only for files you trust.
    """
    path = Path(path)
    if path.is_dir():
        found = [p for p in path.iterdir() if p.suffix in (".pth", ".pt", ".bin", ".safetensors")]
        if len(found) != 1:
            raise FileNotFoundError(
                f"'{path}' holds {len(found)} checkpoint files ({[p.name for p in found]}); pass "
                "the Uni-ViGU checkpoint file itself (.pth, .pt, .bin or .safetensors)"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"Uni-ViGU checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds pickled Python objects that torch.load(weights_only=True) refuses "
            f"({str(err).splitlines()[0]}); if you trust the file pass trust_pickle=True"
        ) from err
    if isinstance(obj, Mapping) and key in obj:
        obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        top = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            f"{path} is neither a state dict nor a checkpoint with weights under '{key}' "
            f"(top level: {top}); pass key=<the entry holding the weights>"
        )
    return dict(obj)


def load_univigu_checkpoint(
    path: str | Path,
    *,
    wan_folder: str | Path | None = None,
    size: str = "wan1.3b",
    mask_token: bool = False,
    key: str = "model",
    trust_pickle: bool = False,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    **overrides,
) -> UniViGUTransformer:
    """Load released Uni-ViGU weights (see :func:`univigu_to_ours` for the names).

    Sizes come from ``wan_folder``'s transformer ``config.json`` when given, else from the
    named ``size``; the vocabulary (``vocab_embed`` rows, less one with ``mask_token``) and the
    text-expert width are read from the checkpoint. The release uses umT5's vocabulary and the
    uniform source (``mask_token=False``). Every tensor must match: no missing or unexpected keys.

    Args:
        path: checkpoint file or folder (see :func:`read_univigu_state_dict`).
        wan_folder: the Wan2.1 folder the checkpoint was fine-tuned from (for its config).
        size: a named size of ``sizes.yaml`` used when ``wan_folder`` is ``None``.
        mask_token: the checkpoint was trained with a mask source (one extra vocabulary row).
        key: entry of the training checkpoint that holds the weights.
        trust_pickle: see :func:`read_univigu_state_dict`.
        dtype: parameter dtype.
        device: where the weights are loaded.
        **overrides: other :class:`UniViGUConfig` fields.
    """
    state = univigu_to_ours(read_univigu_state_dict(path, key, trust_pickle))
    if wan_folder is not None:
        config_file = transformer_folder(wan_folder) / "config.json"
        base = wan_config_to_ours(json.loads(config_file.read_text()), str(config_file))
        config_origin = str(config_file)
    else:
        base = dict(vars(model_config(size)))
        config_origin = f"size '{size}'"
    if "vocab_embed.weight" not in state:
        raise ValueError(
            f"{path} has no 'vocab_embed.weight': it is not a Uni-ViGU checkpoint (a plain Wan "
            "transformer loads with load_wan_transformer)"
        )
    rows = state["vocab_embed.weight"].shape[0]
    text_ffn = state.get("blocks.0.ffn_t.net.0.proj.weight")
    base.update(
        vocab_size=rows - int(mask_token),
        mask_token=mask_token,
        text_ffn_dim=None if text_ffn is None else text_ffn.shape[0],
    )
    config = _overridden(base, overrides)
    return _build_from_state(config, state, str(path), config_origin, False, dtype, device)


# ---------------------------------------------------------------------------- whole folders
def check_caption_vocab(tokenizer_vocab: int, model: UniViGUTransformer, origin: str) -> None:
    """Raise when a tokenizer can produce ids the model's vocabulary does not have."""
    vocab = model.config.vocab_size
    if vocab is None:
        raise ValueError("the model has no caption stream (vocab_size=None); it cannot caption")
    if tokenizer_vocab > vocab:
        raise ValueError(
            f"the tokenizer at {origin} has {tokenizer_vocab} ids but the model's vocabulary has "
            f"{vocab} rows (vocab_embed {tuple(model.vocab_embed.weight.shape)}): use the "
            "tokenizer the model was trained with, or build the model with "
            f"vocab_size={tokenizer_vocab}"
        )


@dataclass
class WanParts:
    """What a user needs from a Wan2.1 folder.

    Attributes:
        model: the unified transformer.
        codec: the Wan VAE codec.
        prompt_encoder: the frozen umT5 prompt encoder.
        tokenizer: the caption tokenizer (``None`` for a video-only model).
        caption_path: the caption stream's mixture path (``None`` for a video-only model).
    """

    model: UniViGUTransformer
    codec: LatentCodec
    prompt_encoder: PromptEncoder
    tokenizer: CaptionTokenizer | None
    caption_path: discrete.MixtureDiscretePath | None

    def sampler(self, config: SamplerConfig | None = None) -> UnifiedSampler:
        """A :class:`UnifiedSampler` over the model (Wan velocity; captioning needs a caption
        stream)."""
        path = self.caption_path or discrete.MixtureDiscretePath("uniform", 1)
        return UnifiedSampler(FlowTimeModel(self.model), path, config)


def load_wan_folder(
    folder: str | Path,
    *,
    checkpoint: str | Path | None = None,
    caption: bool = True,
    caption_source: str = "uniform",
    text_ffn_dim: int | None = None,
    normalize_latents: bool | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    prompt_length: int = 512,
    trust_pickle: bool = False,
) -> WanParts:
    """Model, VAE codec, umT5 prompt encoder and caption tokenizer of a Wan2.1 diffusers folder.

    Args:
        folder: the pipeline root holding ``model_index.json``, ``transformer/``, ``vae/``,
            ``text_encoder/`` and ``tokenizer/``.
        checkpoint: a Uni-ViGU checkpoint to load instead of the folder's transformer weights.
        caption: add a caption stream sized to the folder's tokenizer (ignored with a
            ``checkpoint``, which always has one); ``False`` gives the video-only generator.
        caption_source: the caption stream's source, ``uniform`` (Uni-ViGU's default) or ``mask``.
        text_ffn_dim: width of fresh text experts (default: full FFN copies).
        normalize_latents: normalise VAE latents with the VAE config's mean/std. Default:
            on for the Wan generator (as diffusers' WanPipeline), off with a Uni-ViGU
            checkpoint (its reference inference does not normalise).
        dtype: dtype of the transformer, VAE and text encoder.
        device: where everything is loaded.
        prompt_length: umT5 tokens per prompt (Wan: 512).
        trust_pickle: see :func:`read_univigu_state_dict`.
    """
    from lightning_vigu.codecs.wan_vae import WanVAECodec

    root = Path(folder)
    needed = ["model_index.json", *(f"{p}/" for p in PIPELINE_PARTS)]
    missing = [n for n in needed if not (root / n.rstrip("/")).exists()]
    if missing:
        raise FileNotFoundError(
            f"'{root}' lacks {missing}: a Wan2.1 diffusers folder holds model_index.json, "
            "transformer/, vae/, text_encoder/ and tokenizer/ (e.g. Wan2.1-T2V-1.3B-Diffusers)"
        )
    tok_dir = root / "tokenizer"
    mask = caption_source == "mask"
    tokenizer = None
    if checkpoint is not None:
        model = load_univigu_checkpoint(
            checkpoint,
            wan_folder=root,
            mask_token=mask,
            trust_pickle=trust_pickle,
            dtype=dtype,
            device=device,
        )
        base_vocab, eos = _tokenizer_sizes(tok_dir)
        check_caption_vocab(max(base_vocab, eos + 1), model, str(tok_dir))
        tokenizer = HFTokenizer(str(tok_dir), vocab_size=model.config.vocab_size)
    else:
        if caption:
            tokenizer = HFTokenizer(str(tok_dir))
        model = load_wan_transformer(
            root,
            vocab_size=tokenizer.vocab_size if tokenizer else None,
            text_ffn_dim=text_ffn_dim,
            mask_token=mask,
            dtype=dtype,
            device=device,
        )
    if normalize_latents is None:
        normalize_latents = checkpoint is None
    name = str(dtype).removeprefix("torch.")
    codec = WanVAECodec(root, normalize=normalize_latents, dtype=name).to(device)
    encoder = UMT5PromptEncoder(str(root), max_length=prompt_length, dtype=name).to(device)
    if encoder.dim != model.config.text_dim:
        raise ValueError(
            f"the text encoder in {root / 'text_encoder'} outputs {encoder.dim} features but the "
            f"transformer expects text_dim={model.config.text_dim}; the folder mixes models"
        )
    path = (
        discrete.MixtureDiscretePath(caption_source, model.config.vocab_size)
        if model.has_text
        else None
    )
    return WanParts(model, codec, encoder, tokenizer, path)


def _tokenizer_sizes(path: Path) -> tuple[int, int]:
    """Base vocabulary (without added special tokens) and EOS id of a local HF tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return int(tok.vocab_size), int(tok.eos_token_id if tok.eos_token_id is not None else -1)
