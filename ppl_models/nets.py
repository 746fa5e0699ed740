"""Networks shared by the models: MLPs, Gaussian encoders, convolutional bodies.

Every network accepts arbitrary leading batch dimensions (vectorised particles
put a particle dimension in front of the data dimension).
"""

import math

import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU, "softplus": nn.Softplus}


def mlp(sizes, activation="relu"):
    """Linear layers through ``sizes`` with ``activation`` between them (none after the last)."""
    act = ACTIVATIONS[activation]
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class GaussianHead(nn.Module):
    """features -> (loc, scale) of a diagonal Gaussian, scale = softplus(.) + min_scale > 0."""

    def __init__(self, in_features, out_features, min_scale=1e-4):
        super().__init__()
        self.linear = nn.Linear(in_features, 2 * out_features)
        self.min_scale = min_scale

    def forward(self, h):
        loc, raw = self.linear(h).chunk(2, dim=-1)
        return loc, F.softplus(raw) + self.min_scale


class Flat(nn.Module):
    """Apply a network that wants (N, *in_shape) to inputs with any leading dims."""

    def __init__(self, net, in_shape):
        super().__init__()
        self.net = net
        self.in_shape = tuple(in_shape)

    def forward(self, x):
        lead = x.shape[: x.dim() - 1]
        y = self.net(x.reshape((-1,) + self.in_shape))
        return y.reshape(lead + y.shape[1:]) if y.dim() == 2 else y.reshape(lead + (-1,))


def conv_encoder_body(image_shape, channels=(32, 64), activation="relu"):
    """(.., C*H*W) -> (.., features): stride-2 4x4 convolutions, each halving H and W."""
    c, h, w = image_shape
    factor = 2 ** len(channels)
    if h % factor or w % factor:
        raise ValueError(f"conv nets need H and W divisible by {factor}, got {image_shape}")
    act = ACTIVATIONS[activation]
    layers, prev = [], c
    for ch in channels:
        layers += [nn.Conv2d(prev, ch, 4, stride=2, padding=1), act()]
        prev = ch
    layers.append(nn.Flatten())
    features = prev * (h // factor) * (w // factor)
    return Flat(nn.Sequential(*layers), image_shape), features


def conv_decoder(in_features, image_shape, channels=(64, 32), activation="relu", out_per_pixel=1):
    """(.., in_features) -> (.., out_per_pixel*C*H*W): a linear layer then transposed convolutions."""
    c, h, w = image_shape
    factor = 2 ** len(channels)
    if h % factor or w % factor:
        raise ValueError(f"conv nets need H and W divisible by {factor}, got {image_shape}")
    act = ACTIVATIONS[activation]
    h0, w0 = h // factor, w // factor
    layers = [nn.Linear(in_features, channels[0] * h0 * w0), act(), nn.Unflatten(1, (channels[0], h0, w0))]
    for a, b in zip(channels, channels[1:]):
        layers += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1), act()]
    layers += [nn.ConvTranspose2d(channels[-1], c * out_per_pixel, 4, stride=2, padding=1), nn.Flatten()]
    return Flat(nn.Sequential(*layers), (in_features,))


def num_features(shape):
    return int(math.prod(shape))
