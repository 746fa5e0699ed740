r"""Disentanglement scores of codes against known generative factors: MIG and the beta-VAE metric.

Both take codes ``z`` (N, L) (e.g. posterior means) and integer factor values
``v`` (N, K) of the same datapoints.

* :func:`mig`, the mutual information gap (Chen et al. 2018, eq. 6)::

      MIG = 1/K sum_k (I(z_{j(k)}; v_k) - max_{j != j(k)} I(z_j; v_k)) / H(v_k),
      j(k) = argmax_j I(z_j; v_k)

  with I estimated by discretising each code dimension into ``bins``
  equal-width bins over its range (the histogram estimator of Locatello et
  al. 2019) and H(v_k) the empirical entropy. It lies in [0, 1]: 1 when each
  factor is read off one dimension and no other dimension tells anything
  about it; near 0 (up to the small positive bias of the plug-in estimator,
  about (bins - 1)(|v_k| - 1) / (2 N) nats) for codes independent of the factors.

* :func:`beta_vae_score`, the beta-VAE metric (Higgins et al. 2017, sec. 3):
  a vote is made by choosing a factor k, drawing ``batch`` pairs of
  datapoints that share the value of v_k (the other factors random), and
  averaging |z_a - z_b| over the pairs; a linear classifier (logistic
  regression) learns k from the vote. The score is its accuracy on fresh
  votes: 1 when the fixed factor always leaves one dimension unchanged,
  1/K (chance) for codes that ignore the factors. Pairs are drawn from the
  data, so the data should contain every value of each factor with the other
  factors varied (a full factorial grid, as :mod:`ppl_models.sprites` is).
"""
from typing import Any

import numpy as np
import torch

from .errors import UsageError


def _arrays(z, v):
    z = np.asarray(torch.as_tensor(z).detach().cpu(), dtype=np.float64)
    v = np.asarray(torch.as_tensor(v).detach().cpu())
    if v.ndim == 1:
        v = v[:, None]
    if z.ndim != 2 or v.ndim != 2 or z.shape[0] != v.shape[0] or z.shape[0] < 2:
        raise UsageError(f"codes (N, L) and factors (N, K) with the same N >= 2 expected, got {z.shape} and {v.shape}")
    if not np.issubdtype(v.dtype, np.integer):
        raise UsageError(f"factors must be integer values, got dtype {v.dtype}")
    return z, v


def discretise(z: torch.Tensor, bins: int = 20) -> Any:
    """Each column of ``z`` (N, L) cut into ``bins`` equal-width bins over its range: (N, L) int."""
    out = np.zeros(z.shape, dtype=np.int64)
    for j in range(z.shape[1]):
        edges = np.histogram(z[:, j], bins)[1]
        out[:, j] = np.digitize(z[:, j], edges[:-1])
    return out


def mutual_information_matrix(z: torch.Tensor, v: Any, bins: int = 20) -> np.ndarray:
    """I(z_j; v_k) in nats, (L, K), from the discretised codes (plug-in estimate)."""
    from sklearn.metrics import mutual_info_score

    z, v = _arrays(z, v)
    zd = discretise(z, bins)
    return np.array([[mutual_info_score(v[:, k], zd[:, j]) for k in range(v.shape[1])] for j in range(z.shape[1])])


def mig(z: torch.Tensor, v: Any, *, bins: int = 20) -> dict[str, Any]:
    """The mutual information gap (Chen et al. 2018). Returns ``{"mig", "per_factor", "mutual_information",
    "entropy"}``: the score, the normalised gap of each factor (K,), I(z_j; v_k) (L, K) and H(v_k) (K,).

    :raises UsageError: bad shapes, fewer than 2 code dimensions, or a factor that takes one value only.
    """
    from sklearn.metrics import mutual_info_score

    z, v = _arrays(z, v)
    if z.shape[1] < 2:
        raise UsageError("MIG needs at least 2 code dimensions")
    entropy = np.array([mutual_info_score(v[:, k], v[:, k]) for k in range(v.shape[1])])
    if (entropy <= 0).any():
        raise UsageError(f"factor(s) {np.flatnonzero(entropy <= 0).tolist()} take a single value: no entropy to explain")
    mi = mutual_information_matrix(z, v, bins)
    top2 = np.sort(mi, axis=0)[::-1][:2]
    per_factor = (top2[0] - top2[1]) / entropy
    return {"mig": float(per_factor.mean()), "per_factor": per_factor, "mutual_information": mi, "entropy": entropy}


def _votes(z, v, n, batch, rng):
    k_factors = v.shape[1]
    groups = [{val: np.flatnonzero(v[:, k] == val) for val in np.unique(v[:, k])} for k in range(k_factors)]
    x = np.empty((n, z.shape[1]))
    y = rng.integers(0, k_factors, size=n)
    for i, k in enumerate(y):
        a = rng.integers(0, len(z), size=batch)
        b = np.array([rng.choice(groups[k][v[ai, k]]) for ai in a])
        x[i] = np.abs(z[a] - z[b]).mean(0)
    return x, y


def beta_vae_score(z: torch.Tensor, v: Any, *, batch: int = 64, train_votes: int = 1000, test_votes: int = 500,
                   seed: int = 0) -> dict[str, Any]:
    """The beta-VAE metric (Higgins et al. 2017): accuracy of a linear classifier that names the fixed factor.

    Returns ``{"train_accuracy", "accuracy", "chance"}`` (chance = 1/K).
    """
    from sklearn.linear_model import LogisticRegression

    z, v = _arrays(z, v)
    if v.shape[1] < 2:
        raise UsageError("the beta-VAE metric needs at least 2 factors")
    rng = np.random.default_rng(seed)
    x_tr, y_tr = _votes(z, v, train_votes, batch, rng)
    x_te, y_te = _votes(z, v, test_votes, batch, rng)
    clf = LogisticRegression(max_iter=2000).fit(x_tr, y_tr)
    return {"train_accuracy": float(clf.score(x_tr, y_tr)), "accuracy": float(clf.score(x_te, y_te)),
            "chance": 1.0 / v.shape[1]}
