r"""The variational autoencoder (Kingma & Welling 2014; Rezende et al. 2014).

Generative process, for each datapoint n (all inside ``pyro.plate("data")``)::

    z_n ~ N(0, I_L)
    x_n | z_n ~ p_theta(x | z_n) = Lik(x; decoder_theta(z_n))

with ``Lik`` a family from :mod:`ppl_models.likelihoods` (Bernoulli, continuous
Bernoulli, Normal or Laplace with learned or fixed scale).

Guide (amortised, mean-field over datapoints)::

    q_phi(z_n | x_n) = N(z_n; mu_phi(x_n), diag sigma_phi(x_n)^2)

or, with ``guide="iaf:K"`` / ``"spline:K"``, that Gaussian pushed through K
conditional autoregressive flow steps whose context is the encoder's features
(inverse autoregressive flow, Kingma et al. 2016; neural spline flows, Durkan
et al. 2019; see :mod:`ppl_models.flows`). The guide site is then a
reparameterised ``TransformedDistribution`` whose ``log_prob`` includes the
flow's log-Jacobian, so every ELBO spec and the importance weights of
:func:`inference.evaluate` use the exact log q(z | x).

Objective, per datapoint::

    ELBO_beta(x) = E_q[log p(x | z)] - beta * KL(q(z | x) || p(z))

For beta = 1 this is the evidence lower bound, ELBO(x) <= log p(x). For
beta != 1 (the beta-VAE of Higgins et al. 2017) it is *not* a bound on
log p(x): beta scales both the prior and the guide term of the latent site z
(``poutine.scale`` on that site only), and reported test ELBOs and
log-likelihoods from :func:`inference.evaluate` ignore beta, i.e. they score the
plain VAE. Under an IWAE/Renyi objective beta would sit inside the log-sum-exp,
which is no known bound; do not combine them.

The networks are plain ``torch.nn`` modules; :func:`inference.fit` optimises
``module.parameters()`` directly, so the model and guide need no
``pyro.module`` call.
"""
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn as nn

from inference.errors import UsageError
from inference.latent import posterior_moments

from . import nets
from .base import Configurable, ModelConfig
from .flows import ConditionalFlow, parse_guide
from .likelihoods import make_likelihood


@dataclass
class VAEConfig(ModelConfig):
    """The arguments of :class:`VAE` (defaults: its signature)."""

    x_dim: int
    latent_dim: int
    hidden: Sequence[int]
    likelihood: str
    beta: float
    arch: str
    image_shape: Sequence[int] | None
    activation: str
    guide: str
    flow_hidden: Sequence[int] | None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict; the guide's fields only when not the diagonal Gaussian's defaults,
        so a diagonal-guide VAE writes the same config as before flow guides existed."""
        out = super().to_dict()
        if out["guide"] == "diag" and out["flow_hidden"] is None:
            del out["guide"], out["flow_hidden"]
        return out


class VAE(Configurable, nn.Module):
    """A VAE with an MLP or convolutional encoder/decoder.

    :param x_dim: values per datapoint (flattened).
    :param latent_dim: L, the size of z.
    :param hidden: MLP hidden widths (encoder; the decoder mirrors them).
    :param likelihood: observation family spec (see :mod:`ppl_models.likelihoods`).
    :param beta: weight of the KL term (1 gives the ELBO).
    :param arch: ``"mlp"`` or ``"conv"`` (needs ``image_shape`` with H, W divisible by 4).
    :param guide: ``"diag"`` (diagonal Gaussian), ``"iaf:K"`` or ``"spline:K"`` (K flow steps on top of it).
    :param flow_hidden: MADE hidden widths of each flow step (default max(4 L, 64)).
    :raises UsageError: a bad ``beta``, ``arch`` or ``guide`` spec.
    """

    max_plate_nesting = 1

    def __init__(
        self,
        x_dim: int,
        latent_dim: int = 16,
        hidden: tuple[Any, ...] = (256,),
        likelihood: str = "bernoulli",
        beta: float = 1.0,
        arch: str = "mlp",
        image_shape: tuple[int, ...] | None = None,
        activation: str = "relu",
        guide: str = "diag",
        flow_hidden: Any = None,
    ) -> None:
        super().__init__()
        self.cfg = VAEConfig.from_arguments(locals())
        if not beta > 0:
            raise UsageError(f"beta must be positive, got {beta}")
        flow_kind, flow_steps = parse_guide(guide)
        self.latent_dim = latent_dim
        self.beta = float(beta)
        self.likelihood = make_likelihood(likelihood, x_dim)
        self.decoder: nn.Module
        if arch == "mlp":
            self.encoder_body, body_out = nets.mlp_encoder_body(x_dim, hidden, activation)
            self.decoder = nets.mlp([latent_dim, *reversed(hidden), self.likelihood.out_features], activation)
        elif arch == "conv":
            if image_shape is None or len(image_shape) != 3 or nets.num_features(image_shape) != x_dim:
                raise UsageError(f"the conv VAE needs images: image_shape (C, H, W) with C*H*W = {x_dim}, "
                                 f"got {None if image_shape is None else tuple(image_shape)}")
            self.encoder_body, body_out = nets.conv_encoder_body(image_shape, activation=activation)
            self.decoder = nets.conv_decoder(latent_dim, image_shape, activation=activation)
        else:
            raise UsageError(f"unknown arch {arch!r}; use 'mlp' or 'conv'")
        self.encoder_head = nets.GaussianHead(body_out, latent_dim)
        # created last, so that a diag (or K = 0) VAE initialises exactly as before under the same seed
        self.flow = None if flow_kind == "diag" else ConditionalFlow(flow_kind, flow_steps, latent_dim, body_out,
                                                                       flow_hidden)

    def _kl_scale(self):
        return poutine.scale(scale=self.beta) if self.beta != 1.0 else nullcontext()

    def model(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        with pyro.plate("data", n):
            with self._kl_scale():
                z = pyro.sample("z", dist.Normal(x.new_zeros(n, self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]), self._kl_scale():
            pyro.sample("z", self.encode(x))

    # ---- conveniences ------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Any:
        """q(z | x) as a distribution with event shape (L,) (a ``TransformedDistribution`` for a flow guide)."""
        h = self.encoder_body(x)
        loc, scale = self.encoder_head(h)
        base = dist.Normal(loc, scale).to_event(1)
        return base if self.flow is None else self.flow(base, h)

    @torch.no_grad()
    def posterior_moments(self, x: torch.Tensor, *, samples: int = 256) -> Any:
        """(mean, sd) of q(z | x), each (N, L): exact for the diagonal guide, from ``samples`` draws for a flow."""
        return posterior_moments(self.encode(x), samples=samples)

    def decode(self, z: torch.Tensor) -> Any:
        """p(x | z) as a distribution with event shape (x_dim,)."""
        return self.likelihood(self.decoder(z))

    def check_data(self, x: torch.Tensor) -> None:
        self.likelihood.check(x)

    @torch.no_grad()
    def sample(self, n: int, *, mean: bool = True) -> torch.Tensor:
        """n draws x ~ p(x) (z from the prior); ``mean=True`` returns E[x | z] instead of a draw."""
        ref = next(self.parameters())
        z = torch.randn(n, self.latent_dim, device=ref.device, dtype=ref.dtype)
        px = self.decode(z)
        return px.mean if mean else px.sample()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z = mean of q(z | x)] (the mean estimated by Monte Carlo for a flow guide)."""
        return self.decode(self.posterior_moments(x)[0]).mean
