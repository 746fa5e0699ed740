"""Fusion rules against closed forms and explicit matrix-inverse references (float64 throughout)."""

import math

import pytest
import torch

from inference.errors import UsageError
from ppl_models import experts

RULES = [("poe", {}), ("poe", {"prior_expert": True}), ("moe", {}), ("mopoe", {}), ("code", {"rho": 0.4})]
# float64 inputs: closed form vs reference differ only by rounding, ~1e-15 relative; 1e-10 leaves room
# for the matrix inverse's conditioning at the largest correlations tried.
TOL = dict(rtol=1e-10, atol=1e-10)


def random_experts(*lead, m=3, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(*lead, m, d, generator=g, dtype=torch.float64) * 2
    scale = torch.rand(*lead, m, d, generator=g, dtype=torch.float64) * 2 + 0.05
    return loc, scale


def code_reference(loc, scale, rho):
    """N(B/A, 1/A) with A = 1' Sigma^-1 1, B = 1' Sigma^-1 mu by an explicit matrix inverse, per dimension."""
    n, dims = loc.shape
    means, variances = [], []
    for d in range(dims):
        s = torch.diag(scale[:, d])
        corr = (1 - rho) * torch.eye(n, dtype=loc.dtype) + rho * torch.ones(n, n, dtype=loc.dtype)
        inv = torch.linalg.inv(s @ corr @ s)
        one = torch.ones(n, dtype=loc.dtype)
        a, b = one @ inv @ one, one @ inv @ loc[:, d]
        means.append(b / a)
        variances.append(1 / a)
    return torch.stack(means), torch.stack(variances)


def test_subsets_enumerates_every_nonempty_subset_once():
    for m in range(1, 6):
        subs = experts.subsets(m)
        assert len(subs) == 2**m - 1 == len(set(subs))
        assert all(len(s) >= 1 and set(s) <= set(range(m)) for s in subs)


@pytest.mark.parametrize("mask", [None, (True, False, True, True)])
def test_code_rho_zero_is_poe_without_prior(mask):
    loc, scale = random_experts(5, m=4)
    c, p = experts.code(loc, scale, mask, rho=0.0), experts.poe(loc, scale, mask, prior_expert=False)
    # the tolerance; the two are the same arithmetic up to rounding
    assert torch.allclose(c.mean, p.mean, atol=1e-6, rtol=0)
    assert torch.allclose(c.variance, p.variance, atol=1e-6, rtol=0)


@pytest.mark.parametrize("m", [2, 3, 5])
@pytest.mark.parametrize("rho_fraction", [-0.9, -0.3, 0.2, 0.6, 0.95])
def test_code_matches_matrix_inverse(m, rho_fraction):
    # rho spans the valid interval (-1/(m-1), 1): negative values scale its lower end
    rho = rho_fraction / (m - 1) if rho_fraction < 0 else rho_fraction
    loc, scale = random_experts(m=m, d=6, seed=m)
    q = experts.code(loc, scale, rho=rho)
    mean, var = code_reference(loc, scale, rho)
    assert torch.allclose(q.mean, mean, **TOL)
    assert torch.allclose(q.variance, var, **TOL)
    w = experts.code_weights(scale, rho=rho)
    assert torch.allclose(w.sum(-2), torch.ones(6, dtype=w.dtype), **TOL)
    assert torch.allclose((w * loc).sum(-2), q.mean, **TOL)


def test_code_with_mask_matches_reference_on_present_experts():
    loc, scale = random_experts(m=4, d=3, seed=7)
    mask = torch.tensor([True, False, True, True])
    loc_nan = loc.clone()
    loc_nan[1] = float("nan")  # an absent expert's values are never read
    q = experts.code(loc_nan, scale, mask, rho=0.3)
    mean, var = code_reference(loc[mask], scale[mask], 0.3)
    assert torch.allclose(q.mean, mean, **TOL) and torch.allclose(q.variance, var, **TOL)


def test_code_equal_scales_variance_exceeds_poe():
    n, s, rho = 4, 0.7, 0.4
    loc = torch.randn(n, 2, dtype=torch.float64)
    scale = torch.full((n, 2), s, dtype=torch.float64)
    q = experts.code(loc, scale, rho=rho)
    expected = s**2 * (1 + (n - 1) * rho) / n
    assert torch.allclose(q.variance, torch.full((2,), expected, dtype=torch.float64), **TOL)
    assert torch.allclose(q.variance, code_reference(loc, scale, rho)[1], **TOL)
    assert (q.variance > experts.poe(loc, scale).variance).all()  # s^2/n: correlated experts add less
    # equal scales: every weight is 1/n, so the mean is the plain average
    assert torch.allclose(q.mean, loc.mean(0), **TOL)


def test_code_unequal_scales_variance_below_poe_and_negative_weights():
    # one sharp expert and two vague ones, positively correlated: the consensus subtracts the vague
    # experts' shared error, giving a variance below PoE's and negative weights on the vague experts
    loc = torch.tensor([[0.5], [2.0], [-1.0]], dtype=torch.float64)
    scale = torch.tensor([[0.1], [1.0], [1.0]], dtype=torch.float64)
    rho = 0.6
    q = experts.code(loc, scale, rho=rho)
    mean, var = code_reference(loc, scale, rho)
    assert torch.allclose(q.mean, mean, **TOL) and torch.allclose(q.variance, var, **TOL)
    assert (q.variance < experts.poe(loc, scale).variance).all()
    w = experts.code_weights(scale, rho=rho)
    assert (w[1:] < 0).all() and torch.allclose(w.sum(0), torch.ones(1, dtype=w.dtype), **TOL)


@pytest.mark.parametrize("rho,m", [(1.0, 2), (1.5, 3), (-0.5, 3), (-0.7, 3), (-1.0, 2), (-0.26, 5)])
def test_code_rejects_rho_outside_valid_interval(rho, m):
    loc, scale = random_experts(m=m)
    with pytest.raises(UsageError, match="rho must lie in"):
        experts.code(loc, scale, rho=rho)


def test_code_rho_bound_uses_present_experts():
    # with two of four experts present the interval is (-1, 1), so rho = -0.5 is valid
    loc, scale = random_experts(m=4)
    mask = (True, True, False, False)
    q = experts.code(loc, scale, mask, rho=-0.5)
    mean, var = code_reference(loc[:2], scale[:2], -0.5)
    assert torch.allclose(q.mean, mean, **TOL) and torch.allclose(q.variance, var, **TOL)


@pytest.mark.parametrize("rule,kw", [r for r in RULES if r[1] != {"prior_expert": True}])
def test_single_expert_passes_through(rule, kw):
    loc, scale = random_experts(3, m=3)
    q = experts.fuse(rule, loc, scale, (False, True, False), **kw)
    assert torch.allclose(q.mean, loc[..., 1, :], **TOL)
    assert torch.allclose(q.variance, scale[..., 1, :] ** 2, **TOL)
    z = torch.randn(3, 4, dtype=torch.float64)
    ref = torch.distributions.Normal(loc[..., 1, :], scale[..., 1, :]).log_prob(z).sum(-1)
    assert torch.allclose(q.log_prob(z), ref, **TOL)


@pytest.mark.parametrize("prior_expert", [False, True])
def test_poe_closed_form_and_variance_below_smallest_expert(prior_expert):
    loc, scale = random_experts(8, m=3)
    q = experts.poe(loc, scale, prior_expert=prior_expert)
    prec = scale.pow(-2).sum(-2) + (1.0 if prior_expert else 0.0)
    assert torch.allclose(q.variance, 1 / prec, **TOL)
    assert torch.allclose(q.mean, (loc * scale.pow(-2)).sum(-2) / prec, **TOL)
    assert (q.variance <= scale.pow(2).min(-2).values).all()


def test_moe_moments_log_prob_and_sampling():
    loc, scale = random_experts(2, m=3, d=2)
    q = experts.moe(loc, scale)
    mean = loc.mean(-2)
    var = scale.pow(2).mean(-2) + loc.var(-2, unbiased=False)  # mean of variances + variance of means
    assert torch.allclose(q.mean, mean, **TOL) and torch.allclose(q.variance, var, **TOL)
    z = torch.randn(2, 2, dtype=torch.float64)
    comp = torch.distributions.Normal(loc, scale).log_prob(z[:, None]).sum(-1)
    assert torch.allclose(q.log_prob(z), torch.logsumexp(comp, -1) - math.log(3), **TOL)
    # 200k reparameterised draws: sample mean within 5 standard errors of the closed form
    torch.manual_seed(0)
    draws = q.rsample((200_000,))
    se = (var / 200_000).sqrt()
    assert ((draws.mean(0) - mean).abs() < 5 * se).all()
    # sample variance: its SE is about var * sqrt(2/N) for near-Gaussian tails; mixtures are heavier, use 10x
    assert ((draws.var(0) - var).abs() < 10 * var * math.sqrt(2 / 200_000)).all()


def test_mixture_rsample_is_differentiable_in_locs_and_scales():
    loc, scale = random_experts(m=3, d=2)
    loc.requires_grad_(True)
    scale.requires_grad_(True)
    z = experts.moe(loc, scale).rsample((50,))
    z.sum().backward()
    # each draw moves one-for-one with its component's mean: the loc gradients count the draws per component
    assert loc.grad.sum().item() == pytest.approx(50 * 2)
    assert scale.grad.abs().sum() > 0


def test_mopoe_is_uniform_mixture_of_subset_poes():
    mask = torch.tensor([True, True, False, True])
    loc4, scale4 = random_experts(4, m=4)
    q = experts.mopoe(loc4, scale4, mask)
    present = [0, 1, 3]
    comps = [experts.poe(loc4[..., list(s), :], scale4[..., list(s), :]) for s in
             [tuple(present[i] for i in sub) for sub in experts.subsets(3)]]
    assert int(torch.isfinite(q.log_weights).sum()) == 7  # 2^3 - 1 valid subsets of 15
    assert torch.allclose(q.mean, torch.stack([c.mean for c in comps]).mean(0), **TOL)
    z = torch.randn(4, 4, dtype=torch.float64)
    lp = torch.logsumexp(torch.stack([c.log_prob(z) for c in comps]), 0) - math.log(7)
    assert torch.allclose(q.log_prob(z), lp, **TOL)


@pytest.mark.parametrize("rule,kw", RULES)
def test_masks_drop_modalities_exactly(rule, kw):
    loc, scale = random_experts(5, m=4)
    mask = (True, False, True, True)
    dropped_loc, dropped_scale = loc.clone(), scale.clone()
    dropped_loc[..., 1, :] = float("nan")
    dropped_scale[..., 1, :] = float("nan")
    q = experts.fuse(rule, dropped_loc, dropped_scale, mask, **kw)
    keep = [0, 2, 3]
    r = experts.fuse(rule, loc[..., keep, :], scale[..., keep, :], **kw)
    z = torch.randn(5, 4, dtype=torch.float64)
    for a, b in ((q.mean, r.mean), (q.variance, r.variance), (q.log_prob(z), r.log_prob(z))):
        assert torch.allclose(a, b, **TOL)  # equal up to the order of floating-point summation


@pytest.mark.parametrize("rule,kw", RULES)
def test_per_datapoint_masks_match_row_by_row(rule, kw):
    loc, scale = random_experts(3, m=3)
    mask = torch.tensor([[True, True, True], [False, True, False], [True, False, True]])
    q = experts.fuse(rule, loc, scale, mask, **kw)
    for i in range(3):
        r = experts.fuse(rule, loc[i], scale[i], mask[i], **kw)
        assert torch.allclose(q.mean[i], r.mean, **TOL) and torch.allclose(q.variance[i], r.variance, **TOL)


@pytest.mark.parametrize("rule,kw", RULES)
def test_empty_mask_is_rejected(rule, kw):
    loc, scale = random_experts(2, m=3)
    with pytest.raises(UsageError, match="at least one present expert"):
        experts.fuse(rule, loc, scale, torch.tensor([[True, False, False], [False, False, False]]), **kw)


def test_unknown_rule_is_rejected():
    loc, scale = random_experts(m=2)
    with pytest.raises(UsageError, match="valid: poe, moe, mopoe, code"):
        experts.fuse("sum", loc, scale)
