"""The VAE model/guide pair: shapes, support checks, beta, and analytic vs Monte-Carlo KL."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from inference.elbo import make_elbo
from inference.errors import UsageError
from ppl_models.likelihoods import make_likelihood
from ppl_models.nets import softplus_inverse
from ppl_models.vae import VAE

LIKELIHOODS = ["bernoulli", "cbernoulli", "normal", "normal:0.3", "laplace"]


def _data(likelihood, n=32, d=64):
    torch.manual_seed(0)
    grey = torch.rand(n, d)
    return torch.bernoulli(grey) if likelihood == "bernoulli" else grey


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_shapes_with_particle_dimensions(arch, device):
    vae = VAE(64, latent_dim=5, hidden=(32,), arch=arch, image_shape=(1, 8, 8)).to(device)
    x = _data("bernoulli").to(device)
    q = vae.encode(x)
    assert q.batch_shape == (32,) and q.event_shape == (5,)
    z = q.rsample((7,))  # vectorised particles in front
    px = vae.decode(z)
    assert px.batch_shape == (7, 32) and px.event_shape == (64,)
    assert vae.sample(9).shape == (9, 64) and vae.reconstruct(x).shape == (32, 64)
    assert vae.sample(3).device.type == device.type


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_meanfield_and_trace_agree_in_expectation(likelihood):
    """E[Monte-Carlo-KL ELBO] = E[analytic-KL ELBO] on a fixed model and batch.

    Each spec is estimated with K = 2000 vectorised particles. The per-particle batch ELBO
    sum_n log w_n has variance v (estimated from trace_log_weights); the analytic-KL estimator
    only removes the KL's noise, so v bounds both, and |difference| < 5 sqrt(2 v / K) holds
    unless the two expectations differ (5 sd: a false alarm about once in 1.7 million runs)."""
    from inference.evaluate import trace_log_weights

    vae = VAE(64, latent_dim=4, hidden=(32,), likelihood=likelihood)
    x = _data(likelihood)
    k = 2000
    with torch.no_grad():
        mc = make_elbo(f"trace:{k}", max_plate_nesting=1).loss(vae.model, vae.guide, x)
        an = make_elbo(f"meanfield:{k}", max_plate_nesting=1).loss(vae.model, vae.guide, x)
        v = trace_log_weights(vae.model, vae.guide, x, k, max_plate_nesting=1).sum(1).var()
    assert abs(mc - an) < 5 * float((2 * v / k).sqrt())


def test_beta_scales_exactly_the_kl():
    """With the same draws, loss(beta) - loss(1) = (beta - 1) * sum_n KL(q(z|x_n) || N(0, I)) exactly."""
    x = _data("bernoulli")
    vae = VAE(64, latent_dim=4, hidden=(32,))
    beta_vae = VAE(64, latent_dim=4, hidden=(32,), beta=4.0)
    beta_vae.load_state_dict(vae.state_dict())
    with torch.no_grad():
        pyro.set_rng_seed(1)
        plain = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
        pyro.set_rng_seed(1)
        weighted = TraceMeanField_ELBO().loss(beta_vae.model, beta_vae.guide, x)
        q = vae.encode(x)
        kl = torch.distributions.kl_divergence(q, dist.Normal(torch.zeros(4), 1.0).to_event(1)).sum()
    assert weighted - plain == pytest.approx(3.0 * float(kl), rel=1e-4)


@pytest.mark.parametrize(
    "likelihood, bad, message",
    [
        ("bernoulli", torch.full((2, 3), 0.5), "binary"),
        ("cbernoulli", torch.full((2, 3), 1.5), r"\[0, 1\]"),
        ("normal", torch.tensor([[0.0, float("nan"), 1.0]]), "NaN"),
        ("categorical", torch.tensor([0, 3]), "0..2"),
    ],
)
def test_support_checks(likelihood, bad, message):
    with pytest.raises(UsageError, match=message):
        make_likelihood(likelihood, 3).check(bad)


def test_learned_scale_is_bounded_below():
    lik = make_likelihood("normal", 3)
    with torch.no_grad():
        lik.raw_scale.fill_(-1e4)
    assert torch.all(lik.scale >= 1e-3)
    # so the density of a constant pixel stays finite: log N(0; 0, 1e-3) = -log(1e-3) - log(2 pi)/2
    expected = 3 * (-math.log(1e-3) - 0.5 * math.log(2 * math.pi))
    assert lik(torch.zeros(1, 3)).log_prob(torch.zeros(1, 3)).item() == pytest.approx(expected, rel=1e-4)


def test_unknown_likelihood_lists_the_valid_ones():
    with pytest.raises(UsageError, match="bernoulli, cbernoulli, normal"):
        make_likelihood("poisson", 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta=0.0), "beta must be positive"),
    (dict(arch="rnn"), "unknown arch"),
    (dict(arch="conv"), r"image_shape \(C, H, W\)"),
    (dict(arch="conv", image_shape=(64,)), r"image_shape \(C, H, W\)"),  # flat data: prod matches, no H and W
    (dict(arch="conv", image_shape=(1, 2, 32)), "divisible by 4"),
    (dict(activation="swish"), "unknown activation"),
])
def test_bad_arguments_raise_usage_error(kwargs, message):
    with pytest.raises(UsageError, match=message):
        VAE(64, **kwargs)


def test_softplus_inverse_inverts_softplus_in_both_tails():
    y = torch.tensor([1e-6, 0.1, 1.0, 10.0, 50.0], dtype=torch.float64)
    x = softplus_inverse(y)
    assert torch.allclose(torch.nn.functional.softplus(x), y, rtol=1e-12, atol=0)
    assert softplus_inverse(1).dtype == torch.get_default_dtype()
    assert float(softplus_inverse(1.0)) == pytest.approx(math.log(math.e - 1), rel=1e-7)
