"""ELBO specs, and our differentiable Renyi/IWAE loss against Pyro's own estimator."""

import pyro
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceEnum_ELBO

from inference.elbo import DifferentiableRenyiELBO, DifferentiableTraceGraphELBO, ReportingMeanFieldELBO, make_elbo
from inference.errors import UsageError
from inference.train import fit
from ppl_models.vae import VAE


@pytest.mark.parametrize(
    "spec, cls, particles",
    [
        ("trace", Trace_ELBO, 1),
        ("trace:4", Trace_ELBO, 4),
        ("meanfield", ReportingMeanFieldELBO, 1),  # a TraceMeanField_ELBO that reports MC-KL sites
        ("enum", TraceEnum_ELBO, 1),
        ("tracegraph", DifferentiableTraceGraphELBO, 1),  # a TraceGraph_ELBO with a differentiable_loss
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


# ---- tracegraph: the surrogate's gradient against Trace_ELBO's and the closed form ----------------

X_TG = torch.tensor([-1.0, 0.5, 2.0])  # three datapoints, each with its own non-reparameterised latent


def _tg_model(kind):
    def model():
        with pyro.plate("data", 3):
            if kind == "bernoulli":
                z = pyro.sample("z", pyro.distributions.Bernoulli(0.3 * torch.ones(3)))
                loc = 3.0 * z - 1.5
            else:
                loc = pyro.sample("z", pyro.distributions.Normal(torch.zeros(3), 1.0))
            pyro.sample("x", pyro.distributions.Normal(loc, 1.0), obs=X_TG)

    return model


def _tg_guide(kind, theta):
    def guide():
        with pyro.plate("data", 3):
            if kind == "bernoulli":
                pyro.sample("z", pyro.distributions.Bernoulli(logits=theta))
            else:  # a Normal without rsample: the estimator must use score-function terms
                pyro.sample("z", pyro.distributions.Normal(theta, 0.8).has_rsample_(False))

    return guide


def _tg_exact_elbo(kind, theta):
    """The ELBO in closed form, as a function of the guide's parameters theta (3,)."""
    normal = torch.distributions.Normal
    if kind == "bernoulli":
        q1 = torch.sigmoid(theta)
        total = 0.0
        for z, qz, pz in ((1.0, q1, 0.3), (0.0, 1 - q1, 0.7)):
            total = total + qz * (torch.log(torch.tensor(pz)) + normal(3.0 * z - 1.5, 1.0).log_prob(X_TG) - qz.log())
        return total.sum()
    s2 = 0.8**2
    # E_q[log N(z; 0, 1)] + E_q[log N(x; z, 1)] + H[N(theta, s^2)]
    e_prior = -0.5 * torch.log(torch.tensor(2 * torch.pi)) - 0.5 * (theta**2 + s2)
    e_lik = -0.5 * torch.log(torch.tensor(2 * torch.pi)) - 0.5 * ((X_TG - theta) ** 2 + s2)
    entropy = 0.5 * torch.log(torch.tensor(2 * torch.pi * torch.e * s2))
    return (e_prior + e_lik + entropy).sum()


@pytest.mark.parametrize("kind", ["bernoulli", "normal"])
def test_tracegraph_gradient_matches_trace_elbo_and_the_closed_form(kind):
    """Unbiased score-function gradients: means over R seeded estimates agree within 4 standard errors.

    Each estimate averages 50 vectorised particles; R = 100 estimates give the
    mean and its standard error sd / sqrt(R). By the central limit theorem a
    4-standard-error band fails by chance with probability about 6e-5 per
    coordinate. The closed-form gradient is autograd of the exact ELBO.
    """
    theta0 = torch.tensor([0.2, -0.4, 0.7])
    exact_theta = theta0.clone().requires_grad_()
    exact = torch.autograd.grad(-_tg_exact_elbo(kind, exact_theta), exact_theta)[0]
    tracegraph = make_elbo("tracegraph:50", max_plate_nesting=1)
    trace = Trace_ELBO(num_particles=50, vectorize_particles=True, max_plate_nesting=1)
    means, ses = {}, {}
    for seed, (name, elbo) in enumerate((("tracegraph", tracegraph), ("trace", trace))):
        pyro.set_rng_seed(seed)  # independent draws for the two estimators
        grads, losses = [], []
        for _ in range(100):
            theta = theta0.clone().requires_grad_()
            loss = elbo.differentiable_loss(_tg_model(kind), _tg_guide(kind, theta))
            grads.append(torch.autograd.grad(loss, theta)[0])
            losses.append(loss.detach())
        g = torch.stack(grads)
        means[name], ses[name] = g.mean(0), g.std(0) / 100**0.5
        if name == "tracegraph":  # the value is -ELBO: its mean matches the closed form too
            lv = torch.stack(losses)
            assert abs(lv.mean() + _tg_exact_elbo(kind, theta0)) < 4 * lv.std() / 100**0.5
    assert (ses["tracegraph"] > 0).all()  # score-function terms are present: the estimate is noisy
    assert ((means["tracegraph"] - exact).abs() < 4 * ses["tracegraph"]).all(), (means["tracegraph"], exact, ses)
    band = 4 * (ses["tracegraph"] ** 2 + ses["trace"] ** 2).sqrt()
    assert ((means["tracegraph"] - means["trace"]).abs() < band).all(), (means, ses)


def test_tracegraph_trains_through_fit_as_trace_does_on_a_reparameterised_pair():
    """fit used to crash with 'tracegraph' (TraceGraph_ELBO has no differentiable_loss).

    With every guide site reparameterised the surrogate has no score-function
    term, so tracegraph's loss and gradient equal Trace_ELBO's: the same seed
    gives the same training history (to float summation order).
    """
    x = torch.rand(32, 6).round()
    histories = {}
    for spec in ("trace", "tracegraph"):
        pyro.set_rng_seed(3)
        vae = VAE(x_dim=6, latent_dim=2, hidden=(8,))
        result = fit(vae, x, elbo=spec, epochs=3, batch_size=16, lr=1e-2, progress=False, seed=5)
        histories[spec] = [r["train_loss"] for r in result.history]
    assert histories["tracegraph"] == pytest.approx(histories["trace"], rel=1e-5)
