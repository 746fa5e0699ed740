r"""The conditional VAE (Sohn, Lee & Yan 2015, "Learning structured output representation using deep
conditional generative models").

Generative process, for each datapoint n (inside ``pyro.plate("data")``), given its condition y_n::

    z_n | y_n ~ p_theta(z | y_n) = N(mu_theta(y_n), diag sigma_theta(y_n)^2)   (prior="learned")
                or N(0, I_L)                                                  (prior="standard")
    x_n | y_n, z_n ~ Lik(x; decoder_theta(z_n, y_n))

Guide (the recognition network)::

    q_phi(z_n | x_n, y_n) = N(z_n; mu_phi(x_n, y_n), diag sigma_phi(x_n, y_n)^2)

Objective: the conditional ELBO (Sohn et al. eq. 4), per datapoint::

    ELBO(x | y) = E_q[log p(x | y, z)] - KL(q(z | x, y) || p(z | y))  <=  log p(x | y)

so :func:`inference.evaluate`'s test ELBO and importance-weighted value bound the
conditional log-likelihood log p(x | y). The condition y is either a class
(``num_classes`` set: y an integer label, fed to the networks one-hot) or any
real tensor of ``y_dim`` values, e.g. the top half of an image whose bottom half
is x (image completion, as in Sohn et al. sec. 5 and Pyro's CVAE example). The
networks take y concatenated to their input.
"""
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F

from inference.errors import UsageError

from . import nets
from .base import Configurable, ModelConfig
from .data import DataSplit
from .likelihoods import make_likelihood

PRIORS = ("learned", "standard")
CONDITIONS = ("class", "top-half")


@dataclass
class CVAEConfig(ModelConfig):
    """The arguments of :class:`CVAE` (defaults: its signature)."""

    x_dim: int
    y_dim: int
    num_classes: int | None
    latent_dim: int
    hidden: Sequence[int]
    likelihood: str
    prior: str
    activation: str
    image_shape: Sequence[int] | None


class CVAE(Configurable, nn.Module):
    """A conditional VAE with MLP networks.

    :param x_dim: D, values per datapoint x (flattened).
    :param y_dim: values of the condition y; ignored (set to ``num_classes``) for a class condition.
    :param num_classes: K for a class condition (y an integer label in 0..K-1), None for a real tensor y.
    :param latent_dim: L.
    :param hidden: MLP hidden widths (encoder, decoder and prior network).
    :param likelihood: observation family spec of x (:mod:`ppl_models.likelihoods`).
    :param prior: ``"learned"`` p(z | y) or ``"standard"`` N(0, I).
    :param activation: hidden activation.
    :param image_shape: (C, H, W) of x when x is an image, kept for figures (the networks are MLPs).
    :raises UsageError: an unknown prior, or sizes below 1.

    ``model(x, y)`` / ``guide(x, y)``: x (B, D); y (B,) long labels or (B, y_dim) reals.
    """

    max_plate_nesting = 1

    def __init__(
        self,
        x_dim: int,
        y_dim: int = 0,
        num_classes: int | None = None,
        latent_dim: int = 16,
        hidden: tuple[Any, ...] = (256,),
        likelihood: str = "bernoulli",
        prior: str = "learned",
        activation: str = "relu",
        image_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = CVAEConfig.from_arguments(locals())
        if prior not in PRIORS:
            raise UsageError(f"unknown CVAE prior {prior!r}; valid: {', '.join(PRIORS)}")
        if num_classes is not None:
            if num_classes < 2:
                raise UsageError(f"a class condition needs at least 2 classes, got {num_classes}")
            y_dim = num_classes
        if y_dim < 1 or latent_dim < 1:
            raise UsageError(f"the CVAE needs y_dim >= 1 and latent_dim >= 1, got {y_dim} and {latent_dim}")
        self.num_classes, self.y_dim, self.latent_dim, self.prior = num_classes, y_dim, latent_dim, prior
        self.likelihood = make_likelihood(likelihood, x_dim)
        self.encoder_body, body_out = nets.mlp_encoder_body(x_dim + y_dim, tuple(hidden), activation)
        self.encoder_head = nets.GaussianHead(body_out, latent_dim)
        self.decoder = nets.mlp([latent_dim + y_dim, *reversed(hidden), self.likelihood.out_features], activation)
        if prior == "learned":
            self.prior_body, prior_out = nets.mlp_encoder_body(y_dim, tuple(hidden), activation)
            self.prior_head = nets.GaussianHead(prior_out, latent_dim)

    def condition(self, y: torch.Tensor) -> torch.Tensor:
        """The networks' input for condition y: one-hot (.., K) for a class, y itself (float) otherwise."""
        if self.num_classes is not None:
            return F.one_hot(y.long(), self.num_classes).to(self._dtype())
        return y.to(self._dtype())

    def _dtype(self):
        return next(self.parameters()).dtype

    def model(self, x: torch.Tensor, y: torch.Tensor) -> None:
        c = self.condition(y)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior_dist(c, x))
            pyro.sample("x", self.decode(z, c), obs=x)

    def guide(self, x: torch.Tensor, y: torch.Tensor) -> None:
        c = self.condition(y)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.encode(x, c))

    def prior_dist(self, c: torch.Tensor, ref: torch.Tensor | None = None) -> dist.TorchDistribution:
        """p(z | y) for the networks' input c = :meth:`condition` (y), event shape (L,)."""
        if self.prior == "standard":
            return dist.Normal(c.new_zeros(c.shape[:-1] + (self.latent_dim,)), 1.0).to_event(1)
        loc, scale = self.prior_head(self.prior_body(c))
        return dist.Normal(loc, scale).to_event(1)

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> dist.TorchDistribution:
        """q(z | x, y) for c = :meth:`condition` (y), event shape (L,)."""
        loc, scale = self.encoder_head(self.encoder_body(torch.cat([x, c], -1)))
        return dist.Normal(loc, scale).to_event(1)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> dist.TorchDistribution:
        """p(x | y, z) for c = :meth:`condition` (y), event shape (D,); c broadcasts against z."""
        c = c.expand(z.shape[:-1] + c.shape[-1:])
        return self.likelihood(self.decoder(torch.cat([z, c], -1)))

    def check_data(self, batch: Any) -> None:
        """x in the likelihood's support; y integer labels in 0..K-1 (class) or finite reals of y_dim values."""
        if not isinstance(batch, dict) or set(batch) != {"x", "y"}:
            raise UsageError("CVAE data are a mapping with 'x' and 'y'")
        x, y = batch["x"], batch["y"]
        self.likelihood.check(x)
        if self.num_classes is not None:
            if y.is_floating_point() or y.shape != x.shape[:1] or (y < 0).any() or (y >= self.num_classes).any():
                raise UsageError(f"a class condition needs one integer label in 0..{self.num_classes - 1} per point")
        elif y.shape != (x.shape[0], self.y_dim) or not torch.isfinite(y).all():
            raise UsageError(f"the condition y must be finite reals of shape (N, {self.y_dim}), "
                             f"got {tuple(y.shape)}")

    def _conditions(self, y, n, ref):
        y = torch.as_tensor(y, device=ref.device)
        if self.num_classes is not None:
            y = y.long()
            y = y.expand(n) if y.dim() == 0 else y
            if y.shape != (n,) or (y < 0).any() or (y >= self.num_classes).any():
                raise UsageError(f"y must be one class in 0..{self.num_classes - 1} or {n} of them")
        else:
            if y.shape == (self.y_dim,):
                y = y.expand(n, self.y_dim)
            if y.shape != (n, self.y_dim):
                raise UsageError(f"y must have shape ({self.y_dim},) or ({n}, {self.y_dim}), got {tuple(y.shape)}")
        return self.condition(y)

    @torch.no_grad()
    def sample(self, n: int, *, y: Any, mean: bool = True) -> torch.Tensor:
        """n draws x ~ p(x | y) (z ~ p(z | y)): ``y`` one condition (a class, or (y_dim,)) or n of them.
        ``mean=True`` returns E[x | y, z]. (n, D)."""
        c = self._conditions(y, n, next(self.parameters()))
        px = self.decode(self.prior_dist(c).sample(), c)
        return px.mean if mean else px.sample()


@dataclass
class ConditionalData:
    """A split as CVAE data: ``{"x": ..., "y": ...}`` for the evaluation view (``data``) and each training
    epoch (``epoch()``, a fresh draw under dynamic binarisation).

    ``condition="class"``: x the images, y their labels. ``condition="top-half"``: y the top half of each
    image and x its bottom half (image completion); ``image_shape`` is then the bottom half's (C, H/2, W).
    """

    split: DataSplit
    condition: str = "class"

    def __post_init__(self):
        if self.condition not in CONDITIONS:
            raise UsageError(f"unknown condition {self.condition!r}; valid: {', '.join(CONDITIONS)}")
        if self.condition == "class" and self.split.y is None:
            raise UsageError(f"a class condition needs labels; {self.split.name!r} carries none")
        if self.condition == "top-half":
            shape = self.split.image_shape
            if shape is None or len(shape) != 3 or shape[1] % 2:
                raise UsageError(f"a top-half condition needs images with an even height, got shape {shape}")

    @property
    def name(self) -> str:
        return self.split.name

    @property
    def half(self) -> int:
        """Values in the top half of an image (C * H/2 * W)."""
        c, h, w = self._chw()
        return c * (h // 2) * w

    def _chw(self) -> tuple[int, int, int]:
        shape = self.split.image_shape
        if shape is None or len(shape) != 3:
            raise UsageError(f"{self.split.name!r} holds no images of shape (C, H, W)")
        c, h, w = shape
        return c, h, w

    @property
    def image_shape(self) -> Any:
        if self.condition == "class":
            return self.split.image_shape
        c, h, w = self._chw()
        return (c, h // 2, w)

    @property
    def dim(self) -> int:
        return self.split.dim if self.condition == "class" else self.split.dim - self.half

    @property
    def y_dim(self) -> int:
        """Values of the condition: the top half's; 0 for a class (the CVAE's y_dim is then its num_classes)."""
        return self.half if self.condition == "top-half" else 0

    def __len__(self):
        return len(self.split)

    def _view(self, x):
        if self.condition == "class":
            return {"x": x, "y": self.split.y}
        # images are stored (C, H, W) row-major: per channel, the top half's rows come first
        c = self.split.image_shape[0]
        img = x.reshape(x.shape[0], c, -1)
        half = img.shape[-1] // 2
        return {"x": img[..., half:].reshape(x.shape[0], -1), "y": img[..., :half].reshape(x.shape[0], -1)}

    @property
    def data(self) -> dict[str, torch.Tensor]:
        return self._view(self.split.data)

    def epoch(self) -> dict[str, torch.Tensor]:
        return self._view(self.split.epoch())

    def to(self, device: str | torch.device) -> "ConditionalData":
        return replace(self, split=self.split.to(device))

    def rows(self, index: torch.Tensor) -> "ConditionalData":
        return replace(self, split=self.split.rows(index))
