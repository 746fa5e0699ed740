"""Metrics computed from model outputs and labels.

Sections are independent; each keeps its own imports inside its functions where
they are heavy.
"""

import numpy as np
import torch

from .errors import UsageError


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


def contingency(y_true, y_pred):
    """Table C (clusters x classes) with C[k, j] = #{n : y_pred_n = k, y_true_n = j}, and the two label sets."""
    y_true, y_pred = _pair(y_true, y_pred)
    classes, t = np.unique(y_true, return_inverse=True)
    clusters, p = np.unique(y_pred, return_inverse=True)
    table = np.zeros((clusters.size, classes.size), dtype=np.int64)
    np.add.at(table, (p, t), 1)
    return table, clusters, classes


def cluster_matching(y_true, y_pred):
    """The accuracy-maximising one-to-one map {cluster id: class label} (Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment

    table, clusters, classes = contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return {clusters[r].item(): classes[c].item() for r, c in zip(rows, cols)}


def cluster_accuracy(y_true, y_pred):
    """Unsupervised clustering accuracy in [0, 1] under the best one-to-one matching of ids to labels."""
    from scipy.optimize import linear_sum_assignment

    table, _, _ = contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def nmi(y_true, y_pred):
    """Normalised mutual information (arithmetic normalisation), in [0, 1]."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(*_pair(y_true, y_pred)))


def ari(y_true, y_pred):
    """Adjusted Rand index: 1 for identical partitions, 0 in expectation under chance."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(*_pair(y_true, y_pred)))


def clustering_scores(y_true, y_pred):
    """``{"acc", "nmi", "ari"}`` of a clustering against reference labels."""
    return {"acc": cluster_accuracy(y_true, y_pred), "nmi": nmi(y_true, y_pred), "ari": ari(y_true, y_pred)}
