"""Observation families p(x | decoder output), one small module each.

Each family maps the decoder's output ``h`` (shape ``(..., out_features)``) to a
Pyro distribution whose event is one datapoint, and checks that data lie in its
support before training (so a wrong pairing fails with a clear message instead
of a NaN).

=================  ===============================================  ==========
spec               p(x | h)                                         support
=================  ===============================================  ==========
bernoulli          prod_d Bernoulli(x_d; sigmoid(h_d))              {0, 1}
cbernoulli         prod_d ContinuousBernoulli(x_d; sigmoid(h_d))    [0, 1]
                   (Loaiza-Ganem & Cunningham 2019)
normal             prod_d N(x_d; h_d, s_d^2), s_d learned           reals
normal:S           the same with every s_d = S fixed                reals
laplace[:S]        prod_d Laplace(x_d; h_d, s_d), learned or fixed  reals
categorical        Categorical(x; softmax(h)), x an integer label   {0..C-1}
=================  ===============================================  ==========

Learned scales are ``softplus(r_d) + min_scale`` (min_scale = 1e-3), so the
density stays bounded even on pixels that never vary (digits' corners).
"""

from typing import Any

import pyro.distributions as dist
import torch
import torch.nn as nn
import torch.nn.functional as F

from inference.errors import UsageError

from .nets import softplus_inverse

LIKELIHOODS = ("bernoulli", "cbernoulli", "normal[:S]", "laplace[:S]", "categorical")


class Likelihood(nn.Module):
    """Base: ``forward(h)`` -> distribution over one datapoint; ``check(x)`` validates data."""

    spec: str | None = None
    support = "reals"

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    @property
    def out_features(self) -> int:
        return self.dim

    def check(self, x: torch.Tensor) -> None:
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise UsageError(f"data for the {self.spec} likelihood holds NaN or infinite values")

    def mean(self, h: torch.Tensor) -> torch.Tensor:
        return self(h).mean


class Bernoulli(Likelihood):
    support = "{0, 1}"

    def forward(self, h: torch.Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=h).to_event(1)

    def check(self, x: torch.Tensor) -> None:
        super().check(x)
        if not ((x == 0) | (x == 1)).all():
            raise UsageError(
                "the bernoulli likelihood needs binary data (values 0 or 1); binarise it "
                "(--binarize fixed|dynamic) or use the cbernoulli likelihood for grey levels"
            )


class ContinuousBernoulli(Likelihood):
    support = "[0, 1]"

    def forward(self, h: torch.Tensor) -> dist.TorchDistribution:
        return dist.ContinuousBernoulli(logits=h).to_event(1)

    def check(self, x: torch.Tensor) -> None:
        super().check(x)
        if ((x < 0) | (x > 1)).any():
            raise UsageError("the cbernoulli likelihood needs data in [0, 1]")


class _LocationScale(Likelihood):
    family: Any = None  # a torch.distributions location-scale class, set by each subclass

    def __init__(self, dim, scale=None, min_scale=1e-3):
        super().__init__(dim)
        self.min_scale = min_scale
        if scale is None:
            # softplus(raw) = 1: start at unit scale (plus the floor)
            self.raw_scale = nn.Parameter(torch.full((dim,), float(softplus_inverse(1.0))))
        else:
            if not scale > 0:
                raise UsageError(f"a fixed observation scale must be positive, got {scale}")
            self.register_buffer("fixed_scale", torch.tensor(float(scale)))

    @property
    def scale(self):
        if hasattr(self, "raw_scale"):
            return F.softplus(self.raw_scale) + self.min_scale
        return self.fixed_scale

    def forward(self, h):
        return self.family(h, self.scale.expand(h.shape)).to_event(1)


class Normal(_LocationScale):
    family = dist.Normal


class Laplace(_LocationScale):
    family = dist.Laplace


class Categorical(Likelihood):
    """A label: ``dim`` is the number of classes; data are integer tensors of shape (B,)."""

    support = "{0, ..., C-1}"

    def forward(self, h: torch.Tensor) -> dist.TorchDistribution:
        return dist.Categorical(logits=h)

    def check(self, x: torch.Tensor) -> None:
        if x.is_floating_point() or x.dim() != 1 or (x < 0).any() or (x >= self.dim).any():
            raise UsageError(f"the categorical likelihood needs integer labels in 0..{self.dim - 1}")

    def mean(self, h: torch.Tensor) -> torch.Tensor:
        return h.softmax(-1)


def _check_fixed_scale(spec, scale):
    """A fixed scale S must be positive and finite with S^2 a normal float32 (the densities divide by it)."""
    f32 = torch.finfo(torch.float32)
    low, high = f32.tiny**0.5, f32.max**0.5
    if not low <= scale <= high:
        raise UsageError(f"likelihood {spec!r}: a fixed scale must lie in [{low:.3g}, {high:.3g}] "
                         "(positive and finite at float32 precision)")


def make_likelihood(spec: Any, dim: int) -> "Likelihood":
    """Build an observation family from its spec (see the module docstring)."""
    name, _, arg = str(spec).lower().partition(":")
    lik: Likelihood
    if name in ("normal", "laplace"):
        cls = Normal if name == "normal" else Laplace
        if arg in ("", "learned"):
            lik = cls(dim)
        else:
            try:
                scale = float(arg)
            except ValueError:
                raise UsageError(f"likelihood {spec!r}: the scale must be a number or 'learned'") from None
            _check_fixed_scale(spec, scale)
            lik = cls(dim, scale=scale)
    elif name in ("bernoulli", "cbernoulli", "categorical") and not arg:
        lik = {"bernoulli": Bernoulli, "cbernoulli": ContinuousBernoulli, "categorical": Categorical}[name](dim)
    else:
        raise UsageError(f"unknown likelihood {spec!r}; valid: {', '.join(LIKELIHOODS)}")
    lik.spec = str(spec)
    return lik
