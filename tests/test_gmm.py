"""GMM: EM, SVI with enumerated assignments, exact scoring."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import multivariate_normal

from inference import UsageError, evaluate, fit, make_elbo
from ppl_models.gmm import GMM, em, kmeans_pp
from ppl_models.nets import softplus_inverse

TRUE_MEANS = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
TRUE_SD = 0.5
N = 600


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def synthetic(seed=0):
    """N points from three well-separated isotropic clusters (sd 0.5, centres >= 5 apart), equal weights."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(3, (N,), generator=g)
    return TRUE_MEANS[c] + TRUE_SD * torch.randn(N, 2, generator=g), c


def matched_error(est, true):
    """Largest distance between estimated and true means after the best one-to-one matching."""
    cost = torch.cdist(est.double(), true.double()).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].max())


def scipy_log_marginal(x, weights, means, covs, covariance):
    """Direct log-sum-exp over components with scipy's densities (an independent implementation)."""
    x, weights, means, covs = (t.detach().double().cpu().numpy() for t in (x, weights, means, covs))
    comps = []
    for k in range(len(weights)):
        cov = np.diag(covs[k]) if covariance == "diag" else covs[k]
        comps.append(np.log(weights[k]) + multivariate_normal(means[k], cov).logpdf(x))
    comps = np.stack(comps, -1)
    top = comps.max(-1, keepdims=True)
    return torch.from_numpy((top + np.log(np.exp(comps - top).sum(-1, keepdims=True)))[:, 0])


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_em_recovers_the_generating_mixture(covariance):
    x, _ = synthetic()
    r = em(x, 3, covariance=covariance)
    assert r.converged
    # each mean estimate has sd 0.5 / sqrt(200) = 0.035 per coordinate: 0.15 is > 4 sd
    assert matched_error(r.means, TRUE_MEANS) < 0.15
    # the MLE is at least as likely as the generating parameters (a feasible point of the same likelihood)
    true_ll = scipy_log_marginal(x, torch.full((3,), 1 / 3), TRUE_MEANS, torch.full((3, 2), TRUE_SD**2), "diag")
    assert r.log_likelihood >= float(true_ll.mean()) - 1e-9
    # interface: shapes, devices, a valid responsibility matrix
    assert r.covariances.shape == ((3, 2) if covariance == "diag" else (3, 2, 2))
    resp = r.responsibilities(x)
    torch.testing.assert_close(resp.sum(-1), torch.ones(N), rtol=0, atol=1e-6)
    assert torch.equal(r.predict(x), resp.argmax(-1))


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_log_marginal_matches_direct_logsumexp(covariance):
    x, _ = synthetic()
    r = em(x, 3, covariance=covariance, restarts=1)
    direct = scipy_log_marginal(x, r.weights, r.means, r.covariances, covariance)
    # EMResult works in float64: agreement to round-off; the GMM module is float32 (1e-4 relative)
    torch.testing.assert_close(r.log_marginal(x.double()), direct, rtol=1e-10, atol=1e-10)
    gmm = GMM.from_em(r)
    torch.testing.assert_close(gmm.log_marginal(x).double().detach(), direct, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_svi_with_enumeration_reaches_em(covariance):
    """Point-estimate SVI with c summed out maximises the same likelihood EM does.

    Both start from the same k-means++ seeding; with full-batch Adam (200 steps,
    lr 0.05) SVI gets to within 1e-3 nats per point of EM's optimum, far below
    the sampling resolution of the likelihood (its SE over 600 points is ~0.05
    nats), and its means match the true ones to the accuracy EM has (0.15)."""
    x, labels = synthetic()
    r = em(x, 3, covariance=covariance)
    gmm = GMM(2, 3, covariance).initialize(x, seed=1)
    fit(gmm, x, elbo="enum", epochs=200, batch_size=N, lr=0.05, progress=False, device="cpu")
    with torch.no_grad():
        ll = float(gmm.log_marginal(x).mean())
        pred = gmm.predict(x)
    assert abs(ll - r.log_likelihood) < 1e-3
    assert matched_error(gmm.means.detach(), TRUE_MEANS) < 0.15
    from sklearn.metrics import adjusted_rand_score

    # clusters 5 apart with sd 0.5: misassignment probability ~ Phi(-5) per point
    assert adjusted_rand_score(labels.numpy(), pred.numpy()) > 0.99


def test_enum_elbo_is_the_exact_log_likelihood(device):
    """TraceEnum_ELBO of the point-estimate GMM equals sum_n log p(x_n) (no bound, no noise)."""
    x, _ = synthetic()
    x = x.to(device)
    gmm = GMM(2, 3, "full").to(device).initialize(x, seed=0)
    loss = make_elbo("enum", max_plate_nesting=1).loss(gmm.model, gmm.guide, x)
    exact = float(gmm.log_marginal(x).sum().detach())
    # float32 sums of 600 terms ~ -3: round-off ~1e-4 relative
    assert abs(-loss - exact) <= 1e-4 * abs(exact)
    ev = evaluate(gmm, x, particles=3)
    assert abs(ev.log_likelihood - exact / N) < 1e-5 and abs(ev.elbo - exact / N) < 1e-5


def test_prior_proposal_importance_sampling_is_a_bound():
    """With c_k ~ pi as proposal, ELBO < IWAE_1000 <= log p(x) + 3 SE of the paired gap."""
    x, _ = synthetic()
    gmm = GMM.from_em(em(x, 3, restarts=1))
    exact = gmm.log_marginal(x).detach().double()
    gmm.proposal = "prior"
    ev = evaluate(gmm, x, particles=1000)
    gap = ev.log_likelihood_per_point - exact
    assert float(gap.mean()) <= 3 * float(gap.std() / N**0.5)
    # ELBO under the prior proposal is E_pi[log p(x | c)]: far below (clusters are far apart)
    assert ev.elbo < float(exact.mean()) - 1.0


def test_priors_give_the_global_elbo_with_minibatch_scaling():
    """With priors on the means and weights the enum ELBO is
    E_q[sum_n log p(x_n | theta)] (N/B)-scaled - KL(q(theta) || p(theta)).
    With the guide's scales at 1e-4 the expectation is the plug-in value to O(1e-8)."""
    x, _ = synthetic()
    r = em(x, 3, restarts=1)
    gmm = GMM(2, 3, mean_prior_scale=10.0, weight_concentration=2.0)
    gmm.set_parameters(r.weights, r.means, r.covariances)
    with torch.no_grad():
        gmm.means_scale_raw.fill_(-20.0)  # softplus(-20) + 1e-4 ~ 1e-4
        gmm.weight_conc_raw.copy_(softplus_inverse(1e5 * r.weights.float()))  # Dirichlet at r.weights, sd ~1.5e-3
    gmm.num_data = 2 * N  # the batch is half of the data set: likelihood scaled by 2
    elbo = make_elbo("enum:1000", max_plate_nesting=1)
    loss = elbo.loss(gmm.model, gmm.guide, x)
    q_means = torch.distributions.Normal(gmm.means, torch.nn.functional.softplus(gmm.means_scale_raw) + 1e-4)
    kl_means = torch.distributions.kl_divergence(q_means, torch.distributions.Normal(0.0, 10.0)).sum()
    conc = torch.nn.functional.softplus(gmm.weight_conc_raw)
    kl_w = torch.distributions.kl_divergence(
        torch.distributions.Dirichlet(conc), torch.distributions.Dirichlet(torch.full((3,), 2.0))
    )
    expected = 2 * gmm.log_marginal(x).sum() - kl_means - kl_w
    # Monte Carlo: log q - log p of a Gaussian (6 dims) / Dirichlet (2 free dims) sample has sd
    # sqrt(dims / 2), so 1000 particles leave sd sqrt(4 / 1000) = 0.063 nats; the guide's spread moves
    # the plug-in likelihood by ~0.01 nats (second order). 0.3 nats is ~5 sd.
    assert abs(-loss - float(expected.detach())) < 0.3


def test_pplm_train_gmm(tmp_path):
    """``pplm train gmm`` from EM's fit: the run's exact and importance-weighted test scores coincide,
    PSIS sees constant weights, and 3 Adam steps of lr 0.01 from EM's optimum keep its test
    log-likelihood to within 0.05 nats per point (each step moves a parameter by at most ~lr)."""
    import json

    from ppl_models.cli import main

    x, y = synthetic()
    data = tmp_path / "blobs.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    out = tmp_path / "run"
    argv = ["train", "gmm", "--dataset", str(data), "--clusters", "3", "--covariance", "full", "--min-scale", "0.05",
            "--init", "em", "--em-restarts", "2", "--epochs", "3", "--batch-size", "600", "--lr", "0.01",
            "--particles", "25", "--quiet", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["exact_test_log_likelihood"] == pytest.approx(m["test_log_likelihood"], abs=1e-5)
    assert m["test_elbo"] == pytest.approx(m["test_log_likelihood"], abs=1e-5)
    assert m["khat_below_0_5"] == 1.0 and m["khat_max"] is None
    assert abs(m["exact_test_log_likelihood"] - m["em_test_log_likelihood"]) < 0.05
    assert m["test_ari"] > 0.99 and m["em_test_ari"] > 0.99


def test_cli_options_and_refusals():
    from ppl_models.cli.recipe import RunConfig
    from ppl_models.cli.recipes import get_recipe

    recipe = get_recipe("gmm")
    with pytest.raises(UsageError, match="enum"):
        recipe.check(RunConfig(elbo="trace", options=recipe.Options()))
    with pytest.raises(UsageError):
        em(torch.zeros(5, 2), 6)
    with pytest.raises(UsageError):
        em(torch.tensor([[float("nan"), 0.0]]), 1)
    with pytest.raises(UsageError):
        GMM(2, 3, covariance="spherical")
    with pytest.raises(UsageError):
        kmeans_pp(torch.zeros(3, 2), 4)
