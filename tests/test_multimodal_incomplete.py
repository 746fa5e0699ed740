"""MultimodalVAE on incomplete samples, with likelihood weights and the cross objective.

* values under an absent mask change nothing, bit for bit (NaN there included);
* a batch with per-sample masks has the same ELBO as the batch split by presence pattern, each
  part holding only its present modalities (same random draws, float64: 1e-9);
* weights of 1 give exactly the unweighted loss; a weight lambda adds (lambda - 1) log p(x_m | z);
* the cross objective is the explicit sum of single-expert ELBOs.
"""

import pyro
import pyro.poutine as poutine
import pytest
import torch

from inference import evaluate, make_elbo
from inference.errors import UsageError
from inference.metrics import PRESENT
from ppl_models.multimodal import MultimodalVAE, likelihood_weights, modality

MODS = [modality("a", 5, "bernoulli"), modality("b", 4, "normal"), modality("label", 3, "categorical")]
NAMES = ["a", "b", "label"]
# per-row presence of (a, b, label): every pattern with at least one modality, some twice
PATTERNS = [(1, 1, 1), (1, 0, 1), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 1, 1), (0, 1, 1), (1, 0, 0), (0, 1, 0)]


def build(rule="mopoe", rho=0.0, **kw):
    pyro.set_rng_seed(0)
    return MultimodalVAE(MODS, latent_dim=3, hidden=(8,), rule=rule, rho=rho, **kw)


def make_batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    n = len(PATTERNS)
    return {
        "a": torch.bernoulli(torch.full((n, 5), 0.4), generator=g).to(dtype),
        "b": torch.randn(n, 4, generator=g, dtype=dtype),
        "label": torch.randint(0, 3, (n,), generator=g),
        PRESENT: torch.tensor(PATTERNS, dtype=torch.bool),
    }


def loss_and_grads(module, batch, seed=5):
    module.zero_grad()
    pyro.set_rng_seed(seed)
    loss = make_elbo("trace", max_plate_nesting=2).differentiable_loss(module.model, module.guide, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.parameters() if p.grad is not None]


CASES = [("poe", 0.0, "joint", "uniform", 0), ("moe", 0.0, "subset", "uniform", 2),
         ("mopoe", 0.0, "subset", "learned", 0), ("code", 0.3, "cross", "uniform", 2)]


@pytest.mark.parametrize("rule,rho,objective,weights,private", CASES)
def test_values_under_an_absent_mask_change_nothing(rule, rho, objective, weights, private):
    module = build(rule, rho, objective=objective, subset_weights=weights, private_dim=private)
    batch = make_batch()
    other = dict(batch)
    absent = ~batch[PRESENT]
    other["a"] = torch.where(absent[:, :1], torch.nan, batch["a"])
    other["b"] = torch.where(absent[:, 1:2], torch.tensor(1e30), batch["b"])
    other["label"] = torch.where(absent[:, 2], torch.tensor(-7), batch["label"])
    loss, grads = loss_and_grads(module, batch)
    loss2, grads2 = loss_and_grads(module, other)
    assert torch.isfinite(loss) and torch.equal(loss, loss2)
    assert len(grads) == len(grads2) and all(torch.equal(g, h) for g, h in zip(grads, grads2))
    for f in (lambda b: module.log_weights(b, 4), lambda b: module.impute(b)["b"], lambda b: module.embed(b)):
        pyro.set_rng_seed(2)
        x = f(batch)
        pyro.set_rng_seed(2)
        assert torch.equal(x, f(other))


def _trace_value(module, batch, condition=None):
    guide = module.guide if condition is None else poutine.condition(module.guide, data=condition)
    g = poutine.trace(guide).get_trace(batch)
    for name in condition or ():
        g.nodes[name]["is_observed"] = False  # a fixed draw, replayed into the model as one
    m = poutine.trace(poutine.replay(module.model, trace=g)).get_trace(batch)
    return m.log_prob_sum() - g.log_prob_sum(), g


@pytest.mark.parametrize("rule,rho,objective,weights,private", CASES)
def test_masked_batch_equals_the_sum_over_presence_patterns(rule, rho, objective, weights, private):
    module = build(rule, rho, objective=objective, subset_weights=weights, private_dim=private).double()
    if weights == "learned":
        with torch.no_grad():
            module.subset_logits.copy_(torch.linspace(-1, 1, 7, dtype=torch.float64))
    batch = make_batch(torch.float64)
    pyro.set_rng_seed(3)
    whole, trace = _trace_value(module, batch)
    z = trace.nodes["z"]["value"]
    copies = [(m,) for m in NAMES] if objective == "cross" else module.subsets(NAMES)
    total, patterns = 0.0, sorted(set(PATTERNS))
    for pattern in patterns:
        rows = torch.tensor([i for i, p in enumerate(PATTERNS) if p == pattern])
        names = [m for m, p in zip(NAMES, pattern) if p]
        part = {m: batch[m][rows] for m in names}  # only the present modalities, no mask
        fixed = {f"w_{m}": trace.nodes[f"w_{m}"]["value"][rows] for m in names if private and m != "label"}
        if objective == "joint":
            fixed["z"] = z[rows]
        else:
            own = [(m,) for m in names] if objective == "cross" else module.subsets(names)
            fixed["z"] = z[[copies.index(s) for s in own]][:, rows]
        total = total + _trace_value(module, part, fixed)[0]
    assert len(patterns) == 7
    assert torch.allclose(whole, total, rtol=1e-10, atol=1e-9)


def test_weights_of_one_are_exactly_the_unweighted_loss_and_a_weight_scales_its_term():
    batch = make_batch()
    plain, ones = build(), build(weights={"a": 1, "b": 1.0, "label": 1})
    assert torch.equal(loss_and_grads(plain, batch)[0], loss_and_grads(ones, batch)[0])
    del batch[PRESENT]
    assert torch.equal(loss_and_grads(plain, batch)[0], loss_and_grads(ones, batch)[0])
    heavy = build(weights={"label": 50.0})
    pyro.set_rng_seed(4)
    g = poutine.trace(plain.guide).get_trace(batch)
    m1 = poutine.trace(poutine.replay(plain.model, trace=g)).get_trace(batch)
    m50 = poutine.trace(poutine.replay(heavy.model, trace=g)).get_trace(batch)
    site = m1.nodes["x_label"]
    label_term = (site["fn"].log_prob(site["value"]) * site["scale"]).sum()
    assert torch.allclose(m50.log_prob_sum() - m1.log_prob_sum(), 49 * label_term, rtol=1e-5)


def test_automatic_weights_and_bad_weights():
    assert likelihood_weights("auto", MODS) == {"a": 1.0, "b": 1.25, "label": 5.0}  # max dim 5 over 5, 4, 1
    for bad, message in ((["a"], "must be None"), ({"c": 1.0}, "unknown modalities"), ({"a": 0.0}, "positive")):
        with pytest.raises(UsageError, match=message):
            build(weights=bad)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("rule,rho", [("poe", 0.0), ("mopoe", 0.0), ("code", 0.3)])
def test_cross_objective_is_the_sum_of_single_expert_elbos(rule, rho, masked):
    module = build(rule, rho, objective="cross", prior_expert=rule == "poe").double()
    batch = make_batch(torch.float64)
    if not masked:
        del batch[PRESENT]
    mask = batch.get(PRESENT, torch.ones(len(PATTERNS), 3, dtype=torch.bool))
    pyro.set_rng_seed(6)
    value, trace = _trace_value(module, batch)
    z = trace.nodes["z"]["value"]  # (3, B, L): one copy per modality
    x = module.observed(batch, NAMES, mask)
    loc, scale, _ = module.experts(x, NAMES)
    manual = 0.0
    for i in range(3):
        q = module.fuse(loc[:, [i]], scale[:, [i]])  # q(z | x_i): expert i alone (PoE: with the prior expert)
        elbo = torch.distributions.Normal(0.0, 1.0).log_prob(z[i]).sum(-1) - q.log_prob(z[i])
        for t, name in enumerate(NAMES):
            elbo = elbo + torch.where(mask[:, t], module.decode(name, z[i]).log_prob(x[name]), 0.0)
        manual = manual + torch.where(mask[:, i], elbo, 0.0).sum()
    assert torch.allclose(value, manual, rtol=1e-10, atol=1e-9)


def test_mask_is_checked_once_and_evaluate_scores_each_row_on_its_modalities():
    module = build()
    batch = make_batch()
    module.check_data(batch)
    for bad, message in ((torch.zeros(9, 3, dtype=torch.bool), "none of the modalities"),
                         (torch.ones(9, 2, dtype=torch.bool), "shape"), (torch.ones(9, 3), "bool tensor")):
        with pytest.raises(UsageError, match=message):
            module.check_data({**batch, PRESENT: bad})
    # a row's log-weight is the one of its present modalities alone: compare with a batch of that row
    # (PoE: the same normal draws; a mixture would draw its component among a different number)
    module = build("poe")
    pyro.set_rng_seed(0)
    ev = evaluate(module, batch, particles=4)
    assert torch.isfinite(ev.elbo_per_point).all()
    row = 1  # a and label present
    pyro.set_rng_seed(9)
    full = module.log_weights({k: v[row : row + 1] for k, v in batch.items()}, 3)
    pyro.set_rng_seed(9)
    alone = module.log_weights({"a": batch["a"][row : row + 1], "label": batch["label"][row : row + 1]}, 3)
    assert torch.allclose(full, alone, atol=1e-5)


def test_impute_fills_only_absent_entries():
    module = build()
    batch = make_batch()
    filled = module.impute(batch)
    present = batch[PRESENT]
    for i, m in enumerate(NAMES):
        assert torch.equal(filled[m][present[:, i]], batch[m][present[:, i]])
    assert ((filled["a"] >= 0) & (filled["a"] <= 1)).all() and filled["label"].dtype == torch.long
    assert ((filled["label"] >= 0) & (filled["label"] < 3)).all()
