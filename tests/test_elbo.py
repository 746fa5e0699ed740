"""ELBO specs, and our differentiable Renyi/IWAE loss against Pyro's own estimator."""

import pyro
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO

from inference.elbo import DifferentiableRenyiELBO, ReportingMeanFieldELBO, make_elbo
from inference.errors import UsageError
from ppl_models.vae import VAE


@pytest.mark.parametrize(
    "spec, cls, particles",
    [
        ("trace", Trace_ELBO, 1),
        ("trace:4", Trace_ELBO, 4),
        ("meanfield", ReportingMeanFieldELBO, 1),  # a TraceMeanField_ELBO that reports MC-KL sites
        ("enum", TraceEnum_ELBO, 1),
        ("tracegraph", TraceGraph_ELBO, 1),
        ("iwae:50", DifferentiableRenyiELBO, 50),
        ("renyi:0.5:5", DifferentiableRenyiELBO, 5),
    ],
)
def test_specs_build_the_named_objective(spec, cls, particles):
    elbo = make_elbo(spec, max_plate_nesting=1)
    assert type(elbo) is cls and elbo.num_particles == particles
    if spec.startswith("iwae"):
        assert elbo.alpha == 0.0
    if spec.startswith("renyi"):
        assert elbo.alpha == 0.5


@pytest.mark.parametrize("spec", ["bogus", "iwae", "iwae:0", "iwae:x", "renyi:1:5", "renyi:a:5", "trace:1:2", ""])
def test_bad_specs_raise_with_the_valid_list(spec):
    with pytest.raises(ValueError, match="ELBO spec") as err:
        make_elbo(spec, max_plate_nesting=1)
    assert isinstance(err.value, UsageError)
    if spec in ("bogus", "iwae", "trace:1:2", ""):
        assert "trace[:K], meanfield[:K], enum[:K], tracegraph[:K], iwae:K, renyi:ALPHA:K" in str(err.value)


def test_enum_needs_max_plate_nesting():
    with pytest.raises(UsageError, match="max_plate_nesting"):
        make_elbo("enum")


@pytest.mark.parametrize("alpha", [0.0, 0.5, -1.0])
def test_renyi_loss_and_gradient_match_pyro(alpha):
    """Same seed, same particles: our differentiable loss equals Pyro's RenyiELBO value, and its
    gradient equals the surrogate gradient Pyro's loss_and_grads accumulates (float tolerance)."""
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((16, 12), 0.3))
    vae = VAE(12, latent_dim=3, hidden=(8,))
    ours = DifferentiableRenyiELBO(alpha=alpha, num_particles=7, vectorize_particles=True, max_plate_nesting=1)
    theirs = RenyiELBO(alpha=alpha, num_particles=7, vectorize_particles=True, max_plate_nesting=1)

    pyro.set_rng_seed(3)
    loss = ours.differentiable_loss(vae.model, vae.guide, x)
    loss.backward()
    ours_grad = [p.grad.clone() for p in vae.parameters()]
    vae.zero_grad()

    pyro.set_rng_seed(3)

    # Pyro's loss_and_grads only backpropagates when it sees pyro.param sites
    def model(x):
        pyro.module("vae", vae)
        vae.model(x)

    def guide(x):
        pyro.module("vae", vae)
        vae.guide(x)

    their_loss = theirs.loss_and_grads(model, guide, x)
    assert float(loss.detach()) == pytest.approx(their_loss, rel=1e-5)
    for g, p in zip(ours_grad, vae.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


def test_iwae_rejects_non_reparameterised_guides():
    import pyro.distributions as dist

    def model():
        with pyro.plate("data", 3):
            pyro.sample("c", dist.Bernoulli(0.5))

    def guide():
        with pyro.plate("data", 3):
            pyro.sample("c", dist.Bernoulli(0.3))

    with pytest.raises(UsageError, match="reparameterised"):
        make_elbo("iwae:3", max_plate_nesting=1).differentiable_loss(model, guide)
