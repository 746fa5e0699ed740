"""Pareto k-hat of importance weights: how far a guide can be trusted as a proposal.

For a datapoint x with particles z_k ~ q(z | x), the importance weights are
``w_k = p(x, z_k) / q(z_k | x)``. Pareto smoothed importance sampling (Vehtari
et al. 2015/2024) fits a generalised Pareto distribution to the largest weights;
its shape estimate k-hat tells how heavy the weights' right tail is. Yao et al.
(2018, "Yes, but did it work?") read it as a diagnostic of a variational
approximation used as a proposal:

* k-hat < 0.5: the weights have finite variance; importance-weighted estimates
  (and the IWAE bound) converge quickly, q is a good proposal for this x;
* 0.5 <= k-hat <= 0.7: finite mean, infinite variance; estimates are usable but
  noisy and converge slowly;
* k-hat > 0.7: q misses a substantial part of the posterior; the IWAE estimate of
  log p(x) is unreliable for this datapoint however large K is in practice.

The fit is done by ArviZ. ArviZ 0.x (Python 3.11 here) has ``arviz.psislw(log
weights)``; ArviZ 1.x moved it to ``arviz_stats`` whose ``psislw`` takes log
*likelihoods* (it negates its input). :func:`psis_khat` probes which is installed
and passes the right sign, so both return the k-hat of the same weights.

Degenerate case: when every weight of a datapoint is the same (the guide is the
exact posterior, so log w_k = log p(x) for every k) the tail has no spread and a
Pareto fit is undefined (ArviZ would fit floating-point noise). We detect it
explicitly: log weights whose range is at most ``constant_tol`` nats (weights
within a factor exp(constant_tol) of each other) get k-hat = -inf, the limit of
the generalised Pareto shape as the tail collapses to a point. Such a datapoint
counts as "k-hat < 0.5", and the summaries below never contain NaN.
"""
import math
import warnings
from typing import Any

import numpy as np
import torch

from .errors import UsageError

THRESHOLDS = (0.5, 0.7)
DEFAULT_CONSTANT_TOL = 1e-3


BACKENDS = ("arviz_stats", "arviz")


def _backend(name=None):
    """(name, function log_weights (N, K) ndarray -> k-hat (N,) ndarray) for ArviZ's PSIS.

    ``name=None`` takes the first installed of :data:`BACKENDS`: ``arviz_stats``
    (ArviZ >= 1.0, whose ``psislw`` takes log-likelihoods, so the log weights are
    negated) or ``arviz`` 0.x (``arviz.psislw`` takes log weights as they are).
    """
    if name not in (None, *BACKENDS):
        raise UsageError(f"unknown PSIS backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name in (None, "arviz_stats"):
        try:
            from arviz_stats.base import array_stats

            return "arviz_stats", lambda lw: np.asarray(array_stats.psislw(-lw, r_eff=1.0, axis=-1)[1])
        except ImportError:
            if name is not None:
                raise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ 0.2x announces its refactor on import
        import arviz

    if not hasattr(arviz, "psislw"):
        raise ImportError("PSIS needs arviz<1 (arviz.psislw) or arviz_stats (arviz_stats.base.array_stats.psislw)")
    return "arviz", lambda lw: np.asarray(arviz.psislw(lw, reff=1.0)[1])


def min_particles() -> int:
    """The smallest K whose PSIS tail (ceil(min(K/5, 3 sqrt K)) weights) has the 5 a Pareto fit needs."""
    k = 1
    while math.ceil(min(k / 5, 3 * math.sqrt(k))) < 5:
        k += 1
    return k


def psis_khat(log_weights: torch.Tensor, *, constant_tol: float = DEFAULT_CONSTANT_TOL,
              backend: str | None = None) -> torch.Tensor:
    """Pareto k-hat per datapoint of importance log weights ``log_weights`` (N, K): returns (N,) float64.

    ``log_weights[n, k] = log p(x_n, z_k) - log q(z_k | x_n)``, as
    ``inference.evaluate(..., keep_log_weights=True).log_weights`` returns them.
    Datapoints whose weights are constant to ``constant_tol`` nats get -inf (see
    the module docstring). Raises :class:`UsageError` for fewer than
    :func:`min_particles` particles or non-finite weights. ``backend`` picks the
    ArviZ implementation (see :func:`_backend`); by default the installed one.
    """
    lw = torch.as_tensor(log_weights).detach().to("cpu", torch.float64)
    if lw.dim() == 1:
        lw = lw[None]
    if lw.dim() != 2:
        raise UsageError(f"log_weights must be (N, K), got shape {tuple(lw.shape)}")
    if lw.shape[1] < min_particles():
        raise UsageError(
            f"PSIS needs at least {min_particles()} importance samples per datapoint for its Pareto tail fit, "
            f"got {lw.shape[1]}"
        )
    if not torch.isfinite(lw).all():
        raise UsageError("log_weights hold NaN or infinite values")
    out = np.full(lw.shape[0], -np.inf)
    spread = (lw.max(1).values - lw.min(1).values).numpy()
    varying = spread > constant_tol
    if varying.any():
        _, fn = _backend(backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # overflow in exp for extreme tails: k-hat is still right
            out[varying] = fn(lw.numpy()[varying])
    return torch.from_numpy(out)


def khat_summary(khat: Any) -> dict[str, Any]:
    """Fractions of datapoints with k-hat < 0.5, in [0.5, 0.7] and > 0.7 (Yao et al. 2018), plus counts.

    Keys: ``khat_below_0_5``, ``khat_0_5_to_0_7``, ``khat_above_0_7`` (fractions
    summing to 1), ``khat_max`` and ``khat_median`` (None when every datapoint is
    degenerate, so the record stays valid JSON), ``khat_n``.
    """
    k = torch.as_tensor(khat, dtype=torch.float64).reshape(-1)
    if k.numel() == 0:
        raise UsageError("khat_summary needs at least one k-hat")
    if torch.isnan(k).any():
        raise UsageError("k-hat values hold NaN")
    lo, hi = THRESHOLDS
    n = k.numel()
    finite = k[torch.isfinite(k)]
    return {
        "khat_below_0_5": float((k < lo).sum()) / n,
        "khat_0_5_to_0_7": float(((k >= lo) & (k <= hi)).sum()) / n,
        "khat_above_0_7": float((k > hi).sum()) / n,
        "khat_max": float(finite.max()) if finite.numel() else None,
        "khat_median": float(finite.median()) if finite.numel() else None,
        "khat_n": n,
    }


def psis_diagnostics(log_weights: torch.Tensor, *, constant_tol: float = DEFAULT_CONSTANT_TOL) -> tuple[Any, ...]:
    """``(khat (N,), summary dict)`` for importance log weights (N, K)."""
    khat = psis_khat(log_weights, constant_tol=constant_tol)
    return khat, khat_summary(khat)
