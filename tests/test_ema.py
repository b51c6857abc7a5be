"""The EMA callback's average and the compile option of the module."""

import lightning as L
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


def test_one_walk_lists_the_tensors_that_parameters_and_buffers_list():
    """module_tensors is ``[*parameters(), *buffers()]`` from one pass: the same tensors in the
    same order, a tied weight and a module registered twice once, ``None`` slots skipped, and
    a submodule replaced after an update is followed (the averaged copy is then not updated
    from the old one's tensors)."""
    from callbacks.ema import WarmupAveragedModel, module_tensors

    torch.manual_seed(0)
    norm = torch.nn.BatchNorm1d(3)
    model = torch.nn.ModuleDict(
        {
            "a": torch.nn.Linear(3, 3, bias=False),
            "b": torch.nn.Linear(3, 3),
            "norm": norm,
            "again": norm,  # the same module under two names
            "empty": torch.nn.Linear(3, 3, bias=False),
        }
    )
    model["b"].weight = model["a"].weight  # tied
    model.register_buffer("none", None)
    listed = module_tensors(model)
    expected = [*model.parameters(), *model.buffers()]
    assert len(listed) == len(expected) and all(a is b for a, b in zip(listed, expected))

    ours = WarmupAveragedModel(model, WarmupEMA(0.5))
    for _ in range(2):
        ours.update_parameters(model)
    model["empty"] = torch.nn.Linear(3, 3, bias=False)  # a new submodule in its place
    with torch.no_grad():
        model["empty"].weight.fill_(2.0)
    before = ours.module["empty"].weight.detach().clone()
    ours.update_parameters(model)
    weight = 1.0 - WarmupEMA(0.5).decay_at(2)
    torch.testing.assert_close(ours.module["empty"].weight, before + weight * (2.0 - before))


class _Regression(L.LightningModule):
    """The smallest trainable module: one linear layer on random regression batches."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1))
        return torch.utils.data.DataLoader(data, batch_size=2)


def test_the_end_of_training_checkpoint_keeps_the_live_weights_beside_the_average(tmp_path):
    """``last.ckpt`` written by ``ModelCheckpoint`` at the end of training (no interval
    checkpoint in the run, e.g. a run resumed near its end) comes after the average replaced the
    live weights: it must still hold the live ones as ``current_model_state``, so that a resumed
    run and ``weights="raw"`` read the run's own weights, not the average twice."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from callbacks.ema import EMA

    class KeepLive(Callback):  # the live weights after the last optimiser step
        def on_train_batch_end(self, trainer, module, *args):
            self.live = {k: v.clone() for k, v in module.state_dict().items()}

    keep = KeepLive()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=100, save_last=True)
    trainer = L.Trainer(
        max_steps=5,
        callbacks=[keep, EMA(decay=0.9), checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    torch.manual_seed(0)
    trainer.fit(_Regression())
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 5
    for name, live in keep.live.items():
        torch.testing.assert_close(ckpt["current_model_state"][name], live)
        assert not torch.equal(ckpt["state_dict"][name], live)  # the average differs from them
