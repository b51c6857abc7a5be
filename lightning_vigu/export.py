"""Export a trained model out of the project: Uni-ViGU release format, diffusers, LoRA adapters.

``python -m lightning_vigu export --ckpt <run>/checkpoints/last.ckpt --format F --out PATH``

* ``univigu`` -- the Uni-ViGU release format: ``{"model": state_dict}`` with the release's
  parameter names (:func:`~lightning_vigu.pretrained.ours_to_univigu`) and as many vocabulary
  rows as the official loader builds (``T5Tokenizer.vocab_size`` of the Wan folder, plus the
  mask row of a mask source), as ``.pth`` (what the official ``inference_unified_wan.py``
  reads) or ``.safetensors``. :func:`~lightning_vigu.pretrained.load_univigu_checkpoint` and
  ``generate/caption --wan-folder W --checkpoint FILE`` load it back.
* ``diffusers`` -- the video path as a diffusers ``WanTransformer3DModel`` folder
  (``config.json`` + ``diffusion_pytorch_model.safetensors``): drop it into a Wan2.1 pipeline
  folder as ``transformer/`` and ``WanPipeline`` generates with the trained generator.
* ``init`` -- what a later phase starts from (``--init_from FILE``): the run's video path and
  prompt encoder as a plain state dict (``.pt``), without the caption stream, which ``init_from``
  then initialises from the video path as Uni-ViGU does. ``conf/init/tiny_generator.pt``, the
  prior of the README's main job, was written this way.
* ``lora`` -- the LoRA adapters alone, with diffusers' key names
  (``transformer.blocks.0.attn1.to_q.lora_A.weight``) in ``pytorch_lora_weights.safetensors``,
  for ``WanPipeline.load_lora_weights`` on the base Wan2.1 transformer.

The checkpoint may be a Lightning ``.ckpt`` (the EMA weights are exported when the run kept
them; ``--weights live`` takes the training weights), the file that
``python -m lightning.pytorch.utilities.consolidate_checkpoint`` writes from an FSDP run, or the
sharded FSDP folder itself. LoRA adapters are merged into the base weights for ``univigu`` and
``diffusers`` (those formats have no adapters); ``lora`` writes them alone, their
``alpha / rank`` scale folded into ``lora_B`` so any loader's default scale (1) is right.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from lightning_vigu.model import UniViGUConfig, UniViGUTransformer, model_config, parameter_group
from lightning_vigu.pretrained import (
    _WRAPPERS,
    WEIGHTS_NAME,
    _as_dtype,
    _build_from_state,
    ours_to_univigu,
)
from lightning_vigu.runs import load_checkpoint_file

FORMATS = ("univigu", "diffusers", "lora", "init")
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # what WanPipeline.load_lora_weights reads
_DIFFUSERS_FIXED = {  # WanTransformer3DModel options of the text-to-video model we implement
    "qk_norm": "rms_norm_across_heads",
    "image_dim": None,
    "added_kv_proj_dim": None,
    "pos_embed_seq_len": None,
}
_DIFFUSERS_KEYS = (  # UniViGUConfig fields that diffusers' config shares
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "cross_attn_norm",
    "eps",
    "rope_max_seq_len",
)


@dataclass
class TrainedCheckpoint:
    """The transformer weights of a training checkpoint and what is needed to read them.

    Attributes:
        state: transformer tensors under our names (LoRA adapters not merged).
        config: the transformer's sizes.
        lora_scale: ``alpha / rank`` of the run's LoRA adapters (``None``: no adapters).
        prediction: what the video head predicts (``velocity`` or ``data``).
        weights: ``ema`` or ``live``: which of the checkpoint's weights ``state`` holds.
        tokenizer: the run's tokenizer hyper-parameters (``class_path`` / ``init_args``).
        step: the global step of the checkpoint.
        path: the file or folder it came from.
    """

    state: dict[str, Tensor]
    config: UniViGUConfig
    lora_scale: float | None
    prediction: str
    weights: str
    tokenizer: dict | None
    step: int | None
    path: str

    def adapters(self) -> dict[str, Tensor]:
        """The LoRA tensors alone (our names, peft's ``.default`` adapter name)."""
        return {k: v for k, v in self.state.items() if ".lora_A." in k or ".lora_B." in k}

    def merged_state(self) -> dict[str, Tensor]:
        """The state with every adapter folded into its base weight, under the base names."""
        return merge_lora_state(self.state, self.lora_scale or 1.0)

    def model(self, dtype: str | torch.dtype = "float32") -> UniViGUTransformer:
        """The transformer with merged weights (every tensor checked against the config)."""
        return _build_from_state(
            self.config,
            self.merged_state(),
            self.path,
            f"the hyper-parameters of {self.path}",
            False,
            dtype,
            "cpu",
        )


# ---------------------------------------------------------------------------- reading
def _load_file(path: Path, trust_pickle: bool) -> dict:
    if path.is_dir():  # an FSDP run's sharded checkpoint folder
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(
                f"'{path}' is a folder without a torch.distributed.checkpoint '.metadata' file; "
                "pass a .ckpt file or the sharded checkpoint folder an FSDP run wrote"
            )
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        checkpoint = _load_distributed_checkpoint(path)
        checkpoint["state_dict"] = checkpoint.pop("model")  # Lightning's sharded layout
        return checkpoint
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint '{path}' does not exist; pass a .ckpt written by 'fit' "
            "(e.g. <run>/checkpoints/last.ckpt) or an FSDP checkpoint folder"
        )
    return load_checkpoint_file(path, trust_pickle=trust_pickle, mmap=True)


def _plain(value):
    """Hyper-parameter values as plain Python (dicts for dataclasses / namespaces)."""
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: getattr(value, f.name) for f in fields(value)}
    if hasattr(value, "as_dict"):  # jsonargparse Namespace
        return value.as_dict()
    return value


def _weights_key(checkpoint: dict, weights: str, path: Path) -> str:
    """Where a Lightning checkpoint keeps the asked weights (``auto`` | ``ema`` | ``live``)."""
    if weights not in ("auto", "ema", "live"):
        raise ValueError(f"weights must be 'auto', 'ema' or 'live', got '{weights}'")
    if "state_dict" not in checkpoint:
        raise ValueError(
            f"{path} has no 'state_dict' (top level: {list(checkpoint)[:10]}): it is not a "
            "Lightning checkpoint; a Uni-ViGU release file loads with load_univigu_checkpoint"
        )
    has_ema = "current_model_state" in checkpoint  # EMA swaps its average into 'state_dict'
    if weights == "ema" and not has_ema:
        raise ValueError(
            f"{path} holds no EMA weights (the run had no EMA callback); use --weights live"
        )
    return "current_model_state" if weights == "live" and has_ema else "state_dict"


def read_checkpoint(
    path: str | Path, weights: str = "auto", trust_pickle: bool = False
) -> TrainedCheckpoint:
    """The transformer of a training checkpoint.

    Args:
        path: a Lightning ``.ckpt`` (consolidated FSDP files included) or a sharded FSDP folder.
        weights: ``auto`` (the EMA weights when the run kept them, else the training ones),
            ``ema`` (fail without EMA) or ``live`` (the training weights).
        trust_pickle: allow arbitrary pickled objects in the file (only for files you trust).
    """
    path = Path(path)
    checkpoint = _load_file(path, trust_pickle)
    key = _weights_key(checkpoint, weights, path)
    has_ema = "current_model_state" in checkpoint
    state = {}
    for name, value in checkpoint[key].items():
        for wrapper in _WRAPPERS:  # FSDP / torch.compile wrappers, wherever they sit
            name = name.replace(wrapper, "")
        if name.startswith("model."):  # our module's transformer; codec etc. stay out
            state[name[len("model.") :]] = value
    if not state:
        raise ValueError(f"{path} holds no 'model.*' tensors: it is not a UniViGU checkpoint")
    hp = {k: _plain(v) for k, v in dict(checkpoint.get("hyper_parameters") or {}).items()}
    config = _config_from(hp, state, str(path))
    lora_scale = None
    if any(".lora_A." in k for k in state):
        from lightning_vigu.model.lora import apply_lora

        defaults = {n: p.default for n, p in inspect.signature(apply_lora).parameters.items()}
        lora = {**defaults, **dict(hp.get("lora") or {})}
        lora_scale = float(lora["alpha"]) / float(lora["rank"])
    return TrainedCheckpoint(
        state=state,
        config=config,
        lora_scale=lora_scale,
        prediction=str(dict(hp.get("objective") or {}).get("prediction", "velocity")),
        weights="ema" if has_ema and key == "state_dict" else "live",
        tokenizer=hp.get("tokenizer") if isinstance(hp.get("tokenizer"), dict) else None,
        step=checkpoint.get("global_step"),
        path=str(path),
    )


def _config_from(hp: dict, state: dict[str, Tensor], origin: str) -> UniViGUConfig:
    """The model config of the run: its size and overrides, channels and vocabulary from the
    tensors (the codec and tokenizer decided those and are not needed here)."""
    overrides = dict(hp.get("model_overrides") or {})
    c_in = state["patch_embedding.weight"].shape[1]
    p = overrides.get("patch_size") or model_config(hp.get("size", "tiny")).patch_size
    overrides.update(
        in_channels=c_in, out_channels=state["proj_out.weight"].shape[0] // math.prod(p)
    )
    causal = hp.get("caption_objective", "flow") == "autoregressive"
    mask = hp.get("caption_source", "uniform") == "mask" and not causal
    rows = state.get("vocab_embed.weight")
    overrides.update(
        vocab_size=None if rows is None else rows.shape[0] - int(mask),
        mask_token=mask,
        causal_captions=causal,
    )
    try:
        return model_config(hp.get("size", "tiny"), **overrides)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{origin}: its hyper-parameters do not describe a model ({err})") from err


def merge_lora_state(state: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """Fold peft adapters into their base weights: ``W + scale * B @ A`` under ``W``'s name.

    ``blocks.0.attn1.to_q.base_layer.weight`` (+ ``lora_A.default`` / ``lora_B.default``)
    becomes ``blocks.0.attn1.to_q.weight``; a state without adapters is returned unchanged.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        layer, _, param = key.partition(".base_layer.")
        if param == "weight":
            a = _adapter(state, layer, "A")  # (r, in)
            b = _adapter(state, layer, "B")  # (out, r)
            value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
        out[f"{layer}.{param}"] = value
    return out


def _adapter(state: dict[str, Tensor], layer: str, which: str) -> Tensor:
    found = [v for k, v in state.items() if k.startswith(f"{layer}.lora_{which}.")]
    if len(found) != 1:
        raise ValueError(
            f"layer '{layer}' has {len(found)} lora_{which} tensors; expected one adapter"
        )
    return found[0]


# ---------------------------------------------------------------------------- writing
def _save_safetensors(state: dict[str, Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    tmp.chmod(0o644)  # safetensors creates the file private to its owner
    tmp.replace(path)


def base_vocabulary(tokenizer_folder: str | Path) -> int:
    """``vocab_size`` of a local Hugging Face tokenizer: the rows the official Uni-ViGU loader
    builds (``T5Tokenizer.from_pretrained(<wan>/tokenizer).vocab_size``, without added tokens)."""
    from lightning_vigu.pretrained import _tokenizer_sizes

    folder = Path(tokenizer_folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder '{folder}' does not exist; pass the Wan2.1 folder (its "
            "tokenizer/ decides the vocabulary rows) or --vocab-rows N"
        )
    return _tokenizer_sizes(folder)[0]


def univigu_state(model: UniViGUTransformer, vocab_rows: int | None = None) -> dict[str, Tensor]:
    """The model's state under the release's names, its vocabulary cut to ``vocab_rows``.

    The release's ``vocab_embed`` and ``text_head.linear`` have ``vocab + mask`` rows, the mask
    id last. Rows of ids past ``vocab_rows`` (tokenizer ids the official loader does not count,
    e.g. umT5's sentinels) are dropped; the mask row is kept.
    """
    c = model.config
    state = dict(model.state_dict())
    if vocab_rows is not None and c.vocab_size is not None and vocab_rows != c.vocab_size:
        if vocab_rows > c.vocab_size:
            raise ValueError(
                f"the model has {c.vocab_size} vocabulary rows but {vocab_rows} were asked for: "
                "it was trained with a smaller tokenizer than the target's; export with its own "
                "rows (no --wan-folder / --vocab-rows) and load it with the same tokenizer"
            )
        keep = torch.cat([torch.arange(vocab_rows), torch.arange(c.vocab_size, c.num_embeddings)])
        for key in ("vocab_embed.weight", "text_head.linear.weight", "text_head.linear.bias"):
            state[key] = state[key].index_select(0, keep)
    return ours_to_univigu(state, c.attention_head_dim)


def export_univigu(
    model: UniViGUTransformer,
    out: str | Path,
    vocab_rows: int | None = None,
    step: int | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write the Uni-ViGU release format: ``.pth`` (``{"model": sd, "step": N}``, what the
    official script loads) or ``.safetensors`` (the flat state dict)."""
    if not model.has_text:
        raise ValueError(
            "the model has no caption stream (a generator run): the Uni-ViGU format needs one; "
            "export the video path with --format diffusers"
        )
    out = Path(out)
    state = univigu_state(model, vocab_rows)
    if dtype is not None:
        state = {
            k: v.to(_as_dtype(dtype)) if v.is_floating_point() else v for k, v in state.items()
        }
    if out.suffix == ".safetensors":
        _save_safetensors(state, out, {"format": "pt", "step": str(step or 0)})
    elif out.suffix in (".pth", ".pt"):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        torch.save({"model": state, "step": int(step or 0)}, tmp)
        tmp.replace(out)
    else:
        raise ValueError(
            f"'{out}': the Uni-ViGU format is written as .pth (what the official script loads) "
            "or .safetensors; name the output file with one of these suffixes"
        )
    return out


def diffusers_config(config: UniViGUConfig) -> dict:
    """The ``config.json`` of a diffusers ``WanTransformer3DModel`` with ``config``'s video path."""
    try:
        from diffusers import __version__ as version
    except ImportError:
        version = "0.33.0"  # the first release with WanTransformer3DModel's current config
    values = {k: getattr(config, k) for k in _DIFFUSERS_KEYS}
    values["patch_size"] = list(values["patch_size"])
    head = {"_class_name": "WanTransformer3DModel", "_diffusers_version": version}
    return {**head, **values, **_DIFFUSERS_FIXED}


def export_diffusers(
    model: UniViGUTransformer, out: str | Path, dtype: str | torch.dtype | None = None
) -> Path:
    """Write the video path as a diffusers ``WanTransformer3DModel`` folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"'{out}' is a file; the diffusers format is a folder")
    state = {k: v for k, v in model.state_dict().items() if parameter_group(k) == "video"}
    if dtype is not None:
        state = {k: v.to(_as_dtype(dtype)) for k, v in state.items()}
    _save_safetensors(state, out / WEIGHTS_NAME, {"format": "pt"})
    (out / "config.json").write_text(json.dumps(diffusers_config(model.config), indent=2) + "\n")
    return out


def lora_to_diffusers(adapters: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """peft adapters under our names -> diffusers' Wan LoRA names, ``scale`` folded into B.

    ``blocks.0.attn1.to_q.lora_A.default.weight`` -> ``transformer.blocks.0.attn1.to_q.lora_A.weight``.
    """
    out = {}
    for key, value in adapters.items():
        layer, which, _ = _split_adapter_key(key)
        if parameter_group(layer + ".weight") != "video":
            raise ValueError(
                f"adapter '{key}' sits on the caption stream, which diffusers' Wan has not"
            )
        value = value * scale if which == "B" else value
        out[f"transformer.{layer}.lora_{which}.weight"] = value.contiguous()
    return out


def lora_from_diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers' Wan LoRA names -> peft adapters under our names (``default`` adapter, scale 1)."""
    out = {}
    for key, value in state.items():
        if not key.startswith("transformer.") or ".lora_" not in key:
            raise ValueError(
                f"'{key}' is not a diffusers Wan LoRA key (transformer.<layer>.lora_A.weight)"
            )
        layer, which, _ = _split_adapter_key(key.removeprefix("transformer."))
        out[f"{layer}.lora_{which}.default.weight"] = value
    return out


def _split_adapter_key(key: str) -> tuple[str, str, str]:
    for which in ("A", "B"):
        layer, sep, rest = key.partition(f".lora_{which}.")
        if sep:
            return layer, which, rest
    raise ValueError(f"'{key}' is not a LoRA adapter key")


def export_init(ckpt: str | Path, out: str | Path, weights: str, trust_pickle: bool) -> Path:
    """Write the checkpoint's weights outside the caption stream as a plain state dict, the
    file ``init_from`` starts a later phase from (EMA weights by default, see
    :func:`read_checkpoint`)."""
    checkpoint = _load_file(Path(ckpt), trust_pickle)
    source = checkpoint[_weights_key(checkpoint, weights, Path(ckpt))]
    state = {
        k: v.detach().clone()
        for k, v in source.items()
        if not k.startswith("model.") or parameter_group(k.removeprefix("model.")) == "video"
    }
    if not any(k.startswith("model.") for k in state):
        raise ValueError(f"{ckpt} holds no 'model.*' tensors: it is not a UniViGU checkpoint")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return out


def export_lora(trained: TrainedCheckpoint, out: str | Path) -> Path:
    """Write the run's LoRA adapters alone in diffusers' format (a folder)."""
    adapters = trained.adapters()
    if not adapters:
        raise ValueError(
            f"{trained.path} has no LoRA adapters (the run had no model.lora); export the "
            "full weights with --format univigu or diffusers"
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"'{out}' is a file; the lora format is a folder")
    state = lora_to_diffusers(adapters, trained.lora_scale or 1.0)
    _save_safetensors(state, out / LORA_WEIGHTS_NAME, {"format": "pt"})
    return out


# ---------------------------------------------------------------------------- command
def _vocab_rows(trained: TrainedCheckpoint, wan_folder: str | None, rows: int | None) -> int | None:
    """Rows for the release format: ``rows``, else the Wan folder's tokenizer, else the run's
    HFTokenizer folder when it still exists, else all of the model's."""
    if rows is not None:
        return rows
    if wan_folder is not None:
        return base_vocabulary(Path(wan_folder) / "tokenizer")
    tok = trained.tokenizer or {}
    path = dict(tok.get("init_args") or {}).get("path")
    if str(tok.get("class_path", "")).endswith("HFTokenizer") and path and Path(path).is_dir():
        return base_vocabulary(path)
    return None


def export(
    ckpt: str | Path,
    fmt: str,
    out: str | Path,
    weights: str = "auto",
    wan_folder: str | None = None,
    vocab_rows: int | None = None,
    dtype: str | None = None,
    trust_pickle: bool = False,
    allow_data_prediction: bool = False,
) -> Path:
    """Export a training checkpoint (see the module docstring for the formats)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}'; choose one of {list(FORMATS)}")
    if fmt == "init":
        return export_init(ckpt, out, weights, trust_pickle)
    trained = read_checkpoint(ckpt, weights, trust_pickle)
    if fmt == "lora":
        return export_lora(trained, out)
    if trained.prediction != "velocity" and not allow_data_prediction:
        raise ValueError(
            f"{ckpt} was trained with objective.prediction='{trained.prediction}': its video head "
            "predicts clean latents, while Wan pipelines and the official script expect a "
            "velocity; pass --allow-data-prediction to write the weights anyway"
        )
    model = trained.model()
    # sine-cosine positions, the pooled prompt and the mixed rope (ours, off for Wan) that the
    # target lacks
    unknown = ["video_absolute_positions", "video_rope", "pooled_prompt"] + (
        ["text_absolute_positions"] * (fmt == "univigu")
    )
    wan = UniViGUConfig()  # Wan's choice for each
    added = [key for key in unknown if getattr(model.config, key) != getattr(wan, key)]
    if added:
        target = "diffusers' WanTransformer3DModel" if fmt == "diffusers" else "the official script"
        named = ", ".join(f"{k}: {str(getattr(model.config, k)).lower()}" for k in added)
        raise ValueError(
            f"{ckpt} was trained with model_overrides {named}: parts (sine-cosine positions, a "
            f"mixed rope, a pooled prompt) that {target} does not have, so the exported model "
            "would compute something else; sample it with `python -m lightning_vigu generate "
            "--ckpt`, or train with those overrides off to export"
        )
    if fmt == "univigu" and model.config.causal_captions:
        raise ValueError(
            f"{ckpt} was trained with model.caption_objective='autoregressive': its caption "
            "stream writes next tokens under a causal mask, which the official Uni-ViGU script "
            "(a discrete-flow sampler over full attention) cannot run; export the video path "
            "with --format diffusers, or caption with `python -m lightning_vigu caption --ckpt`"
        )
    if fmt == "diffusers":
        return export_diffusers(model, out, dtype)
    return export_univigu(
        model, out, _vocab_rows(trained, wan_folder, vocab_rows), trained.step, dtype
    )


def export_main(argv: list[str]) -> None:
    """``export``: a training checkpoint -> release / diffusers / LoRA files."""
    from jsonargparse import ArgumentParser

    p = ArgumentParser(prog="python -m lightning_vigu export", description=__doc__)
    p.add_argument("--ckpt", type=str, required=True, help=".ckpt file or FSDP checkpoint folder")
    p.add_argument("--format", type=str, required=True, help=f"one of {list(FORMATS)}")
    p.add_argument(
        "--out",
        type=str,
        required=True,
        help="univigu: a .pth/.safetensors file; init: a .pt file; else a folder",
    )
    p.add_argument("--weights", type=str, default="auto", help="auto | ema | live")
    p.add_argument(
        "--wan-folder",
        type=str | None,
        default=None,
        help="univigu: the Wan2.1 folder whose tokenizer decides the vocabulary rows",
    )
    p.add_argument("--vocab-rows", type=int | None, default=None, help="univigu: rows to keep")
    p.add_argument(
        "--dtype", type=str | None, default=None, help="e.g. bfloat16 (default: as saved)"
    )
    p.add_argument("--trust-pickle", type=bool, default=False)
    p.add_argument("--allow-data-prediction", type=bool, default=False)
    a = p.parse_args(argv)
    path = export(
        a.ckpt,
        a.format,
        a.out,
        a.weights,
        a.wan_folder,
        a.vocab_rows,
        a.dtype,
        a.trust_pickle,
        a.allow_data_prediction,
    )
    print(f"wrote {a.format} export of {a.ckpt} to {path}")
