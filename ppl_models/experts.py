r"""Fusion rules: one posterior q(z | X_S) from the unimodal experts q(z | x_m) = N(mu_m, diag s_m^2).

Every rule is a small pure function of

* ``loc``, ``scale``: the experts' means and standard deviations stacked on a
  *modality axis*, shape ``(..., M, L)`` (the axis is dim -2);
* ``mask``: which experts are present, ``None`` (all), a sequence of M bools, or
  a bool tensor broadcastable to ``(..., M)`` (e.g. per datapoint). An absent
  expert is dropped exactly: its values are never read (they may be NaN).
  A tensor mask is checked (every row has a present expert) with one host
  read, unless ``checked=True`` says the caller checked it once already (a
  data set's presence mask, checked at load): then no device synchronisation
  happens, and CoDE's rho is checked against all M experts.

and returns a ``torch.distributions.Distribution`` (a Pyro one) over z with event shape
``(L,)``. The Gaussian rules act per latent dimension (the experts are diagonal).

=========  =====================================================================
rule       q(z | X_S), S the present experts, n = |S|
=========  =====================================================================
``poe``    product of experts (Wu & Goodman 2018):
           precision T = sum_S 1/s_m^2 (+1 with the prior expert N(0, I)),
           mean = (sum_S mu_m / s_m^2) / T, variance = 1/T.
``moe``    uniform mixture (1/n) sum_S N(mu_m, s_m^2) (Shi et al. 2019):
           mean = mean of the means, variance = mean of the variances plus the
           variance of the means (law of total variance).
``mopoe``  uniform mixture over the 2^n - 1 non-empty subsets of S of each
           subset's PoE (Sutter, Daunhawer & Vogt 2021).
``code``   consensus of dependent experts (Mancisidor et al. 2024, Lemma 2): see
           :func:`code`.
=========  =====================================================================

Sampling the mixtures: :class:`GaussianMixture` ``rsample`` first draws a
component index k from the (fixed, parameter-free) mixture weights and then
z = mu_k + s_k * eps. Because the weights carry no parameters, the single-sample
estimator ``log p(x, z) - log q(z | X)`` with that z is unbiased for the ELBO
and its pathwise gradient is unbiased for the ELBO's gradient: the ELBO is
sum_k w_k E_eps[f(mu_k + s_k eps)] with w fixed, and each term is
differentiated by reparameterisation. (Shi et al.'s stratified estimator, one
draw per component, has lower variance; it is not implemented here.)
"""
import itertools
import math
from collections.abc import Sequence
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints

from inference.errors import UsageError

RULES = ("poe", "moe", "mopoe", "code")


def subsets(m: Any) -> list[Any]:
    """The 2^m - 1 non-empty subsets of range(m) as sorted tuples, by size then lexicographically."""
    return [s for k in range(1, m + 1) for s in itertools.combinations(range(m), k)]


def _mask(mask, loc, checked=False):
    """(bool mask broadcastable to loc.shape[:-1], largest number of present experts).

    A mask given as (nested) Python bools is checked on the host, so no device
    synchronisation happens; a tensor mask is checked with one host read, unless
    ``checked`` (then M stands for the largest number).
    """
    m = loc.shape[-2]
    if mask is None:
        return torch.ones(m, dtype=torch.bool, device=loc.device), m
    if isinstance(mask, torch.Tensor) and checked:
        mask = mask.to(device=loc.device, dtype=torch.bool)
        if mask.shape[-1:] != (m,):
            raise UsageError(f"the mask must have one entry per expert ({m}), got shape {tuple(mask.shape)}")
        return mask, m
    if isinstance(mask, torch.Tensor):
        mask = mask.to(device=loc.device, dtype=torch.bool)
        counts = mask.sum(-1)
        low, high = (int(v) for v in torch.stack([counts.min(), counts.max()]).cpu()) if counts.numel() else (m, m)
    else:
        rows = [mask] if not isinstance(mask[0], (list, tuple)) else mask
        counts = [sum(bool(v) for v in r) for r in rows]
        low, high = min(counts), max(counts)
        mask = torch.tensor(mask, dtype=torch.bool).to(loc.device)
    if mask.shape[-1:] != (m,):
        raise UsageError(f"the mask must have one entry per expert ({m}), got shape {tuple(mask.shape)}")
    if low == 0:
        raise UsageError("every datapoint needs at least one present expert (the mask has an all-False row)")
    return mask, high


def _precisions(loc, scale, mask):
    """Precisions 1/s^2 and precision-weighted means with absent experts set to exactly 0."""
    mask = mask[..., None]
    prec = torch.where(mask, scale.pow(-2), scale.new_zeros(()))
    return prec, torch.where(mask, loc, loc.new_zeros(())) * prec


def poe(loc: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None = None, prior_expert: bool = False,
        checked: bool = False) -> dist.TorchDistribution:
    """Product of Gaussian experts: N(sum_S mu_m t_m / T, 1/T), t_m = s_m^-2, T = sum_S t_m (+1 with the prior).

    With ``prior_expert=True`` the standard-normal prior joins as an expert
    (precision 1, mean 0), as in the MVAE (Wu & Goodman 2018). The variance is at
    most the smallest present expert's variance.
    """
    mask, _ = _mask(mask, loc, checked)
    prec, weighted = _precisions(loc, scale, mask)
    total, num = prec.sum(-2), weighted.sum(-2)
    if prior_expert:
        total = total + 1.0
    return dist.Normal(num / total, total.rsqrt()).to_event(1)


def _check_rho(rho, n_max):
    low = -1.0 / (n_max - 1) if n_max > 1 else -math.inf
    if not low < rho < 1.0:
        raise UsageError(
            f"code: rho must lie in ({low:.4g}, 1) for {n_max} present experts (so that the experts' error "
            f"correlation matrix (1 - rho) I + rho 11' is positive definite), got {rho}"
        )


def _code_sigma_inv_one(scale, mask, rho, checked=False):
    r"""Sigma^-1 1 per latent dimension, (..., M, L), in O(M) by Sherman-Morrison.

    Sigma = S R S, S = diag(s), R = (1 - rho) I + rho 11' over the n present
    experts, R^-1 = [I - c 11'] / (1 - rho) with c = rho / (1 + (n-1) rho), so
    with a = 1/s (0 for absent experts): Sigma^-1 1 = a (a - c sum a) / (1 - rho).
    """
    mask, n_max = _mask(mask, scale, checked)
    rho = float(rho)
    _check_rho(rho, n_max)
    a = torch.where(mask[..., None], scale.reciprocal(), scale.new_zeros(()))
    n = mask.sum(-1)[..., None, None].to(scale.dtype)
    c = rho / (1.0 + (n - 1.0) * rho)
    return a * (a - c * a.sum(-2, keepdim=True)) / (1.0 - rho), mask


def code_weights(scale: torch.Tensor, mask: torch.Tensor | None = None, rho: float = 0.0) -> torch.Tensor:
    """Consensus weights w = Sigma^-1 1 / (1' Sigma^-1 1), (..., M, L): the CoDE mean is sum_m w_m mu_m.

    They sum to 1 and may be negative when the experts' scales differ a lot;
    absent experts get weight 0.
    """
    u, _ = _code_sigma_inv_one(scale, mask, rho)
    return u / u.sum(-2, keepdim=True)


def code(loc: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None = None, rho: float = 0.0,
         checked: bool = False) -> dist.TorchDistribution:
    r"""Consensus of dependent experts (CoDE; Mancisidor, Jenssen, Kampffmeyer & Yu 2024, Lemma 2).

    Per latent dimension the experts' estimates mu_j of z have errors with
    covariance Sigma_jj = s_j^2, Sigma_ij = rho s_i s_j. With a flat prior the
    consensus is N(B/A, 1/A), A = 1' Sigma^-1 1, B = 1' Sigma^-1 mu = (Sigma^-1 1)' mu,
    with Sigma^-1 1 in closed form (:func:`_code_sigma_inv_one`)::

        A = [sum a^2 - c (sum a)^2] / (1 - rho),   a = 1/s, c = rho / (1 + (n-1) rho)

    Properties: one present expert passes through unchanged; rho = 0 is the
    precision-weighted PoE without the prior expert; with n equal scales s the
    variance is s^2 (1 + (n-1) rho) / n. ``rho`` must lie in (-1/(n-1), 1) for
    the largest n present, else :class:`UsageError`.
    """
    u, mask = _code_sigma_inv_one(scale, mask, rho, checked)
    precision = u.sum(-2)
    mean = (u * torch.where(mask[..., None], loc, loc.new_zeros(()))).sum(-2) / precision
    return dist.Normal(mean, precision.rsqrt()).to_event(1)


class GaussianMixture(TorchDistribution):
    """A mixture of diagonal Gaussians with fixed weights and reparameterised sampling per component.

    ``loc``, ``scale``: (..., C, L); ``log_weights``: (..., C), -inf for absent
    components. ``rsample`` picks k ~ Categorical(weights) and returns
    ``loc_k + scale_k * eps`` (differentiable in loc and scale, not in the
    weights, which are treated as constants; see the module docstring).
    """

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, log_weights: torch.Tensor,
                 validate_args: bool | None = None) -> None:
        self.loc, self.scale = loc, scale
        self.log_weights = log_weights - torch.logsumexp(log_weights, -1, keepdim=True)
        batch_shape = torch.broadcast_shapes(loc.shape[:-2], scale.shape[:-2], log_weights.shape[:-1])
        super().__init__(batch_shape, loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape: torch.Size | Sequence[int], _instance: Any = None) -> "GaussianMixture":
        batch_shape = torch.Size(batch_shape)
        c, d = self.loc.shape[-2:]
        return GaussianMixture(
            self.loc.expand(batch_shape + (c, d)),
            self.scale.expand(batch_shape + (c, d)),
            self.log_weights.expand(batch_shape + (c,)),
        )

    @property
    def weights(self) -> torch.Tensor:
        return self.log_weights.exp()

    @property
    def mean(self) -> torch.Tensor:
        return (self.weights[..., None] * self.loc).sum(-2)

    @property
    def variance(self) -> torch.Tensor:
        w = self.weights[..., None]
        mean = (w * self.loc).sum(-2, keepdim=True)
        return (w * (self.scale.pow(2) + (self.loc - mean).pow(2))).sum(-2)

    def rsample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        logits = self.log_weights.expand(shape + self.log_weights.shape[-1:])
        k = torch.distributions.Categorical(logits=logits).sample()
        pick = lambda t: t.expand(shape + t.shape[-2:]).gather(-2, k[..., None, None].expand(shape + (1, t.shape[-1])))  # noqa: E731
        loc, scale = pick(self.loc).squeeze(-2), pick(self.scale).squeeze(-2)
        return loc + scale * torch.randn_like(loc)

    def log_prob(self, value: Any) -> torch.Tensor:
        per = dist.Normal(self.loc, self.scale).log_prob(value.unsqueeze(-2)).sum(-1)  # (..., C)
        return torch.logsumexp(per + self.log_weights, dim=-1)


def moe(loc: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None = None,
        checked: bool = False) -> "GaussianMixture":
    """Uniform mixture of the present experts, (1/n) sum_S N(mu_m, diag s_m^2)."""
    mask, _ = _mask(mask, loc, checked)
    scale = torch.where(mask[..., None], scale, scale.new_ones(()))  # absent: finite placeholders, weight 0
    loc = torch.where(mask[..., None], loc, loc.new_zeros(()))
    return GaussianMixture(loc, scale, torch.where(mask, 0.0, -math.inf).to(loc.dtype))


def mopoe(loc: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None = None, prior_expert: bool = False,
          checked: bool = False) -> torch.Tensor:
    """Uniform mixture over the non-empty subsets of the present experts of each subset's PoE (Sutter et al. 2021).

    With n present experts there are 2^n - 1 components; a single expert passes
    through unchanged (without the prior expert).
    """
    mask, _ = _mask(mask, loc, checked)
    m = loc.shape[-2]
    member = torch.zeros(2**m - 1, m, dtype=loc.dtype, device=loc.device)
    for i, s in enumerate(subsets(m)):
        member[i, list(s)] = 1.0
    prec, weighted = _precisions(loc, scale, mask)
    total = member @ prec + (1.0 if prior_expert else 0.0)  # (..., C, L)
    num = member @ weighted
    # a component is valid iff every member is present; invalid ones get weight 0 and a finite placeholder
    valid = (member @ (~mask).to(loc.dtype).unsqueeze(-1)).squeeze(-1) == 0  # (..., C)
    safe = torch.where(valid[..., None], total, total.new_ones(()))
    return GaussianMixture(num / safe, safe.rsqrt(), torch.where(valid, 0.0, -math.inf).to(loc.dtype))


def fuse(rule: str, loc: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None = None, *, rho: float = 0.0,
         prior_expert: bool = False, checked: bool = False) -> Any:
    """Apply the rule named ``rule`` (one of :data:`RULES`); ``checked``: see the module docstring."""
    if rule == "poe":
        return poe(loc, scale, mask, prior_expert=prior_expert, checked=checked)
    if rule == "moe":
        return moe(loc, scale, mask, checked=checked)
    if rule == "mopoe":
        return mopoe(loc, scale, mask, prior_expert=prior_expert, checked=checked)
    if rule == "code":
        return code(loc, scale, mask, rho=rho, checked=checked)
    raise UsageError(f"unknown fusion rule {rule!r}; valid: {', '.join(RULES)}")
