"""The EMA callback's average and the compile option of the module."""

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from callbacks.ema import WarmupEMA
from lightning_vigu.training import compile_transformer


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
    linear = torch.nn.Linear(2, 2)
    assert compile_transformer(linear, "none") == (linear, False)


def test_the_callbacks_average_matches_torchs_and_reads_its_count_once_after_loading():
    """``WarmupAveragedModel`` (what :class:`callbacks.EMA` updates, with no host reads) gives
    torch's ``AveragedModel`` + ``WarmupEMA`` numbers, also across a save and load."""
    from callbacks.ema import WarmupAveragedModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model.register_buffer("statistic", torch.zeros(3))  # a float buffer is averaged too
    ours = WarmupAveragedModel(model, WarmupEMA(0.9))
    reference = AveragedModel(model, multi_avg_fn=WarmupEMA(0.9), use_buffers=True)
    for step in range(7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.statistic.add_(torch.randn(3))
        ours.update_parameters(model)
        reference.update_parameters(model)
        if step == 3:  # a resumed run: the count comes back from the state dict
            state = ours.state_dict()
            ours = WarmupAveragedModel(model, WarmupEMA(0.9))
            ours.load_state_dict(state)
    for a, b in zip(ours.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert int(ours.n_averaged) == 7


def test_integer_buffers_are_copied_not_averaged():
    from callbacks.ema import WarmupAveragedModel

    model = torch.nn.BatchNorm1d(3)
    ours = WarmupAveragedModel(model, WarmupEMA(0.9))
    for _ in range(3):
        model(torch.randn(5, 3))
        ours.update_parameters(model)
    assert int(ours.module.num_batches_tracked) == 3


def test_the_kept_pairing_follows_replaced_swapped_and_cast_tensors():
    """The update pairs averaged and live tensors once and keeps the pairing; a parameter
    replaced by a new tensor, one whose data was swapped, or a module cast to another dtype
    (averaged through a conversion) must be followed, as a fresh pairing would."""
    from callbacks.ema import WarmupAveragedModel

    def step(model):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    ours = WarmupAveragedModel(model, WarmupEMA(0.9))
    reference = AveragedModel(model, multi_avg_fn=WarmupEMA(0.9), use_buffers=True)

    def update():
        ours.update_parameters(model)
        reference.update_parameters(model)

    for _ in range(3):
        step(model)
        update()
    plan = ours._plan
    model[0].weight = torch.nn.Parameter(torch.randn(3, 4))  # a new tensor in its place
    update()
    assert ours._plan is not plan  # paired again
    model[1].bias.data = torch.randn(3)  # same parameter, new data
    update()
    model.double()  # the live module in float64: averaged in float32 through a conversion
    step(model)
    ours.update_parameters(model)
    reference.update_parameters(model.float())
    model.double()
    assert len(ours._plan.converted) == 4
    for a, b in zip(ours.module.parameters(), reference.module.parameters()):
        torch.testing.assert_close(a, b)
