"""What an objective computed: analytic vs Monte Carlo KL, not-a-bound checks, gradient SNR."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from inference import MonteCarloKLWarning, NotABoundWarning, UsageError, gradient_snr, make_elbo
from ppl_models.ppca import PPCA
from ppl_models.vae import VAE

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def _ppca():
    torch.manual_seed(0)
    m = PPCA(8, 2, guide="diag").double()
    with torch.no_grad():
        m.W.normal_()
        m.mu.normal_()
        m.encoder.weight.normal_(0, 0.3)
    return m, m.marginal().sample((50,)).detach()


@torch.no_grad()
def test_monte_carlo_and_analytic_kl_elbos_agree_with_the_closed_form():
    """trace (MC KL) and meanfield (analytic KL) estimate the same ELBO; for pPCA it is known exactly:
    ELBO = sum_n log p(x_n) - KL(q(z_n | x_n) || p(z_n | x_n)). Each estimate averages 400 draws of
    the loss; both must be within 4 of their own standard errors of the closed form (and so of each other)."""
    m, x = _ppca()
    q = torch.distributions.MultivariateNormal(m.encoder(x), scale_tril=m.guide_scale_tril())
    exact = float((m.log_marginal(x) - torch.distributions.kl_divergence(q, m.posterior(x))).sum())
    estimates = {}
    for spec in ("trace", "meanfield"):
        elbo = make_elbo(spec, max_plate_nesting=1)
        draws = torch.tensor([-elbo.loss(m.model, m.guide, x) for _ in range(400)], dtype=torch.float64)
        estimates[spec] = (float(draws.mean()), float(draws.std() / 20.0))
        assert getattr(elbo, "mc_sites", []) == []  # Normal guide vs Normal prior: analytic KL, nothing reported
    for mean, se in estimates.values():
        assert abs(mean - exact) < 4 * se
    # the analytic KL removes the KL's share of the noise
    assert estimates["meanfield"][1] < estimates["trace"][1]


def _mixture_prior_model(x):
    prior = dist.MixtureSameFamily(dist.Categorical(x.new_ones(2)), dist.Normal(x.new_tensor([-2.0, 2.0]), 1.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", prior)
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _normal_guide(x):
    loc = pyro.param("loc", torch.zeros(x.shape[0]))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, 1.0))


def test_meanfield_reports_monte_carlo_fallback_for_a_mixture_prior():
    elbo = make_elbo("meanfield", max_plate_nesting=1)
    x = torch.randn(7)
    with pytest.warns(MonteCarloKLWarning, match="'z'"):
        elbo.differentiable_loss(_mixture_prior_model, _normal_guide, x)
    assert elbo.mc_sites == ["z"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MonteCarloKLWarning)  # reported once per objective, not every step
        elbo.differentiable_loss(_mixture_prior_model, _normal_guide, x)


def _global_model(x):
    w = pyro.sample("w", dist.Normal(x.new_zeros(()), 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(w, 1.0), obs=x)


def _global_guide(x):
    pyro.sample("w", dist.Normal(pyro.param("w_loc", torch.tensor(0.0)), 1.0))


def _subsampled_model(x):
    with pyro.plate("data", 100, subsample=torch.arange(x.shape[0])):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _subsampled_guide(x):
    with pyro.plate("data", 100, subsample=torch.arange(x.shape[0])):
        pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))


@pytest.mark.parametrize("spec", ["iwae:5", "renyi:0.5:5"])
def test_importance_weighted_objectives_refuse_scales_inside_the_logsumexp(spec):
    x = torch.bernoulli(torch.full((6, 12), 0.5))
    beta_vae = VAE(12, 2, hidden=(8,), beta=4.0)
    with pytest.raises(UsageError, match="scaled"):
        make_elbo(spec, max_plate_nesting=1).differentiable_loss(beta_vae.model, beta_vae.guide, x)
    with pytest.raises(UsageError, match="subsampled"):
        make_elbo(spec, max_plate_nesting=1).differentiable_loss(_subsampled_model, _subsampled_guide, torch.randn(6))
    # the ELBO is linear in the log weights: the same beta-VAE trains with "trace" silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_elbo("trace", max_plate_nesting=1).differentiable_loss(beta_vae.model, beta_vae.guide, x)


def test_global_latent_warns_that_iwae_is_a_whole_batch_bound():
    elbo = make_elbo("iwae:4", max_plate_nesting=1)
    with pytest.warns(NotABoundWarning, match="'w'.*whole batch"):
        loss = elbo.differentiable_loss(_global_model, _global_guide, torch.randn(5))
    assert loss.dim() == 0


def test_negative_renyi_alpha_warns():
    with pytest.warns(NotABoundWarning, match="above log p"):
        make_elbo("renyi:-0.5:5")


def test_gradient_snr_matches_closed_form():
    """z ~ N(0,1), x | z ~ N(z, 1), q(z) = N(m, 1), z = m + eps. The one-particle loss gradient in m is
    -(x - 2m - 2 eps): mean 2m - x, sd 2, so SNR = |2m - x| / 2 = 0.5 at x = 1, m = 0.
    With 1000 draws the SNR estimate has sd ~ sqrt((1 + SNR^2 / 2) / 1000) = 0.034; tolerance 0.14 is 4 sd."""

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = torch.nn.Parameter(torch.zeros(1))

        def model(self, x):
            with pyro.plate("data", 1):
                z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0))
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)

        def guide(self, x):
            with pyro.plate("data", 1):
                pyro.sample("z", dist.Normal(self.m, 1.0))

    snr = gradient_snr(Toy(), make_elbo("trace", max_plate_nesting=1), torch.ones(1), samples=1000)
    assert snr["m"]["n_params"] == 1
    assert abs(snr["m"]["snr_mean"] - 0.5) < 0.14


def test_gradient_snr_groups_and_errors():
    vae = VAE(12, 2, hidden=(8,))
    x = torch.bernoulli(torch.full((6, 12), 0.5))
    groups = {"encoder": ("encoder_body", "encoder_head"), "decoder": "decoder"}
    out = gradient_snr(vae, make_elbo("iwae:3", max_plate_nesting=1), x, samples=5, groups=groups)
    n_enc = sum(p.numel() for n, p in vae.named_parameters() if n.startswith("encoder"))
    assert set(out) == {"encoder", "decoder"} and out["encoder"]["n_params"] <= n_enc
    with pytest.raises(UsageError, match="no parameters"):
        gradient_snr(vae, make_elbo("trace"), x, samples=5, groups={"x": "nonexistent"})
    with pytest.raises(UsageError):
        gradient_snr(vae, make_elbo("trace"), x, samples=1)
