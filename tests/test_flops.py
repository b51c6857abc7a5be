"""The analytic FLOP count behind MFU agrees with torch's FLOP counter."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flops import forward_flops, train_flops
from lightning_vigu.model import build_model


@pytest.mark.parametrize("with_text", [False, True])
def test_analytic_forward_flops_match_torch_flop_counter(with_text):
    m = build_model("tiny", vocab_size=50 if with_text else None, num_layers=2).eval()
    b, f, h, w, lt, lc = 2, 4, 8, 8, 6, 5
    video, ctx = torch.randn(b, 48, f, h, w), torch.randn(b, lc, 64)
    text = torch.randint(0, 50, (b, lt)) if with_text else None
    counter = FlopCounterMode(display=False)
    # the math kernel runs attention as matmuls the counter sees (the CPU fused kernel is not counted)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        m(video, 500.0, ctx, text=text, t_text=500.0 if with_text else None)
    counted = counter.get_total_flops()
    analytic = forward_flops(m.config, f * h * w // 4, lt if with_text else 0, lc, b)
    # the counter also sees the small time-embedding matmuls, which the analytic count omits
    assert analytic == pytest.approx(counted, rel=0.03)
    assert train_flops(m.config, 64, 0, 5) == 3 * forward_flops(m.config, 64, 0, 5)
