"""PSIS k-hat: known tails, the exact-posterior degenerate case, a mismatched guide."""

import math

import numpy as np
import pytest
import torch

from inference import UsageError, evaluate, psis
from inference.psis import khat_summary, min_particles, psis_khat
from ppl_models.ppca import PPCA

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


@pytest.mark.parametrize("k", [0.2, 0.9])
def test_khat_recovers_a_pareto_tail(k):
    """w = u^(-k), u ~ U(0,1), is Pareto with shape k (tail index 1/k).

    With 4000 draws the GPD fit to the top ~190 weights has sd ~ (1+k)/sqrt(190)
    ~ 0.1 (Zhang & Stephens 2009); 0.25 is 2.5 sd for any one datapoint and the
    median over 40 datapoints is far tighter."""
    g = torch.Generator().manual_seed(0)
    lw = -k * torch.log(torch.rand(40, 4000, generator=g, dtype=torch.float64))
    khat = psis_khat(lw)
    assert abs(float(khat.median()) - k) < 0.1
    assert (khat - k).abs().max() < 0.35


def test_constant_weights_are_handled_without_nan():
    lw = torch.full((5, 100), -123.4, dtype=torch.float64)
    lw[0] += 1e-6 * torch.randn(100, dtype=torch.float64)  # round-off spread, below constant_tol
    khat = psis_khat(lw)
    assert torch.isinf(khat).all() and (khat < 0).all()
    s = khat_summary(khat)
    assert s == {
        "khat_below_0_5": 1.0, "khat_0_5_to_0_7": 0.0, "khat_above_0_7": 0.0,
        "khat_max": None, "khat_median": None, "khat_n": 5,
    }


def test_summary_fractions():
    s = khat_summary(torch.tensor([0.1, 0.49, 0.5, 0.7, 0.71, 2.0, -math.inf, 0.0]))
    assert (s["khat_below_0_5"], s["khat_0_5_to_0_7"], s["khat_above_0_7"]) == (4 / 8, 2 / 8, 2 / 8)
    assert s["khat_max"] == 2.0


@pytest.mark.parametrize(
    "bad", [torch.zeros(3, 10), torch.tensor([[0.0] * 30 + [float("nan")]]), torch.zeros(2, 3, 40)]
)
def test_bad_log_weights_are_usage_errors(bad):
    with pytest.raises(UsageError):
        psis_khat(bad)
    assert min_particles() == 21  # ceil(21/5) = 5 tail draws, the fewest a GPD fit takes


def _ppca(seed=0):
    torch.manual_seed(seed)
    m = PPCA(10, 3, guide="full").double()
    with torch.no_grad():
        m.W.normal_()
        m.mu.normal_()
        m.sigma_raw.fill_(0.0)
    return m, m.marginal().sample((100,)).detach()


@torch.no_grad()
def test_exact_posterior_gives_khat_below_half():
    """q = p(z | x): every weight equals p(x), so k-hat is -inf (< 0.5) for every point, never NaN."""
    m, x = _ppca()
    m.set_guide_to_posterior()
    for model in (m, m.float()):  # float32 round-off spreads the log weights by ~1e-5 nats only
        ev = evaluate(model, x.to(next(model.parameters()).dtype), particles=200, keep_log_weights=True)
        khat = psis_khat(ev.log_weights)
        assert not torch.isnan(khat).any()
        assert khat_summary(khat)["khat_below_0_5"] == 1.0


@torch.no_grad()
def test_badly_mismatched_guide_gives_khat_above_0_7():
    """A guide 20x narrower than the posterior: weights heavy-tailed (Yao et al. 2018); most k-hat > 0.7."""
    m, x = _ppca()
    m.set_guide_to_posterior()
    m.q_scale_raw.fill_(-3.0)  # scales softplus(-3) ~ 0.05
    m.q_tril_raw.zero_()
    ev = evaluate(m, x, particles=1000, keep_log_weights=True)
    s = khat_summary(psis_khat(ev.log_weights))
    # at this seed 87% of points exceed 0.7; half is a safe floor for "badly mismatched"
    assert s["khat_above_0_7"] > 0.5 and s["khat_median"] > 0.7


def _installed(name):
    try:
        psis._backend(name)
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not (_installed("arviz") and _installed("arviz_stats")), reason="needs both ArviZ 0.x and arviz_stats")
def test_both_arviz_generations_give_the_same_khat():
    """ArviZ 0.x's psislw takes log weights, arviz_stats' (ArviZ 1.x) takes log-likelihoods and negates
    them: with the sign handled, both estimate the same tail. Their Pareto fits differ in small details
    (prior regularisation of k-hat), so agreement is to 0.05 on 4000 draws per row, not to float error."""
    rng = np.random.default_rng(0)
    lw = torch.from_numpy(rng.normal(size=(6, 4000)) * np.linspace(0.5, 2.5, 6)[:, None])
    a = psis.psis_khat(lw, backend="arviz")
    b = psis.psis_khat(lw, backend="arviz_stats")
    assert torch.allclose(a, b, atol=0.05)
    # the sign matters: Gumbel log weights have a heavy right tail in w = exp(lw) (k-hat near 1),
    # their negation a light one; both generations must see the heavy one
    skewed = torch.from_numpy(rng.gumbel(size=(2, 4000)) * 1.5)
    heavy_a, heavy_b = psis.psis_khat(skewed, backend="arviz"), psis.psis_khat(skewed, backend="arviz_stats")
    light = psis.psis_khat(-skewed, backend="arviz")
    assert torch.all(heavy_a > light + 0.3) and torch.allclose(heavy_a, heavy_b, atol=0.05)


def test_unknown_backend_is_refused():
    with pytest.raises(UsageError, match="arviz_stats, arviz"):
        psis.psis_khat(torch.randn(2, 100), backend="stan")
