"""The analytic FLOP count behind MFU agrees with torch's FLOP counter."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flops import caption_rows_forward_flops, forward_flops, train_flops
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


def test_caption_rows_flops_match_torch_flop_counter():
    """Causal captions held by some rows only: each caption reads its row's video, the video no
    caption (``text_rows``, the next-token stream's training step)."""
    m = build_model("tiny", vocab_size=50, num_layers=2, causal_captions=True).eval()
    b, f, h, w, lt, lc = 4, 4, 8, 8, 6, 5
    rows = torch.tensor([0, 2, 2])  # a padding row counts: it runs
    video, ctx = torch.randn(b, 48, f, h, w), torch.randn(b, lc, 64)
    text = torch.randint(0, 50, (len(rows), lt))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        m(video, 500.0, ctx, text=text, t_text=torch.full((3,), 500.0), text_rows=rows)
    lv = f * h * w // 4
    analytic = caption_rows_forward_flops(m.config, lv, lt, lc, b, len(rows))
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.03)
    # between the video alone and every row holding a caption in one joint pass
    assert forward_flops(m.config, lv, 0, lc, b) < analytic < forward_flops(m.config, lv, lt, lc, b)
    assert train_flops(m.config, lv, lt, lc, b, caption_rows=3) == 3 * analytic
