r"""Looking inside a continuous latent space: codes, activity, traversals, interpolations, grids, 2-D maps.

Generic over any model whose guide gives a distribution q(z | x) with event
shape (L,) and whose decoder maps codes to observations; the functions take
tensors and callables, never a model class.

* :func:`posterior_moments` / :func:`encode_batches`: the posterior mean and
  standard deviation of every datapoint's code (exact when the distribution
  has them in closed form, Monte Carlo otherwise, e.g. for a flow);
* :func:`activity`: A_l = Var_x(E_q[z_l | x]), Burda et al. 2015 (sec. 5.2):
  dimension l is "active" when A_l > 10^-2 (:data:`ACTIVE_THRESHOLD`);
* :func:`traversal_codes`: one code with one dimension swept at a time
  (Higgins et al. 2017, fig. 1);
* :func:`lerp` / :func:`slerp`: linear and spherical interpolation between
  two codes (White 2016, "Sampling generative networks": slerp follows the
  shell where most of a high-dimensional Gaussian's mass lies);
* :func:`manifold_grid`: the 2-D latent grid through the prior's inverse CDF
  (Kingma & Welling 2014, fig. 4);
* :func:`map_2d`: codes projected to 2-D by PCA or t-SNE (scikit-learn).
"""
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import UsageError

ACTIVE_THRESHOLD = 1e-2


def posterior_moments(q: Any, *, samples: int = 256) -> tuple[Any, ...]:
    """(mean, sd) of a distribution ``q`` over codes, each of shape ``q.batch_shape + q.event_shape``.

    Uses ``q.mean`` / ``q.stddev`` where the distribution defines them; otherwise
    (a ``TransformedDistribution``) the sample mean and standard deviation of
    ``samples`` draws (Monte Carlo error sd / sqrt(samples)).
    """
    try:
        return q.mean, q.stddev
    except NotImplementedError:
        if samples < 2:
            raise UsageError(f"Monte Carlo moments need samples >= 2, got {samples}") from None
        draws = q.sample((samples,))
        return draws.mean(0), draws.std(0)


@torch.no_grad()
def encode_batches(encode: Any, x: torch.Tensor, *, batch_size: int = 1024, samples: int = 256) -> tuple[Any, ...]:
    """Posterior (mean, sd) of every row of ``x`` (N, ...), each (N, L): ``encode(x_batch)`` returns q(z | x)."""
    if x.shape[0] == 0:
        raise UsageError("no data to encode")
    parts = [posterior_moments(encode(x[i : i + batch_size]), samples=samples) for i in range(0, x.shape[0], batch_size)]
    return torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])


def activity(means: torch.Tensor) -> torch.Tensor:
    """A_l = variance over the data of the posterior means, (N, L) -> (L,) (Burda et al. 2015, sec. 5.2)."""
    if means.dim() != 2 or means.shape[0] < 2:
        raise UsageError(f"activity needs posterior means of shape (N >= 2, L), got {tuple(means.shape)}")
    return means.var(0, unbiased=False)


def traversal_codes(z: torch.Tensor, dims: Sequence[int], values: Any) -> torch.Tensor:
    """Codes (len(dims), len(values), L): ``z`` (L,) with dimension ``dims[i]`` set to ``values[j]``."""
    z = torch.as_tensor(z)
    values = torch.as_tensor(values, dtype=z.dtype, device=z.device)
    if z.dim() != 1:
        raise UsageError(f"traversal_codes needs one code of shape (L,), got {tuple(z.shape)}")
    if any(not 0 <= d < z.shape[0] for d in dims):
        raise UsageError(f"traversal dims {list(dims)} outside 0..{z.shape[0] - 1}")
    codes = z.expand(len(dims), values.shape[0], z.shape[0]).clone()
    for i, d in enumerate(dims):
        codes[i, :, d] = values
    return codes


def _weights(steps, ref):
    if steps < 2:
        raise UsageError(f"interpolation needs steps >= 2, got {steps}")
    return torch.linspace(0.0, 1.0, steps, dtype=ref.dtype, device=ref.device)


def lerp(z0: torch.Tensor, z1: torch.Tensor, steps: int) -> torch.Tensor:
    """(1 - t) z0 + t z1 for t = 0, 1/(steps-1), ..., 1: (..., L), (..., L) -> (..., steps, L); endpoints exact."""
    t = _weights(steps, z0).unsqueeze(-1)
    path = (1 - t) * z0.unsqueeze(-2) + t * z1.unsqueeze(-2)
    path[..., 0, :], path[..., -1, :] = z0, z1
    return path


def slerp(z0: torch.Tensor, z1: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation (White 2016): sin((1-t) w) / sin w * z0 + sin(t w) / sin w * z1, w = angle(z0, z1).

    Shapes as :func:`lerp`; falls back to :func:`lerp` where the codes are
    (anti)parallel to within ``eps`` (sin w ~ 0). Endpoints exact.
    """
    t = _weights(steps, z0).unsqueeze(-1)
    cos = (z0 * z1).sum(-1, keepdim=True) / (z0.norm(dim=-1, keepdim=True) * z1.norm(dim=-1, keepdim=True)).clamp_min(eps)
    omega = torch.arccos(cos.clamp(-1.0, 1.0)).unsqueeze(-2)  # (..., 1, 1)
    sin = torch.sin(omega)
    ok = sin.abs() > eps
    safe = torch.where(ok, sin, torch.ones_like(sin))
    path = (torch.sin((1 - t) * omega) / safe) * z0.unsqueeze(-2) + (torch.sin(t * omega) / safe) * z1.unsqueeze(-2)
    path = torch.where(ok, path, lerp(z0, z1, steps))
    path[..., 0, :], path[..., -1, :] = z0, z1
    return path


def manifold_grid(n: int, *, lo: float = 0.05, hi: float = 0.95, dtype: torch.dtype | None = None) -> tuple[Any, ...]:
    """The n x n grid of 2-D codes Phi^{-1}(u) for u on an even grid in [lo, hi]^2 (Kingma & Welling 2014, fig. 4).

    Returns ``(codes, values)``: codes (n*n, 2), row-major with the first
    coordinate along columns and the second decreasing down the rows (so the
    image reads like a plot), and the n values of one axis.
    """
    if n < 2 or not 0 < lo < hi < 1:
        raise UsageError(f"manifold_grid needs n >= 2 and 0 < lo < hi < 1, got n={n}, lo={lo}, hi={hi}")
    u = torch.linspace(lo, hi, n, dtype=dtype or torch.get_default_dtype())
    values = torch.distributions.Normal(0.0, 1.0).icdf(u)
    z2, z1 = torch.meshgrid(values.flip(0), values, indexing="ij")
    return torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=-1), values


def map_2d(codes: Any, *, method: str = "pca", seed: int = 0, max_points: int | None = None) -> tuple[Any, ...]:
    """Codes (N, L) -> (N, 2) numpy coordinates by ``"pca"`` or ``"tsne"`` (scikit-learn); L = 2 is returned as is.

    Returns ``(coords, axis_names)``. t-SNE (perplexity 30, PCA initialisation)
    is slow beyond a few thousand points: pass ``max_points`` to subsample first
    (the caller then uses the first ``max_points`` rows).
    """
    codes = np.asarray(torch.as_tensor(codes).detach().cpu(), dtype=np.float64)
    if max_points is not None:
        codes = codes[:max_points]
    if codes.ndim != 2 or codes.shape[0] < 3:
        raise UsageError(f"map_2d needs codes of shape (N >= 3, L), got {codes.shape}")
    if codes.shape[1] == 2:
        return codes, ("z1", "z2")
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed).fit(codes)
        share = pca.explained_variance_ratio_
        return pca.transform(codes), (f"PC 1 ({share[0]:.0%} of variance)", f"PC 2 ({share[1]:.0%} of variance)")
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (codes.shape[0] - 1) / 3)
        coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(codes)
        return coords, ("t-SNE 1", "t-SNE 2")
    raise UsageError(f"unknown map method {method!r}; use 'pca' or 'tsne'")
