"""Per-datapoint bounds and importance-weighted log-likelihoods.

For each datapoint x and K particles z_k ~ q(z | x), with log weights
``log w_k = log p(x, z_k) - log q(z_k | x)``:

* the ELBO estimate is ``(1/K) sum_k log w_k`` (unbiased for the ELBO);
* the importance-weighted estimate is ``log (1/K) sum_k w_k`` (Burda et al.
  2015), a stochastic lower bound on log p(x) whose expectation increases with K
  and tends to log p(x).

Both are computed per datapoint in batches, with particles drawn in chunks and
combined by a running log-sum-exp, so memory stays bounded for any K. The log
densities are the model's and guide's own, without any ``poutine.scale`` (so a
beta-VAE is scored as the VAE it is) but with their masks.
"""

import math
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from . import batching
from .errors import UsageError

DEFAULT_MAX_ELEMENTS = 2**24  # floats per particle chunk: about 64 MiB per tensor of that size


@dataclass
class Evaluation:
    """Means, standard errors (of the mean over datapoints) and per-point values, in nats."""

    elbo: float
    elbo_se: float
    log_likelihood: float
    log_likelihood_se: float
    particles: int
    elbo_per_point: torch.Tensor
    log_likelihood_per_point: torch.Tensor
    log_weights: torch.Tensor = None  # (N, K) when asked for with keep_log_weights=True

    def as_dict(self):
        return {
            "elbo": self.elbo,
            "elbo_se": self.elbo_se,
            "log_likelihood": self.log_likelihood,
            "log_likelihood_se": self.log_likelihood_se,
            "particles": self.particles,
        }


def guess_max_plate_nesting(model, guide, *args):
    """The number of plate dimensions used by a model/guide pair (traced once)."""
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
    dims = [
        -frame.dim
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


def _per_point(log_prob, site, max_plate_nesting, data_plate):
    """Sum a site's log-density over every dim but the particle and data-plate dims: (K|1, B|1)."""
    frames = [f for f in site["cond_indep_stack"] if f.name == data_plate]
    if not frames:
        raise UsageError(
            f"site {site['name']!r} lies outside the {data_plate!r} plate: per-datapoint bounds need every "
            "latent inside it (or a module.log_weights method that handles it)"
        )
    data_dim = frames[0].dim
    lp = log_prob.reshape((1,) * (max_plate_nesting + 1 - log_prob.dim()) + tuple(log_prob.shape))
    other = [d for d in range(-max_plate_nesting, 0) if d != data_dim]
    if other:
        lp = lp.sum(other, keepdim=True)
    return lp.reshape(lp.shape[0], -1)


def trace_log_weights(model, guide, batch, num_particles, *, max_plate_nesting=None, data_plate="data"):
    """log p(x, z_k) - log q(z_k | x) for every datapoint: shape (K, B).

    Particles are vectorised by an outer plate left of the model's plates. Every
    latent must lie inside the plate named ``data_plate``.
    """
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, batch)
    size = batching.length(batch)
    particles = pyro.plate("_eval_particles", num_particles, dim=-(max_plate_nesting + 1))
    with particles:
        guide_trace = poutine.trace(guide).get_trace(batch)
    with particles:
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    total = 0.0
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if sign < 0 and site["is_observed"]:
                continue
            lp = site["fn"].log_prob(site["value"])
            if site["mask"] is not None:
                lp = torch.where(site["mask"], lp, lp.new_zeros(()))
            total = total + sign * _per_point(lp, site, max_plate_nesting, data_plate)
    return torch.as_tensor(total).expand(num_particles, size)


def _points_size(batch):
    """Number of values per datapoint, used to size particle chunks."""
    view = batching.fixed_view(batch)
    values = view.values() if isinstance(view, dict) else [view]
    return max(1, sum(v[0].numel() for v in values if v is not None))


def evaluate(
    module,
    data,
    *,
    particles=1000,
    batch_size=None,
    max_elements=DEFAULT_MAX_ELEMENTS,
    keep_log_weights=False,
    progress=False,
):
    """Score ``module`` on ``data``: per-datapoint ELBO and importance-weighted log-likelihood.

    Datapoints are processed ``batch_size`` at a time (default: min(N, 500))
    and particles in chunks of at most ``max_elements / (batch * values per
    datapoint)``, combined by a running log-sum-exp. A module may provide
    ``log_weights(batch, num_particles) -> (K, B)`` (e.g. to sum out a discrete
    latent); otherwise its model/guide are traced with every latent inside the
    ``"data"`` plate. Returns an :class:`Evaluation`.
    """
    if not isinstance(particles, int) or particles < 1:
        raise UsageError(f"particles must be a positive integer, got {particles!r}")
    data = batching.fixed_view(data)
    n = batching.length(data)
    if n == 0:
        raise UsageError("cannot evaluate on empty data")
    batch_size = batch_size or min(n, 500)
    mpn = getattr(module, "max_plate_nesting", None)
    was_training = module.training
    module.eval()
    elbos, lls, weights = [], [], []
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"evaluate K={particles}", unit="batch")
    try:
        with torch.no_grad():
            for start in starts:
                batch = batching.take(data, slice(start, start + batch_size))
                b = batching.length(batch)
                chunk = max(1, min(particles, max_elements // (b * _points_size(batch))))
                lse = None
                mean = 0.0
                kept = []
                for k0 in range(0, particles, chunk):
                    k = min(chunk, particles - k0)
                    if hasattr(module, "log_weights"):
                        lw = module.log_weights(batch, k)
                    else:
                        lw = trace_log_weights(module.model, module.guide, batch, k, max_plate_nesting=mpn)
                    part = torch.logsumexp(lw, dim=0)
                    lse = part if lse is None else torch.logaddexp(lse, part)
                    mean = mean + lw.sum(0) / particles
                    if keep_log_weights:
                        kept.append(lw.T.cpu())
                elbos.append(mean.cpu())
                lls.append((lse - math.log(particles)).cpu())
                if keep_log_weights:
                    weights.append(torch.cat(kept, dim=1))
    finally:
        module.train(was_training)
    elbo = torch.cat(elbos).double()
    ll = torch.cat(lls).double()
    if not (torch.isfinite(elbo).all() and torch.isfinite(ll).all()):
        raise FloatingPointError("evaluation produced non-finite log weights; is the data inside the model's support?")
    se = lambda v: float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")  # noqa: E731
    return Evaluation(
        elbo=float(elbo.mean()),
        elbo_se=se(elbo),
        log_likelihood=float(ll.mean()),
        log_likelihood_se=se(ll),
        particles=particles,
        elbo_per_point=elbo,
        log_likelihood_per_point=ll,
        log_weights=torch.cat(weights) if keep_log_weights else None,
    )
