"""Metrics computed from model outputs and labels.

Sections are independent. The optional heavy libraries (scipy, scikit-learn)
are imported inside the functions that need them.
"""
import itertools
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from numpy.typing import ArrayLike

from .checkpoint import get_rng_state, set_rng_state
from .errors import UsageError
from .evaluate import evaluate
from .train import fit

# =====================================================================================
# Clustering: unsupervised accuracy (Hungarian matching), NMI, ARI
# =====================================================================================
#
# A clustering assigns each of N points a cluster id; the ids are arbitrary names,
# so every score below is invariant to renaming the clusters.
#
# * Unsupervised accuracy (Xie et al. 2016; Jiang et al. 2017):
#       ACC = max_m (1/N) sum_n 1[y_n = m(c_n)]
#   over one-to-one maps m from cluster ids to class labels. With the contingency
#   table C[k, j] = #{n : c_n = k, y_n = j}, ACC = max over matchings of the sum of
#   matched cells / N: a linear assignment problem, solved exactly by
#   scipy.optimize.linear_sum_assignment (rectangular tables allowed; when there
#   are more clusters than classes the extra clusters match nothing and count as
#   errors, so ACC does not reward over-segmentation).
# * NMI: mutual information between the two labelings normalised by the
#   arithmetic mean of their entropies (scikit-learn's default), in [0, 1].
# * ARI: the Rand index adjusted for chance (Hubert & Arabie 1985): 0 in
#   expectation for random labelings, 1 for identical partitions, can be < 0.


def _labels(values, name):
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise UsageError(f"{name} must be a 1-D array of labels, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not (np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            raise UsageError(f"{name} must hold integer labels, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
    return arr


def _pair(y_true, y_pred):
    y_true, y_pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise UsageError(f"y_true and y_pred disagree in length: {y_true.shape[0]} vs {y_pred.shape[0]}")
    if y_true.size == 0:
        raise UsageError("cannot score an empty clustering")
    return y_true, y_pred


def contingency(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[Any, ...]:
    """Table C (clusters x classes) with C[k, j] = #{n : y_pred_n = k, y_true_n = j}, and the two label sets."""
    y_true, y_pred = _pair(y_true, y_pred)
    classes, t = np.unique(y_true, return_inverse=True)
    clusters, p = np.unique(y_pred, return_inverse=True)
    table = np.zeros((clusters.size, classes.size), dtype=np.int64)
    np.add.at(table, (p, t), 1)
    return table, clusters, classes


def cluster_matching(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, Any]:
    """The accuracy-maximising one-to-one map {cluster id: class label} (Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment

    table, clusters, classes = contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return {clusters[r].item(): classes[c].item() for r, c in zip(rows, cols)}


def cluster_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Unsupervised clustering accuracy in [0, 1] under the best one-to-one matching of ids to labels."""
    from scipy.optimize import linear_sum_assignment

    table, _, _ = contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def nmi(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Normalised mutual information (arithmetic normalisation), in [0, 1]."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(*_pair(y_true, y_pred)))


def ari(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Adjusted Rand index: 1 for identical partitions, 0 in expectation under chance."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(*_pair(y_true, y_pred)))


def clustering_scores(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, Any]:
    """``{"acc", "nmi", "ari"}`` of a clustering against reference labels."""
    return {"acc": cluster_accuracy(y_true, y_pred), "nmi": nmi(y_true, y_pred), "ari": ari(y_true, y_pred)}


# =====================================================================================
# Multimodal: cross-modal and joint coherence, linear probes, CCA, conditional likelihoods
# =====================================================================================
#
# A multimodal model here is anything with ``generate(given: dict, targets) -> dict``
# (decode targets from z ~ q(z | X_given)), ``sample(n) -> dict`` (joint draws from
# the prior) and ``embed(batch) -> (B, L)`` (posterior mean of the shared latent);
# data are dicts {modality: tensor} sharing dim 0, with class labels y beside them.
#
# * Coherence (Shi et al. 2019; Sutter et al. 2021): a classifier per modality,
#   trained on real data, labels what the model generated for a target modality
#   from the other modalities of a test tuple; coherence is the fraction labelled
#   with the tuple's true class. Its ceiling is the classifier's own accuracy.
# * Joint coherence: the fraction of joint prior draws whose modalities the
#   classifiers all give the same class.
# * Linear probe: accuracy of a logistic regression from a representation
#   (latent means, canonical variates) to the class, fitted on train, scored on test.
# * CCA (Hotelling 1936; a "coordinated representation" in the taxonomy of
#   Baltrusaitis, Ahuja & Morency 2019): project two
#   views onto their top canonical directions; probe the variates.


# The key of a multimodal data dict's presence mask: a bool tensor (N, M), True where datapoint n has
# modality m, its columns in the order of the dict's modalities (a model's ``names``). Absent entries hold
# placeholder values that nothing here reads: each score uses the datapoints that have what it needs.
PRESENT = "_present"


def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def split_presence(data: Any, names: Sequence[str] | None = None) -> tuple[Any, ...]:
    """(the modalities of a data dict without its mask, {name: bool (N,) tensor} or None when complete).

    ``names``: the mask's column order (default: the dict's modalities in order).
    """
    x = {k: v for k, v in data.items() if k != PRESENT}
    mask = data.get(PRESENT)
    if mask is None:
        return x, None
    names = list(x) if names is None else list(names)
    return x, {n: mask[:, i] for i, n in enumerate(names) if n in x}


def _rows(present, given, n):
    """Indices (a CPU tensor) of the datapoints that have every modality of ``given``, or None for all."""
    if present is None:
        return None
    keep = torch.ones(n, dtype=torch.bool)
    for m in given:
        keep &= present[m].cpu()
    return keep.nonzero().squeeze(-1)


def _take(values, rows):
    return values if rows is None else values[rows.to(values.device) if isinstance(values, torch.Tensor) else rows]


class LabelReader:
    """The "classifier" of a categorical modality: integer labels as they are, probabilities by argmax."""

    accuracy = 1.0

    def predict(self, x: Any) -> np.ndarray:
        x = _numpy(x)
        return x.argmax(-1) if x.ndim == 2 else x.astype(np.int64)


class CategoricalRegression(nn.Module):
    """A classifier as a Pyro model/guide pair, so :func:`inference.fit` trains it.

    Model, for a batch ``{"x": (B, ...), "y": (B,)}``: y_n ~ Categorical(logits = net(x_n))
    inside ``pyro.plate("data")``. There is no latent variable, so the guide is
    empty and the ELBO is the log-likelihood sum_n log p(y_n | x_n): fit's loss
    per datapoint is the mean cross-entropy.
    """

    max_plate_nesting = 1

    def __init__(self, net: Any) -> None:
        super().__init__()
        self.net = net

    def model(self, batch: Any) -> None:
        with pyro.plate("data", batch["y"].shape[0]):
            pyro.sample("y", dist.Categorical(logits=self.net(batch["x"])), obs=batch["y"])

    def guide(self, batch: Any) -> None:
        pass


class CNNClassifier:
    """A small convolutional classifier of square one-channel images (N, S*S), trained with Adam by :func:`fit`.

    Two 3x3 convolutions (32, 64 channels) with 2x2 max-pooling, then a linear
    layer; trained ``epochs`` passes with batch 128 on the CPU from ``seed``, as
    a :class:`CategoricalRegression` pair (so fit's non-finite-loss guard and
    progress bar apply). The caller's random number generators are left as they were.

    :raises UsageError: the images are not square with a side divisible by 4.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 4, seed: int = 0,
                 progress: bool = False) -> None:
        side = int(round(x.shape[1] ** 0.5))
        if side * side != x.shape[1] or side % 4:
            raise UsageError(f"the cnn classifier needs square images with side divisible by 4, got {x.shape[1]} values")
        self.side = side
        data = {"x": torch.as_tensor(x, dtype=torch.float32), "y": torch.as_tensor(y).long()}
        state = get_rng_state()
        try:
            pyro.set_rng_seed(seed)
            self.net = nn.Sequential(
                nn.Unflatten(1, (1, side, side)), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                nn.Linear(64 * (side // 4) ** 2, int(data["y"].max()) + 1),
            )
            self.history = fit(CategoricalRegression(self.net), data, epochs=epochs, batch_size=128, lr=1e-3,
                               device="cpu", seed=seed, progress=progress).history
        finally:
            set_rng_state(state)
        self.net.eval()

    @torch.no_grad()
    def predict(self, x: Any) -> np.ndarray:
        x = torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape(len(x), -1)
        return torch.cat([self.net(b).argmax(-1) for b in x.split(1000)]).numpy()


def fit_classifier(x: Any, y: Any, *, kind: str = "logistic", seed: int = 0) -> Any:
    """A classifier of real data for one modality: ``logistic`` regression or a small ``mlp`` (scikit-learn),
    or a small ``cnn`` (:class:`CNNClassifier`, square one-channel images).

    Integer 1-D data (a label modality) get a :class:`LabelReader`.
    """
    x, y = _numpy(x), _numpy(y)
    if x.ndim == 1 and not np.issubdtype(x.dtype, np.floating):
        return LabelReader()
    x = x.reshape(len(x), -1)
    if kind == "cnn":
        return CNNClassifier(x, y, seed=seed)
    if kind == "logistic":
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(max_iter=1000, C=1.0)
    elif kind == "mlp":
        from sklearn.neural_network import MLPClassifier

        clf = MLPClassifier(hidden_layer_sizes=(256,), max_iter=60, early_stopping=True, random_state=seed)
    else:
        raise UsageError(f"unknown classifier kind {kind!r}; valid: logistic, mlp, cnn")
    return clf.fit(x, y)


def modality_classifiers(train: Any, y_train: ArrayLike, test: Any, y_test: ArrayLike, *, kind: str = "logistic",
                         seed: int = 0) -> tuple[Any, ...]:
    """One classifier per modality fitted on ``train``; returns (classifiers, their test accuracies).

    With a presence mask (:data:`PRESENT`) each modality's classifier is fitted and scored on the
    rows that have it."""
    train, p_train = split_presence(train)
    test, p_test = split_presence(test)
    classifiers, accuracy = {}, {}
    for name, x in train.items():
        rows, test_rows = _rows(p_train, [name], len(x)), _rows(p_test, [name], len(test[name]))
        clf = fit_classifier(_take(x, rows), _take(_numpy(y_train), rows), kind=kind, seed=seed)
        classifiers[name] = clf
        pred = _predict(clf, _take(test[name], test_rows))
        accuracy[name] = float((pred == _take(_numpy(y_test), test_rows)).mean()) if len(pred) else float("nan")
    return classifiers, accuracy


def _predict(clf, x):
    x = _numpy(x)
    return clf.predict(x if isinstance(clf, LabelReader) else x.reshape(len(x), -1))


def _module_device(module):
    return next(module.parameters()).device


def coherence(module: Any, data: Any, y: Any, classifiers: Any, *, given_sizes: Any = None,
              batch_size: int = 500) -> Any:
    """Cross-modal coherence for every non-empty subset S of modalities and every target t not in S.

    Returns a list of ``{"given": "a+b", "size": |S|, "target": t, "coherence": acc, "n": rows}``;
    ``given_sizes`` limits |S| (default 1..M-1). With a presence mask in ``data`` (:data:`PRESENT`,
    columns in ``module.names`` order) each subset S is scored on the ``n`` datapoints that have every
    modality of S (a subset no datapoint has is left out).
    """
    data, present = split_presence(data, getattr(module, "names", None))
    names = list(data)
    y = _numpy(y)
    sizes = given_sizes or range(1, len(names))
    dev = _module_device(module)
    records = []
    for k in sizes:
        for given in itertools.combinations(names, k):
            targets = [t for t in names if t not in given]
            rows = _rows(present, given, len(y))
            sub = {m: _take(data[m], rows) for m in given}
            y_sub = _take(y, None if rows is None else rows.numpy())
            if len(y_sub) == 0:
                continue
            preds: dict[str, list[Any]] = {t: [] for t in targets}
            for start in range(0, len(y_sub), batch_size):
                batch = {m: v[start : start + batch_size].to(dev) for m, v in sub.items()}
                out = module.generate(batch, targets)
                for t in targets:
                    preds[t].append(_predict(classifiers[t], out[t]))
            for t in targets:
                acc = float((np.concatenate(preds[t]) == y_sub).mean())
                records.append({"given": "+".join(given), "size": k, "target": t, "coherence": acc, "n": len(y_sub)})
    return records


def coherence_by_size(records: Any) -> dict[str, Any]:
    """Mean coherence over the records of each number of given modalities: {size: mean}."""
    sizes = sorted({r["size"] for r in records})
    return {k: float(np.mean([r["coherence"] for r in records if r["size"] == k])) for k in sizes}


def joint_coherence(module: Any, classifiers: Any, n: int = 1000) -> float:
    """Fraction of n joint prior draws on whose class every modality's classifier agrees."""
    out = module.sample(n)
    preds = np.stack([_predict(classifiers[m], out[m]) for m in classifiers])
    return float((preds == preds[:1]).all(0).mean())


def linear_probe(train_features: Any, y_train: ArrayLike, test_features: Any, y_test: ArrayLike) -> float:
    """Test accuracy of a logistic regression fitted to (train_features, y_train)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(_numpy(train_features), _numpy(y_train))
    return float((clf.predict(_numpy(test_features)) == _numpy(y_test)).mean())


@torch.no_grad()
def embeddings(module: Any, data: Any, batch_size: int = 1000) -> torch.Tensor:
    """``module.embed`` over ``data`` (a dict, with its presence mask if any) in batches, on the CPU."""
    dev = _module_device(module)
    n = len(next(iter(data.values())))
    return torch.cat([
        module.embed({m: v[s : s + batch_size].to(dev) for m, v in data.items()}).cpu()
        for s in range(0, n, batch_size)
    ])


def cca_probe(view1_train: Any, view2_train: Any, y_train: ArrayLike, view1_test: Any, view2_test: Any,
              y_test: ArrayLike, n_components: int = 8) -> dict[str, Any]:
    """Linear CCA (scikit-learn) on two views, then linear probes on the canonical variates.

    Returns accuracies from view 1's variates, view 2's, and their average (the
    coordinated representation of both views).
    """
    from sklearn.cross_decomposition import CCA
    from threadpoolctl import threadpool_limits

    cca = CCA(n_components=n_components, max_iter=2000)
    # scikit-learn's CCA iterates many small matrix products: BLAS threads cost more than they gain
    # (20x slower on a busy 2-core machine), so it runs on one
    with threadpool_limits(1):
        cca.fit(_numpy(view1_train), _numpy(view2_train))
        u_tr, v_tr = cca.transform(_numpy(view1_train), _numpy(view2_train))
        u_te, v_te = cca.transform(_numpy(view1_test), _numpy(view2_test))
    return {
        "view1": linear_probe(u_tr, y_train, u_te, y_test),
        "view2": linear_probe(v_tr, y_train, v_te, y_test),
        "mean": linear_probe((u_tr + v_tr) / 2, y_train, (u_te + v_te) / 2, y_test),
    }


def conditional_log_likelihood(module: Any, data: Any, given: Any, target: Any, *, particles: int = 1000,
                               batch_size: int | None = None) -> tuple[Any, ...]:
    """log p(x_target | X_given) estimated as log p(X_given, x_target) - log p(X_given), per datapoint.

    Both terms are importance-weighted estimates (:func:`inference.evaluate`)
    with ``particles`` draws from the model's own posteriors; each is a
    stochastic lower bound, so their difference is consistent as particles grow
    but is not a bound. With a presence mask in ``data``, over the datapoints that have the given
    and target modalities. Returns (mean, standard error, per-point tensor).
    """
    given = [given] if isinstance(given, str) else list(given)
    if target in given:
        raise UsageError(f"the target {target!r} is among the given modalities")
    data, present = split_presence(data, getattr(module, "names", None))
    rows = _rows(present, [*given, target], len(next(iter(data.values()))))
    data = {m: _take(data[m], rows) for m in [*given, target]}
    joint = evaluate(module, {m: data[m] for m in [*given, target]}, particles=particles, batch_size=batch_size)
    marginal = evaluate(module, {m: data[m] for m in given}, particles=particles, batch_size=batch_size)
    per = cast(torch.Tensor, joint.log_likelihood_per_point) - cast(torch.Tensor, marginal.log_likelihood_per_point)
    return float(per.mean()), float(per.std() / per.numel() ** 0.5), per


def multimodal_metrics(module: Any, train: Any, y_train: ArrayLike, test: Any, y_test: ArrayLike, classifiers: Any, *,
                       particles: int = 100, joint_samples: int = 1000, log_likelihood: bool = False,
                       seed: int = 0) -> dict[str, Any]:
    """The multimodal scores of a trained model: coherence, joint coherence, probes, conditional log-likelihoods.

    ``train``/``test``: dicts {modality: tensor} with labels ``y_train``/``y_test``;
    ``classifiers`` from :func:`modality_classifiers`; ``module`` a multimodal
    model with ``generate``, ``sample`` and ``embed`` (see this section's
    comment) that :func:`inference.evaluate` can score on any subset of the
    modalities. Returns a dict: ``coherence`` (:func:`coherence` records),
    ``coherence_by_size``, ``joint_coherence`` (``joint_samples`` prior draws),
    ``particles``, ``conditional_log_likelihood`` {t: mean log p(x_t | X_rest)}
    (:func:`conditional_log_likelihood` with ``particles`` draws) and
    ``probe_accuracy`` (linear probes of the posterior mean given all modalities,
    ``"all"``, and given each one alone). With ``log_likelihood=True`` it adds the
    joint ``test_elbo``, ``test_log_likelihood`` and ``test_log_likelihood_se``
    (:func:`inference.evaluate`, ``particles`` draws) -- leave it off where the
    caller scores the test set already. Seeded by ``seed``; the module's
    training mode is restored.

    Incomplete samples (a presence mask under :data:`PRESENT`, columns in ``module.names`` order):
    every score uses the datapoints that have what it needs (coherence given S: those with all of S;
    a conditional log-likelihood: those with the given and target modalities; a single-modality
    probe: those with that modality), and ``by_pattern`` adds, for each presence pattern of the test
    set, its number of datapoints and their mean ELBO and log-likelihood estimate.
    """
    pyro.set_rng_seed(seed)
    dev = _module_device(module)
    was = module.training
    module.eval()
    try:
        test_x = {k: v.to(dev) for k, v in test.items()}
        records = coherence(module, test_x, y_test, classifiers)
        mask = test_x.get(PRESENT)
        if log_likelihood or mask is not None:
            ev = evaluate(module, test_x, particles=particles)
        out = {
            "coherence": records,
            "coherence_by_size": coherence_by_size(records),
            "joint_coherence": joint_coherence(module, classifiers, joint_samples),
        }
        if log_likelihood:
            out.update(test_elbo=ev.elbo, test_log_likelihood=ev.log_likelihood,
                       test_log_likelihood_se=ev.log_likelihood_se)
        order = list(getattr(module, "names", None) or [k for k in test if k != PRESENT])
        if mask is not None:
            out["by_pattern"] = _by_pattern(mask.cpu(), ev, order)
        out["particles"] = particles
        train, p_train = split_presence(train, order)
        test_only, p_test = split_presence(test, order)
        names = list(test_only)
        cond = {}
        for t in names:
            rest = [m for m in names if m != t]
            if rest:
                cond[t] = conditional_log_likelihood(module, test_x, rest, t, particles=particles)[0]
        out["conditional_log_likelihood"] = cond
        probes = {"all": linear_probe(embeddings(module, {**train, **_mask_of(p_train, order)}), y_train,
                                      embeddings(module, {**test_only, **_mask_of(p_test, order)}), y_test)}
        for m in names:
            r_tr, r_te = _rows(p_train, [m], len(_numpy(y_train))), _rows(p_test, [m], len(_numpy(y_test)))
            probes[m] = linear_probe(embeddings(module, {m: _take(train[m], r_tr)}), _take(_numpy(y_train), r_tr),
                                     embeddings(module, {m: _take(test_only[m], r_te)}), _take(_numpy(y_test), r_te))
        out["probe_accuracy"] = probes
    finally:
        module.train(was)
    return out


def _mask_of(present, names):
    """{PRESENT: (N, M) mask} back from :func:`split_presence`'s per-modality dict (empty when complete)."""
    return {} if present is None else {PRESENT: torch.stack([present[n] for n in names], 1)}


def _by_pattern(mask, ev, names):
    """{"a+b": {"n", "elbo", "log_likelihood"}} over the test set's presence patterns (per-point means)."""
    out = {}
    for pattern in torch.unique(mask, dim=0):
        rows = (mask == pattern).all(1)
        key = "+".join(n for n, p in zip(names, pattern.tolist()) if p)
        out[key] = {"n": int(rows.sum()), "elbo": float(ev.elbo_per_point.cpu()[rows].mean()),
                    "log_likelihood": float(ev.log_likelihood_per_point.cpu()[rows].mean())}
    return out
