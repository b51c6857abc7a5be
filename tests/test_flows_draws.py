"""The samplers' draws: a plain generator draws exactly what torch draws; per-row generators
draw each row from its own seed, so a row's draws do not depend on the other rows."""

import pytest
import torch

from lightning_vigu.flows import FlowPrediction, SamplerConfig, UnifiedSampler, discrete, draws
from lightning_vigu.flows.draws import RowGenerators


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def test_a_plain_generator_draws_exactly_what_torch_draws():
    shape = (3, 4, 5)
    assert torch.equal(draws.randn(shape, _gen(1), "cpu"), torch.randn(shape, generator=_gen(1)))
    half = draws.randn(shape, _gen(1), "cpu", torch.float64)
    assert torch.equal(half, torch.randn(shape, generator=_gen(1), dtype=torch.float64))
    assert torch.equal(draws.rand(shape, _gen(2), "cpu"), torch.rand(shape, generator=_gen(2)))
    assert torch.equal(
        draws.randint(9, shape, _gen(3), "cpu"), torch.randint(0, 9, shape, generator=_gen(3))
    )
    torch.manual_seed(4)
    expected = torch.rand(shape)
    torch.manual_seed(4)
    assert torch.equal(draws.rand(shape, None, "cpu"), expected)  # None: torch's global RNG


@pytest.mark.parametrize(
    "draw, alone",
    [
        (lambda s, g: draws.randn(s, g, "cpu"), lambda s, g: torch.randn(s, generator=g)),
        (lambda s, g: draws.rand(s, g, "cpu"), lambda s, g: torch.rand(s, generator=g)),
        (
            lambda s, g: draws.randint(9, s, g, "cpu"),
            lambda s, g: torch.randint(0, 9, s, generator=g),
        ),
    ],
)
def test_row_generators_draw_each_row_from_its_own_seed(draw, alone):
    rows = draw((3, 4, 5), RowGenerators([5, 6, 7]))
    assert rows.shape == (3, 4, 5)
    for row, seed in zip(rows, [5, 6, 7]):
        assert torch.equal(row, alone((4, 5), _gen(seed)))
    assert torch.equal(draw((1, 4, 5), RowGenerators([6]))[0], rows[1])
    assert not torch.equal(rows[0], rows[1])


def test_a_per_row_draw_needs_one_generator_per_row():
    with pytest.raises(ValueError, match=r"shape \(2, 4\) .* got 3 \(one per seed\)"):
        draws.randn((2, 4), RowGenerators([1, 2, 3]), "cpu")


def test_seeds_give_one_generator_or_one_per_row():
    one = draws.seeded(4, rows=3)
    assert isinstance(one, torch.Generator) and one.initial_seed() == 4
    rows = draws.seeded([4, 5, 6], rows=3)
    assert [g.initial_seed() for g in rows.generators] == [4, 5, 6]
    with pytest.raises(ValueError, match="got 2 seeds for a batch of 3"):
        draws.seeded([4, 5], rows=3)


def test_on_device_keeps_generators_already_there():
    rows, one = RowGenerators([1, 2]), _gen(1)
    assert draws.on_device(rows, "cpu") is rows and draws.on_device(one, "cpu") is one
    assert draws.on_device(None, "cpu") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_device_seeds_each_row_on_the_device_from_its_own_generator():
    on_gpu = draws.on_device(RowGenerators([5, 6]), "cuda")
    assert len(on_gpu) == 2 and on_gpu.device.type == "cuda"
    for g, seed in zip(on_gpu.generators, [5, 6]):
        derived = int(torch.randint(0, 2**62, (1,), generator=_gen(seed)))
        expected = torch.randn(8, generator=_gen(derived, "cuda"), device="cuda")
        assert g.device.type == "cuda"
        assert torch.equal(torch.randn(8, generator=g, device="cuda"), expected)
    one = draws.on_device(_gen(5), "cuda")  # one generator: the same derivation
    assert one.initial_seed() == int(torch.randint(0, 2**62, (1,), generator=_gen(5)))


class PositionwiseLogits(torch.nn.Module):
    """Caption logits that depend on nothing but the position: rows never interact."""

    def __init__(self, length: int, vocab: int) -> None:
        super().__init__()
        self.logits = torch.randn(length, vocab, generator=_gen(0))

    def forward(self, x, t, context, x_text=None, t_text=None):
        logits = self.logits.expand(x_text.shape[0], -1, -1)  # (B, L, V): no mask column
        return FlowPrediction(velocity=None, text_logits=logits)


@pytest.mark.parametrize(
    "kind, unmasking", [("uniform", "random"), ("mask", "random"), ("mask", "confidence")]
)
def test_jump_sampler_rows_depend_on_their_seed_alone(kind, unmasking):
    length, vocab = 6, 7
    path = discrete.MixtureDiscretePath(kind, vocab)
    config = SamplerConfig(text_steps=4, unmasking=unmasking)
    sampler = UnifiedSampler(PositionwiseLogits(length, vocab), path, config)
    latents, context = torch.zeros(3, 1, 1, 1, 1), torch.zeros(3, 1, 1)
    batch = sampler.caption(latents, context, length, RowGenerators([5, 6, 7]))
    alone = sampler.caption(latents[:1], context[:1], length, RowGenerators([6]))
    assert torch.equal(batch[1:2], alone)
    assert len({tuple(row) for row in batch.tolist()}) > 1  # the rows' draws differ
