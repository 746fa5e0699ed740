"""Networks shared by the models: MLPs, Gaussian encoders, convolutional bodies; the softplus inverse.

Every network accepts arbitrary leading batch dimensions (vectorised particles
put a particle dimension in front of the data dimension). Bad shapes raise
:class:`inference.errors.UsageError`.
"""
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from inference.errors import UsageError

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU, "softplus": nn.Softplus}


def activation_class(name: str) -> type[nn.Module]:
    """The ``torch.nn`` class of an activation named in :data:`ACTIVATIONS`."""
    if name not in ACTIVATIONS:
        raise UsageError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def mlp(sizes: Sequence[int], activation: str = "relu") -> nn.Sequential:
    """Linear layers through ``sizes`` with ``activation`` between them (none after the last)."""
    act = activation_class(activation)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def softplus_inverse(y: float | torch.Tensor) -> torch.Tensor:
    """softplus^{-1}(y) = log(exp(y) - 1) = y + log(-expm1(-y)) for y > 0, stable for small and large y.

    The raw value of a positive parameter stored as softplus(raw) (+ a floor).
    ``y``: a number or a tensor; returns a tensor of ``y``'s shape (a Python
    number or an integer tensor gives the default floating dtype).
    """
    y = torch.as_tensor(y)
    if not y.is_floating_point():
        y = y.to(torch.get_default_dtype())
    return y + torch.log(-torch.expm1(-y))


def mlp_encoder_body(in_features: int, hidden: tuple[Any, ...] = (256,), activation: str = "relu") -> tuple[Any, ...]:
    """(.., in_features) -> (.., features): the MLP through ``hidden`` with ``activation`` after every layer.

    Returns ``(net, features)`` like :func:`conv_encoder_body`; with no hidden
    layer the body is the identity and ``features = in_features``.
    """
    body = mlp([in_features, *hidden], activation)
    if not hidden:
        return body, in_features
    return nn.Sequential(body, activation_class(activation)()), hidden[-1]


class GaussianHead(nn.Module):
    """features -> (loc, scale) of a diagonal Gaussian, scale = softplus(.) + min_scale > 0."""

    def __init__(self, in_features: int, out_features: int, min_scale: float = 1e-4) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 2 * out_features)
        self.min_scale = min_scale

    def forward(self, h: torch.Tensor) -> tuple[Any, ...]:
        loc, raw = self.linear(h).chunk(2, dim=-1)
        return loc, F.softplus(raw) + self.min_scale


class Flat(nn.Module):
    """Apply a network that wants (N, *in_shape) to inputs with any leading dims."""

    def __init__(self, net: Any, in_shape: Any) -> None:
        super().__init__()
        self.net = net
        self.in_shape = tuple(in_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[: x.dim() - 1]
        y = self.net(x.reshape((-1,) + self.in_shape))
        return y.reshape(lead + y.shape[1:]) if y.dim() == 2 else y.reshape(lead + (-1,))


def _chw(image_shape, factor):
    """(C, H, W) of ``image_shape``, checked: three positive sizes, H and W divisible by ``factor``."""
    if image_shape is None or len(image_shape) != 3 or min(image_shape) < 1:
        raise UsageError(f"conv nets need an image shape (C, H, W), got {image_shape}")
    c, h, w = image_shape
    if h % factor or w % factor:
        raise UsageError(f"conv nets need H and W divisible by {factor}, got {tuple(image_shape)}")
    return c, h, w


def conv_encoder_body(image_shape: tuple[int, ...], channels: tuple[Any, ...] = (32, 64),
                      activation: str = "relu") -> tuple[Any, ...]:
    """(.., C*H*W) -> (.., features): stride-2 4x4 convolutions, each halving H and W."""
    factor = 2 ** len(channels)
    c, h, w = _chw(image_shape, factor)
    act = activation_class(activation)
    layers, prev = [], c
    for ch in channels:
        layers += [nn.Conv2d(prev, ch, 4, stride=2, padding=1), act()]
        prev = ch
    layers.append(nn.Flatten())
    features = prev * (h // factor) * (w // factor)
    return Flat(nn.Sequential(*layers), image_shape), features


def conv_decoder(in_features: int, image_shape: tuple[int, ...], channels: tuple[Any, ...] = (64, 32),
                 activation: str = "relu", out_per_pixel: int = 1) -> "Flat":
    """(.., in_features) -> (.., out_per_pixel*C*H*W): a linear layer then transposed convolutions."""
    factor = 2 ** len(channels)
    c, h, w = _chw(image_shape, factor)
    act = activation_class(activation)
    h0, w0 = h // factor, w // factor
    layers = [nn.Linear(in_features, channels[0] * h0 * w0), act(), nn.Unflatten(1, (channels[0], h0, w0))]
    for a, b in zip(channels, channels[1:]):
        layers += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1), act()]
    layers += [nn.ConvTranspose2d(channels[-1], c * out_per_pixel, 4, stride=2, padding=1), nn.Flatten()]
    return Flat(nn.Sequential(*layers), (in_features,))


def num_features(shape: Any) -> int:
    return int(math.prod(shape))
