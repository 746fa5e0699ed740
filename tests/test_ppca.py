"""pPCA: exact marginal and posterior against every bound the library computes."""

import pyro
import pytest
import torch
from torch.distributions import kl_divergence

from inference import UsageError, evaluate
from ppl_models.ppca import PPCA

D, L, N = 10, 3, 200


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def make_ppca(guide="full", dtype=torch.float64, device="cpu", seed=0):
    """A pPCA with random W, mu, sigma = softplus(0) + 1e-3 and N datapoints drawn from its own marginal."""
    gen = torch.Generator().manual_seed(seed)
    m = PPCA(D, L, guide=guide).to(device=device, dtype=dtype)
    with torch.no_grad():
        m.W.copy_(torch.randn(D, L, generator=gen))
        m.mu.copy_(torch.randn(D, generator=gen))
        m.sigma_raw.fill_(0.0)
    pyro.set_rng_seed(seed)
    x = m.marginal().sample((N,)).detach()
    return m, x


def exact_elbo(m, x):
    """Closed form: ELBO(x) = log p(x) - KL(q(z | x) || p(z | x)) (both Gaussian)."""
    q = torch.distributions.MultivariateNormal(m.encoder(x), scale_tril=m.guide_scale_tril())
    return m.log_marginal(x) - kl_divergence(q, m.posterior(x)), kl_divergence(q, m.posterior(x))


@torch.no_grad()
def test_marginal_matches_dense_gaussian(device):
    m, x = make_ppca(device=device)
    cov = m.W @ m.W.T + m.sigma**2 * torch.eye(D, dtype=x.dtype, device=x.device)
    dense = torch.distributions.MultivariateNormal(m.mu, covariance_matrix=cov).log_prob(x)
    # both float64: agreement to round-off of a 10x10 Cholesky
    torch.testing.assert_close(m.log_marginal(x), dense, rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_posterior_is_bayes_rule():
    """log p(z | x) = log p(z) + log p(x | z) - log p(x) at any z."""
    m, x = make_ppca()
    z = torch.randn(N, L, dtype=x.dtype)
    prior = torch.distributions.Normal(torch.zeros_like(z), 1.0).log_prob(z).sum(-1)
    lik = torch.distributions.Normal(z @ m.W.T + m.mu, m.sigma).log_prob(x).sum(-1)
    torch.testing.assert_close(m.posterior(x).log_prob(z), prior + lik - m.log_marginal(x), rtol=1e-10, atol=1e-10)


@torch.no_grad()
@pytest.mark.parametrize("guide", ["diag", "full"])
def test_elbo_below_exact_per_datapoint(guide):
    """Monte Carlo ELBO per point = closed-form ELBO within 4 MC standard errors, and that is <= log p(x)."""
    m, x = make_ppca(guide)
    with torch.no_grad():  # an untrained guide: a real gap
        m.encoder.weight.normal_(0, 0.3)
    ev = evaluate(m, x, particles=2000, keep_log_weights=True)
    closed, kl = exact_elbo(m, x)
    assert (kl >= 0).all()
    assert (closed <= m.log_marginal(x)).all()
    se = ev.log_weights.std(1) / ev.log_weights.shape[1] ** 0.5
    # 4 SE per point: with 200 points, a false alarm has probability ~ 200 * 6e-5 ~ 1%
    assert ((ev.elbo_per_point - closed).abs() <= 4 * se).all()
    assert (ev.elbo_per_point <= m.log_marginal(x) + 4 * se).all()


@torch.no_grad()
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_exact_posterior_guide_makes_every_bound_tight(dtype, tol):
    """With q = p(z | x), log w = log p(x) for every z: ELBO = IWAE_K = log p(x) per point.

    Tolerance: float64 round-off (~1e-13 per term); float32 sums ~3D terms of
    magnitude <= 50 with eps 1.2e-7, so a few 1e-5, bounded here by 2e-4 relative."""
    m, x = make_ppca("full", dtype=dtype)
    m.set_guide_to_posterior()
    ev = evaluate(m, x, particles=50)
    exact = m.log_marginal(x).double()
    scale = 1.0 if dtype == torch.float64 else 1.0 + exact.abs()
    assert ((ev.elbo_per_point - exact).abs() <= tol * scale).all()
    assert ((ev.log_likelihood_per_point - exact).abs() <= tol * scale).all()


def test_diag_guide_refuses_non_diagonal_posterior():
    m, _ = make_ppca("diag")
    with pytest.raises(UsageError, match="guide='full'"):
        m.set_guide_to_posterior()


@torch.no_grad()
def test_iwae_increases_to_log_marginal():
    """IWAE_K gap shrinks with K (Burda et al. 2015, thm 1) and stays <= 0 within 3 SE of the paired gap."""
    m, x = make_ppca("full")
    m.set_guide_to_posterior()
    m.q_scale_raw.add_(1.0)  # an over-dispersed guide: proposals valid, but not exact
    m.encoder.bias.add_(0.3)
    exact = m.log_marginal(x).double()
    gaps, ses = [], []
    for k in (1, 10, 100, 1000):
        gap = evaluate(m, x, particles=k).log_likelihood_per_point - exact
        gaps.append(float(gap.mean()))
        ses.append(float(gap.std() / N**0.5))
    for g, se in zip(gaps, ses):
        assert g <= 3 * se
    # increasing in K; at this seed the steps are 5.2, 0.43 and 0.027 nats, each above
    # 1.5 SE of the larger gap's SE (the gaps are of independent draws, so this is a real signal)
    for a, b, sb in zip(gaps, gaps[1:], ses[1:]):
        assert b > a + 1.5 * sb
    # K=1000 gap within 0.05 nats (10 SE) of zero: the over-dispersed guide is a good proposal
    assert abs(gaps[-1]) < 0.05


def test_mle_is_a_stationary_point_of_the_likelihood():
    """Tipping & Bishop's closed form: the gradient of the mean log-likelihood vanishes there."""
    m, x = make_ppca("diag")
    m.set_mle(x)
    ll = m.log_marginal(x).mean()
    grads = torch.autograd.grad(ll, [m.W, m.mu, m.sigma_raw])
    # float64, objective O(10): round-off gradients ~1e-12; 1e-8 leaves room for eigh's accuracy
    for g in grads:
        assert g.abs().max() < 1e-8
    # and it beats the generating parameters (it is the maximum, they are a feasible point)
    m2, _ = make_ppca("diag")
    assert float(ll.detach()) >= float(m2.log_marginal(x).mean().detach())


@pytest.mark.parametrize("kwargs", [{"latent_dim": 0}, {"latent_dim": 11}, {"guide": "tril"}, {"sigma": -1.0}])
def test_bad_options_are_usage_errors(kwargs):
    opts = {"x_dim": D, "latent_dim": L, **kwargs}
    with pytest.raises(UsageError):
        PPCA(**opts)
