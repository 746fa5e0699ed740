r"""Gaussian mixture models: classic EM and a Pyro model with enumerated assignments.

Generative process, for each datapoint n (inside ``pyro.plate("data")``)::

    c_n ~ Categorical(pi)                      pi = softmax(logits), K components
    x_n | c_n ~ N(mu_{c_n}, Sigma_{c_n})       Sigma diagonal or full

The marginal is the mixture density, computed exactly::

    log p(x_n) = logsumexp_k [log pi_k + log N(x_n; mu_k, Sigma_k)]

Two ways to fit it:

* :func:`em` — expectation-maximisation (Dempster, Laird & Rubin 1977; Bishop
  2006, section 9.2): E-step responsibilities r_nk = p(c_n = k | x_n), closed-form
  M-step, several restarts, the restart with the highest log-likelihood kept.
  Each iteration cannot decrease the log-likelihood; the result is a local
  maximum (or a saddle) of the likelihood of the regularised model.
* :class:`GMM` — a Pyro model/guide pair trained by SVI with ``TraceEnum_ELBO``
  (spec ``"enum"``). The assignment ``c`` is marked
  ``infer={"enumerate": "parallel"}`` so it is summed out exactly, and with the
  global parameters as point estimates (the default) the objective *is*
  ``sum_n log p(x_n)``: no bound, no Monte Carlo noise. With priors
  (``mean_prior_scale`` / ``weight_concentration``) the means and weights become
  global latent variables outside the data plate with a mean-field guide
  (Normal for the means, Dirichlet for the weights); the objective is then the
  ELBO ``E_q[log p(x, theta)] - E_q[log q(theta)] <= log p(x)`` of the whole data
  set, minibatches scaled by ``num_data / batch`` (set by :func:`inference.fit`).
  Covariances always stay point estimates.

:meth:`GMM.log_marginal` and :meth:`GMM.log_weights` score the model exactly, so
:func:`inference.evaluate` reports the exact log-likelihood (with priors: the
plug-in log-likelihood at the guide's mean of the globals, which is not the
marginal over theta).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro.ops.indexing import Vindex

from inference.errors import UsageError

from .base import Configurable, ModelConfig
from .nets import softplus_inverse

COVARIANCES = ("diag", "full")


def _check_x(x, what="x"):
    if not torch.is_tensor(x) or x.dim() != 2:
        raise UsageError(f"{what} must be a 2-D tensor (N, D), got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise UsageError(f"{what} must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise UsageError(f"{what} holds NaN or infinite values")


def _check_covariance(covariance):
    if covariance not in COVARIANCES:
        raise UsageError(f"unknown covariance {covariance!r}; valid: {', '.join(COVARIANCES)}")


def component_log_prob(x: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor,
                       covariance: str = "diag") -> torch.Tensor:
    """log N(x_n; mu_k, Sigma_k) for every pair: (N, K).

    ``covariances`` are variances (K, D) for ``"diag"`` and matrices (K, D, D) for ``"full"``.
    """
    xs = x.unsqueeze(-2)  # (N, 1, D)
    if covariance == "diag":
        return dist.Normal(means, covariances.sqrt()).log_prob(xs).sum(-1)
    return dist.MultivariateNormal(means, scale_tril=torch.linalg.cholesky(covariances)).log_prob(xs)


def mixture_log_joint(x: torch.Tensor, weights: Any, means: torch.Tensor, covariances: torch.Tensor,
                      covariance: str = "diag") -> torch.Tensor:
    """log pi_k + log N(x_n; mu_k, Sigma_k): (N, K)."""
    return weights.log() + component_log_prob(x, means, covariances, covariance)


@dataclass
class EMResult:
    """A fitted mixture: parameters, mean log-likelihood per datapoint, convergence record."""

    weights: torch.Tensor  # (K,)
    means: torch.Tensor  # (K, D)
    covariances: torch.Tensor  # (K, D) variances, or (K, D, D)
    log_likelihood: float  # mean log p(x_n) on the training data
    n_iter: int
    converged: bool
    covariance: str = "diag"

    def _joint(self, x):
        _check_x(x)
        p = self.means
        x64 = x.to(device=p.device, dtype=p.dtype)
        return mixture_log_joint(x64, self.weights, self.means, self.covariances, self.covariance)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_n) per datapoint: (N,), dtype and device of ``x``."""
        return torch.logsumexp(self._joint(x), dim=-1).to(device=x.device, dtype=x.dtype)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """p(c_n = k | x_n): (N, K)."""
        return torch.softmax(self._joint(x), dim=-1).to(device=x.device, dtype=x.dtype)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable component per datapoint: (N,) long."""
        return self._joint(x).argmax(-1).to(x.device)


def kmeans_pp(x: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): k rows of ``x`` spread over the data, seeded."""
    _check_x(x)
    if not 1 <= k <= x.shape[0]:
        raise UsageError(f"k must be between 1 and the number of datapoints ({x.shape[0]}), got {k!r}")
    return _kmeans_pp(x, k, torch.Generator().manual_seed(seed))


def _kmeans_pp(x, k, gen):
    n = x.shape[0]
    idx = [int(torch.randint(n, (1,), generator=gen))]
    d2 = (x - x[idx[0]]).pow(2).sum(-1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        i = int(torch.multinomial(probs.cpu(), 1, generator=gen))
        idx.append(i)
        d2 = torch.minimum(d2, (x - x[i]).pow(2).sum(-1))
    return x[idx].clone()


def _m_step(x, resp, covariance, reg):
    nk = resp.sum(0) + 10 * torch.finfo(resp.dtype).eps  # (K,)
    weights = nk / nk.sum()
    means = (resp.T @ x) / nk[:, None]
    if covariance == "diag":
        # sum_n r_nk (x_n - mu_k)^2 / N_k, expanded to avoid an (N, K, D) tensor
        ex2 = (resp.T @ (x * x)) / nk[:, None]
        cov = (ex2 - means.pow(2)).clamp_min(0.0) + reg
    else:
        d = x.shape[1]
        cov = torch.empty(means.shape[0], d, d, dtype=x.dtype, device=x.device)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        for k in range(means.shape[0]):
            diff = x - means[k]
            cov[k] = (resp[:, k, None] * diff).T @ diff / nk[k] + reg * eye
    return weights, means, cov


def em(x: torch.Tensor, n_components: int, *, covariance: str = "diag", restarts: int = 5, max_iter: int = 200,
       tol: float = 1e-6, reg: float = 1e-6, seed: int = 0) -> Any:
    """Fit a Gaussian mixture by expectation-maximisation, keeping the best of ``restarts`` runs.

    Each run starts from k-means++ means, the pooled per-dimension variance (or
    covariance) for every component and uniform weights, then alternates

    * E-step: r_nk = pi_k N(x_n; mu_k, Sigma_k) / sum_j pi_j N(x_n; mu_j, Sigma_j);
    * M-step: N_k = sum_n r_nk, pi_k = N_k / N, mu_k = sum_n r_nk x_n / N_k,
      Sigma_k = sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T / N_k + reg * I
      (its diagonal only for ``"diag"``),

    until the mean log-likelihood changes by less than ``tol`` (converged) or
    ``max_iter`` iterations. ``reg`` keeps covariances positive definite (it is a
    ridge on Sigma, so the fitted model is the regularised one). Computation is in
    float64 on ``x``'s device; the returned tensors are float64 on that device.
    Runs are seeded from ``seed``, so the result is deterministic.
    """
    _check_x(x)
    _check_covariance(covariance)
    for name, value in (("n_components", n_components), ("restarts", restarts), ("max_iter", max_iter)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    if n_components > x.shape[0]:
        raise UsageError(f"n_components={n_components} exceeds the number of datapoints ({x.shape[0]})")
    if not (reg >= 0 and math.isfinite(reg)) or not (tol >= 0):
        raise UsageError(f"reg and tol must be non-negative, got reg={reg!r}, tol={tol!r}")
    x64 = x.detach().to(torch.float64)
    n, d = x64.shape
    gen = torch.Generator().manual_seed(seed)
    centred = x64 - x64.mean(0)
    if covariance == "diag":
        pooled = centred.pow(2).mean(0) + reg
    else:
        pooled = centred.T @ centred / n + reg * torch.eye(d, dtype=x64.dtype, device=x64.device)
    if float(pooled.min() if covariance == "diag" else torch.linalg.eigvalsh(pooled).min()) <= 0:
        raise UsageError("the data have a dimension with zero variance: pass reg > 0")
    best = None
    for _ in range(restarts):
        means = _kmeans_pp(x64, n_components, gen)
        weights = torch.full((n_components,), 1.0 / n_components, dtype=x64.dtype, device=x64.device)
        cov = pooled.expand((n_components,) + pooled.shape).clone()
        prev = -math.inf
        converged = False
        for it in range(1, max_iter + 1):
            joint = mixture_log_joint(x64, weights, means, cov, covariance)
            lse = torch.logsumexp(joint, dim=-1, keepdim=True)
            ll = float(lse.mean())
            if abs(ll - prev) < tol:
                converged = True
                break
            prev = ll
            weights, means, cov = _m_step(x64, (joint - lse).exp(), covariance, reg)
        else:
            ll = float(torch.logsumexp(mixture_log_joint(x64, weights, means, cov, covariance), -1).mean())
        result = EMResult(weights, means, cov, ll, it, converged, covariance)
        if best is None or result.log_likelihood > best.log_likelihood:
            best = result
    return best


@dataclass
class GMMConfig(ModelConfig):
    """The stored arguments of :class:`GMM` (defaults: its signature; ``init_means`` is not stored)."""

    x_dim: int
    n_components: int
    covariance: str
    min_scale: float
    mean_prior_scale: float | None
    weight_concentration: float | None


class GMM(Configurable, nn.Module):
    """A Gaussian mixture as a Pyro model/guide pair with the assignments enumerated.

    :param x_dim: D, values per datapoint.
    :param n_components: K.
    :param covariance: ``"diag"`` or ``"full"``.
    :param min_scale: floor on standard deviations (diag) / the Cholesky diagonal (full).
    :param mean_prior_scale: if given, mu_k ~ N(0, s^2 I) a priori with a mean-field Normal guide.
    :param weight_concentration: if given, pi ~ Dirichlet(a * 1) a priori with a Dirichlet guide.

    Train with ``inference.fit(gmm, x, elbo="enum", ...)``; ``max_plate_nesting = 1``.
    """

    max_plate_nesting = 1

    def __init__(
        self,
        x_dim: int,
        n_components: int,
        covariance: str = "diag",
        *,
        min_scale: float = 1e-3,
        mean_prior_scale: float | None = None,
        weight_concentration: float | None = None,
        init_means: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.cfg = GMMConfig.from_arguments(locals())
        _check_covariance(covariance)
        if not isinstance(n_components, int) or n_components < 1:
            raise UsageError(f"n_components must be a positive integer, got {n_components!r}")
        for name, v in (("mean_prior_scale", mean_prior_scale), ("weight_concentration", weight_concentration)):
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise UsageError(f"{name} must be a positive number, got {v!r}")
        self.x_dim, self.n_components, self.covariance = x_dim, n_components, covariance
        self.min_scale = min_scale
        self.mean_prior_scale, self.weight_concentration = mean_prior_scale, weight_concentration
        self.num_data = None  # set by inference.fit; scales minibatches when there are global latents
        k, d = n_components, x_dim
        means = torch.randn(k, d) if init_means is None else torch.as_tensor(init_means, dtype=torch.float32)
        self.weight_logits = nn.Parameter(torch.zeros(k))
        self.means = nn.Parameter(means.clone())
        # the "raw" scale: softplus(raw) + min_scale is a standard deviation (diag) / Cholesky diagonal (full)
        self.scale_raw = nn.Parameter(torch.full((k, d), float(softplus_inverse(1.0 - min_scale))))
        if covariance == "full":
            self.tril_raw = nn.Parameter(torch.zeros(k, d, d))
        if mean_prior_scale is not None:
            self.means_scale_raw = nn.Parameter(torch.full((k, d), float(softplus_inverse(0.1))))
        if weight_concentration is not None:
            self.weight_conc_raw = nn.Parameter(torch.full((k,), float(softplus_inverse(10.0))))
        # how log_weights draws the assignment: "exact" sums it out; "prior" samples c_k ~ pi
        # (importance sampling with the prior as proposal, a deliberately weak guide for bound studies)
        self.proposal = "exact"

    @classmethod
    def from_em(cls, result: Any, *, min_scale: float | None = None) -> GMM:
        """A point-estimate GMM holding the parameters of an :class:`EMResult` (float32).

        ``min_scale`` defaults to min(1e-3, half the smallest standard deviation / Cholesky diagonal),
        so the floor never alters EM's covariances."""
        k, d = result.means.shape
        if min_scale is None:
            cov = result.covariances
            sds = cov.sqrt() if result.covariance == "diag" else torch.linalg.cholesky(cov).diagonal(dim1=-2, dim2=-1)
            min_scale = min(1e-3, 0.5 * float(sds.min()))
        gmm = cls(d, k, result.covariance, min_scale=min_scale)
        gmm.set_parameters(result.weights, result.means, result.covariances)
        return gmm.to(result.means.device)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, *, seed: int = 0) -> GMM:
        """EM's starting point: k-means++ means (seeded), uniform weights, the pooled per-dimension
        variance (diag) or covariance (full) of ``x`` for every component (floored at ``min_scale``^2)."""
        _check_x(x)
        k = self.n_components
        x = x.detach().to(torch.float64)
        centred = x - x.mean(0)
        floor = self.min_scale**2 * 1.01
        if self.covariance == "diag":
            cov = (centred.pow(2).mean(0) + floor).expand(k, -1)
        else:
            eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
            cov = (centred.T @ centred / x.shape[0] + floor * eye).expand(k, -1, -1)
        self.set_parameters(torch.full((k,), 1.0 / k), kmeans_pp(x, k, seed=seed), cov)
        return self

    @property
    def has_priors(self) -> bool:
        return self.mean_prior_scale is not None or self.weight_concentration is not None

    # ---- parameters ---------------------------------------------------------------
    def _scales(self):
        return F.softplus(self.scale_raw) + self.min_scale

    def scale_tril(self) -> torch.Tensor:
        """Cholesky factors L_k with Sigma_k = L_k L_k^T: (K, D, D) (diagonal for "diag")."""
        if self.covariance == "diag":
            return torch.diag_embed(self._scales())
        return torch.tril(self.tril_raw, -1) + torch.diag_embed(self._scales())

    def covariances(self) -> torch.Tensor:
        """Variances (K, D) for "diag", matrices (K, D, D) for "full"."""
        if self.covariance == "diag":
            return self._scales().pow(2)
        tril = self.scale_tril()
        return tril @ tril.transpose(-1, -2)

    @torch.no_grad()
    def set_parameters(self, weights: Any, means: torch.Tensor, covariances: torch.Tensor) -> None:
        """Set pi, mu and Sigma (variances (K, D) or matrices (K, D, D)); priors' guides centre on them."""
        weights = torch.as_tensor(weights, dtype=torch.float32)
        self.weight_logits.copy_(weights.log())
        self.means.copy_(torch.as_tensor(means))
        covs = torch.as_tensor(covariances, dtype=torch.float64)
        if self.covariance == "diag":
            scales = covs.sqrt()
            self.scale_raw.copy_(softplus_inverse((scales - self.min_scale).clamp_min(1e-6)))
        else:
            tril = torch.linalg.cholesky(covs)
            diag = torch.diagonal(tril, dim1=-2, dim2=-1)
            self.scale_raw.copy_(softplus_inverse((diag - self.min_scale).clamp_min(1e-6)))
            self.tril_raw.copy_(torch.tril(tril, -1))

    def point_estimates(self) -> tuple[Any, ...]:
        """(weights, means, covariances) used for scoring: the guide's means of the globals with priors."""
        if self.weight_concentration is not None:
            conc = F.softplus(self.weight_conc_raw)
            weights = conc / conc.sum()
        else:
            weights = torch.softmax(self.weight_logits, -1)
        return weights, self.means, self.covariances()

    def _component(self, means, tril):
        if self.covariance == "diag":
            return dist.Normal(means, torch.diagonal(tril, dim1=-2, dim2=-1)).to_event(1)
        return dist.MultivariateNormal(means, scale_tril=tril)

    # ---- Pyro model and guide -----------------------------------------------------
    def _data_plate(self, x):
        n = x.shape[0]
        if self.has_priors and self.num_data is not None and self.num_data != n:
            # a minibatch of a larger data set: scale the likelihood by num_data / n
            return pyro.plate("data", self.num_data, subsample=torch.arange(n, device=x.device))
        return pyro.plate("data", n)

    def model(self, x: torch.Tensor) -> None:
        k = self.n_components
        if self.weight_concentration is not None:
            weights = pyro.sample("weights", dist.Dirichlet(x.new_full((k,), self.weight_concentration)))
        else:
            weights = torch.softmax(self.weight_logits, -1)
        if self.mean_prior_scale is not None:
            prior = dist.Normal(x.new_zeros(k, self.x_dim), self.mean_prior_scale).to_event(2)
            means = pyro.sample("means", prior)
        else:
            means = self.means
        tril = self.scale_tril()
        with self._data_plate(x):
            c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
            # Vindex: means may carry particle dims (vectorised particles with priors) left of (K, D)
            pyro.sample("x", self._component(Vindex(means)[..., c, :], Vindex(tril)[..., c, :, :]), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        if self.weight_concentration is not None:
            pyro.sample("weights", dist.Dirichlet(F.softplus(self.weight_conc_raw)))
        if self.mean_prior_scale is not None:
            scale = F.softplus(self.means_scale_raw) + 1e-4
            pyro.sample("means", dist.Normal(self.means, scale).to_event(2))

    # ---- exact scoring -----------------------------------------------------------
    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """log pi_k + log N(x_n; mu_k, Sigma_k): (N, K), at :meth:`point_estimates`."""
        weights, means, _ = self.point_estimates()
        return weights.log() + self._component(means, self.scale_tril()).log_prob(x.unsqueeze(-2))

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_n) per datapoint (N,) (with priors: at the guide's mean of the globals)."""
        return torch.logsumexp(self.log_joint(x), dim=-1)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.log_joint(x), dim=-1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Assignments argmax_k p(c_n = k | x_n): (N,) long."""
        return self.log_joint(x).argmax(-1)

    def log_weights(self, x: torch.Tensor, num_particles: int) -> torch.Tensor:
        """Importance log weights (K, N) for :func:`inference.evaluate`.

        With ``proposal == "exact"`` (default) c is summed out, so every weight
        equals p(x_n): the ELBO and every IWAE estimate are the exact log p(x_n).
        With ``proposal == "prior"``, c_k ~ pi and log w_k = log p(x_n | c_k): an
        importance sampler whose IWAE_K estimate is a stochastic lower bound
        increasing to log p(x_n) with K (its ELBO is E_pi[log p(x | c)]).
        """
        if self.proposal == "exact":
            return self.log_marginal(x).expand(num_particles, x.shape[0])
        if self.proposal == "prior":
            weights, means, _ = self.point_estimates()
            comp = self._component(means, self.scale_tril()).log_prob(x.unsqueeze(-2))  # (N, K)
            c = dist.Categorical(weights).sample((num_particles, x.shape[0]))  # (P, N)
            return comp.T.gather(0, c)  # [p, n] = comp[n, c[p, n]]
        raise UsageError(f"unknown proposal {self.proposal!r}; valid: exact, prior")

    def check_data(self, x: torch.Tensor) -> None:
        _check_x(x, "data")
        if x.shape[1] != self.x_dim:
            raise UsageError(f"data have {x.shape[1]} values per point, the model expects {self.x_dim}")
