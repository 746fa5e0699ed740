r"""Probabilistic PCA as a linear-Gaussian VAE, with its exact marginal and posterior.

Generative process (Tipping & Bishop 1999), for each datapoint n inside
``pyro.plate("data")``::

    z_n ~ N(0, I_L)
    x_n | z_n ~ N(W z_n + mu, sigma^2 I_D)

with W (D, L), mu (D,) and sigma > 0 point estimates (module parameters).
Everything is Gaussian, so with M = W^T W + sigma^2 I_L:

* marginal:  p(x) = N(x; mu, W W^T + sigma^2 I_D), evaluated in O(D L^2) as a
  :class:`~torch.distributions.LowRankMultivariateNormal` (``log_marginal``);
* posterior: p(z | x) = N(z; M^{-1} W^T (x - mu), sigma^2 M^{-1}) (``posterior``).

Guide (amortised, mean linear in x, covariance shared by all datapoints, since
the exact posterior covariance does not depend on x)::

    q(z_n | x_n) = N(z_n; V x_n + b, S S^T)

with S diagonal (``guide="diag"``, the linear VAE of Lucas et al. 2019) or lower
triangular (``guide="full"``). A full guide contains the exact posterior:
:meth:`set_guide_to_posterior` sets it, after which log p(x, z) - log q(z | x)
= log p(x) for every z, so the ELBO, every IWAE_K estimate and the exact log
marginal coincide (up to floating point). A diagonal guide contains it only when
W^T W is diagonal; Lucas et al. (2019) show that the ELBO's global optima have
this property, so the ELBO of a well-trained linear VAE is tight.

Objective: the ELBO ``E_q[log p(x | z)] - KL(q(z | x) || p(z)) <= log p(x)``,
or any other spec of :func:`inference.make_elbo`; every bound is checked against
the exact ``log_marginal``. :meth:`mle` gives the closed-form maximum-likelihood
parameters (Tipping & Bishop 1999, eq. 7-8).
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

from inference.errors import UsageError

from .base import Configurable, ModelConfig
from .nets import softplus_inverse

GUIDES = ("diag", "full")


@dataclass
class PPCAConfig(ModelConfig):
    """The arguments of :class:`PPCA` (defaults: its signature)."""

    x_dim: int
    latent_dim: int
    guide: str
    sigma: float | None
    min_sigma: float


class PPCA(Configurable, nn.Module):
    """Probabilistic PCA with an amortised linear Gaussian guide.

    :param x_dim: D.
    :param latent_dim: L (<= D).
    :param guide: ``"diag"`` or ``"full"`` covariance of q(z | x).
    :param sigma: a fixed noise standard deviation; learned when None.
    :param min_sigma: floor on the learned sigma and on the guide's scales.
    """

    max_plate_nesting = 1

    def __init__(self, x_dim: int, latent_dim: int, *, guide: str = "diag", sigma: Any = None,
                 min_sigma: float = 1e-3) -> None:
        super().__init__()
        self.cfg = PPCAConfig.from_arguments(locals())
        if guide not in GUIDES:
            raise UsageError(f"unknown guide {guide!r}; valid: {', '.join(GUIDES)}")
        if not (isinstance(latent_dim, int) and 1 <= latent_dim <= x_dim):
            raise UsageError(f"latent_dim must be an integer in 1..x_dim={x_dim}, got {latent_dim!r}")
        if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
            raise UsageError(f"sigma must be a positive number or None (learned), got {sigma!r}")
        self.x_dim, self.latent_dim, self.guide_type, self.min_sigma = x_dim, latent_dim, guide, min_sigma
        self.W = nn.Parameter(0.1 * torch.randn(x_dim, latent_dim))
        self.mu = nn.Parameter(torch.zeros(x_dim))
        if sigma is None:
            self.sigma_raw = nn.Parameter(softplus_inverse(1.0))
        else:
            self.register_buffer("sigma_fixed", torch.tensor(float(sigma)))
        self.encoder = nn.Linear(x_dim, latent_dim)  # the guide's mean V x + b
        self.q_scale_raw = nn.Parameter(torch.full((latent_dim,), float(softplus_inverse(0.5))))
        if guide == "full":
            self.q_tril_raw = nn.Parameter(torch.zeros(latent_dim, latent_dim))

    # ---- parameters -----------------------------------------------------------------
    @property
    def sigma(self) -> Any:
        if hasattr(self, "sigma_fixed"):
            return self.sigma_fixed
        return F.softplus(self.sigma_raw) + self.min_sigma

    def guide_scale_tril(self) -> torch.Tensor:
        """S with q's covariance S S^T: (L, L)."""
        diag = torch.diag_embed(F.softplus(self.q_scale_raw) + self.min_sigma)
        if self.guide_type == "diag":
            return diag
        return torch.tril(self.q_tril_raw, -1) + diag

    # ---- Pyro model and guide -----------------------------------------------------------
    def model(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(x.new_zeros(n, self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.mu, self.sigma).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.encode(x))

    def encode(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z | x), event shape (L,)."""
        loc = self.encoder(x)
        if self.guide_type == "diag":
            return dist.Normal(loc, F.softplus(self.q_scale_raw) + self.min_sigma).to_event(1)
        return dist.MultivariateNormal(loc, scale_tril=self.guide_scale_tril())

    def check_data(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.x_dim:
            raise UsageError(f"pPCA expects data of shape (N, {self.x_dim}), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise UsageError("pPCA data hold NaN or infinite values")

    # ---- exact quantities -----------------------------------------------------------
    def marginal(self) -> dist.TorchDistribution:
        """p(x) = N(mu, W W^T + sigma^2 I) as a low-rank multivariate normal."""
        return dist.LowRankMultivariateNormal(self.mu, self.W, self.sigma.pow(2).expand(self.x_dim))

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_n) per datapoint: (N,)."""
        return self.marginal().log_prob(x)

    def _posterior_parts(self):
        s2 = self.sigma.pow(2)
        m = self.W.T @ self.W + s2 * torch.eye(self.latent_dim, dtype=self.W.dtype, device=self.W.device)
        m_chol = torch.linalg.cholesky(m)
        gain = torch.cholesky_solve(self.W.T, m_chol)  # M^{-1} W^T: (L, D)
        cov = s2 * torch.cholesky_inverse(m_chol)
        return gain, cov

    def posterior(self, x: torch.Tensor) -> dist.TorchDistribution:
        """The exact p(z | x) = N(M^{-1} W^T (x - mu), sigma^2 M^{-1}), batch shape (N,)."""
        gain, cov = self._posterior_parts()
        return dist.MultivariateNormal((x - self.mu) @ gain.T, covariance_matrix=cov)

    @torch.no_grad()
    def set_guide_to_posterior(self) -> None:
        """Set q(z | x) to the exact posterior (needs ``guide="full"`` unless W^T W is diagonal)."""
        gain, cov = self._posterior_parts()
        tril = torch.linalg.cholesky(cov)
        off = torch.tril(tril, -1)
        if self.guide_type == "diag" and off.abs().max() > 1e-6 * tril.diagonal().abs().max():
            raise UsageError(
                "the exact posterior covariance is not diagonal for this W; build the model with guide='full'"
            )
        self.encoder.weight.copy_(gain)
        self.encoder.bias.copy_(-(gain @ self.mu))
        self.q_scale_raw.copy_(softplus_inverse((tril.diagonal() - self.min_sigma).clamp_min(1e-12)))
        if self.guide_type == "full":
            self.q_tril_raw.copy_(off)

    @torch.no_grad()
    def set_mle(self, x: torch.Tensor) -> PPCA:
        """Set (W, mu, sigma) to the closed-form maximum-likelihood estimate on ``x`` (Tipping & Bishop 1999).

        With S the sample covariance, eigenvalues l_1 >= ... >= l_D and eigenvectors U:
        mu = mean(x), sigma^2 = mean(l_{L+1..D}), W = U_L (diag(l_1..L) - sigma^2 I)^{1/2}
        (up to a rotation of z). Needs a learned sigma.
        """
        if hasattr(self, "sigma_fixed"):
            raise UsageError("set_mle needs a learned sigma (build the model with sigma=None)")
        self.check_data(x)
        L, D = self.latent_dim, self.x_dim
        if L == D:
            raise UsageError("the pPCA MLE needs latent_dim < x_dim (sigma^2 is the mean of the discarded eigenvalues)")
        x64 = x.double()
        mean = x64.mean(0)
        centred = x64 - mean
        evals, evecs = torch.linalg.eigh(centred.T @ centred / x.shape[0])
        evals, evecs = evals.flip(0), evecs.flip(1)
        s2 = evals[L:].mean().clamp_min((self.min_sigma * 1.001) ** 2)
        W = evecs[:, :L] * (evals[:L] - s2).clamp_min(0).sqrt()
        self.mu.copy_(mean)
        self.W.copy_(W)
        self.sigma_raw.copy_(softplus_inverse(s2.sqrt() - self.min_sigma))
        return self
