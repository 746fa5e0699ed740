"""Evaluation against exact answers: per-point bounds, IWAE ordering, chunking, beta, plate checks."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn

from inference import evaluate, fit, trace_log_weights
from inference.errors import UsageError
from ppl_models.vae import VAE


class Conjugate(nn.Module):
    """z ~ N(0, 1), x | z ~ N(z, 1) per datapoint, so log p(x) = log N(x; 0, 2) and p(z | x) = N(x/2, 1/2).

    The guide is q(z | x) = N(a x, s); a = 1/2, s = sqrt(1/2) is the exact posterior."""

    max_plate_nesting = 1

    def __init__(self, a=0.5, s=math.sqrt(0.5)):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.s = s

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.a * x, self.s))


def exact(x):
    return dist.Normal(0.0, math.sqrt(2.0)).log_prob(x)


def test_exact_posterior_gives_exact_log_likelihood(device):
    x = torch.linspace(-3, 3, 101, device=device)
    ev = evaluate(Conjugate().to(device), x, particles=50)
    # with q = p(z | x) every weight equals p(x): both estimates are exact up to float error
    torch.testing.assert_close(ev.elbo_per_point, exact(x.cpu()).double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ev.log_likelihood_per_point, exact(x.cpu()).double(), rtol=0, atol=1e-5)


def test_mismatched_guide_bounds_order_and_converge():
    """ELBO < IWAE_10 < IWAE_1000 <= log p(x) + MC error, and IWAE_1000 is within 0.01 nats."""
    torch.manual_seed(0)
    x = torch.randn(400) * math.sqrt(2.0)
    model = Conjugate(a=0.2, s=1.2)
    truth = exact(x).double().mean()
    e1 = evaluate(model, x, particles=1)
    e10 = evaluate(model, x, particles=10)
    e1000 = evaluate(model, x, particles=1000)
    assert e1.elbo < e10.log_likelihood < e1000.log_likelihood
    assert e1000.log_likelihood <= truth + 3 * e1000.log_likelihood_se / math.sqrt(400)
    # the IWAE bias is about Var(w)/(2 K p(x)^2); here it is < 0.01 nats at K = 1000
    assert abs(e1000.log_likelihood - truth) < 0.01


def test_chunked_particles_combine_exactly():
    """Particles drawn in chunks are combined by a running log-sum-exp: the result equals the
    log-mean-exp and the mean of the very same log weights."""
    torch.manual_seed(0)
    x = torch.randn(30)
    ev = evaluate(Conjugate(a=0.1, s=2.0), x, particles=257, max_elements=30 * 40, keep_log_weights=True)
    lw = ev.log_weights.double()
    assert lw.shape == (30, 257)
    # float32 log weights summed in a different order: agreement to 1e-5 nats
    torch.testing.assert_close(ev.log_likelihood_per_point, torch.logsumexp(lw, 1) - math.log(257), rtol=0, atol=1e-5)
    torch.testing.assert_close(ev.elbo_per_point, lw.mean(1), rtol=0, atol=1e-5)
    # log-mean-exp >= mean (Jensen), point by point, for the same particles
    assert torch.all(ev.log_likelihood_per_point >= ev.elbo_per_point - 1e-9)


def test_iwae_grows_with_particles_on_a_trained_vae(digits):
    """E[IWAE_K] increases with K (Burda et al. 2015, Theorem 1), and IWAE >= ELBO on average.

    From 2000 log weights per test point, E[IWAE_K] per point is estimated by the mean over
    2000/K disjoint groups of K particles, for K = 1, 10, 100 (K = 1 is the ELBO). Differences
    are paired per point; the mean gain over 359 points must exceed 3 standard errors."""
    train, test = digits
    vae = VAE(train.dim, latent_dim=8, hidden=(64,))
    fit(vae, train, epochs=8, batch_size=64, lr=3e-3, seed=0, progress=False)
    ev = evaluate(vae, test, particles=2000, keep_log_weights=True)
    lw = ev.log_weights.double()
    iwae = {k: (torch.logsumexp(lw.reshape(len(test), -1, k), 2) - math.log(k)).mean(1) for k in (1, 10, 100)}
    torch.testing.assert_close(iwae[1], ev.elbo_per_point, rtol=1e-6, atol=1e-4)  # float32 sums
    for small, large in ((1, 10), (10, 100)):
        diff = iwae[large] - iwae[small]
        assert diff.mean() > 3 * diff.std() / math.sqrt(diff.numel())
    assert ev.log_likelihood > iwae[100].mean() > ev.elbo


def test_beta_is_not_part_of_the_score():
    x = torch.bernoulli(torch.full((20, 16), 0.4))
    plain, heavy = VAE(16, latent_dim=3, hidden=(8,)), VAE(16, latent_dim=3, hidden=(8,), beta=5.0)
    heavy.load_state_dict(plain.state_dict())
    pyro.set_rng_seed(0)
    a = evaluate(plain, x, particles=20)
    pyro.set_rng_seed(0)
    b = evaluate(heavy, x, particles=20)
    torch.testing.assert_close(a.log_likelihood_per_point, b.log_likelihood_per_point)


class Global(nn.Module):
    """mu ~ N(0, 1), x_n | mu ~ N(mu, 1): a global latent, so log p(X) = log N(X; 0, I + 11^T) and
    p(mu | X) = N(sum(X) / (N + 1), 1 / (N + 1))."""

    def __init__(self, loc=0.0, scale=1.0):
        super().__init__()
        self.loc = nn.Parameter(torch.tensor(loc, dtype=torch.float64))
        self.scale = scale

    def model(self, x):
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(self, x):
        pyro.sample("mu", dist.Normal(self.loc, self.scale))


def test_latent_outside_the_data_plate_gives_whole_data_bounds():
    """A global latent: no per-point values, the whole-data bounds / N, exact with the exact posterior."""
    x = torch.tensor([0.5, -1.0, 2.0, 0.3, 1.1], dtype=torch.float64)
    n = len(x)
    exact = float(dist.MultivariateNormal(torch.zeros(n, dtype=x.dtype), torch.eye(n, dtype=x.dtype) + 1.0).log_prob(x)) / n
    with pytest.raises(UsageError, match="outside the 'data' plate"):
        trace_log_weights(Global().model, Global().guide, torch.zeros(5), 3)
    best = Global(float(x.sum()) / (n + 1), math.sqrt(1.0 / (n + 1)))
    ev = evaluate(best, x, particles=7)
    assert ev.scope == "whole-data" and ev.elbo_per_point is None and ev.log_likelihood_per_point is None
    # q = p(mu | X): every whole-data weight equals p(X), so both values are exact and their SEs 0 (float64)
    assert ev.log_likelihood == pytest.approx(exact, abs=1e-12) and ev.elbo == pytest.approx(exact, abs=1e-12)
    assert ev.elbo_se < 1e-12 and ev.log_likelihood_se < 1e-12
    worse = evaluate(Global(0.0, 1.0), x, particles=4000)
    # ELBO < IWAE_4000 <= log p(X) + 3 SE (IWAE is a stochastic lower bound)
    assert worse.elbo + 3 * worse.elbo_se < worse.log_likelihood < exact + 3 * worse.log_likelihood_se


def test_bad_particle_counts_are_refused():
    with pytest.raises(UsageError, match="particles"):
        evaluate(Conjugate(), torch.zeros(3), particles=0)
