"""Importance-weighted scores of any model/guide pair: ELBO and log-likelihood bounds.

For data X and K particles drawn from the guide, with log weights
``log w_k = log p(X, z_k) - log q(z_k | X)``:

* the ELBO estimate is ``(1/K) sum_k log w_k`` (unbiased for the ELBO);
* the importance-weighted estimate is ``log (1/K) sum_k w_k`` (Burda et al.
  2015), a stochastic lower bound on log p(X) whose expectation increases with K
  and tends to log p(X).

Two scopes, decided once from :func:`inference.pair.inspect_pair`, never mixed:

* **per-datapoint** (every latent and every observed site inside the data plate):
  each datapoint x_n gets its own K weights ``log p(x_n, z_nk) - log q(z_nk | x_n)``,
  so per-point ELBOs and log-likelihoods are reported with their mean and the
  standard error of that mean over datapoints;
* **whole-data** (a global latent, e.g. a regression weight or the single latent
  vector of ``AutoDiagonalNormal``, or an observed site outside the data plate):
  each particle draws the globals once for all N points, the full data are scored
  in one call (particles in chunks), and the whole-data ELBO and IWAE bound on
  log p(X) are reported divided by N, with the standard error over particles:
  ``std(log w) / sqrt(K)`` for the ELBO and the delta-method error of the
  log-mean-exp, ``std(w) / (mean(w) sqrt(K))`` for the IWAE value (both over N).
  There are no per-point values.

Discrete model-only latents marked ``infer={"enumerate": "parallel"}`` (or by
``config_enumerate``) are summed out exactly: the model is replayed against the
guide's particles under ``poutine.enum`` and every site's log-density factor is
contracted by Pyro's tensor variable elimination (``pyro.ops.contract``, as
``TraceEnum_ELBO`` does; Obermeyer et al. 2019, "Tensor variable elimination for
plated factor graphs"), keeping the particle and data dimensions, so a chain under
``pyro.markov`` costs time linear in its length. Guide sites are always sampled.

The log densities are the model's and guide's own, without any ``poutine.scale``
or subsampling scale (so a beta-VAE is scored as the VAE it is) but with their
masks. A pair may instead provide ``log_weights(batch, num_particles) -> (K, B)``,
which is used as is (per-datapoint).
"""
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
import torch.nn as nn
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.util import prune_subsample_sites

from . import batching
from .errors import UsageError
from .pair import Pair, PairInfo, as_pair, inspect_pair

DEFAULT_MAX_ELEMENTS = 2**24  # floats per particle chunk: about 64 MiB per tensor of that size
PER_DATAPOINT = "per-datapoint"
WHOLE_DATA = "whole-data"
_PARTICLES = "_eval_particles"


@dataclass
class Evaluation:
    """Scores in nats per datapoint, and how they were obtained.

    ``scope == "per-datapoint"``: ``elbo``/``log_likelihood`` are means over datapoints of
    per-point values (``elbo_per_point``, ``log_likelihood_per_point``: (N,) float64), and the
    ``_se`` fields are standard errors of those means over datapoints; ``log_weights`` is (N, K).

    ``scope == "whole-data"``: ``elbo``/``log_likelihood`` are the whole-data ELBO and IWAE
    bound on log p(X) divided by N, the ``_se`` fields their standard errors over particles
    (divided by N; NaN for one particle), the per-point fields are None and ``log_weights``
    is (1, K): the whole-data log weights.
    """

    elbo: float
    elbo_se: float
    log_likelihood: float
    log_likelihood_se: float
    particles: int
    elbo_per_point: torch.Tensor | None = None
    log_likelihood_per_point: torch.Tensor | None = None
    log_weights: torch.Tensor | None = None  # when asked for with keep_log_weights=True
    scope: str = PER_DATAPOINT
    num_data: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "elbo": self.elbo,
            "elbo_se": self.elbo_se,
            "log_likelihood": self.log_likelihood,
            "log_likelihood_se": self.log_likelihood_se,
            "particles": self.particles,
            "scope": self.scope,
        }


def scope_of(info: PairInfo) -> str:
    """``"per-datapoint"`` when every site lies inside the data plate, else ``"whole-data"``.

    Raises :class:`UsageError` naming a latent that is neither in the guide nor enumerated
    (no importance weight can account for it)."""
    for name in info.model_only_latents:
        site = info.sites[name]
        if not site.enumerated:
            if site.discrete:
                hint = 'mark it infer={"enumerate": "parallel"} (or use config_enumerate) to sum it out, or sample it in the guide'
            else:
                hint = "add it to the guide"
            kind = "discrete" if site.discrete else "continuous"
            raise UsageError(f"latent site {name!r} is {kind}, in the model only and not enumerated: {hint}")
    if info.num_data is None or any(not site.local for site in info.sites.values()):
        return WHOLE_DATA
    return PER_DATAPOINT


def _frames(site):
    return [f for f in site["cond_indep_stack"] if f.vectorized]


def _factors(pair, info, batch, index, num_particles, globals_trace=None):
    """Trace the pair with K vectorised particles, model-only enumerated sites enumerated in parallel.

    Returns ``(factors, sum_dims, dim_to_size, model_trace, guide_trace)``: the unscaled, masked
    log-density factors (guide ones negated) as packed tensors grouped by plate ordinal, as
    ``TraceEnum_ELBO`` builds them. ``globals_trace``: a guide trace whose (global) sites are replayed.
    """
    mpn = info.max_plate_nesting
    model, guide, args, kwargs = pair.bind(batch, index, info)
    if globals_trace is not None:
        guide = poutine.replay(guide, trace=globals_trace)
    particles = pyro.plate(_PARTICLES, num_particles, dim=-(mpn + 1))
    try:
        with particles:
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        # model enumeration dims start left of the particle dim; replay inside enum so that guide
        # sites keep the guide's values and only model-only sites are enumerated
        enum_model = poutine.enum(poutine.replay(model, trace=guide_trace), first_available_dim=-(mpn + 2))
        with particles:
            model_trace = poutine.trace(enum_model).get_trace(*args, **kwargs)
    except (RuntimeError, ValueError) as exc:
        if isinstance(exc, UsageError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"evaluate draws its particles in parallel, in a plate at dim {-(mpn + 1)} left of the model's "
            f"{mpn} plate(s), and the pair failed under it ({type(exc).__name__}: {first}); the model and guide "
            "must broadcast over extra leading dimensions, as with Pyro's vectorize_particles "
            "(e.g. write x @ w as (x * w).sum(-1))"
        ) from exc
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    for name, site in model_trace.nodes.items():
        if (
            site["type"] == "sample"
            and not site["is_observed"]
            and name not in guide_trace.nodes
            and site["infer"].get("_enumerate_dim") is None
        ):
            raise UsageError(
                f"latent site {name!r} is in the model only and was not enumerated in parallel: "
                'mark it infer={"enumerate": "parallel"} or add it to the guide'
            )
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    guide_trace.pack_tensors()
    model_trace.pack_tensors(guide_trace.plate_to_symbol)
    plate_to_symbol = model_trace.plate_to_symbol
    factors, sum_dims, dim_to_size = OrderedDict(), set(), {}
    for trace, sign in ((model_trace, 1), (guide_trace, -1)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or (sign < 0 and site["is_observed"]):
                continue
            # unscaled (no poutine.scale, no subsampling scale), masked: the mask applies inside
            # the sum over enumerated values, as in TraceEnum_ELBO
            term = packed.scale_and_mask(site["packed"]["unscaled_log_prob"], mask=site["packed"]["mask"])
            if sign < 0:
                term = packed.neg(term)
            elif name not in guide_trace.nodes and site["infer"].get("_enumerate_dim") is not None:
                sum_dims.update(term._pyro_dims)
            dim_to_size.update(zip(term._pyro_dims, term.shape))
            ordinal = frozenset(plate_to_symbol[f.name] for f in _frames(site))
            factors.setdefault(ordinal, []).append(term)
    sum_dims -= set(plate_to_symbol.values())
    return factors, sum_dims, dim_to_size, model_trace, guide_trace


def _contract(factors, sum_dims, dim_to_size, model_trace, info, num_particles, size):
    """Sum out ``sum_dims`` and product-contract every plate but the particle plate and (when
    ``size`` is given) the data plate: log weights (K, size), or (K, 1) with ``size=None``."""
    mpn = info.max_plate_nesting
    plate_to_symbol = model_trace.plate_to_symbol
    target = {plate_to_symbol[_PARTICLES]}
    dim_to_size = dict(dim_to_size, **{plate_to_symbol[_PARTICLES]: num_particles})
    shape = [num_particles] + [1] * mpn
    if size is not None:
        frame = next(
            f for site in model_trace.nodes.values() if site["type"] == "sample" for f in _frames(site) if f.name == info.data_plate
        )
        target.add(plate_to_symbol[info.data_plate])
        dim_to_size[plate_to_symbol[info.data_plate]] = size
        shape[mpn + 1 + frame.dim] = size
    if not factors:
        return torch.zeros(num_particles, size or 1)
    term = contract_to_tensor(factors, sum_dims, target_ordinal=frozenset(target), ring=LogRing(dim_to_size=dim_to_size))
    lw = packed.unpack(term, model_trace.symbol_to_dim)
    lw = lw.reshape((1,) * (mpn + 1 - lw.dim()) + tuple(lw.shape))
    return lw.expand(shape).reshape(num_particles, -1)


def _log_weights(pair, info, batch, index, num_particles, scope):
    """Log weights with enumerated sites summed out: (K, B) per-datapoint, (K, 1) whole-data."""
    factors, sum_dims, dim_to_size, model_trace, _ = _factors(pair, info, batch, index, num_particles)
    size = (batching.length(batch) if index is None else len(index)) if scope == PER_DATAPOINT else None
    return _contract(factors, sum_dims, dim_to_size, model_trace, info, num_particles, size)


def _groups(n, b, device):
    """Index tensors of exactly ``b`` rows covering 0..n-1 (what a self-subsampling plate accepts), each
    with the number of its leading rows not covered before: the last group overlaps the one before."""
    out = []
    for start in range(0, n, b):
        stop = min(start + b, n)
        first = max(0, stop - b)
        out.append((torch.arange(first, first + b, device=device), stop - start))
    return out


def _subsampled_whole_data_log_weights(pair, info, data, num_particles):
    """Whole-data log weights (K, 1) of a pair that subsamples its own data plate (only B rows per call).

    The guide's global sites are drawn once per particle (first group) and replayed for every other
    group of B rows; global factors are counted once, local ones per datapoint."""
    n, b = info.num_data, info.batch_size
    total, globals_trace = None, None
    for index, fresh in _groups(n, b, batching.data_device(data)):
        factors, sum_dims, dim_to_size, model_trace, guide_trace = _factors(
            pair, info, data, index, num_particles, globals_trace
        )
        d = model_trace.plate_to_symbol[info.data_plate]
        local = OrderedDict((t, terms) for t, terms in factors.items() if d in t)
        local_lw = _contract(local, sum_dims, dim_to_size, model_trace, info, num_particles, b)[:, b - fresh :]
        if globals_trace is None:
            glob = OrderedDict((t, terms) for t, terms in factors.items() if d not in t)
            if any(sum_dims.intersection(term._pyro_dims) for terms in glob.values() for term in terms):
                raise UsageError(
                    "an enumerated site lies outside the subsampled data plate: its sum does not factorise over "
                    "minibatches; evaluate such a pair without subsample_size"
                )
            total = _contract(glob, sum_dims, dim_to_size, model_trace, info, num_particles, None)
            globals_trace = poutine.Trace()
            for name, site in guide_trace.nodes.items():
                if site["type"] == "sample" and not any(f.name == info.data_plate for f in site["cond_indep_stack"]):
                    globals_trace.add_node(name, **site)
        total = total + local_lw.sum(1, keepdim=True)
    return total


def trace_log_weights(model: Callable[..., Any], guide: Callable[..., Any], batch: Any, num_particles: int, *,
                      max_plate_nesting: int | None = None, data_plate: str = "data") -> torch.Tensor:
    """log p(x_b, z_bk) - log q(z_bk | x_b) for every datapoint of ``batch``: shape (K, B).

    ``model``/``guide`` are called with ``batch`` by the convention of
    :meth:`inference.pair.Pair.arguments`. Particles are vectorised by an outer plate left of the
    model's plates; enumerated model-only sites are summed out exactly. Raises
    :class:`UsageError` when a site lies outside the plate named ``data_plate`` (whole-data
    scores: :func:`evaluate`) or a model-only latent is not enumerated.
    """
    pair = as_pair(model=model, guide=guide)
    with torch.no_grad():
        info = inspect_pair(pair, batch, max_plate_nesting=max_plate_nesting)
    if info.data_plate != data_plate:
        raise UsageError(f"the pair's data plate is {info.data_plate!r}, not {data_plate!r}")
    if scope_of(info) != PER_DATAPOINT:
        outside = [s.name for s in info.sites.values() if not s.local]
        raise UsageError(
            f"site {outside[0] if outside else '?'!r} lies outside the {data_plate!r} plate: per-datapoint weights "
            "need every site inside it (evaluate reports whole-data bounds for such pairs)"
        )
    return _log_weights(pair, info, batch, None, num_particles, PER_DATAPOINT)


def _mean_se(values):
    """Mean over datapoints and its standard error (NaN for one point)."""
    se = float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else float("nan")
    return float(values.mean()), se


def _whole_data_scores(lw, n):
    """ELBO and IWAE per datapoint from whole-data log weights (K,), with standard errors over
    particles: the ELBO's std(log w)/sqrt(K), and for log mean(w) the delta method,
    std(w)/(mean(w) sqrt(K)) (weights rescaled by their maximum, which cancels)."""
    k = lw.numel()
    elbo = float(lw.mean()) / n
    ll = float(torch.logsumexp(lw, 0) - math.log(k)) / n
    if k == 1:
        return elbo, float("nan"), ll, float("nan")
    w = torch.exp(lw - lw.max())
    return elbo, float(lw.std()) / math.sqrt(k) / n, ll, float(w.std() / w.mean()) / math.sqrt(k) / n


def evaluate(
    module: Any = None,
    data: Any = None,
    *,
    model: Any = None,
    guide: Any = None,
    particles: int = 1000,
    batch_size: int | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    keep_log_weights: bool = False,
    progress: bool = False,
) -> Evaluation:
    """Score a model/guide pair on ``data``: ELBO and importance-weighted log-likelihood, in nats per datapoint.

    ``module``: anything :func:`inference.pair.as_pair` accepts (an object with ``model``/``guide``,
    a ``(model, guide)`` tuple, an autoguide as guide; or ``model=``/``guide=`` keywords), or an
    object with only a ``log_weights`` hook; ``data``: a tensor, tuple of tensors or dict of tensors whose first dimension indexes
    datapoints (or a ``DataSplit``). Batches are passed by :meth:`inference.pair.Pair.arguments`.

    The scope (per-datapoint or whole-data, see the module docstring) is decided from one
    :func:`inference.pair.inspect_pair` record of the first batch. Per-datapoint: datapoints
    ``batch_size`` at a time (default min(N, 500); a pair that subsamples its own data plate gets
    the full data and its plate's B indices at a time). Whole-data: the full data in one call
    (a self-subsampling pair: its B-row groups with the global latents drawn once per particle).
    Particles are drawn in chunks of at most ``max_elements / (batch * values per datapoint)``
    and combined by a running log-sum-exp. A pair with a ``log_weights(batch, num_particles) ->
    (K, B)`` hook is scored per datapoint by that hook, without inspection.

    Returns an :class:`Evaluation`. Raises :class:`UsageError` for bad ``particles``, empty data
    or a latent that is neither in the guide nor enumerated; ``FloatingPointError`` when a log
    weight is not finite.
    """
    if not isinstance(particles, int) or isinstance(particles, bool) or particles < 1:
        raise UsageError(f"particles must be a positive integer, got {particles!r}")
    if data is None:
        raise UsageError("no data given to evaluate")
    if model is not None or guide is not None:
        module = as_pair(module, model=model, guide=guide)
    data = batching.fixed_view(data)
    n = batching.length(data)
    if n == 0:
        raise UsageError("cannot evaluate on empty data")
    batch_size = batch_size or min(n, 500)
    hooked = _hook_owner(module)
    pair = None if hooked is not None else as_pair(module)
    modules = [hooked] if isinstance(hooked, nn.Module) else ([] if pair is None else pair.modules())
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            if hooked is not None:
                return _per_datapoint(
                    hooked.log_weights, None, None, data, n, particles, batch_size, max_elements, keep_log_weights, progress
                )
            info = inspect_pair(pair, data, rows=batch_size)
            if scope_of(info) == PER_DATAPOINT:
                return _per_datapoint(None, pair, info, data, n, particles, batch_size, max_elements, keep_log_weights, progress)
            return _whole_data(pair, info, data, n, particles, max_elements, keep_log_weights)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _hook_owner(module):
    """The object whose ``log_weights`` hook scores ``module``, or None."""
    if isinstance(module, Pair):
        return module.owner if module.has("log_weights") else None
    if isinstance(module, (tuple, list)):
        return None
    return module if hasattr(module, "log_weights") else None


def _sampled_latents(info):
    """Whether any latent is drawn from the guide (else every weight is the same exact number)."""
    return any(info.sites[name].in_guide for name in info.latents)


def _per_datapoint(hook, pair, info, data, n, particles, batch_size, max_elements, keep_log_weights, progress):
    elbos, lls, weights = [], [], []
    if info is not None and info.subsampled:
        # the pair takes the full data and subsamples its own plate: exactly B indices per call
        groups = _groups(n, info.batch_size, batching.data_device(data))
    else:
        groups = [(slice(start, min(start + batch_size, n)), None) for start in range(0, n, batch_size)]
    if progress:
        from tqdm.auto import tqdm

        groups = tqdm(groups, desc=f"evaluate K={particles}", unit="batch")
    exact = info is not None and not _sampled_latents(info)
    per_point = batching.values_per_point(data)  # the same for every row
    for rows, fresh in groups:
        if fresh is None:
            batch, index = batching.take(data, rows), None
            b = batching.length(batch)
            keep = slice(None)
        else:
            batch, index = data, rows
            b = len(index)
            keep = slice(b - fresh, None)
        chunk = max(1, min(particles, max_elements // (b * per_point)))
        lse, mean, kept = None, 0.0, []
        k0 = 0
        while k0 < particles:
            k = min(chunk, particles - k0)
            if hook is not None:
                lw = hook(batch, k)
            elif exact:  # no sampled latent: one exact evaluation stands for every particle
                lw = _log_weights(pair, info, batch, index, 1, PER_DATAPOINT).expand(k, b)
            else:
                lw = _log_weights(pair, info, batch, index, k, PER_DATAPOINT)
            lw = lw[:, keep]
            part = torch.logsumexp(lw, dim=0)
            lse = part if lse is None else torch.logaddexp(lse, part)
            mean = mean + lw.sum(0) / particles
            if keep_log_weights:
                kept.append(lw.T.cpu())
            k0 += k
        elbos.append(mean.cpu())
        lls.append((lse - math.log(particles)).cpu())
        if keep_log_weights:
            weights.append(torch.cat(kept, dim=1))
    elbo = torch.cat(elbos).double()
    ll = torch.cat(lls).double()
    if not (torch.isfinite(elbo).all() and torch.isfinite(ll).all()):
        raise FloatingPointError("evaluation produced non-finite log weights; is the data inside the model's support?")
    elbo_mean, elbo_se = _mean_se(elbo)
    ll_mean, ll_se = _mean_se(ll)
    return Evaluation(
        elbo=elbo_mean,
        elbo_se=elbo_se,
        log_likelihood=ll_mean,
        log_likelihood_se=ll_se,
        particles=particles,
        elbo_per_point=elbo,
        log_likelihood_per_point=ll,
        log_weights=torch.cat(weights) if keep_log_weights else None,
        scope=PER_DATAPOINT,
        num_data=n,
    )


def _whole_data(pair, info, data, n, particles, max_elements, keep_log_weights):
    rows = info.batch_size if info.subsampled else n
    chunk = max(1, min(particles, max_elements // (rows * batching.values_per_point(data))))

    def draw(k):
        if info.subsampled:
            return _subsampled_whole_data_log_weights(pair, info, data, k).reshape(k)
        return _log_weights(pair, info, data, None, k, WHOLE_DATA).reshape(k)

    if _sampled_latents(info):
        lw = torch.cat([draw(min(chunk, particles - k0)) for k0 in range(0, particles, chunk)])
    else:  # no sampled latent: one exact evaluation stands for every particle
        lw = draw(1).expand(particles)
    lw = lw.double().cpu()
    if not torch.isfinite(lw).all():
        raise FloatingPointError("evaluation produced non-finite log weights; is the data inside the model's support?")
    elbo, elbo_se, ll, ll_se = _whole_data_scores(lw, n)
    return Evaluation(
        elbo=elbo,
        elbo_se=elbo_se,
        log_likelihood=ll,
        log_likelihood_se=ll_se,
        particles=particles,
        log_weights=lw.reshape(1, -1) if keep_log_weights else None,
        scope=WHOLE_DATA,
        num_data=n,
    )
