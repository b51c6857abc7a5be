"""The EMA callback's average and the compile option of the module."""

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from callbacks.ema import WarmupEMA
from lightning_vigu.module import compile_transformer


def test_warmup_ema_updates_every_tensor_at_once_with_the_warmup_decay():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    ema = AveragedModel(model, multi_avg_fn=WarmupEMA(0.9), use_buffers=True)
    expected = None
    for n in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update_parameters(model)
        current = [p.detach().clone() for p in model.parameters()]
        if expected is None:  # the first update copies
            expected = current
        else:
            decay = min(0.9, (1 + n) / (10 + n))
            expected = [decay * e + (1 - decay) * c for e, c in zip(expected, current)]
    for e, p in zip(expected, ema.module.parameters()):
        torch.testing.assert_close(p, e)
    assert WarmupEMA(0.999).decay_at(0) == pytest.approx(0.1)
    assert WarmupEMA(0.999, warmup=False).decay_at(0) == 0.999


def test_an_unknown_compile_mode_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="model.compile 'graph'"):
        compile_transformer(torch.nn.Linear(2, 2), "graph")
    assert compile_transformer(torch.nn.Linear(2, 2), "none") is False
