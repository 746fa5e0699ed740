"""The conformance zoo: small model/guide pairs written the way users write them, scored by evaluate.

Every entry has an exact log p(x) (closed form, the forward algorithm, a mixture sum). With the
exact posterior as guide every importance weight equals p(x), so evaluate must return it exactly
(float64: 1e-9; float32: 1e-5 relative); with any other guide ELBO <= IWAE_K per draw (Jensen) and
IWAE_K <= log p(x) up to Monte Carlo error (Burda et al. 2015), checked at a fixed seed.

``ZOO`` lists the entries. Every entry is also given to ``fit``'s engine: its first step's loss
and gradients must equal those of Pyro's own ELBO (Trace_ELBO, or TraceEnum_ELBO when a site is
enumerated) on the same draws to 1e-6 relative, or the engine refuses the pair up front in one
line naming the reason; entries with a ``fit`` check are then trained to their exact answer
(a conjugate posterior, the exact posterior of a local latent, the maximum of the likelihood).
Refusals (a guide missing a latent) are tested at the end.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.nn import PyroModule, PyroParam

from inference import Trainer, UsageError, evaluate, fit
from inference.pair import inspect_pair
from ppl_models.gmm import GMM

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster

F64 = torch.float64


@dataclass
class Case:
    """One built zoo pair: what evaluate gets and the exact answer.

    ``exact``: log p(x_n) per point (N,) for per-datapoint pairs, or log p(X) (a float) for
    whole-data ones; ``guide_is_exact``: the guide is the exact posterior (equality expected)."""

    pair: object
    data: object
    exact: object
    scope: str
    guide_is_exact: bool
    particles: int = 500
    tol: float = 1e-9


@dataclass
class Entry:
    name: str
    build: Callable[[], Case]
    fit: Optional[Callable] = None  # a fit-based check of this entry: fit(case) -> None (asserts)
    refused: Optional[str] = None  # the engine refuses this pair up front: a fragment of its one-line reason


# ---- 1. an enumerated two-component mixture with an empty guide --------------------------------
def mixture_model(x):
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Categorical(torch.tensor([0.3, 0.7])), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(torch.tensor([-3.0, 3.0])[c], 1.0), obs=x)


def mixture_guide(x):
    pass


def mixture_exact(x):
    return torch.logsumexp(
        torch.stack([math.log(0.3) + dist.Normal(-3.0, 1.0).log_prob(x), math.log(0.7) + dist.Normal(3.0, 1.0).log_prob(x)]), 0
    )


def build_mixture():
    x = torch.tensor([-3.0, 0.0, 3.0, 5.0])
    # no continuous latent: every weight is the exact mixture density (float32 round-off)
    return Case((mixture_model, mixture_guide), x, mixture_exact(x), "per-datapoint", True, particles=2000, tol=1e-6)


# ---- 2. an HMM-like chain enumerated over time with pyro.markov ---------------------------------
HMM_INIT = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
HMM_TRANS = torch.tensor([[0.8, 0.15, 0.05], [0.1, 0.7, 0.2], [0.25, 0.25, 0.5]], dtype=F64)
HMM_LOCS = torch.tensor([-2.0, 0.0, 2.5], dtype=F64)


def hmm_model(x):  # x: (B, T) sequences, one per datapoint
    z = None
    with pyro.plate("data", x.shape[0]):
        for t in pyro.markov(range(x.shape[1])):
            probs = HMM_INIT if z is None else HMM_TRANS[z]
            z = pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
            pyro.sample(f"x_{t}", dist.Normal(HMM_LOCS[z], 1.0), obs=x[:, t])


def hmm_guide(x):
    pass


def forward_algorithm(x):
    """log p(x_{1:T}) per sequence by the forward recursion, in float64."""
    emit = dist.Normal(HMM_LOCS, 1.0).log_prob(x.unsqueeze(-1))  # (B, T, S)
    alpha = HMM_INIT.log() + emit[:, 0]
    for t in range(1, x.shape[1]):
        alpha = torch.logsumexp(alpha.unsqueeze(-1) + HMM_TRANS.log(), dim=-2) + emit[:, t]
    return torch.logsumexp(alpha, -1)


def build_hmm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, generator=g, dtype=F64) * 2.0  # T = 50, 3 states: 3^50 paths by brute force
    return Case((hmm_model, hmm_guide), x, forward_algorithm(x), "per-datapoint", True, particles=10, tol=1e-9)


# ---- 3. the built-in GMM through the generic path (a (model, guide) tuple: no log_weights hook) ----
def build_gmm():
    gmm = GMM(2, 3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 2, generator=g) * 2.0
    with torch.no_grad():
        gmm.means.copy_(torch.randn(3, 2, generator=g) * 2.0)
    exact = gmm.log_marginal(x).detach()
    return Case((gmm.model, gmm.guide), x, exact, "per-datapoint", True, particles=5, tol=1e-5)


# ---- 4. Bayesian linear regression, function model, pyro.param guide, (X, y) tuple batch --------
REG_S = 0.5


def regression_model(X, y):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1), REG_S), obs=y)


def regression_guide(X, y):
    loc = pyro.param("w_loc", lambda: X.new_zeros(X.shape[1]))
    tril = pyro.param("w_tril", lambda: torch.eye(X.shape[1], dtype=X.dtype), constraint=dist.constraints.lower_cholesky)
    pyro.sample("w", dist.MultivariateNormal(loc, scale_tril=tril))


def regression_data():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(30, 3, generator=g, dtype=F64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + REG_S * torch.randn(30, generator=g, dtype=F64)
    cov = X @ X.T + REG_S**2 * torch.eye(30, dtype=F64)
    exact = float(dist.MultivariateNormal(torch.zeros(30, dtype=F64), cov).log_prob(y))
    post_cov = torch.linalg.inv(torch.eye(3, dtype=F64) + X.T @ X / REG_S**2)
    return X, y, exact, post_cov @ X.T @ y / REG_S**2, post_cov


def build_regression_exact():
    X, y, exact, mean, cov = regression_data()
    pyro.param("w_loc", mean)
    pyro.param("w_tril", torch.linalg.cholesky(cov), constraint=dist.constraints.lower_cholesky)
    return Case((regression_model, regression_guide), (X, y), exact, "whole-data", True, particles=20, tol=1e-9)


def build_regression_worse():
    X, y, exact, mean, cov = regression_data()
    pyro.param("w_loc", mean + 0.05)
    pyro.param("w_tril", 1.5 * torch.linalg.cholesky(cov), constraint=dist.constraints.lower_cholesky)
    return Case((regression_model, regression_guide), (X, y), exact, "whole-data", False, particles=2000)


# ---- 5. global + local latents with a self-subsampled plate --------------------------------------
SUB_B = 4


def sub_model(x):
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), 1.0))
    with pyro.plate("data", x.shape[0], subsample_size=SUB_B) as idx:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])


def sub_guide(x):
    n = x.shape[0]
    # exact posterior: x_n | mu ~ N(mu, 2), so mu | X ~ N((sum x / 2) / (1 + n / 2), 1 / (1 + n / 2)),
    # and z_n | mu, x_n ~ N((mu + x_n) / 2, 1 / 2)
    shift = pyro.param("sub_shift", lambda: x.new_zeros(()))
    prec = 1.0 + n / 2
    mu = pyro.sample("mu", dist.Normal(x.sum() / 2 / prec + shift, prec**-0.5))
    with pyro.plate("data", n, subsample_size=SUB_B) as idx:
        pyro.sample("z", dist.Normal((mu + x[idx]) / 2, math.sqrt(0.5)))


def build_subsampled(shift=0.0):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, generator=g, dtype=F64) + 1.0  # N = 10, B = 4: groups 0-3, 4-7, 6-9 (overlap)
    pyro.param("sub_shift", torch.tensor(shift, dtype=F64))
    cov = 2.0 * torch.eye(10, dtype=F64) + 1.0
    exact = float(dist.MultivariateNormal(torch.zeros(10, dtype=F64), cov).log_prob(x))
    return Case((sub_model, sub_guide), x, exact, "whole-data", shift == 0.0, particles=20 if shift == 0.0 else 3000)


# ---- 6. local latents with an AutoNormal guide; 7. a global latent with AutoDiagonalNormal ---------
def local_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def build_autonormal():
    x = torch.linspace(-2.0, 2.0, 8, dtype=F64)
    return Case((local_model, AutoNormal(local_model, init_scale=0.5)), x, dist.Normal(0.0, math.sqrt(2.0)).log_prob(x), "per-datapoint", False, 2000)


def global_model(x):
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def build_autodiagonal():
    x = torch.tensor([0.5, -1.0, 2.0, 0.3, 1.1], dtype=F64)
    exact = float(dist.MultivariateNormal(torch.zeros(5, dtype=F64), torch.eye(5, dtype=F64) + 1.0).log_prob(x))
    guide = AutoDiagonalNormal(global_model, init_scale=0.5)
    return Case((global_model, guide), x, exact, "whole-data", False, particles=2000)


# ---- 8. factor analysis as a PyroModule with model/guide methods (exact posterior guide) ----------
class FactorAnalysis(PyroModule):
    """z ~ N(0, I_L), x | z ~ N(W z + mu, diag(psi^2)): log p(x) = N(x; mu, W W^T + diag(psi^2))."""

    def __init__(self, W, mu, psi):
        super().__init__()
        self.W, self.mu, self.psi = PyroParam(W), PyroParam(mu), PyroParam(psi, constraint=dist.constraints.positive)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.W.shape[1]), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.mu, self.psi).to_event(1), obs=x)

    def posterior(self, x):
        """p(z | x) = N(S W^T Psi^-1 (x - mu), S), S = (I + W^T Psi^-1 W)^-1 (Bishop 2006, eq. 12.42)."""
        wp = self.W.T / self.psi**2
        cov = torch.linalg.inv(torch.eye(self.W.shape[1], dtype=x.dtype) + wp @ self.W)
        return (x - self.mu) @ (cov @ wp).T, torch.linalg.cholesky(cov)

    def guide(self, x):
        loc, tril = self.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=tril))


def build_factor_analysis():
    g = torch.Generator().manual_seed(4)
    W, mu = torch.randn(6, 2, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    psi = 0.3 + torch.rand(6, generator=g, dtype=F64)
    fa = FactorAnalysis(W, mu, psi)
    x = dist.LowRankMultivariateNormal(mu, W, psi**2).sample((25,))
    exact = dist.LowRankMultivariateNormal(mu, W, psi**2).log_prob(x)
    return Case(fa, x, exact, "per-datapoint", True, particles=20)


# ---- 9. a non-reparameterised guide site, in an nn.Module with methods ----------------------------
class SignModel(nn.Module):
    """s ~ Bernoulli(0.3), x | s ~ N(2 s - 1, 1); the guide samples s from q(s | x) (no rsample)."""

    def __init__(self, exact=True):
        super().__init__()
        self.exact = exact

    def posterior(self, x):
        log1 = math.log(0.3) + dist.Normal(1.0, 1.0).log_prob(x)
        log0 = math.log(0.7) + dist.Normal(-1.0, 1.0).log_prob(x)
        return torch.sigmoid(log1 - log0) if self.exact else torch.full_like(x, 0.5)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            s = pyro.sample("s", dist.Bernoulli(x.new_full(x.shape, 0.3)))
            pyro.sample("x", dist.Normal(2 * s - 1, 1.0), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("s", dist.Bernoulli(self.posterior(x)))


def build_sign(exact=True):
    x = torch.tensor([-2.0, -0.5, 0.0, 0.7, 3.0], dtype=F64)
    lp = torch.logaddexp(math.log(0.3) + dist.Normal(1.0, 1.0).log_prob(x), math.log(0.7) + dist.Normal(-1.0, 1.0).log_prob(x))
    return Case(SignModel(exact), x, lp, "per-datapoint", exact, particles=20 if exact else 2000)


# ---- 10. a partly observed site (obs_mask) --------------------------------------------------------
def masked_model(x, mask):
    with pyro.plate("data", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1), 1.0))
        with pyro.plate("dims", x.shape[1], dim=-1):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x, obs_mask=mask)


def masked_guide(x, mask):
    # exact: z | x_obs ~ N(sum_obs x / (1 + m), 1 / (1 + m)), m observed entries; x_miss | z ~ N(z, 1)
    m = mask.sum(-1, keepdim=True).to(x.dtype)
    a = pyro.param("mask_a", lambda: x.new_tensor(1.0))  # 1 gives the exact posterior
    with pyro.plate("data", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Normal(a * (x * mask).sum(-1, keepdim=True) / (1 + m), (1 + m) ** -0.5))
        with pyro.plate("dims", x.shape[1], dim=-1):
            pyro.sample("x_unobserved", dist.Normal(z.expand(z.shape[:-1] + x.shape[-1:]), 1.0).mask(~mask))


def build_masked():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0], [1, 0, 0]], dtype=torch.bool)
    exact = torch.stack(
        [
            dist.MultivariateNormal(torch.zeros(int(r.sum()), dtype=F64), torch.eye(int(r.sum()), dtype=F64) + 1.0).log_prob(v[r])
            for v, r in zip(x, mask)
        ]
    )
    return Case((masked_model, masked_guide), (x, mask), exact, "per-datapoint", True, particles=20)


# ---- fit checks: trained from a worse start to the exact answer ------------------------------------
def fit_regression(case):
    """The guide's family (a full-covariance Gaussian) holds the conjugate posterior: from a zero mean and
    identity covariance, full-batch SVI reaches its mean within 0.02 (posterior sds 0.09 or more) and the
    whole-data ELBO reaches log p(y) / N within 0.01 nats."""
    X, y, exact, mean, cov = regression_data()
    pyro.get_param_store().clear()
    fit(case.pair, (X, y), epochs=1500, batch_size=30, lr=0.05, progress=False, device="cpu",
        scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.997))
    assert (pyro.param("w_loc").detach() - mean).abs().max() < 0.02
    assert evaluate(case.pair, (X, y), particles=200).elbo == pytest.approx(exact / 30, abs=0.01)


def fit_subsampled(case):
    """Minibatches of B = 4 of N = 10 through the model's own subsampled plate: the guide's shift, started at
    0.3, reaches the exact posterior's 0 within 0.1 (its posterior sd is 0.41)."""
    pyro.set_rng_seed(0)
    fit(case.pair, case.data, epochs=500, batch_size=SUB_B, lr=0.01, progress=False, device="cpu",
        scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.995))
    assert abs(float(pyro.param("sub_shift").detach())) < 0.1


def fit_local_autonormal(case):
    """z_n | x_n ~ N(x_n / 2, 1/2) exactly; AutoNormal's per-point locs and scales reach it within 0.05."""
    model, guide = case.pair
    pyro.set_rng_seed(0)
    fit(case.pair, case.data, epochs=1500, batch_size=8, lr=0.05, progress=False, device="cpu",
        scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.997))
    assert (guide.locs.z.detach() - case.data / 2).abs().max() < 0.05
    assert (guide.scales.z.detach() - math.sqrt(0.5)).abs().max() < 0.05


def fit_autodiagonal(case):
    """mu | x ~ N(sum x / (1 + n), 1 / (1 + n)) lies in AutoDiagonalNormal's family: reached within 0.05."""
    x = case.data
    model, guide = case.pair
    pyro.set_rng_seed(0)
    fit(case.pair, x, epochs=1500, batch_size=5, lr=0.05, progress=False, device="cpu",
        scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.997))
    loc, scale = guide.get_posterior().base_dist.loc, guide.get_posterior().base_dist.scale
    assert float(loc.detach()) == pytest.approx(float(x.sum() / 6), abs=0.05)
    assert float(scale.detach()) == pytest.approx(6**-0.5, abs=0.05)


def fit_factor_analysis(case):
    """With the exact posterior as guide the ELBO is log p(x), so SVI maximises the likelihood: from a
    perturbed start it reaches scikit-learn's FactorAnalysis maximum (a well-kept EM/SVD reference) within
    0.05 nats per point."""
    from sklearn.decomposition import FactorAnalysis as SkFA

    fa, x = case.pair, case.data
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        fa.W_unconstrained.add_(0.5 * torch.randn(fa.W.shape, generator=g, dtype=F64))
        fa.mu_unconstrained.add_(0.5)
    fit(fa, x, epochs=1500, batch_size=x.shape[0], lr=0.02, progress=False, device="cpu")
    reference = SkFA(n_components=2, tol=1e-6, max_iter=100000).fit(x.numpy()).score(x.numpy())
    with torch.no_grad():
        got = float(dist.LowRankMultivariateNormal(fa.mu, fa.W, fa.psi**2).log_prob(x).mean())
    assert got == pytest.approx(reference, abs=0.05)


def fit_partly_observed(case):
    """The guide's location factor a (exact at 1), started at 0.5, reaches 1 within 0.05 (full batch)."""
    x, mask = case.data
    pyro.param("mask_a", torch.tensor(0.5, dtype=F64))
    pyro.set_rng_seed(0)
    fit(case.pair, (x, mask), epochs=1500, batch_size=6, lr=0.05, progress=False, device="cpu",
        scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.997))
    assert float(pyro.param("mask_a").detach()) == pytest.approx(1.0, abs=0.05)


NO_PARAMETERS = "has no parameters to optimise"

ZOO = [
    Entry("enumerated-mixture", build_mixture, refused=NO_PARAMETERS),
    Entry("markov-chain", build_hmm, refused=NO_PARAMETERS),
    Entry("gmm-generic-path", build_gmm),
    Entry("regression-param-guide-exact", build_regression_exact),
    Entry("regression-param-guide-worse", build_regression_worse, fit=fit_regression),
    Entry("global-local-subsampled-exact", build_subsampled),
    Entry("global-local-subsampled-worse", lambda: build_subsampled(shift=0.3), fit=fit_subsampled),
    Entry("local-autonormal", build_autonormal, fit=fit_local_autonormal),
    Entry("global-autodiagonalnormal", build_autodiagonal, fit=fit_autodiagonal),
    Entry("factor-analysis-pyromodule", build_factor_analysis, fit=fit_factor_analysis),
    Entry("non-reparameterised-exact", build_sign, refused=NO_PARAMETERS),
    Entry("non-reparameterised-worse", lambda: build_sign(exact=False), refused=NO_PARAMETERS),
    Entry("partly-observed", build_masked, fit=fit_partly_observed),
]


def _whole_or_mean(case):
    return case.exact / _length(case.data) if case.scope == "whole-data" else float(case.exact.double().mean())


def _length(data):
    return (data[0] if isinstance(data, tuple) else data).shape[0]


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_evaluate_matches_exact_log_likelihood(entry):
    case = entry.build()
    ev = evaluate(case.pair, case.data, particles=case.particles, keep_log_weights=True)
    assert ev.scope == case.scope
    truth = _whole_or_mean(case)
    if case.scope == "whole-data":
        assert ev.elbo_per_point is None and ev.log_likelihood_per_point is None and ev.log_weights.shape == (1, case.particles)
    if case.guide_is_exact:
        # q = p(z | x): every weight is p(x); the scope's mean (per point, or whole-data / N) is exact
        assert ev.log_likelihood == pytest.approx(truth, abs=case.tol * (1 + abs(truth)))
        assert ev.elbo == pytest.approx(truth, abs=case.tol * (1 + abs(truth)))
        if case.scope == "per-datapoint":
            exact = case.exact.double()
            assert torch.allclose(ev.log_likelihood_per_point, exact, rtol=0, atol=case.tol * (1 + float(exact.abs().max())))
        return
    # a worse guide: ELBO < IWAE_K (Jensen, same draws) and IWAE_K <= log p(x) + 3 MC standard errors
    lw = ev.log_weights.double()  # (N, K) or (1, K)
    k = lw.shape[1]
    w = torch.exp(lw - lw.max(1, keepdim=True).values)
    mc_se = (w.std(1) / w.mean(1) / math.sqrt(k)).pow(2).sum().sqrt() / _length(case.data)  # delta method, over N
    assert ev.elbo < ev.log_likelihood - 1e-3
    assert ev.log_likelihood <= truth + 3 * float(mc_se)
    assert ev.elbo < truth


def test_markov_chain_cost_is_linear():
    """T = 200 (3^200 paths) runs through the contraction and still equals the forward algorithm."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 200, generator=g, dtype=F64)
    ev = evaluate((hmm_model, hmm_guide), x, particles=1)
    assert torch.allclose(ev.log_likelihood_per_point, forward_algorithm(x), rtol=0, atol=1e-9)


def test_mixture_with_one_particle_is_exact():
    x = torch.tensor([-3.0, 0.0, 3.0, 5.0])
    ev = evaluate((mixture_model, mixture_guide), x, particles=1)
    assert ev.log_likelihood == pytest.approx(-3.023, abs=5e-4)  # the value
    assert ev.log_likelihood == pytest.approx(float(mixture_exact(x).mean()), abs=1e-6)


# ---- refusals --------------------------------------------------------------------------------
def guide_without_z(x):
    pass


def discrete_model(x):
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Bernoulli(x.new_full(x.shape, 0.3)))
        pyro.sample("x", dist.Normal(2 * c - 1, 1.0), obs=x)


def test_guide_missing_a_continuous_latent_is_refused():
    with pytest.raises(UsageError, match=r"'z' is continuous, in the model only.*add it to the guide"):
        evaluate((local_model, guide_without_z), torch.zeros(4, dtype=F64), particles=3)


def test_a_pair_that_does_not_broadcast_over_the_particle_plate_is_refused_in_one_line():
    """``X @ w`` cannot take evaluate's particle dimension: one UsageError with the remedy, not Pyro's traceback;
    the keyword form model=/guide= is the tuple form."""

    def model(X, y):
        w = pyro.sample("w", dist.Normal(X.new_zeros(3), 1.0).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Normal(X @ w, REG_S), obs=y)

    X, y, *_ = regression_data()
    with pytest.raises(UsageError, match=r"broadcast over extra leading dimensions.*\(x \* w\)\.sum\(-1\)"):
        evaluate(model=model, guide=regression_guide, data=(X, y), particles=4)


def test_unmarked_discrete_model_only_latent_is_refused_with_the_hint():
    with pytest.raises(UsageError, match=r"'c' is discrete.*enumerate"):
        evaluate((discrete_model, guide_without_z), torch.zeros(4, dtype=F64), particles=3)


# ---- the engine on every entry ----------------------------------------------------------------------
def _batch_size(case):
    info_b = SUB_B if case.pair == (sub_model, sub_guide) else None
    return info_b or _length(case.data)


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_first_step_equals_pyros_own_elbo_or_is_refused(entry):
    """The engine's step loss and gradients on an entry are Pyro's own (same seed, same draws, rel 1e-6)."""
    case = entry.build()
    n = _length(case.data)
    spec = "enum" if inspect_pair(case.pair, case.data).enumerated else "trace"
    if entry.refused:
        with pytest.raises(UsageError, match=entry.refused):
            Trainer(case.pair, case.data, elbo=spec, batch_size=n, lr=1e-3, device="cpu")
        return
    trainer = Trainer(case.pair, case.data, elbo=spec, batch_size=_batch_size(case), lr=1e-3, device="cpu")
    info = trainer.info
    index = torch.arange(info.batch_size if info.subsampled else n)
    pyro.set_rng_seed(11)
    ours = trainer.loss_of(case.data, index)
    grads = torch.autograd.grad(ours, trainer.params, allow_unused=True)
    # Pyro's own objective on the same bound call (its differentiable_loss: a PyroModule's methods called
    # outside its __call__ record no param sites, so loss_and_grads would not see their parameters)
    reference = TraceEnum_ELBO(max_plate_nesting=info.max_plate_nesting) if spec == "enum" else Trace_ELBO()
    model, guide, args, kwargs = trainer.pair.bind(case.data, index, info)
    pyro.set_rng_seed(11)
    theirs = reference.differentiable_loss(model, guide, *args, **kwargs)
    their_grads = torch.autograd.grad(theirs, trainer.params, allow_unused=True)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-6)
    for p, g, want in zip(trainer.params, grads, their_grads):
        want = torch.zeros_like(p) if want is None else want
        got = torch.zeros_like(p) if g is None else g
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max().clamp_min(1e-30)))


@pytest.mark.parametrize("entry", [e for e in ZOO if e.fit is not None], ids=lambda e: e.name)
def test_fit(entry):
    entry.fit(entry.build())
