"""The multimodal section of inference.metrics, on oracle modules whose answers are known exactly."""

import numpy as np
import pytest
import torch

from inference import metrics as M
from inference.errors import UsageError
from ppl_models.multimodal_data import load_multimodal


class Oracle(torch.nn.Module):
    """'Generates' each tuple's own true target modality; joint draws are the first n real tuples."""

    def __init__(self, data):
        super().__init__()
        self.data = data
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def generate(self, given, targets):
        n = len(next(iter(given.values())))
        return {t: self.data[t][:n] for t in targets}

    def sample(self, n):
        return {m: v[:n] for m, v in self.data.items()}

class Shuffler(Oracle):
    """Generates targets of randomly permuted tuples: class agreement only by chance."""

    def generate(self, given, targets):
        n = len(next(iter(given.values())))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        return {t: self.data[t][:n][perm] for t in targets}

@pytest.fixture(scope="module")
def halves():
    train, test = load_multimodal("digits-halves")
    classifiers, acc = M.modality_classifiers(train.data, train.y, test.data, test.y)
    return train, test, classifiers, acc

def test_oracle_coherence_equals_classifier_accuracy(halves):
    train, test, classifiers, acc = halves
    records = M.coherence(Oracle(test.data), test.data, test.y, classifiers, batch_size=10_000)
    assert len(records) == 3 * 2 + 3 * 1  # (given, target) pairs for sizes 1 and 2
    for r in records:
        assert r["coherence"] == pytest.approx(acc[r["target"]], abs=1e-12)  # the same predictions
    assert acc["label"] == 1.0 and 0.7 < acc["top"] < 1.0
    by = M.coherence_by_size(records)
    assert set(by) == {1, 2}

def test_shuffled_generation_has_chance_coherence(halves):
    _, test, classifiers, _ = halves
    records = M.coherence(Shuffler(test.data), test.data, test.y, classifiers, batch_size=10_000)
    label = [r["coherence"] for r in records if r["target"] == "label"]
    # a random permutation matches classes with probability sum_c p_c^2 ~ 0.1; 359 tuples give a binomial
    # standard deviation of ~0.016, so 0.2 is more than 6 of them away
    assert all(c < 0.2 for c in label)

def test_joint_coherence_of_real_tuples(halves):
    _, test, classifiers, _ = halves
    n = len(test)
    preds = np.stack([M._predict(classifiers[m], test.data[m]) for m in classifiers])
    expected = float((preds == preds[0]).all(0).mean())
    assert M.joint_coherence(Oracle(test.data), classifiers, n) == pytest.approx(expected, abs=1e-12)

def test_linear_probe_and_cca_separate_signal_from_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 2000)
    onehot = np.eye(10)[y]
    v1 = onehot @ rng.normal(size=(10, 20)) + 0.3 * rng.normal(size=(2000, 20))
    v2 = onehot @ rng.normal(size=(10, 15)) + 0.3 * rng.normal(size=(2000, 15))
    tr, te = slice(0, 1500), slice(1500, None)
    assert M.linear_probe(v1[tr], y[tr], v1[te], y[te]) > 0.95  # classes 0.3-noise apart in 20 dims
    cca = M.cca_probe(v1[tr], v2[tr], y[tr], v1[te], v2[te], y[te], n_components=9)
    assert cca["mean"] > 0.9  # the 9 canonical directions span the shared class means
    noise1, noise2 = rng.normal(size=(2000, 20)), rng.normal(size=(2000, 15))
    chance = M.cca_probe(noise1[tr], noise2[tr], y[tr], noise1[te], noise2[te], y[te], n_components=4)
    # 500 test points at chance 0.1: binomial sd ~0.013, so 0.2 is over 7 sd away
    assert chance["mean"] < 0.2

class IndependentGaussians(torch.nn.Module):
    """Modalities independent N(0, 1) vectors with exact log_weights (constant over particles)."""

    max_plate_nesting = 1

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def log_weights(self, batch, k):
        lp = sum(torch.distributions.Normal(0.0, 1.0).log_prob(v).sum(-1) for v in batch.values() if v is not None)
        return lp.expand(k, -1)

def test_conditional_log_likelihood_is_the_difference_of_marginals():
    g = torch.Generator().manual_seed(0)
    data = {"a": torch.randn(50, 3, generator=g), "b": torch.randn(50, 2, generator=g)}
    mean, se, per = M.conditional_log_likelihood(IndependentGaussians(), data, "a", "b", particles=4)
    exact = torch.distributions.Normal(0.0, 1.0).log_prob(data["b"]).sum(-1).double()
    assert torch.allclose(per, exact, atol=1e-5)  # independent modalities: log p(b | a) = log p(b)
    assert mean == pytest.approx(float(exact.mean()), abs=1e-5) and se > 0
    with pytest.raises(UsageError, match="among the given"):
        M.conditional_log_likelihood(IndependentGaussians(), data, ["a", "b"], "b")

def test_unknown_classifier_kind_is_rejected():
    with pytest.raises(UsageError, match="valid: logistic, mlp, cnn"):
        M.fit_classifier(np.zeros((4, 2)), np.array([0, 1, 0, 1]), kind="svm")


def test_cnn_classifier_learns_digits():
    # sklearn digits (8x8): a linear model reaches ~0.95; the small CNN must clear 0.85 after its 4 epochs
    # (359 test images: binomial sd ~0.015, so a working CNN is far from failing by chance)
    train, test = load_multimodal("digits-label")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: extra threads only contend on the shared CPU
    try:
        before = torch.get_rng_state()
        clf = M.fit_classifier(train.x["image"], train.y, kind="cnn")
        assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is left as it was
    finally:
        torch.set_num_threads(threads)
    assert float((clf.predict(test.x["image"]) == test.y.numpy()).mean()) > 0.85
    assert [r["epoch"] for r in clf.history] == [1, 2, 3, 4]  # trained by inference.fit
    with pytest.raises(UsageError, match="square images"):
        M.fit_classifier(np.zeros((4, 10), dtype=np.float32), np.array([0, 1, 0, 1]), kind="cnn")


class GaussianOracle(IndependentGaussians):
    """Oracle generation on exactly scored independent N(0, 1) modalities; embeds by concatenation."""

    def __init__(self, data):
        super().__init__()
        self.data = data

    generate, sample = Oracle.generate, Oracle.sample

    def embed(self, batch):
        return torch.cat([v for v in batch.values()], -1)


def test_multimodal_metrics_scores_the_test_set_only_when_asked():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (500,), generator=g)
    onehot = torch.nn.functional.one_hot(y, 3).float()
    data = {m: onehot @ torch.randn(3, d, generator=g) + torch.randn(500, d, generator=g) for m, d in (("a", 4), ("b", 2))}
    train, test = {m: v[:300] for m, v in data.items()}, {m: v[300:] for m, v in data.items()}
    classifiers, _ = M.modality_classifiers(train, y[:300], test, y[300:])
    module = GaussianOracle(test)
    plain = M.multimodal_metrics(module, train, y[:300], test, y[300:], classifiers, particles=3, joint_samples=200)
    assert list(plain) == ["coherence", "coherence_by_size", "joint_coherence", "particles",
                           "conditional_log_likelihood", "probe_accuracy"]
    assert set(plain["probe_accuracy"]) == {"all", "a", "b"}
    full = M.multimodal_metrics(module, train, y[:300], test, y[300:], classifiers, particles=3, joint_samples=200,
                                log_likelihood=True)
    assert {k: v for k, v in full.items() if not k.startswith("test_")} == plain  # a deterministic oracle
    exact = torch.distributions.Normal(0.0, 1.0)
    log_px = sum(exact.log_prob(v).sum(-1) for v in test.values()).double().mean()
    assert full["test_log_likelihood"] == pytest.approx(float(log_px), abs=1e-4)  # exact weights: no bound gap
    assert full["test_elbo"] == pytest.approx(float(log_px), abs=1e-4)
    assert plain["conditional_log_likelihood"]["b"] == pytest.approx(float(exact.log_prob(test["b"]).sum(-1).mean()),
                                                                      abs=1e-4)  # independent: log p(b | a) = log p(b)
