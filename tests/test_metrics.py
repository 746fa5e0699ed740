"""Clustering metrics against hand-computed values and brute force."""

import itertools
import math

import numpy as np
import pytest
import torch

from inference.errors import UsageError
from inference.metrics import ari, cluster_accuracy, cluster_matching, clustering_scores, contingency, nmi


def test_permuted_labels_score_one():
    y = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    renamed = np.array([7, 5, 9, 2])[y]  # a renaming of the cluster ids: the same partition
    # identical partitions: every score is exactly 1 (float rounding only)
    assert clustering_scores(y, renamed) == pytest.approx({"acc": 1.0, "nmi": 1.0, "ari": 1.0}, abs=1e-12)
    assert cluster_matching(y, renamed) == {7: 0, 5: 1, 9: 2, 2: 3}


def test_hand_checked_two_classes():
    y_true = [0, 0, 0, 1, 1, 1]
    y_pred = [1, 1, 0, 0, 0, 0]
    # contingency (clusters x classes): cluster 0 -> (1, 3), cluster 1 -> (2, 0); best matching 1->0, 0->1: 5/6
    table, clusters, classes = contingency(y_true, y_pred)
    np.testing.assert_array_equal(table, [[1, 3], [2, 0]])
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(5 / 6, abs=1e-12)
    # ARI by hand: sum_ij C(n_ij, 2) = 4, sum_i C(a_i, 2) = 7, sum_j C(b_j, 2) = 6, C(6, 2) = 15:
    # (4 - 7*6/15) / ((7 + 6)/2 - 7*6/15) = 1.2 / 3.7
    assert ari(y_true, y_pred) == pytest.approx(1.2 / 3.7, abs=1e-12)


def test_over_segmentation_is_not_rewarded():
    # four singleton clusters for two classes of two: only two clusters can be matched
    y_true, y_pred = [0, 0, 1, 1], [0, 1, 2, 3]
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(0.5, abs=1e-12)
    # I(Y; C) = H(Y) = log 2, H(C) = log 4: NMI = log 2 / ((log 2 + log 4) / 2) = 2/3
    assert nmi(y_true, y_pred) == pytest.approx(2 / 3, abs=1e-12)
    # no pair of points shares a cluster: the index is 0, its expectation 0, its max (2 + 0)/2: ARI = 0
    assert ari(y_true, y_pred) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    y_true, y_pred = rng.integers(0, 4, 40), rng.integers(0, 4, 40)
    table, _, _ = contingency(y_true, y_pred)
    best = max(sum(table[i, p[i]] for i in range(table.shape[0])) for p in itertools.permutations(range(4)))
    # exact: the assignment is solved exactly, counts are integers
    assert cluster_accuracy(y_true, y_pred) == best / 40


def test_accepts_tensors_and_integral_floats():
    y = torch.tensor([0, 1, 1, 2])
    assert cluster_accuracy(y, torch.tensor([2.0, 0.0, 0.0, 1.0])) == 1.0
    assert math.isclose(nmi(y.numpy(), [1, 1, 1, 1]), 0.0, abs_tol=1e-12)  # a constant clustering carries no information


@pytest.mark.parametrize(
    "y_true, y_pred, match",
    [
        ([0, 1], [0, 1, 1], "disagree in length"),
        ([[0, 1]], [[0, 1]], "1-D"),
        ([0, 1], [0.5, 1.0], "integer labels"),
        ([], [], "empty"),
    ],
)
def test_bad_input(y_true, y_pred, match):
    with pytest.raises(UsageError, match=match):
        clustering_scores(y_true, y_pred)
