"""Initialising a :class:`~lightning_vigu.module.UniViGU` from another run's weights
(``init_from``): a Lightning ``.ckpt``, a plain state dict, or a diffusers Wan2.1 folder whose
transformer becomes the video path.

Caption-stream weights the file lacks (a generator checkpoint, a Wan folder) are initialised
from the video path, as Uni-ViGU does; any other mismatch is an error naming the keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from lightning_vigu.runs import load_checkpoint_file

if TYPE_CHECKING:
    from lightning_vigu.module import UniViGU


def read_init_state(path: str, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The module state (``model.``-prefixed keys) that ``path`` holds.

    Args:
        path: a Lightning ``.ckpt`` / plain state dict file, or a diffusers Wan2.1 folder
            (pipeline root or its ``transformer/``).
        trust_pickle: load the file with full pickle (only for files you trust).
    """
    file = Path(path)
    if file.is_dir():
        from lightning_vigu.pretrained import load_wan_transformer

        return {f"model.{k}": v for k, v in load_wan_transformer(path).state_dict().items()}
    if not file.is_file():
        where = "" if file.is_absolute() else f" (relative paths are read from {Path.cwd()})"
        raise FileNotFoundError(
            f"init_from checkpoint '{path}' does not exist{where}; train the previous phase "
            "first (e.g. conf/generator.yaml), fix the path, or pass --init_from=null"
        )
    ckpt = load_checkpoint_file(
        file,
        trust_pickle=trust_pickle,
        flag="--model.trust_pickle=true",
        what="init_from checkpoint",
    )
    return ckpt.get("state_dict", ckpt)


def load_init_weights(module: UniViGU, path: str, trust_pickle: bool = False) -> None:
    """Load the weights of ``path`` (see :func:`read_init_state`) into ``module``.

    Raises:
        ValueError: a tensor of another shape, a weight the module lacks, or a missing weight
            outside the caption stream and the parts loaded from their own paths.
    """
    state = read_init_state(path, trust_pickle)
    own = module.state_dict()
    shape_errors = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if shape_errors:
        raise ValueError(
            f"checkpoint '{path}' does not fit this model (other size or vocabulary?): "
            + "; ".join(shape_errors[:5])
            + ". Pass --init_from=<a checkpoint of this model> or --init_from=null to train "
            "from scratch"
        )
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint '{path}' has weights this model lacks: {unexpected[:8]}")
    caption_missing = [
        k for k in missing if k.startswith("model.") and module.model_group(k) != "video"
    ]
    external = module.external_prefixes()
    other_missing = [k for k in missing if k not in caption_missing and not k.startswith(external)]
    if other_missing:
        raise ValueError(f"checkpoint '{path}' lacks weights of this model: {other_missing[:8]}")
    if caption_missing:
        module.model.init_caption_from_video()
