"""The Triton kernels (lightning_vigu.model.kernels) against the PyTorch expressions they replace.

The kernels run on CUDA; on the CPU they run under Triton's interpreter, which must be switched
on before Triton compiles anything. So :func:`test_kernels_under_the_interpreter` runs this
file's ``interpreted`` tests in a fresh interpreter with ``TRITON_INTERPRET=1`` (they are skipped
in the main run), and the other tests check the CPU fallback and the argument checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_vigu.model import build_model, kernels
from lightning_vigu.model.attention import WanAttention
from lightning_vigu.model.embeddings import TextRope1D, VideoRope3D, VideoRopeMixed

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not (INTERPRETED and kernels.HAS_TRITON),
    reason="runs under Triton's interpreter (test_kernels_under_the_interpreter)",
)
B, H, D, GRID, LT = 2, 3, 16, (2, 2, 3), 5


def _ropes(mixed: bool):
    video = VideoRopeMixed(D, H, 64) if mixed else VideoRope3D(D, (1, 2, 2), 64)
    return video(GRID), TextRope1D(D)(LT, torch.device("cpu"))


def _reference(q, k, norms, rope_video, rope_text):
    """The model's PyTorch path: RMS norms over the heads, then the rope of the parts."""
    return [
        WanAttention._rope(n(x).unflatten(-1, (H, D)), rope_video, rope_text)
        for n, x in zip(norms, (q, k))
    ]


@interpreted
@pytest.mark.parametrize(
    "parts, tuning",
    [
        ("joint", {}),
        ("joint mixed", {}),
        ("video", {}),
        ("caption", {}),
        # blocks of 2 tokens, 3 backward programs: each loops over video and caption blocks
        ("joint", dict(rows=2, backward_rows=2, backward_programs=3)),
    ],
)
def test_qk_norm_rope_matches_the_torch_path(parts, tuning, monkeypatch):
    for key, value in tuning.items():
        monkeypatch.setitem(kernels.ROPE_TUNING, key, value)
    torch.manual_seed(0)
    rope_video, rope_text = _ropes(mixed=parts == "joint mixed")
    if parts == "video":
        rope_text = None
    if parts == "caption":
        rope_video = None
    seq = (rope_video[0].shape[1] if rope_video else 0) + (LT if rope_text else 0)
    q, k = (torch.randn(B, seq, H * D, requires_grad=True) for _ in "qk")
    norms = [nn.RMSNorm(H * D, eps=1e-6) for _ in "qk"]
    for n in norms:
        nn.init.uniform_(n.weight, 0.5, 1.5)
    grads = [torch.randn(B, seq, H, D) for _ in "qk"]
    inputs = [q, k, *(n.weight for n in norms)]

    ref = _reference(q, k, norms, rope_video, rope_text)
    ref_grads = torch.autograd.grad(ref, inputs, grads)
    out = kernels.qk_norm_rope(
        q.unflatten(-1, (H, D)), k.unflatten(-1, (H, D)), *(n.weight for n in norms), 1e-6,
        rope_video, rope_text,
    )  # fmt: skip
    out_grads = torch.autograd.grad(out, inputs, grads)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(out_grads, ref_grads):  # q, k, and both norms' weights
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@interpreted
@pytest.mark.parametrize("keys", [7, 32])
def test_few_key_attention_matches_sdpa(keys):
    torch.manual_seed(1)
    q = torch.randn(B, 70, 2, D, requires_grad=True)
    k, v = (torch.randn(B, keys, 2, D, requires_grad=True) for _ in "kv")
    grad = torch.randn(B, 70, 2, D)
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    out = kernels.few_key_attention(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(
        torch.autograd.grad(out, [q, k, v], grad), torch.autograd.grad(ref, [q, k, v], grad)
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _model_losses_and_grads(model, enabled: bool, dtype=None, rows=None):
    """A loss over both streams and every parameter's gradient, kernels on or off (``rows``:
    the rows that hold a causal caption)."""
    model.set_triton_kernels(enabled)
    model.zero_grad()
    g = torch.Generator().manual_seed(0)
    video = torch.randn(B, 48, 2, 4, 4, generator=g)
    t = torch.rand(B, generator=g) * 1000
    context = torch.randn(B, 7, model.config.text_dim, generator=g)
    text = torch.randint(0, 100, (B, 5), generator=g)
    t_text = t
    if rows is not None:
        text, t_text = text[rows], t[rows]
    with torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(video, t, context, text=text, t_text=t_text, text_rows=rows)
    loss = out.velocity.float().pow(2).mean() + out.text_logits.float().logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _tiny(**overrides):
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=100, text_ffn_dim=128, **overrides)
    with torch.no_grad():  # the output projection starts at zero (adaLN-Zero): give it values
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)
    return model


@interpreted
@pytest.mark.parametrize("path, fused_calls", [("joint", 2), ("rows", 4), ("packed", 4)])
def test_the_model_with_kernels_gives_the_torch_paths_values(path, fused_calls, monkeypatch):
    # the joint pass (self-attention over [video | caption], cross-attention to the prompt);
    # the causal captions of some rows, a pass per stream (the norm + rope kernel on the video
    # alone and on the captions alone), and with both streams packed (the same, on views of
    # the packed projections)
    calls = []
    fused = kernels.qk_norm_rope
    monkeypatch.setattr(kernels, "qk_norm_rope", lambda *a: calls.append(1) or fused(*a))
    causal = path != "joint"
    model = _tiny(causal_captions=causal, pack_caption_rows=path == "packed")
    rows = torch.tensor([1]) if causal else None  # the caption of row 1 only
    ref_loss, ref_grads = _model_losses_and_grads(model, False, rows=rows)
    assert not calls
    loss, grads = _model_losses_and_grads(model, True, rows=rows)
    assert len(calls) == fused_calls  # the tiny model's two layers
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@interpreted
def test_bf16_autocast_takes_the_few_key_kernel(monkeypatch):
    # under bf16 autocast the prompt attention goes to the kernel (half-precision keys)
    model = _tiny()
    calls = []
    few_keys = kernels.few_key_attention
    monkeypatch.setattr(kernels, "few_key_attention", lambda *a: calls.append(1) or few_keys(*a))
    ref_loss, _ = _model_losses_and_grads(model, False, torch.bfloat16)
    assert not calls
    loss, _ = _model_losses_and_grads(model, True, torch.bfloat16)
    assert len(calls) == 2 * model.config.num_layers  # forward: cross-attention + self (L <= 128)
    torch.testing.assert_close(loss, ref_loss, atol=0.05, rtol=0.02)


@interpreted
def test_the_kernels_benchmark_runs_its_toy_preset(tmp_path):
    import json

    from benchmarks import kernels as suite

    suite.main(["--preset", "toy", "--iters", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert {(r["part"], r["path"]) for r in rows} == {
        (part, path) for part in ("norm + rope", "prompt attention") for path in ("torch", "triton")
    }
    assert len(rows) == 8 and all(r["ms"] > 0 for r in rows)
    assert all(r["max_err_out"] < 0.05 and r["max_err_grad"] < 0.05 for r in rows)


@pytest.mark.skipif(INTERPRETED or not kernels.HAS_TRITON, reason="the main run starts it")
def test_kernels_under_the_interpreter():
    """This file's ``interpreted`` tests, in a fresh interpreter under Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


@pytest.mark.skipif(INTERPRETED, reason="the CPU without the interpreter")
def test_on_the_cpu_the_switch_keeps_the_torch_path():
    model = _tiny()
    assert not kernels.usable(torch.zeros(1))
    ref_loss, ref_grads = _model_losses_and_grads(model, False)
    loss, grads = _model_losses_and_grads(model, True)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_the_kernels_refuse_what_they_do_not_take():
    q = torch.zeros(1, 4, 2, 16)
    rope_video, _ = _ropes(mixed=False)
    with pytest.raises(ValueError, match="12 video and 0 caption tokens"):
        kernels.qk_norm_rope(q, q, torch.ones(32), torch.ones(32), 1e-6, rope_video, None)
    with pytest.raises(ValueError, match="heads of 2\\^n >= 16 channels, got 12"):
        kernels.qk_norm_rope(q[..., :12], q[..., :12], None, None, 1e-6, rope_video, None)
    with pytest.raises(ValueError, match="at most 128 keys"):
        kernels.few_key_attention(q, torch.zeros(1, 129, 2, 16), torch.zeros(1, 129, 2, 16))
    assert kernels.fits(64) and not kernels.fits(48) and not kernels.fits(8)


_TABLES = ("cv_ptr", "sv_ptr", "ct_ptr", "st_ptr")


@pytest.mark.skipif(
    INTERPRETED or not kernels.HAS_TRITON, reason="Triton's compiler, not its interpreter"
)
@pytest.mark.parametrize(
    "name, float32, constants",
    [
        ("_norm_rope_fwd", ("wq_ptr", "wk_ptr", *_TABLES), dict(EPS=1e-6, H=6, HP=8, D=64, HV=1, BT=8)),
        ("_norm_rope_bwd", ("wq_ptr", "wk_ptr", "dw_ptr", *_TABLES),
         dict(EPS=1e-6, H=8, HP=8, D=64, HV=8, BT=8)),
        ("_few_key_fwd", ("lse_ptr",), dict(SCALE=0.125, D=64, LP=32, BM=64)),
        ("_few_key_bwd", ("lse_ptr", "dk_ptr", "dv_ptr"), dict(SCALE=0.125, D=64, LP=32, BM=64)),
    ],
)  # fmt: skip
def test_the_kernels_compile_for_hopper(name, float32, constants):
    # Triton's ahead-of-time compiler for sm_90 (H100/H200) needs no GPU: the errors that only
    # compiling finds (a loop-carried value changing type, say) show here, not on the device
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    fn = getattr(kernels, name)

    def arg_type(arg: str) -> str:
        if arg in constants:
            return "constexpr"
        if arg.endswith("_ptr"):  # the activations in bf16, tables and sums in float32
            return "*fp32" if arg in float32 else "*bf16"
        return "i32"

    signature = {arg: arg_type(arg) for arg in fn.arg_names}
    source = ASTSource(fn, signature, constexprs=constants)
    compiled = compile(source, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["ptx"].count(".entry") == 1


class _Hopper:
    """Triton's active driver for code generation without a GPU: the target is sm_90."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0


@pytest.mark.skipif(
    INTERPRETED or not kernels.HAS_TRITON, reason="Triton's compiler, not its interpreter"
)
@pytest.mark.parametrize(
    "name, writes",
    [
        ("_norm_rope_fwd", {"yq_ptr", "yk_ptr"}),
        ("_norm_rope_bwd", {"dxq_ptr", "dxk_ptr", "dw_ptr"}),
        ("_few_key_fwd", {"o_ptr", "lse_ptr"}),
        ("_few_key_bwd", {"dq_ptr", "dk_ptr", "dv_ptr"}),
    ],
)
def test_torch_compile_sees_which_tensors_the_kernels_write(name, writes, monkeypatch):
    # torch.compile reads a user kernel's IR to learn which tensors it writes; where it cannot
    # tell (a load or store inside a called function), it takes every argument as written:
    # it copies each input first and writes the copies back (in the packed caption rows'
    # graph that write-back faulted on the GPU, ablation.md part 27)
    import triton

    wrap = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")
    monkeypatch.setattr(triton.runtime.driver, "_active", _Hopper())
    fn = getattr(kernels, name)
    constants = dict(EPS=1e-6, H=6, HP=8, D=64, HV=1, BT=8, SCALE=0.125, LP=32, BM=64)
    float32 = {"wq_ptr", "wk_ptr", "dw_ptr", "lse_ptr", *_TABLES}
    if name == "_few_key_bwd":
        float32 |= {"dk_ptr", "dv_ptr"}

    def argument(arg: str):
        if arg in constants:
            return constants[arg]
        if arg.endswith("_ptr"):
            return torch.zeros(64, dtype=torch.float32 if arg in float32 else torch.bfloat16)
        return 64

    args = {arg: argument(arg) for arg in fn.arg_names}
    accessed = wrap.identify_accessed_tensors(fn, args, {})
    assert {dep.name for dep in accessed.read_writes.writes} == writes
