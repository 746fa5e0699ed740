"""The fast training paths compute exactly the loss and gradients of the generic ones.

* :class:`inference.loss.StepLoss` (eager) against Pyro's own
  ``differentiable_loss`` for the same random draws;
* the compiled graph (``compile=...``) against the eager loss, on its first call,
  on the checked second call and on later unchecked calls;
* ``fit(compile="aot_eager")`` against ``fit(compile=False)``: the same training run;
* the host-read window of ``fit``: a non-finite loss is reported at the right step.

Tolerances: both sides run the same float32 ops on the same draws; they differ
only in summation order (Pyro adds per-site sums as Python floats), a few ulps of
the loss, so 1e-5 relative is ample and still far below any modelling change
(a different draw or a missing term moves the loss by > 1e-3 relative).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from inference import NonFiniteLossError, Trainer, fit, make_elbo
from inference.errors import UsageError
from inference.loss import StepLoss, make_step_loss
from ppl_models.vae import VAE

RTOL = 1e-5

MLP = dict(hidden=(32,))
CONV = dict(arch="conv", image_shape=(1, 8, 8))
# every objective on the MLP VAE; the conv VAE (other ops, same loss code) with two of them
CASES = [pytest.param(spec, MLP, id=f"mlp-{spec}") for spec in ["trace", "trace:3", "meanfield", "iwae:4", "renyi:0.5:3"]]
CASES += [pytest.param(spec, CONV, id=f"conv-{spec}") for spec in ["trace", "iwae:4"]]


def _vae(device, **kw):
    torch.manual_seed(0)
    return VAE(64, latent_dim=4, **kw).to(device)


def _loss_and_grads(elbo, module, x, seed):
    pyro.set_rng_seed(seed)
    loss = elbo.differentiable_loss(module.model, module.guide, x)
    grads = torch.autograd.grad(loss, list(module.parameters()))
    return loss.detach(), grads


def _assert_same(a, b, rtol=RTOL):
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(la, lb, rtol=rtol, atol=0), (float(la), float(lb))
    for x, y in zip(ga, gb):
        # gradients: relative to the largest entry of the tensor (small entries are sums of cancelling terms)
        assert torch.allclose(x, y, rtol=rtol, atol=rtol * float(x.abs().max())), float((x - y).abs().max())


@pytest.mark.parametrize("spec, arch", CASES)
def test_fast_and_compiled_loss_equal_pyro(spec, arch, digits, device):
    module = _vae(device, **arch)
    xs = [digits[0].x[i * 32 : (i + 1) * 32].to(device) for i in range(3)]
    pyro_elbo = make_elbo(spec, max_plate_nesting=1)
    eager = StepLoss(make_elbo(spec, max_plate_nesting=1))
    compiled = make_step_loss(spec, max_plate_nesting=1, compile="aot_eager")[1]
    assert isinstance(compiled, StepLoss) and compiled.backend == "aot_eager"
    # calls 1 (trace + check), 2 (checked) and 3 (the plain graph) on different batches and seeds
    for call, x in enumerate(xs):
        reference = _loss_and_grads(pyro_elbo, module, x, seed=call)
        _assert_same(reference, _loss_and_grads(eager, module, x, seed=call))
        _assert_same(reference, _loss_and_grads(compiled, module, x, seed=call))
    assert len(compiled.compiled) == 1 and not compiled.fallbacks


def _discrete_pair():
    """A model with a Bernoulli latent (not reparameterisable) and a pyro.param guide."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(x.new_tensor(0.3)))
            pyro.sample("x", dist.Normal(2.0 * c - 1.0, 1.0), obs=x)

    def guide(x):
        w = pyro.param("w", x.new_tensor(0.5))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(logits=w * x))

    return model, guide


def test_score_function_loss_equals_pyro(device):
    """Non-reparameterised guide: value of -ELBO and gradient of Pyro's surrogate, without .item()."""
    model, guide = _discrete_pair()
    x = torch.linspace(-2, 2, 50, device=device)
    out = []
    for elbo in (make_elbo("trace"), StepLoss(make_elbo("trace"))):
        pyro.set_rng_seed(3)
        loss = elbo.differentiable_loss(model, guide, x)
        (grad,) = torch.autograd.grad(loss, [pyro.param("w").unconstrained()])
        out.append((loss.detach(), grad))
    (la, ga), (lb, gb) = out
    assert torch.allclose(la, lb, rtol=RTOL) and torch.allclose(ga, gb, rtol=RTOL)


def _param_store_pair():
    """Reparameterised guide whose parameters live in Pyro's param store (one constrained positive)."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        a = pyro.param("a", x.new_tensor(0.1))
        s = pyro.param("s", x.new_tensor(2.0), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(a * x, s))

    return model, guide


def test_compiled_follows_the_param_store(device):
    """Gradients reach pyro.param values through their constraint, and a cleared store is traced again."""
    model, guide = _param_store_pair()
    compiled, eager = make_step_loss("trace", compile="aot_eager")[1], StepLoss(make_elbo("trace"))

    def run(elbo, x, seed):
        pyro.set_rng_seed(seed)
        loss = elbo.differentiable_loss(model, guide, x)
        names = ("a", "s")
        return loss.detach(), torch.autograd.grad(loss, [pyro.param(n).unconstrained() for n in names])

    x = torch.linspace(-1, 1, 20, device=device)
    for seed in range(3):
        _assert_same(run(eager, x, seed), run(compiled, x, seed))
    pyro.clear_param_store()
    pyro.param("a", x.new_tensor(-0.7))  # new tensors, new values
    for seed in range(3):
        _assert_same(run(eager, x, seed), run(compiled, x, seed))
    assert len(compiled.compiled) == 1 and not compiled.fallbacks


def test_compiled_sees_changed_module_attributes(digits):
    """Python attributes the trace would freeze (here the beta of a beta-VAE, as in KL annealing) key the graph."""
    module = _vae("cpu", hidden=(16,))
    x = digits[0].x[:32]
    compiled, eager = make_step_loss("trace", max_plate_nesting=1, compile="aot_eager")[1], StepLoss(make_elbo("trace", max_plate_nesting=1))
    for beta in (1.0, 0.5, 0.5, 2.0):
        module.beta = beta
        _assert_same(_loss_and_grads(eager, module, x, seed=0), _loss_and_grads(compiled, module, x, seed=0))
    assert len(compiled.compiled) == 3  # one graph per beta


def test_compiled_value_dependent_branch_falls_back():
    """A branch on data values cannot be flattened: make_fx refuses it on the first call, which warns and goes eager."""

    class Branchy(VAE):
        def model(self, x):
            if float(x.mean()) > 0.5:  # value-dependent control flow
                x = x.flip(-1)
            super().model(x)

    torch.manual_seed(0)
    module = Branchy(8, latent_dim=2, hidden=(8,))
    high = torch.ones(16, 8)
    high[:, 0] = 0.0  # makes flip(-1) matter
    compiled = make_step_loss("trace", max_plate_nesting=1, compile="aot_eager")[1]
    eager = StepLoss(make_elbo("trace", max_plate_nesting=1))
    with pytest.warns(UserWarning, match="make_fx failed.*data-dependent"):
        got = _loss_and_grads(compiled, module, high, seed=1)
    _assert_same(_loss_and_grads(eager, module, high, seed=1), got)
    assert compiled.fallbacks and not compiled.compiled


def test_compiled_hidden_state_change_is_caught_by_the_second_check():
    """Python state the key does not see (a dict, not a plain attribute) is frozen by flattening: the check
    on the second call compares with the eager loss and goes eager."""

    class Switch(VAE):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.state = {"flip": False}

        def model(self, x):
            super().model(x.flip(-1) if self.state["flip"] else x)

    torch.manual_seed(0)
    module = Switch(8, latent_dim=2, hidden=(8,))
    x = torch.ones(16, 8)
    x[:, 0] = 0.0
    compiled = make_step_loss("trace", max_plate_nesting=1, compile="aot_eager")[1]
    eager = StepLoss(make_elbo("trace", max_plate_nesting=1))
    _assert_same(_loss_and_grads(eager, module, x, seed=0), _loss_and_grads(compiled, module, x, seed=0))
    module.state["flip"] = True
    with pytest.warns(UserWarning, match="differs from the eager loss"):
        got = _loss_and_grads(compiled, module, x, seed=1)
    _assert_same(_loss_and_grads(eager, module, x, seed=1), got)
    assert compiled.fallbacks and not compiled.compiled


def test_step_loss_compile_without_compiled_path_warns():
    with pytest.warns(UserWarning, match="no compiled path"):
        objective, loss = make_step_loss("tracegraph", compile=True)
    assert loss is objective and not isinstance(loss, StepLoss)


@pytest.mark.parametrize("spec", ["trace", "iwae:3"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_fit_compiled_equals_eager(spec, drop_last, digits, device):
    """The compiled run is the eager run: same draws, same updates, same history (float tolerance)."""
    train = digits[0].x[:200]  # 200 = 3 * 64 + 8: a ragged last batch unless dropped
    runs = []
    for compile in (False, "aot_eager"):
        module = _vae(device, hidden=(32,))
        result = fit(module, train, elbo=spec, epochs=2, batch_size=64, lr=1e-2, device=device, progress=False,
                     compile=compile, drop_last=drop_last, seed=5)
        runs.append((result, torch.cat([p.detach().flatten() for p in module.parameters()])))
    (eager, p_eager), (compiled, p_compiled) = runs
    for a, b in zip(eager.history, compiled.history):
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=RTOL)
    # after 8 Adam steps, float differences of a few ulps stay tiny relative to the weights' scale
    assert torch.allclose(p_eager, p_compiled, rtol=1e-4, atol=1e-5)
    # one graph, for the full batch: the ragged last batch (one step an epoch) runs eager
    assert len(compiled.loss.compiled) == 1 and not compiled.loss.fallbacks
    assert [r["loss_path"] for r in compiled.history] == ["aot_eager"] * 2
    assert [r["loss_path"] for r in eager.history] == ["eager"] * 2


class _NaNAt(torch.nn.Module):
    """A Gaussian-mean model whose loss turns NaN on step ``bad`` (counted across calls)."""

    def __init__(self, bad):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(()))
        self.bad, self.calls = bad, 0

    def model(self, x):
        self.calls += 1
        loc = self.loc * (math.nan if self.calls == self.bad else 1.0)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(self, x):
        pass


@pytest.mark.parametrize("sync_every", [1, 4])
def test_nonfinite_loss_names_its_step_within_the_window(sync_every):
    probe = _NaNAt(bad=0)
    with pyro.validation_enabled(False):
        Trainer(probe, torch.zeros(100), batch_size=10, lr=0.1, device="cpu")
    module = _NaNAt(bad=probe.calls + 6)  # the calls before the first step, then training step 6
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 6\b"), pyro.validation_enabled(False):
        fit(module, torch.zeros(100), epochs=1, batch_size=10, lr=0.1, device="cpu", progress=False,
            sync_every=sync_every)


def test_a_misspelt_backend_is_refused_up_front(digits):
    """compile="inductr" used to train eager (every step falling back) while each history record said
    loss_path="inductr"; a name torch.compile does not know is a UsageError before any training."""
    x = digits[0].x[:64]
    with pytest.raises(UsageError, match="names no torch.compile backend"):
        fit(_vae("cpu"), x, epochs=1, batch_size=32, lr=1e-3, device="cpu", progress=False, compile="inductr")
    with pytest.raises(UsageError, match="names no torch.compile backend"):
        make_step_loss("trace", compile="inductr")
    assert make_step_loss("trace", compile="aot_eager")[1].backend == "aot_eager"
