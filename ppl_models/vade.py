r"""Variational deep embedding, VaDE (Jiang et al. 2017): a VAE whose prior is a Gaussian mixture.

Generative process, for each datapoint n (inside ``pyro.plate("data")``)::

    c_n ~ Cat(pi)                                   pi = softmax(logits)
    z_n | c_n ~ N(mu_c, diag sigma_c^2)             sigma_c = softplus(r_c) + min_scale
    x_n | z_n ~ p_theta(x | z_n) = Lik(x; decoder_theta(z_n))

pi, mu_c and sigma_c are learned with the networks. Every sigma_c is positive
and bounded below by construction, so log N(z; mu_c, sigma_c^2) is finite for
finite z; a non-finite loss anyway stops :func:`inference.fit` with
``NonFiniteLossError``.

How c is handled: it is summed out exactly, in the prior
---------------------------------------------------------
The model samples z from the marginal mixture
``p(z) = sum_c pi_c N(z; mu_c, sigma_c^2)`` (``MixtureSameFamily``), so the guide
is the VAE's ``q(z | x) = N(mu_phi(x), diag sigma_phi(x)^2)`` alone and the
objective is, per datapoint::

    ELBO(x) = E_q(z|x)[ log p(x | z) + log sum_c pi_c N(z; mu_c, sigma_c^2) - log q(z | x) ]   <= log p(x).

This is exactly what enumerating c in the model with ``TraceEnum_ELBO`` computes
(a log-sum-exp over c at each sampled z), written as a distribution, so it
works with every ELBO spec of :func:`inference.make_elbo` (``trace``, ``iwae:K``,
...) and :func:`inference.evaluate` scores it by its default tracing path with
no special code: ``log w = log p(x|z) + log p(z) - log q(z|x)``.

Why not the bound of the VaDE paper. With q(z, c | x) = q(z | x) q(c | x) the
paper optimises::

    ELBO_q(c|x)(x) = E_q[log p(x|z)] - sum_c q(c|x) KL(q(z|x) || N(mu_c, sigma_c^2)) - KL(q(c|x) || pi)
                   = ELBO(x) - E_q(z|x)[ KL(q(c|x) || p(c|z)) ],

so it is never tighter than ELBO(x) above, and equals it only if q(c | x)
matched p(c | z) for every z under q(z | x), which a q(c | x) that depends on x
alone cannot do. Its per-component KLs are analytic, but the analytic part we
give up is small: in the marginal bound the sum over c is exact, and the
entropy term enters through the reparameterised estimate
``log q(z(eps) | x) = -sum_j log sigma_j - |eps|^2 / 2 - L/2 log 2 pi``, whose
gradient equals the gradient of the analytic entropy exactly (zero variance).
Only E_q[log p(x|z)] and E_q[log p(z)] are Monte Carlo, as in any VAE.

Cluster assignments. q(c | x) is defined as the posterior responsibility at the
mean of q(z | x)::

    q(c | x) = p(c | z = mu_phi(x)) = pi_c N(mu_phi(x); mu_c, sigma_c^2) / sum_c' pi_c' N(mu_phi(x); mu_c', sigma_c'^2),

with log pi_c added once (the published code summed it over the L latent
dimensions, i.e. used pi_c^L, which is wrong); ``cluster(x)`` is its argmax.

Initialisation. As the paper says, SVI from random mixture parameters gets
stuck: the networks are pretrained as an autoencoder and the mixture is set
from the codes before SVI. That pipeline (pretraining, mixture initialisation
by EM or a t-SNE map, alignment, candidate selection) lives in
:mod:`ppl_models.vade_init`; this module holds only the model, its guide and
queries of a fitted model. Measured accuracies are in
``benchmarks/results/clustering-*``.

References: Z. Jiang, Y. Zheng, H. Tan, B. Tang, H. Zhou, "Variational Deep
Embedding: An Unsupervised and Generative Approach to Clustering", IJCAI 2017.
"""
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F

from inference.errors import UsageError

from .base import ModelConfig
from .nets import softplus_inverse
from .vae import VAE


@dataclass
class VaDEConfig(ModelConfig):
    """The arguments of :class:`VaDE` (defaults: its signature)."""

    x_dim: int
    n_clusters: int
    latent_dim: int
    hidden: Sequence[int]
    likelihood: str
    arch: str
    image_shape: Sequence[int] | None
    activation: str
    min_scale: float


class VaDE(VAE):
    """VaDE: a VAE with a learned K-component diagonal Gaussian-mixture prior (see the module docstring).

    :param x_dim: values per datapoint (flattened).
    :param n_clusters: K, the number of mixture components.
    :param latent_dim: L, the size of z.
    :param hidden: MLP hidden widths (encoder; the decoder mirrors them).
    :param likelihood: observation family spec (see :mod:`ppl_models.likelihoods`).
    :param arch: ``"mlp"`` or ``"conv"``.
    :param min_scale: lower bound of every component's standard deviation.
    """

    def __init__(
        self,
        x_dim: int,
        n_clusters: int = 10,
        latent_dim: int = 10,
        hidden: tuple[Any, ...] = (256,),
        likelihood: str = "bernoulli",
        arch: str = "mlp",
        image_shape: tuple[int, ...] | None = None,
        activation: str = "relu",
        min_scale: float = 1e-3,
    ) -> None:
        if not (isinstance(n_clusters, int) and n_clusters >= 1):
            raise UsageError(f"n_clusters must be a positive integer, got {n_clusters!r}")
        if not min_scale > 0:
            raise UsageError(f"min_scale must be positive, got {min_scale!r}")
        super().__init__(
            x_dim,
            latent_dim=latent_dim,
            hidden=hidden,
            likelihood=likelihood,
            beta=1.0,
            arch=arch,
            image_shape=image_shape,
            activation=activation,
        )
        self.cfg = VaDEConfig.from_arguments(locals())  # replaces the VAE's config (VaDE has no beta)
        self.n_clusters = n_clusters
        self.min_scale = float(min_scale)
        # until init_mixture: equal weights, unit scales, means spread by a fixed generator
        gen = torch.Generator().manual_seed(0)
        self.mixture_logits = nn.Parameter(torch.zeros(n_clusters))
        self.mixture_locs = nn.Parameter(torch.randn(n_clusters, latent_dim, generator=gen))
        self.mixture_raw_scales = nn.Parameter(torch.full((n_clusters, latent_dim), float(softplus_inverse(1.0))))

    # ---- the mixture prior -------------------------------------------------------------
    @property
    def mixture_weights(self) -> torch.Tensor:
        """pi, shape (K,)."""
        return self.mixture_logits.softmax(-1)

    @property
    def mixture_scales(self) -> torch.Tensor:
        """sigma_c, shape (K, L), each >= min_scale."""
        return F.softplus(self.mixture_raw_scales) + self.min_scale

    def components(self) -> dist.TorchDistribution:
        """p(z | c) for every c: a Normal with batch shape (K,) and event shape (L,)."""
        return dist.Normal(self.mixture_locs, self.mixture_scales).to_event(1)

    def prior(self) -> dist.TorchDistribution:
        """p(z) = sum_c pi_c N(z; mu_c, diag sigma_c^2), event shape (L,)."""
        return dist.MixtureSameFamily(dist.Categorical(logits=self.mixture_logits), self.components())

    def model(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        prior = self.prior()
        with pyro.plate("data", n):
            z = pyro.sample("z", prior)
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    # guide: the VAE's q(z | x)

    # ---- clustering --------------------------------------------------------------------
    def log_responsibilities_z(self, z: torch.Tensor) -> torch.Tensor:
        """log p(c | z) for z of shape (..., L): shape (..., K) (Bayes' rule, log pi_c added once)."""
        joint = self.mixture_logits.log_softmax(-1) + self.components().log_prob(z.unsqueeze(-2))
        return joint.log_softmax(-1)

    @torch.no_grad()
    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """q(c | x) = p(c | z = mean of q(z | x)): shape (N, K), rows sum to 1."""
        return self.log_responsibilities_z(self.encode(x).mean).exp()

    @torch.no_grad()
    def cluster(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """The most probable cluster under q(c | x) for each row of x: (N,) long."""
        out = [
            self.log_responsibilities_z(self.encode(x[i : i + batch_size]).mean).argmax(-1)
            for i in range(0, x.shape[0], batch_size)
        ]
        return torch.cat(out)

    @torch.no_grad()
    def latent_means(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """mu_phi(x), the means of q(z | x): (N, L)."""
        return torch.cat([self.encode(x[i : i + batch_size]).mean for i in range(0, x.shape[0], batch_size)])

    @torch.no_grad()
    def sample(self, n: int, *, component: Any = None, mean: bool = True) -> torch.Tensor:
        """n draws x ~ p(x), or x ~ p(x | c = component) when ``component`` is given.

        ``mean=True`` returns E[x | z] instead of a draw of x.
        """
        if component is None:
            z = self.prior().sample((n,))
        else:
            if not (isinstance(component, int) and 0 <= component < self.n_clusters):
                raise UsageError(f"component must be an integer in 0..{self.n_clusters - 1}, got {component!r}")
            loc, scale = self.mixture_locs[component], self.mixture_scales[component]
            z = loc + scale * torch.randn(n, self.latent_dim, device=loc.device, dtype=loc.dtype)
        px = self.decode(z)
        return px.mean if mean else px.sample()

    def freeze_mixture(self, frozen: bool = True) -> None:
        """Keep pi, mu_c, sigma_c out of training (``requires_grad`` off), or put them back with ``frozen=False``.

        :func:`inference.fit` optimises only parameters that require gradients,
        so SVI then trains the networks under the fixed mixture prior. Why one
        would: the ELBO's gradient in the mixture parameters is that of the
        diagonal-GMM log-likelihood of the sampled codes, sum_n log p(z_n), so
        SVI moves the mixture towards the maximum-likelihood diagonal GMM of
        the codes, the clustering that the t-SNE initialisation of
        :mod:`ppl_models.vade_init` exists to avoid (EM on the codes splits
        curved class manifolds). With a mixture set from the map, training
        the networks alone still raises the ELBO and keeps the map's clusters.
        """
        for p in (self.mixture_logits, self.mixture_locs, self.mixture_raw_scales):
            p.requires_grad_(not frozen)

    # ---- setting the mixture -----------------------------------------------------------
    @torch.no_grad()
    def set_mixture(self, weights: Any, locs: torch.Tensor, variances: torch.Tensor) -> None:
        """Set the prior to pi proportional to ``weights`` (K,), mu_c = ``locs`` (K, L), sigma_c^2 = ``variances`` (K, L).

        The logits become log max(w_c, 1e-12) (the softmax normalises them); each
        sigma_c = max(sqrt(variance), 1.01 min_scale) is computed in the dtype given,
        then everything is cast to the parameters' dtype and device. Used by the
        initialisations of :mod:`ppl_models.vade_init`.

        :raises UsageError: on wrong shapes, non-finite values, negative weights or
            variances, or weights that sum to zero.
        """
        weights, locs, variances = (torch.as_tensor(t).detach() for t in (weights, locs, variances))
        k, latent = self.n_clusters, self.latent_dim
        if weights.shape != (k,) or locs.shape != (k, latent) or variances.shape != (k, latent):
            raise UsageError(f"need weights ({k},), locs ({k}, {latent}) and variances ({k}, {latent}), got "
                             f"{tuple(weights.shape)}, {tuple(locs.shape)} and {tuple(variances.shape)}")
        if not all(torch.isfinite(t).all() for t in (weights, locs, variances)):
            raise UsageError("mixture weights, locs and variances must be finite")
        if (weights < 0).any() or not weights.sum() > 0 or (variances < 0).any():
            raise UsageError("mixture weights must be non-negative with a positive sum, and variances non-negative")
        ref = self.mixture_locs
        scales = variances.sqrt().clamp_min(self.min_scale * 1.01).to(ref)
        self.mixture_logits.copy_(weights.clamp_min(1e-12).log().to(ref))
        self.mixture_locs.copy_(locs.to(ref))
        self.mixture_raw_scales.copy_(softplus_inverse(scales - self.min_scale))
