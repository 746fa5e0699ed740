r"""Normalising-flow guides: a diagonal Gaussian pushed through K conditional autoregressive flow steps.

For an encoder with features h = body(x), the guide is::

    z_0 ~ N(mu(h), diag sigma(h)^2)
    z_k = f_k(z_{k-1}; h),   k = 1..K
    log q(z_K | x) = log N(z_0; mu, sigma^2) - sum_k log |det d f_k / d z_{k-1}|

(the change of variables; Rezende & Mohamed 2015). Each f_k is autoregressive
in z and conditioned on the context h, so its Jacobian is triangular and its
log-determinant is a sum over dimensions:

* ``iaf:K``: inverse autoregressive flow (Kingma et al. 2016, eq. 10),
  ``z_k = m + exp(log s) * z_{k-1}`` with ``(m, log s) = MADE(z_{k-1}, h)`` and
  log s clamped to [-5, 3]; Pyro's
  :class:`~pyro.distributions.transforms.ConditionalAffineAutoregressive`.
  The MADE's output layer starts at zero, so every step starts as the identity
  (m = 0, s = 1) and the untrained flow guide *is* the diagonal Gaussian guide
  (Kingma et al. 2016, sec. 4: start each step "as, or close to, the
  identity"). Pyro's default initialisation starts from a random (m, s), and
  its sigmoid-gated "stable" form (eq. 14, ``z_k = s z_{k-1} + (1 - s) m``)
  can only contract (s in (0, 1)) and starts at s = sigmoid(2) = 0.88;
* ``spline:K``: monotone rational-quadratic splines whose knots come from a
  conditional MADE (neural spline flows, Durkan et al. 2019); Pyro's
  :class:`~pyro.distributions.transforms.ConditionalSplineAutoregressive`
  (linear order, 8 bins on [-3, 3], identity outside).

Both run their networks in the sampling direction, so a sample and its
log-density cost one pass per step (Pyro caches the inverse of the value just
sampled); scoring an arbitrary z needs L sequential passes per step. The
autoregressive order is reversed between steps (Kingma et al. 2016, sec. 4).
``diag`` (or K = 0) is the plain diagonal Gaussian.
"""
from typing import Any

import pyro.distributions as dist
import torch
import torch.nn as nn
from pyro.distributions.transforms import ConditionalAffineAutoregressive, ConditionalSplineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN

from inference.errors import UsageError

FLOW_KINDS = ("iaf", "spline")
SPLINE_BINS = 8
SPLINE_BOUND = 3.0


def parse_guide(spec: Any) -> tuple[Any, ...]:
    """``"diag"`` -> ``("diag", 0)``; ``"iaf:K"`` / ``"spline:K"`` -> ``(kind, K)`` with K >= 0.

    :raises UsageError: any other spec.
    """
    if spec == "diag":
        return "diag", 0
    kind, _, steps = str(spec).partition(":")
    if kind in FLOW_KINDS and steps.isdigit():
        return kind, int(steps)
    raise UsageError(f"unknown guide {spec!r}; use 'diag', 'iaf:K' or 'spline:K' (K >= 0 flow steps)")


def default_flow_hidden(latent_dim: int) -> list[Any]:
    """The MADE width used when none is given: max(4 L, 64) (at least L, as MADE requires)."""
    return [max(4 * latent_dim, 64)]


class ConditionalFlow(nn.Module):
    """K conditional autoregressive steps on R^L, conditioned on a context of ``context_dim`` features.

    :param kind: ``"iaf"`` or ``"spline"``.
    :param steps: K >= 0.
    :param latent_dim: L (>= 2: an autoregressive step on one dimension has nothing to condition on).
    :param context_dim: size of the context h (the encoder's features).
    :param hidden: MADE hidden widths, each >= L (default :func:`default_flow_hidden`).
    """

    def __init__(self, kind: str, steps: int, latent_dim: int, context_dim: int, hidden: Any = None) -> None:
        super().__init__()
        if kind not in FLOW_KINDS:
            raise UsageError(f"unknown flow {kind!r}; valid: {', '.join(FLOW_KINDS)}")
        if steps > 0 and latent_dim < 2:
            raise UsageError(f"a flow guide needs latent_dim >= 2, got {latent_dim}")
        hidden = list(hidden) if hidden else default_flow_hidden(latent_dim)
        if any(h < latent_dim for h in hidden):
            raise UsageError(f"flow hidden widths must be >= latent_dim = {latent_dim}, got {hidden}")
        self.kind, self.steps = kind, steps
        transforms: list[Any] = []
        for k in range(steps):
            order = torch.arange(latent_dim) if k % 2 == 0 else torch.arange(latent_dim - 1, -1, -1)
            if kind == "iaf":
                # pyro's stub asks for the legacy torch.LongTensor type; an int64 tensor is what it means
                made = ConditionalAutoRegressiveNN(latent_dim, context_dim, hidden,
                                                   permutation=order)  # type: ignore[arg-type]
                for p in made.layers[-1].parameters():  # (m, log s) = 0: the step starts as the identity
                    nn.init.zeros_(p)
                transforms.append(ConditionalAffineAutoregressive(made))
            else:
                made = ConditionalAutoRegressiveNN(latent_dim, context_dim, hidden,
                                                   permutation=order,  # type: ignore[arg-type]
                                                   param_dims=[SPLINE_BINS, SPLINE_BINS, SPLINE_BINS - 1, SPLINE_BINS])
                transforms.append(ConditionalSplineAutoregressive(latent_dim, made, count_bins=SPLINE_BINS,
                                                                  bound=SPLINE_BOUND, order="linear"))
        self.transforms = nn.ModuleList(transforms)

    def forward(self, base: Any, context: Any) -> dist.TorchDistribution:
        """q(z | x): ``base`` (a distribution with event shape (L,), batch shape B) pushed through the steps.

        ``context``: (*B, context_dim). Returns a
        :class:`pyro.distributions.TransformedDistribution` (reparameterised; its
        ``log_prob`` includes every step's log-Jacobian).
        """
        # nn.ModuleList types its items as plain modules; these are pyro's conditional transforms
        return dist.TransformedDistribution(base, [t.condition(context)  # type: ignore[operator]
                                                   for t in self.transforms])
