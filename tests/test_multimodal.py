"""MultimodalVAE: Pyro validation for every rule, the subset ELBO against explicit subset posteriors,
evaluation against Pyro's generic tracing, missing modalities, generation, errors, and a learning check."""

import pyro
import pyro.poutine as poutine
import pytest
import torch

from inference import evaluate, fit, make_elbo, trace_log_weights
from inference import metrics as M
from inference.errors import UsageError
from ppl_models.multimodal import MultimodalVAE, modality

RULES = [("poe", 0.0), ("moe", 0.0), ("mopoe", 0.0), ("code", 0.4)]
MODS = [modality("a", 10, "bernoulli"), modality("b", 6, "cbernoulli"), modality("label", 4, "categorical")]


def make_batch(device, n=7):
    g = torch.Generator().manual_seed(1)
    batch = {
        "a": torch.bernoulli(torch.full((n, 10), 0.4), generator=g),
        "b": torch.rand(n, 6, generator=g),
        "label": torch.randint(0, 4, (n,), generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def build(rule, rho, device, **kw):
    return MultimodalVAE(MODS, latent_dim=3, hidden=(8,), rule=rule, rho=rho, **kw).to(device)


@pytest.mark.parametrize("rule,rho", RULES)
@pytest.mark.parametrize("objective,weights,private", [("joint", "uniform", 0), ("joint", "uniform", 2),
                                                      ("subset", "uniform", 0), ("subset", "learned", 2)])
@pytest.mark.parametrize("drop", [None, "b"])
def test_pyro_validation_and_missing_modalities(rule, rho, objective, weights, private, drop, device):
    # validation is on (conftest) and pytest.ini turns Pyro's model/guide mismatch warnings into errors
    module = build(rule, rho, device, objective=objective, subset_weights=weights, private_dim=private)
    batch = make_batch(device)
    if drop:
        batch[drop] = None  # a missing modality may be None or absent
    for spec in ("trace", "trace:3"):
        loss = make_elbo(spec, max_plate_nesting=module.max_plate_nesting).differentiable_loss(
            module.model, module.guide, batch)
        assert torch.isfinite(loss)
    loss.backward()
    # the missing modality's networks take no part: no gradient reaches them
    for m in module.names:
        grads = [p.grad for p in module.encoders[m].parameters()]
        if m == drop:
            assert all(g is None for g in grads)
        else:
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
    ev = evaluate(module, batch, particles=16)
    assert torch.isfinite(ev.elbo_per_point).all() and (ev.log_likelihood_per_point >= ev.elbo_per_point - 1e-5).all()


@pytest.mark.parametrize("rule,rho", RULES)
@pytest.mark.parametrize("private", [0, 2])
@pytest.mark.parametrize("drop", [None, "a"])
def test_log_weights_equal_pyro_trace_of_joint_model(rule, rho, private, drop, device):
    # evaluate() uses module.log_weights; with the same random draws it must equal Pyro's own
    # log p(X, z, w) - log q(z, w | X) from tracing the joint model/guide (float32 rounding: 1e-4)
    module = build(rule, rho, device, objective="joint", private_dim=private)
    batch = make_batch(device)
    if drop:
        del batch[drop]
    pyro.set_rng_seed(3)
    ours = module.log_weights(batch, 5)
    pyro.set_rng_seed(3)
    ref = trace_log_weights(module.model, module.guide, batch, 5, max_plate_nesting=1)
    assert ours.shape == (5, 7)
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rule,rho", RULES)
@pytest.mark.parametrize("weights", ["uniform", "learned"])
def test_subset_objective_is_weighted_sum_of_subset_elbos(rule, rho, weights):
    # the plate-and-mask implementation must equal sum_S w_S ELBO_S with q(z | X_S) fused from S's experts alone
    module = build(rule, rho, "cpu", objective="subset", subset_weights=weights)
    if weights == "learned":
        with torch.no_grad():
            module.subset_logits.copy_(torch.linspace(-1, 1, 7))
    batch = make_batch("cpu")
    guide_trace = poutine.trace(module.guide).get_trace(batch)
    model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(batch)
    pyro_value = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
    z = guide_trace.nodes["z"]["value"]  # (K, B, L)
    subsets = module.subsets(module.names)
    assert z.shape[0] == len(subsets) == 7  # 2^3 - 1
    w, entropy = module.subset_weights(module.names)
    loc, scale, _ = module.experts(batch)
    manual = 0.0
    for k, s in enumerate(subsets):
        idx = [module.names.index(m) for m in s]
        q = module.fuse(loc[:, idx], scale[:, idx])
        elbo = torch.distributions.Normal(0.0, 1.0).log_prob(z[k]).sum(-1) - q.log_prob(z[k])
        for m in module.names:
            elbo = elbo + module.decode(m, z[k]).log_prob(batch[m])
        manual = manual + w[k] * elbo.sum()
    if entropy is not None:
        manual = manual + 7 * module.subset_entropy * entropy  # n * lambda * H(w), n = 7 datapoints
    assert torch.allclose(pyro_value, manual, rtol=1e-5, atol=1e-4)  # float32 sums of ~100 terms


def test_learned_subset_weights_restrict_to_present_modalities():
    module = build("code", 0.4, "cpu", objective="subset", subset_weights="learned")
    for names, k in ((["a", "b", "label"], 7), (["a", "label"], 3), (["b"], 1)):
        w, h = module.subset_weights(names)
        assert len(module.subsets(names)) == k == w.numel()
        assert torch.allclose(w.sum(), torch.tensor(1.0)) and 0 <= float(h.detach()) <= float(torch.log(torch.tensor(float(k)))) + 1e-6


@pytest.mark.parametrize("rule,rho", RULES)
def test_generation_from_any_subset_and_prior(rule, rho, device):
    module = build(rule, rho, device, private_dim=2)
    batch = make_batch(device)
    out = module.generate({"label": batch["label"]}, ["a", "b", "label"])
    assert out["a"].shape == (7, 10) and ((out["a"] >= 0) & (out["a"] <= 1)).all()
    assert torch.allclose(out["label"].sum(-1), torch.ones(7, device=device))  # class probabilities
    draws = module.generate({"a": batch["a"], "b": batch["b"]}, ["label"], mean=False)["label"]
    assert draws.dtype == torch.long and ((draws >= 0) & (draws < 4)).all()
    prior = module.sample(5)
    assert set(prior) == {"a", "b", "label"} and prior["b"].shape == (5, 6)


def test_single_given_modality_posterior_is_its_expert():
    # a single present expert passes through every rule unchanged (mixtures: one component of weight 1)
    batch = make_batch("cpu")
    for rule, rho in RULES:
        module = build(rule, rho, "cpu")
        loc, scale = module.heads["b"](module.encoders["b"](batch["b"]))
        q = module.posterior({"b": batch["b"]})
        assert torch.allclose(q.mean, loc, atol=1e-6) and torch.allclose(q.variance, scale**2, rtol=1e-5)


def test_bad_input_is_rejected():
    with pytest.raises(UsageError, match="rho must lie in"):
        build("code", -0.6, "cpu")  # M = 3 needs rho > -1/2
    with pytest.raises(UsageError, match="takes none"):
        build("poe", 0.3, "cpu")
    with pytest.raises(UsageError, match="unknown fusion rule"):
        build("sum", 0.0, "cpu")
    module = build("mopoe", 0.0, "cpu")
    with pytest.raises(UsageError, match="unknown modalities"):
        module.model({"c": torch.zeros(2, 3)})
    with pytest.raises(UsageError, match="holds no modality"):
        module.guide({"a": None})
    with pytest.raises(UsageError, match="integer labels"):
        module.check_data({"label": torch.tensor([0, 5])})


def test_training_on_digits_halves_gives_coherent_labels():
    # 15 epochs of the subset objective: the label generated from the top half alone must match the
    # class far above chance (0.1). With 359 test tuples the binomial sd at p = 0.1 is 0.016, so 0.3 is
    # 12 sd above chance (the benchmark's 60 epochs reach ~0.8); the label target needs no classifier.
    from ppl_models.multimodal_data import load_multimodal

    train, test = load_multimodal("digits-halves")
    module = MultimodalVAE(train.modalities, latent_dim=8, hidden=(128,), rule="code", rho=0.2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks: extra threads only contend on a shared CPU
    try:
        result = fit(module, train, epochs=15, batch_size=128, lr=2e-3, progress=False, validate=False)
    finally:
        torch.set_num_threads(threads)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    records = M.coherence(module, {"top": test.x["top"], "label": test.x["label"]}, test.y,
                          {"label": M.LabelReader(), "top": M.fit_classifier(train.x["top"], train.y)},
                          given_sizes=[1])
    top_to_label = next(r["coherence"] for r in records if r["given"] == "top" and r["target"] == "label")
    assert top_to_label > 0.3
