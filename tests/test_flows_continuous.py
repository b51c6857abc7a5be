"""Continuous flow: path marginals, shift, time sampling, losses, and the Euler sampler."""

import math

import pytest
import torch

from lightning_vigu.flows import (
    FlowPrediction,
    FlowTimeModel,
    SamplerConfig,
    UnifiedSampler,
    continuous,
    discrete,
)


def test_path_marginals_match_the_interpolant():
    torch.manual_seed(0)
    x_1 = torch.full((20000, 1), 2.0)
    for t in (0.0, 0.3, 0.9):
        s = continuous.sample_path(x_1, torch.full((20000,), t))
        assert s.x_t.mean().item() == pytest.approx(2.0 * t, abs=0.03)
        assert s.x_t.std().item() == pytest.approx(1 - t, abs=0.02)
        assert torch.allclose(s.dx_t, s.x_1 - s.x_0)


def test_shift_matches_wan_formula_in_noise_level():
    sigma = torch.linspace(0, 1, 11)
    shifted = 1 - continuous.shift_time(1 - sigma, 3.0)
    assert torch.allclose(shifted, 3 * sigma / (1 + 2 * sigma))
    grid = continuous.time_grid(10, 3.0)
    assert grid[0] == 0 and grid[-1] == 1 and bool((grid[1:] > grid[:-1]).all())


def test_logit_normal_time_sampling_has_the_right_median_and_range():
    t = continuous.sample_time(
        40000, "logit_normal", mean=0.5, std=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.01)
    assert t.min() >= 1e-3 and t.max() <= 1 - 1e-3
    with pytest.raises(ValueError, match="unknown time sampling"):
        continuous.sample_time(2, "beta")


def test_losses_are_finite_over_t_and_zero_for_the_exact_target():
    x_1 = torch.randn(4, 3, 2, 2, 2)
    for t in (0.0, 0.5, 0.999):
        s = continuous.sample_path(x_1, torch.full((4,), t))
        for w in ("none", "snr", "data"):
            loss = continuous.velocity_loss(torch.zeros_like(x_1), s.dx_t, s.t, w)
            assert torch.isfinite(loss).all()
        assert continuous.velocity_loss(s.dx_t, s.dx_t).abs().max() == 0


def test_data_weighting_is_the_squared_error_of_the_implied_clean_video():
    g = torch.Generator().manual_seed(0)
    x_1 = torch.randn(5, 3, 2, 4, 4, generator=g)
    s = continuous.sample_path(x_1, torch.tensor([0.0, 0.2, 0.5, 0.8, 0.97]), generator=g)
    v_hat = torch.randn(x_1.shape, generator=g)
    x_hat = s.x_t + (1 - s.t).view(-1, 1, 1, 1, 1) * v_hat  # the data the velocity implies
    expected = (x_hat - x_1).pow(2).flatten(1).mean(1)
    got = continuous.velocity_loss(v_hat, s.dx_t, s.t, "data")
    assert torch.allclose(got, expected, atol=1e-6)
    with pytest.raises(ValueError, match="needs the flow times"):
        continuous.velocity_loss(v_hat, s.dx_t, None, "data")


class GaussianVelocity(torch.nn.Module):
    """Exact marginal velocity for data N(mu, s^2) and noise N(0, 1) (closed form)."""

    def __init__(self, mu: float, s: float) -> None:
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x, t, context, x_text=None, t_text=None):
        te = t.view(-1, *([1] * (x.ndim - 1)))
        var = te**2 * self.s**2 + (1 - te) ** 2
        v = self.mu + (te * self.s**2 - (1 - te)) / var * (x - te * self.mu)
        # conditional data: the prompt moves the mean (so CFG has something to amplify)
        return FlowPrediction(velocity=v + context.mean() * 0, text_logits=None)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_sampler_with_exact_velocity_reproduces_the_distribution(shift):
    sampler = UnifiedSampler(
        GaussianVelocity(1.5, 0.5),
        discrete.MixtureDiscretePath("uniform", 3),
        SamplerConfig(video_steps=200, shift=shift, guidance_scale=1.0),
    )
    x = sampler.generate_video(
        torch.zeros(20000, 1, 1), (1, 1, 1, 1), generator=torch.Generator().manual_seed(0)
    )
    assert x.mean().item() == pytest.approx(1.5, abs=0.02)
    assert x.std().item() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_sampler_with_exact_velocity_reproduces_the_distribution(eta):
    """Re-drawing part of the noise at every step keeps the path's marginals: with the exact
    velocity the samples have the data's mean and spread, yet differ from the ODE's."""
    config = dict(video_steps=200, shift=3.0, guidance_scale=1.0)
    samples = {}
    for e in (0.0, eta):
        sampler = UnifiedSampler(
            GaussianVelocity(1.5, 0.5),
            discrete.MixtureDiscretePath("uniform", 3),
            SamplerConfig(**config, video_eta=e),
        )
        samples[e] = sampler.generate_video(
            torch.zeros(20000, 1, 1), (1, 1, 1, 1), generator=torch.Generator().manual_seed(0)
        )
    x = samples[eta]
    assert x.mean().item() == pytest.approx(1.5, abs=0.02)
    assert x.std().item() == pytest.approx(0.5, abs=0.02)
    assert (x - samples[0.0]).abs().mean() > 0.05  # another sampler, not the ODE again


def test_a_ddim_step_without_fresh_noise_is_the_euler_step():
    x, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    t, t_next = torch.tensor([0.0, 0.3, 0.9]), torch.tensor([0.1, 0.5, 1.0])
    euler = continuous.euler_step(x, v, t, t_next)
    assert torch.equal(continuous.ddim_step(x, v, t, t_next, 0.0), euler)
    # at the last step (t' = 1) no noise is left to re-draw: any eta lands on the data
    last = continuous.ddim_step(x, v, t, t_next, 1.0, torch.randn_like(x))
    torch.testing.assert_close(last[2], euler[2])
    with pytest.raises(ValueError, match="needs the fresh noise"):
        continuous.ddim_step(x, v, t, t_next, 0.5)
    with pytest.raises(ValueError, match="eta must be in"):
        SamplerConfig(video_eta=1.5)


def test_cfg_is_applied_to_the_video_velocity_only():
    v_c, v_u = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.equal(continuous.guided_velocity(v_c, v_u, 5.0), torch.full((2, 3), 5.0))
    assert torch.equal(continuous.guided_velocity(v_c, v_u, 1.0), v_c)


def test_flow_time_model_converts_time_and_velocity_sign():
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, video, t_video, context, text=None, t_text=None):
            seen["t"] = t_video
            return torch.ones_like(video)

    out = FlowTimeModel(Recorder())(
        torch.zeros(2, 1, 1, 1, 1), torch.tensor([0.0, 0.75]), torch.zeros(2, 1, 1)
    )
    assert torch.allclose(seen["t"], torch.tensor([1000.0, 250.0]))
    assert torch.equal(out.velocity, -torch.ones(2, 1, 1, 1, 1))
