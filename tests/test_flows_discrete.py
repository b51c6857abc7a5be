"""Discrete flow: mixture-path marginals, losses, and the jump sampler with exact posteriors."""

import pytest
import torch

from lightning_vigu.flows import FlowPrediction, SamplerConfig, UnifiedSampler, discrete

Q = torch.tensor(
    [[0.5, 0.3, 0.1, 0.1, 0.0], [0.05, 0.05, 0.1, 0.2, 0.6], [0.2, 0.2, 0.2, 0.2, 0.2]]
)
V = Q.shape[1]


@pytest.mark.parametrize("kind", ["uniform", "mask"])
@pytest.mark.parametrize("exponent", [1.0, 2.0])
def test_path_marginals_match_kappa(kind, exponent):
    source, sched = discrete.make_source(kind, V), discrete.PolynomialScheduler(exponent)
    x_1 = torch.randint(0, V, (4000, 16), generator=torch.Generator().manual_seed(1))
    for t in (0.0, 0.4, 0.8):
        s = discrete.sample_path(
            x_1, torch.full((4000,), t), source, sched, torch.Generator().manual_seed(2)
        )
        kappa = t**exponent
        hit = (s.x_t == x_1).float().mean().item()
        expected = kappa + (1 - kappa) / V if kind == "uniform" else kappa
        assert hit == pytest.approx(expected, abs=0.01)
        if kind == "mask":
            assert bool(((s.x_t == x_1) | (s.x_t == V)).all())


def _exact_posterior_logits(x_t, t, kind, exponent):
    """log p(x_1 | x_t) for independent positions with data marginals Q (closed form)."""
    kappa = (t**exponent)[:, None, None]
    prior = Q[None].expand(x_t.shape[0], -1, -1)  # (B, L, V)
    if kind == "uniform":
        like = kappa * torch.nn.functional.one_hot(x_t, V) + (1 - kappa) / V
    else:
        is_mask = (x_t == V)[..., None]
        like = torch.where(
            is_mask, torch.ones(V), torch.nn.functional.one_hot(x_t.clamp_max(V - 1), V).float()
        )
    post = prior * like
    return torch.log(post / post.sum(-1, keepdim=True) + 1e-30)


class ExactPosterior(torch.nn.Module):
    def __init__(self, kind, exponent):
        super().__init__()
        self.kind, self.exponent = kind, exponent

    def forward(self, x, t, context, x_text=None, t_text=None):
        logits = _exact_posterior_logits(x_text, t_text, self.kind, self.exponent)
        if self.kind == "mask":  # the head also has a (never-predicted) mask column
            logits = torch.cat([logits, torch.full_like(logits[..., :1], -1e9)], -1)
        return FlowPrediction(velocity=None, text_logits=logits)


@pytest.mark.parametrize("kind", ["uniform", "mask"])
@pytest.mark.parametrize("exponent, steps", [(1.0, 8), (2.0, 3)])
def test_jump_sampler_with_exact_posterior_reproduces_frequencies(kind, exponent, steps):
    path = discrete.MixtureDiscretePath(kind, V, exponent)
    sampler = UnifiedSampler(ExactPosterior(kind, exponent), path, SamplerConfig(text_steps=steps))
    n = 30000
    tokens = sampler.caption(
        torch.zeros(n, 1, 1, 1, 1),
        torch.zeros(n, 1, 1),
        Q.shape[0],
        torch.Generator().manual_seed(0),
    )
    freqs = torch.stack(
        [torch.bincount(tokens[:, i], minlength=V).float() / n for i in range(Q.shape[0])]
    )
    assert (freqs - Q).abs().max().item() < 0.012


def test_losses_finite_over_t_and_generalized_kl_zero_at_the_true_posterior():
    sched = discrete.PolynomialScheduler(1.0)
    x_1 = torch.randint(0, V, (64, Q.shape[0]))
    for t in (0.0, 0.5, 0.999):
        tt = torch.full((64,), t)
        s = discrete.sample_path(x_1, tt, discrete.UniformSource(V), sched)
        logits = torch.randn(64, Q.shape[0], V)
        assert torch.isfinite(discrete.cross_entropy_loss(logits, x_1)).all()
        assert torch.isfinite(discrete.generalized_kl_loss(logits, x_1, s.x_t, tt, sched)).all()
    # a perfect (one-hot) posterior makes every term vanish
    perfect = torch.nn.functional.one_hot(x_1, V).float() * 60 - 30
    s = discrete.sample_path(x_1, torch.full((64,), 0.5), discrete.UniformSource(V), sched)
    assert (
        discrete.generalized_kl_loss(perfect, x_1, s.x_t, torch.full((64,), 0.5), sched).abs().max()
        < 1e-6
    )
    assert discrete.cross_entropy_loss(perfect, x_1).max() < 1e-6


def test_cross_entropy_matches_torch_and_weights():
    logits, x_1 = torch.randn(3, 4, V), torch.randint(0, V, (3, 4))
    ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x_1, reduction="none").mean(1)
    assert torch.allclose(discrete.cross_entropy_loss(logits, x_1), ref)
    w = torch.tensor([[1.0, 0, 0, 0]] * 3)
    first = torch.nn.functional.cross_entropy(logits[:, 0], x_1[:, 0], reduction="none")
    assert torch.allclose(discrete.cross_entropy_loss(logits, x_1, w), first)


def test_jump_step_final_step_lands_on_posterior_draws_and_argmax_temperature():
    sched = discrete.PolynomialScheduler()
    logits = torch.full((2, 3, V), -50.0)
    logits[..., 4] = 50.0
    x = discrete.jump_step(
        torch.zeros(2, 3, dtype=torch.long), logits, torch.full((2,), 0.9), torch.ones(2), sched
    )
    assert bool((x == 4).all())
    assert torch.equal(discrete.sample_categorical(logits, temperature=0.0), torch.full((2, 3), 4))


def test_unknown_source_is_named():
    with pytest.raises(ValueError, match="unknown caption source 'gauss'"):
        discrete.make_source("gauss", 4)
