"""Flow guides: the change of variables, K = 0 = the Gaussian guide, and bounds below the exact log p(x) of pPCA."""

import math
import warnings

import pyro
import pytest
import torch
from torch.autograd.functional import jacobian

from inference import evaluate, fit
from inference.elbo import make_elbo
from inference.errors import UsageError
from ppl_models.flows import ConditionalFlow, parse_guide
from ppl_models.vae import VAE


@pytest.mark.parametrize("kind", ["iaf", "spline"])
def test_log_prob_is_the_change_of_variables(kind):
    """log q(z_K) = log N(z_0) - log |det dz_K/dz_0|, the Jacobian taken explicitly by autograd."""
    torch.manual_seed(1)
    L, C = 3, 2
    flow = ConditionalFlow(kind, 2, L, C, hidden=[8]).double()
    for p in flow.parameters():  # move away from the near-identity initialisation
        p.data.normal_(0, 0.5)
    context = torch.randn(C, dtype=torch.float64)
    base = pyro.distributions.Normal(torch.randn(L, dtype=torch.float64), torch.rand(L, dtype=torch.float64) + 0.5).to_event(1)
    q = flow(base, context)
    transforms = [t.condition(context) for t in flow.transforms]

    def push(z0):
        for t in transforms:
            z0 = t(z0)
        return z0

    for _ in range(3):
        z0 = base.sample()
        jac = jacobian(push, z0)
        expected = base.log_prob(z0) - torch.linalg.slogdet(jac)[1]
        # an arbitrary point, scored through the flow's inverse (a fresh tensor: no cached inverse)
        assert torch.allclose(q.log_prob(push(z0).clone()), expected, atol=1e-8, rtol=0)
    # the cached path: the log-density of a sample equals the formula at the base draw that made it
    z = q.rsample()
    z0 = z.clone()
    for t in reversed(transforms):
        z0 = t.inv(z0)
    jac = jacobian(push, z0.detach())
    assert torch.allclose(q.log_prob(z), base.log_prob(z0) - torch.linalg.slogdet(jac)[1], atol=1e-8, rtol=0)


def _diagonal_and(guide):
    """Data, a diagonal-guide VAE and a ``guide`` VAE built under the same seed (the flow is built last)."""
    x = torch.bernoulli(torch.rand(16, 20, generator=torch.Generator().manual_seed(0)))
    pyro.set_rng_seed(3)
    diag = VAE(20, latent_dim=4, hidden=(12,))
    pyro.set_rng_seed(3)
    return x, diag, VAE(20, latent_dim=4, hidden=(12,), guide=guide)


def test_zero_steps_is_the_gaussian_guide():
    x, diag, flow0 = _diagonal_and("iaf:0")
    sd_diag, sd_flow = diag.state_dict(), flow0.state_dict()
    assert sd_diag.keys() == sd_flow.keys() and all(torch.equal(sd_diag[k], sd_flow[k]) for k in sd_diag)
    q_diag, q_flow = diag.encode(x), flow0.encode(x)
    z = q_diag.sample((5,))
    assert torch.equal(q_diag.log_prob(z), q_flow.log_prob(z))
    elbo = make_elbo("iwae:3", max_plate_nesting=1)
    losses = []
    for vae in (diag, flow0):
        pyro.set_rng_seed(7)
        losses.append(elbo.differentiable_loss(vae.model, vae.guide, x))
    assert torch.equal(losses[0], losses[1])


def test_an_untrained_iaf_guide_is_the_gaussian_guide():
    """Each IAF step starts as the identity (Kingma et al. 2016, sec. 4): same draws, log-densities, bounds."""
    x, diag, iaf = _diagonal_and("iaf:3")
    sd_diag, sd_iaf = diag.state_dict(), iaf.state_dict()
    assert all(torch.equal(sd_diag[k], sd_iaf[k]) for k in sd_diag)  # the flow is built last
    assert any(k.startswith("flow.") for k in sd_iaf)
    q_diag, q_iaf = diag.encode(x), iaf.encode(x)
    draws = []
    for q in (q_diag, q_iaf):
        torch.manual_seed(5)
        draws.append(q.rsample((4,)))
    assert torch.equal(draws[0], draws[1])
    assert torch.equal(q_iaf.log_prob(draws[1]), q_diag.log_prob(draws[0]))  # the cached (sampled) path
    assert torch.equal(q_iaf.log_prob(draws[0].clone()), q_diag.log_prob(draws[0]))  # the inverse path
    for spec in ("trace", "iwae:3"):
        elbo = make_elbo(spec, max_plate_nesting=1)
        losses = []
        for vae in (diag, iaf):
            pyro.set_rng_seed(7)
            losses.append(elbo.differentiable_loss(vae.model, vae.guide, x))
        assert torch.equal(losses[0], losses[1])
    # ... and it is still a flow: the output layer gets a gradient, so training moves it off the identity
    loss = make_elbo("trace", max_plate_nesting=1).differentiable_loss(iaf.model, iaf.guide, x)
    loss.backward()
    assert all(t.nn.layers[-1].weight.grad.abs().sum() > 0 for t in iaf.flow.transforms)


def test_guide_specs():
    assert parse_guide("diag") == ("diag", 0) and parse_guide("iaf:3") == ("iaf", 3)
    assert parse_guide("spline:1") == ("spline", 1)
    for bad in ("iaf", "iaf:-1", "maf:2", "spline:x"):
        with pytest.raises(UsageError):
            parse_guide(bad)
    with pytest.raises(UsageError, match="latent_dim >= 2"):
        VAE(10, latent_dim=1, guide="iaf:1")
    vae = VAE(10, latent_dim=3, hidden=(8,), guide="iaf:2")
    assert VAE.from_config(vae.config).config == vae.config and vae.config["guide"] == "iaf:2"


def _ppca_data(n=300, d=6, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, k, generator=g)
    return torch.randn(n, k, generator=g) @ w.T + 0.5 * torch.randn(n, d, generator=g) + 1.0


@pytest.mark.parametrize("guide", ["iaf:2", "spline:1"])
def test_bounds_stay_below_exact_ppca(guide):
    """A linear-Gaussian decoder with fixed noise is pPCA: log p(x) = log N(x; b, W W^T + s^2 I) exactly.

    The importance-weighted estimate with the flow guide is a stochastic lower
    bound: its test mean must not exceed the exact value by more than 3 standard
    errors of the paired gap, the ELBO must lie below it, and a trained guide
    brings IWAE_1000 close to the exact value.
    """
    x = _ppca_data()
    s = 0.5
    vae = VAE(6, latent_dim=2, hidden=(), likelihood=f"normal:{s}", guide=guide)
    fit(vae, x, elbo="trace", epochs=30, batch_size=50, lr=1e-2, seed=0, progress=False)
    lin = vae.decoder[0] if isinstance(vae.decoder, torch.nn.Sequential) else vae.decoder
    with torch.no_grad():
        cov = lin.weight @ lin.weight.T + s**2 * torch.eye(6)
        exact = torch.distributions.MultivariateNormal(lin.bias, cov).log_prob(x)
    pyro.set_rng_seed(0)
    ev = evaluate(vae, x, particles=1000)
    gap = ev.log_likelihood_per_point - exact
    se = gap.std() / math.sqrt(gap.numel())
    assert gap.mean() <= 3 * se
    assert ev.elbo <= ev.log_likelihood
    assert gap.mean() > -0.05  # the trained flow guide is close to the exact posterior


@pytest.mark.parametrize("spec", ["trace", "meanfield", "tracegraph", "iwae:4", "renyi:0.5:4"])
def test_every_elbo_spec_trains_a_flow_guide(spec):
    """One short fit per objective; the flow's parameters move (their gradient reaches the optimiser)."""
    x = torch.bernoulli(torch.rand(64, 20, generator=torch.Generator().manual_seed(0)))
    vae = VAE(20, latent_dim=3, hidden=(16,), guide="iaf:1")
    before = [p.detach().clone() for p in vae.flow.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # meanfield says, once, that it estimates this site's KL by Monte Carlo
        result = fit(vae, x, elbo=spec, epochs=2, batch_size=32, lr=1e-2, seed=0, progress=False)
    assert math.isfinite(result.history[-1]["train_loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, vae.flow.parameters()))
