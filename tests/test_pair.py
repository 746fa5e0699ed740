"""The pair contract: as_pair on every kind of pair, arguments/bind, inspect_pair's records, check_objective."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
import torch.nn as nn
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoIAFNormal, AutoLowRankMultivariateNormal, AutoNormal
from pyro.nn import PyroModule, PyroSample
from pyro.ops.indexing import Vindex

from inference.elbo import make_elbo
from inference.errors import UsageError
from inference.pair import (
    ModelGuidePair,
    Pair,
    PairInfo,
    Site,
    as_pair,
    check_minibatching,
    check_objective,
    inspect_pair,
    take_rows,
    valid_objectives,
)
from ppl_models.gmm import GMM

ALL_SPECS = ("trace", "meanfield", "enum", "tracegraph", "iwae:5", "renyi:0.5:5")


def site(name, *, plates=(), observed=False, partly_observed=False, in_model=True, in_guide=False, enumerated=False,
         discrete=False, reparameterized=False, scaled=False):
    """An expected record; ``local`` follows from the plates."""
    return Site(name=name, observed=observed, partly_observed=partly_observed, in_model=in_model, in_guide=in_guide,
                local="data" in plates, enumerated=enumerated, discrete=discrete, reparameterized=reparameterized,
                scaled=scaled, plates=plates)


def refused(info, spec, *words):
    with pytest.raises(UsageError) as err:
        check_objective(info, spec)
    msg = str(err.value)
    assert "\n" not in msg and f"{spec!r}" in msg
    for word in words:
        assert word in msg, msg
    return msg


# ---- user-style pairs ------------------------------------------------------------------------------


def local_model(x):
    """A global mean and one local latent per datapoint."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("obs", dist.Normal(z, 1.0), obs=x)


class TinyVAE(nn.Module):
    """An nn.Module with model/guide methods, as in Pyro's examples/vae."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(3, 4)
        self.decoder = nn.Linear(2, 3)
        self.num_data = None
        self.config = {}

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        h = self.encoder(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(h[:, :2], nn.functional.softplus(h[:, 2:]) + 1e-3).to_event(1))


class BayesLinear(PyroModule):
    """A PyroModule regression with PyroSample priors on its weights."""

    def __init__(self):
        super().__init__()
        self.linear = PyroModule[nn.Linear](2, 1)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 2]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([1]).to_event(1))

    def forward(self, x, y=None):
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, 1.0), obs=y)


def param_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z, 0.5), obs=x)


def param_guide(x):
    loc = pyro.param("loc", torch.zeros(len(x)))
    scale = pyro.param("scale", torch.ones(len(x)), constraint=dist.constraints.positive)
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(loc, scale))


def regression(x, y):
    """Bayesian linear regression that subsamples its own data plate (10 of len(x) rows)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(x), subsample_size=10) as idx:
        pyro.sample("y", dist.Normal(w * x[idx], s), obs=y[idx])


LOCS = torch.tensor([-3.0, 3.0])


def mixture(x):
    """The issue's two-component mixture: c enumerated, empty guide."""
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Categorical(torch.tensor([0.3, 0.7])), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(LOCS[c], 1.0), obs=x)


def empty_guide(*args, **kwargs):
    pass


TRANS = torch.tensor([[0.9, 0.1], [0.2, 0.8]])


def hmm(x):
    """An HMM over x's columns (time), one chain per row, the states enumerated with pyro.markov."""
    with pyro.plate("data", x.shape[0]):
        z = 0
        for t in pyro.markov(range(x.shape[1])):
            z = pyro.sample(f"z_{t}", dist.Categorical(Vindex(TRANS)[z]), infer={"enumerate": "parallel"})
            pyro.sample(f"x_{t}", dist.Normal(LOCS[z], 1.0), obs=x[:, t])


def masked_model(x, mask):
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=x, obs_mask=mask)


def masked_guide(x, mask):
    with pyro.plate("data", len(x)), poutine.mask(mask=~mask):
        pyro.sample("x_unobserved", dist.Normal(pyro.param("m", torch.zeros(len(x))), 1.0))


def coin_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("obs", dist.Normal(2.0 * z, 1.0), obs=x)


def coin_guide(x):
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Bernoulli(logits=pyro.param("logits", torch.zeros(len(x)))))


def unmarked_model(x):
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Bernoulli(0.5))
        pyro.sample("obs", dist.Normal(2.0 * c, 1.0), obs=x)


def missing_model(x):
    tau = pyro.sample("tau", dist.Gamma(2.0, 2.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(0.0, tau), obs=x)


X = torch.tensor([-3.0, 0.0, 3.0, 5.0])


# ---- as_pair -----------------------------------------------------------------------------------------


def test_as_pair_on_a_module_with_methods_keeps_it_as_owner_with_its_hooks():
    vae = TinyVAE()
    pair = as_pair(vae)
    assert isinstance(vae, ModelGuidePair)
    assert pair.owner is vae and pair.model == vae.model and pair.guide == vae.guide
    assert pair.modules() == [vae]
    assert pair.parameters() == list(vae.parameters())
    assert pair.has("num_data") and pair.has("config") and not pair.has("log_weights")
    assert pair.hook("config") is vae.config
    assert as_pair(pair) is pair
    pair.eval()
    assert not vae.training
    pair.train()
    assert vae.training


@pytest.mark.parametrize("auto", [AutoNormal, AutoDiagonalNormal, AutoLowRankMultivariateNormal, AutoIAFNormal])
def test_as_pair_on_a_model_and_an_autoguide(auto):
    model = BayesLinear()
    guide = auto(model)
    x, y = torch.randn(6, 2), torch.randn(6)
    for pair in (as_pair((model, guide)), as_pair(model=model, guide=guide)):
        assert isinstance(pair, Pair) and pair.owner is None
        assert pair.model is model and pair.guide is guide
        assert pair.modules() == [model, guide]
        assert not pair.has("num_data") and pair.max_plate_nesting is None
    info = inspect_pair(pair, (x, y))
    assert set(info.model_only_latents) == set() and info.max_plate_nesting == 1
    assert {"linear.weight", "linear.bias"} <= set(info.latents)
    # the autoguide's parameters exist once it has run, and are the guide module's
    assert pair.parameters() and {id(p) for p in guide.parameters()} <= {id(p) for p in pair.parameters()}


def test_as_pair_refuses_what_is_not_a_pair():
    with pytest.raises(UsageError, match="not a model/guide pair"):
        as_pair(object())
    with pytest.raises(UsageError, match="must be \\(model, guide\\)"):
        as_pair((local_model, empty_guide, empty_guide))
    with pytest.raises(UsageError, match="guide must be callable"):
        as_pair((local_model, 3))
    with pytest.raises(UsageError, match="has no guide"):
        as_pair(model=local_model)
    with pytest.raises(UsageError, match="not both"):
        as_pair((local_model, empty_guide), model=local_model)


# ---- arguments and bind ------------------------------------------------------------------------------


def test_arguments_tensor_tuple_and_dict():
    x, y = torch.randn(5, 2), torch.randn(5)
    assert as_pair((local_model, empty_guide)).arguments(x) == ((x,), {})
    reg = as_pair((BayesLinear(), empty_guide))
    assert reg.arguments((x, y)) == ((x, y), {})
    assert reg.arguments([x, y]) == ((x, y), {})
    # dict keys naming the model's parameters -> keyword arguments (a PyroModule: its forward's signature)
    assert reg.arguments({"x": x, "y": y}) == ((), {"x": x, "y": y})
    # dict keys that are not parameters -> one positional argument (the multimodal models take a dict)
    batch = {"image": x, "label": y}
    assert as_pair(TinyVAE()).arguments(batch) == ((batch,), {})

    def kw_model(**kwargs):
        pass

    assert as_pair((kw_model, empty_guide)).arguments(batch) == ((), batch)


def test_bind_without_a_subsampled_plate_takes_the_rows():
    x, y = torch.arange(6.0), torch.arange(6.0) * 10
    idx = torch.tensor([4, 1])
    pair = as_pair((local_model, empty_guide))
    model, guide, args, kwargs = pair.bind(x, idx)
    assert model is local_model and guide is empty_guide
    assert args[0].tolist() == [4.0, 1.0] and kwargs == {}
    assert pair.bind(x) == (local_model, empty_guide, (x,), {})
    assert [t.tolist() for t in take_rows((x, y), idx)] == [[4.0, 1.0], [40.0, 10.0]]
    assert {k: v.tolist() for k, v in take_rows({"a": x, "b": y}, slice(0, 2)).items()} == {"a": [0, 1], "b": [0, 10]}


def test_bind_sets_the_indices_of_a_self_subsampled_plate_so_a_local_autonormal_trains_on_them():
    data = torch.randn(50)
    seen = []

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x), subsample_size=10) as idx:
            seen.append(idx.clone())
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x[idx])

    guide = AutoNormal(model)
    pair = as_pair((model, guide))
    info = inspect_pair(pair, data, rows=8)  # a self-subsampling pair keeps the full data
    assert info.subsampled and (info.num_data, info.batch_size) == (50, 10)
    assert guide.locs.z.shape == (50,)  # per-datapoint parameters for all N rows

    idx = torch.tensor([3, 7, 11, 12, 20, 21, 30, 33, 40, 49])
    model_b, guide_b, args, kwargs = pair.bind(data, idx, info)
    assert args[0] is data
    seen.clear()
    loss = Trace_ELBO().differentiable_loss(model_b, guide_b, *args, **kwargs)  # mismatch warnings are errors here
    loss.backward()
    assert [s.tolist() for s in seen] == [idx.tolist()]  # the model saw exactly these rows
    params = dict(guide.named_parameters())
    for param in (params["locs.z_unconstrained"], params["scales.z_unconstrained"]):
        rows = (param.grad != 0).nonzero().flatten()
        assert rows.tolist() == idx.tolist()  # those rows get gradients, the other 40 none
    with pytest.raises(UsageError, match="subsample_size=10"):
        pair.bind(data, idx[:7], info)


# ---- inspect_pair: exact records -------------------------------------------------------------------


def test_inspect_function_model_with_autonormal():
    pair = as_pair((local_model, AutoNormal(local_model)))
    info = inspect_pair(pair, X)
    assert info.sites == {
        "mu_unconstrained": site("mu_unconstrained", in_model=False, in_guide=True, reparameterized=True),
        "mu": site("mu", in_guide=True, reparameterized=True),
        "z_unconstrained": site("z_unconstrained", plates=("data",), in_model=False, in_guide=True, reparameterized=True),
        "z": site("z", plates=("data",), in_guide=True, reparameterized=True),
        "obs": site("obs", plates=("data",), observed=True),
    }
    assert (info.num_data, info.batch_size, info.subsampled, info.max_plate_nesting) == (4, 4, False, 1)
    assert info.global_latents == ("mu_unconstrained", "mu")
    assert info.model_only_latents == () and info.non_reparameterized == () and info.observed == ("obs",)
    assert valid_objectives(info) == ("trace", "meanfield", "enum", "tracegraph", "iwae", "renyi")


def test_inspect_module_with_methods():
    info = inspect_pair(TinyVAE(), torch.rand(5, 3).round())
    assert info.sites == {
        "z": site("z", plates=("data",), in_guide=True, reparameterized=True),
        "x": site("x", plates=("data",), observed=True, discrete=True),
    }
    assert info.global_latents == () and (info.num_data, info.batch_size) == (5, 5)


def test_inspect_pyromodule_with_autodiagonalnormal_has_one_global_latent():
    model = BayesLinear()
    info = inspect_pair((model, AutoDiagonalNormal(model)), {"x": torch.randn(6, 2), "y": torch.randn(6)})
    assert info.sites == {
        "_AutoDiagonalNormal_latent": site("_AutoDiagonalNormal_latent", in_model=False, in_guide=True, reparameterized=True),
        "linear.weight": site("linear.weight", in_guide=True, reparameterized=True),
        "linear.bias": site("linear.bias", in_guide=True, reparameterized=True),
        "obs": site("obs", plates=("data",), observed=True),
    }
    assert info.global_latents == ("_AutoDiagonalNormal_latent", "linear.weight", "linear.bias")


def test_inspect_pyro_param_guide():
    info = inspect_pair((param_model, param_guide), X)
    assert info.sites == {
        "z": site("z", plates=("data",), in_guide=True, reparameterized=True),
        "obs": site("obs", plates=("data",), observed=True),
    }
    assert set(pyro.get_param_store().keys()) == {"loc", "scale"}


def test_inspect_global_and_local_latents_with_a_subsampled_plate():
    x = torch.randn(50)
    y = 2 * x + 0.1 * torch.randn(50)
    info = inspect_pair((regression, AutoNormal(regression)), (x, y))
    assert info.sites == {
        "w_unconstrained": site("w_unconstrained", in_model=False, in_guide=True, reparameterized=True),
        "w": site("w", in_guide=True, reparameterized=True),
        "s_unconstrained": site("s_unconstrained", in_model=False, in_guide=True, reparameterized=True),
        "s": site("s", in_guide=True, reparameterized=True),
        "y": site("y", plates=("data",), observed=True, scaled=True),  # scaled by N/B = 5
    }
    assert (info.num_data, info.batch_size, info.subsampled) == (50, 10, True)
    assert info.scaled == ("y",)


def test_inspect_enumerated_mixture_with_an_empty_guide():
    info = inspect_pair((mixture, empty_guide), X)
    assert info.sites == {
        "c": site("c", plates=("data",), enumerated=True, discrete=True),
        "x": site("x", plates=("data",), observed=True),
    }
    assert info.enumerated == ("c",) and info.model_only_latents == ("c",) and info.max_plate_nesting == 1


@pytest.mark.parametrize("declared", [None, 1])
def test_inspect_markov_chain_enumerated_over_time(declared):
    x = torch.randn(3, 4)
    info = inspect_pair((hmm, empty_guide), x, max_plate_nesting=declared)
    expected = {}
    for t in range(4):
        expected[f"z_{t}"] = site(f"z_{t}", plates=("data",), enumerated=True, discrete=True)
        expected[f"x_{t}"] = site(f"x_{t}", plates=("data",), observed=True)
    assert info.sites == expected and info.max_plate_nesting == 1
    check_objective(info, "enum")
    refused(info, "trace", "'z_0'", "enum[:K]")


def test_inspect_partly_observed_site():
    x = torch.tensor([0.5, 0.0, -1.0])
    mask = torch.tensor([True, False, True])
    info = inspect_pair((masked_model, masked_guide), (x, mask))
    assert info.sites == {
        "x_unobserved": site("x_unobserved", plates=("data",), partly_observed=True, in_guide=True, reparameterized=True),
        "x_observed": site("x_observed", plates=("data",), observed=True, partly_observed=True),
        "x": site("x", plates=("data",), observed=True, partly_observed=True),
    }
    assert info.latents == ("x_unobserved",)


def test_inspect_non_reparameterised_guide_site():
    info = inspect_pair((coin_model, coin_guide), X)
    assert info.sites == {
        "z": site("z", plates=("data",), in_guide=True, discrete=True),
        "obs": site("obs", plates=("data",), observed=True),
    }
    assert info.non_reparameterized == ("z",)


def test_inspect_guide_missing_a_latent():
    info = inspect_pair((missing_model, empty_guide), X)
    assert info.sites == {"tau": site("tau"), "obs": site("obs", plates=("data",), observed=True)}
    assert info.model_only_latents == ("tau",) and info.global_latents == ("tau",)


def test_inspect_restores_the_rng_and_checks_the_declared_plate_nesting():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    inspect_pair((local_model, AutoNormal(local_model)), X)
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(UsageError, match="max_plate_nesting=0 .* 1 nested plate"):
        inspect_pair((hmm, empty_guide), torch.randn(3, 4), max_plate_nesting=0)
    with pytest.raises(UsageError, match="site 'z'.*plate stack overflow"):
        inspect_pair((local_model, empty_guide), X, max_plate_nesting=0)


def test_inspect_rows_slices_a_pair_that_does_not_subsample_itself():
    calls = []

    def model(x):
        calls.append(x.shape[0])
        local_model(x)

    info = inspect_pair((model, empty_guide), torch.randn(100), rows=8)
    assert (info.num_data, info.batch_size, info.subsampled) == (8, 8, False)
    assert calls[-1] == 8


def test_inspect_builtin_gmm():
    info = inspect_pair(GMM(1, 2), torch.randn(20, 1))
    assert info.sites == {
        "c": site("c", plates=("data",), enumerated=True, discrete=True),
        "x": site("x", plates=("data",), observed=True),
    }
    gmm = GMM(1, 2, mean_prior_scale=3.0)
    gmm.num_data = 600
    info = inspect_pair(gmm, torch.randn(20, 1))
    assert (info.num_data, info.batch_size, info.subsampled) == (600, 20, False)  # the batch is given, not drawn
    assert info.scaled == ("c", "x") and info.global_latents == ("means",)


# ---- check_objective ---------------------------------------------------------------------------------


def test_enumerated_sites_train_only_with_enum():
    info = inspect_pair((mixture, empty_guide), X)
    check_objective(info, "enum")
    check_objective(info, TraceEnum_ELBO(max_plate_nesting=1))
    for spec in ("trace", "meanfield", "tracegraph", "iwae:5", "renyi:0.5:5"):
        refused(info, spec, "'c'", "enumeration", "valid specs for this pair: enum[:K]")
    for elbo in (Trace_ELBO(), make_elbo("iwae:5"), make_elbo("tracegraph")):
        with pytest.raises(UsageError, match="'c'"):
            check_objective(info, elbo)


def test_builtin_gmm_refuses_trace_and_iwae():
    info = inspect_pair(GMM(1, 2), torch.randn(20, 1))
    refused(info, "trace", "'c'", "enum[:K]")
    refused(info, "iwae:5", "'c'", "enum[:K]")
    check_objective(info, "enum")


def test_unmarked_discrete_model_only_latent_is_refused_with_the_hint():
    info = inspect_pair((unmarked_model, empty_guide), X)
    for spec in ALL_SPECS:
        refused(info, spec, "'c'", "config_enumerate", "no objective trains this pair")


def test_continuous_model_only_latent_is_refused_for_every_objective():
    info = inspect_pair((missing_model, empty_guide), X)
    for spec in ALL_SPECS:
        refused(info, spec, "'tau'", "continuous", "add it to the guide")


def test_non_reparameterised_guide_sites_need_score_function_terms():
    info = inspect_pair((coin_model, coin_guide), X)
    for spec in ("trace", "tracegraph:2", "enum"):
        check_objective(info, spec)
    for spec in ("iwae:5", "renyi:0.5:5", "meanfield"):
        refused(info, spec, "'z'", "rsample", "valid specs for this pair: trace[:K], enum[:K], tracegraph[:K]")


def test_scaled_sites_refuse_iwae_and_renyi():
    x = torch.randn(50)
    info = inspect_pair((regression, AutoNormal(regression)), (x, x))
    check_objective(info, "trace")
    refused(info, "iwae:5", "'y'", "scaled")
    refused(info, "renyi:0.5:5", "'y'", "scaled")


def test_a_plain_reparameterised_pair_accepts_every_objective_and_unknown_elbos():
    info = inspect_pair(TinyVAE(), torch.rand(5, 3).round())
    for spec in ALL_SPECS:
        check_objective(info, spec)

    class MyELBO:
        pass

    check_objective(info, MyELBO())
    assert isinstance(info, PairInfo)


def test_inspect_nested_plates_outermost_first():
    """Factor analysis with a features plate inside the data plate: plates are listed outermost first."""

    def fa_model(x):
        w = pyro.sample("w", dist.Normal(torch.zeros(3, 1), 1.0).to_event(2))
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.plate("features", x.shape[1], dim=-1):
                pyro.sample("x", dist.Normal(z * w.T, 0.5), obs=x)

    def fa_guide(x):
        pyro.sample("w", dist.Normal(pyro.param("w_loc", torch.zeros(3, 1)), 1.0).to_event(2))
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1), 1.0))

    info = inspect_pair((fa_model, fa_guide), torch.randn(5, 3))
    assert info.sites == {
        "w": site("w", in_guide=True, reparameterized=True),
        "z": site("z", plates=("data",), in_guide=True, reparameterized=True),
        "x": site("x", plates=("data", "features"), observed=True),
    }
    assert info.max_plate_nesting == 2 and (info.num_data, info.batch_size) == (5, 5)


def test_minibatches_with_a_local_autoguide_need_a_self_subsampled_plate():
    x = torch.randn(40)
    pair = as_pair((local_model, AutoNormal(local_model)))
    info = inspect_pair(pair, x)
    with pytest.raises(UsageError, match="local latent 'z'.*subsample_size=10"):
        check_minibatching(pair, info, num_data=40, batch_size=10)
    check_minibatching(pair, info, num_data=40, batch_size=40)  # full batch: fine
    check_minibatching(as_pair(TinyVAE()), inspect_pair(TinyVAE(), torch.rand(4, 3)), num_data=40, batch_size=10)
    sub = as_pair((regression, AutoNormal(regression)))
    check_minibatching(sub, inspect_pair(sub, (x, x)), num_data=40, batch_size=10)


def test_a_batch_given_plate_with_subsample_indices_is_not_self_subsampled():
    """A model that scales its batch by N/B with subsample=arange(B) (as GMM does) is given its batch, with an autoguide too."""

    def scaled_model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", 100, subsample=torch.arange(len(x))):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    # AutoNormal creates its plate with subsample_size=4 of 100; the model's plate (indices given) decides
    info = inspect_pair((scaled_model, AutoNormal(scaled_model)), X)
    assert (info.num_data, info.batch_size, info.subsampled) == (100, 4, False)
    assert info.scaled == ("z_unconstrained", "z", "obs")
