"""What an objective really computed: Monte Carlo KL fallbacks, objectives that are not bounds, gradient SNR.

Mean-field KL fallback
    :class:`~pyro.infer.TraceMeanField_ELBO` replaces ``E_q[log p(z) - log q(z)]``
    by ``-KL(q || p)`` wherever ``torch.distributions.kl_divergence`` has a closed
    form for the (guide, prior) pair, and *silently* falls back to the
    single-sample Monte Carlo estimate elsewhere (a mixture prior, a Normal guide
    against a Laplace prior, ...). The estimate stays unbiased, but its variance
    is not what the user asked for. :func:`meanfield_mc_sites` lists those sites;
    the ``"meanfield"`` spec of :func:`inference.make_elbo` warns about them once
    per objective with a :class:`MonteCarloKLWarning` and keeps them in ``.mc_sites``.

Objectives that are not bounds as used
    The IWAE and Renyi objectives (``"iwae:K"``, ``"renyi:ALPHA:K"``) put the
    per-datapoint log weights inside a log-mean-exp over particles. They are
    bounds on log p(x_n) only when the log weights are the unscaled
    ``log p(x_n, z_n) - log q(z_n | x_n)``:

    * a ``poutine.scale`` (a beta-VAE's beta, a KL annealing weight) or a
      subsampled plate (which scales by N / B) multiplies terms *inside* the
      log-sum-exp: ``log mean_k exp(s * log w_k)`` is no known bound of anything
      (unlike ``s * ELBO``). :func:`check_bound` raises :class:`UsageError`;
    * a latent outside the data plate (a global latent) couples the datapoints:
      the log weight of a particle is then the sum over the batch, and the
      objective is a bound on the joint ``log p(x_1..B)`` of the whole batch, not
      a sum of per-datapoint bounds (and it is tighter or looser depending on B).
      :func:`check_bound` warns with a :class:`NotABoundWarning`.

    The ELBO (``"trace"``, ``"meanfield"``, ...) is linear in the log weights, so
    scales and subsampling keep it a (scaled, unbiased) bound; no check applies.

Gradient signal-to-noise ratio
    :func:`gradient_snr` estimates, for each parameter, ``|E[g]| / sd[g]`` over
    independent gradient estimates ``g`` of the objective on a fixed minibatch
    (Rainforth et al. 2018, "Tighter variational bounds are not necessarily
    better"), and summarises it per group of parameters (encoder, decoder).
"""
import math
import sys
import types
import warnings
from typing import Any

import torch
from pyro.poutine import Trace
from torch.distributions import kl_divergence

from .errors import UsageError


class MonteCarloKLWarning(UserWarning):
    """TraceMeanField_ELBO used a Monte Carlo estimate of a KL term it had no closed form for."""


class NotABoundWarning(UserWarning):
    """The objective, as set up, is not a per-datapoint bound on log p(x)."""


def _latent_sites(model_trace, guide_trace):
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and name in guide_trace.nodes:
            if site["infer"].get("enumerate") is None:
                yield name, site, guide_trace.nodes[name]


def meanfield_mc_sites(model_trace: Trace, guide_trace: Trace) -> Any:
    """Names of the latent sites whose KL(q || p) has no closed form (so TraceMeanField_ELBO samples it)."""
    out = []
    with torch.no_grad():
        for name, model_site, guide_site in _latent_sites(model_trace, guide_trace):
            try:
                kl_divergence(guide_site["fn"], model_site["fn"])
            except NotImplementedError:
                out.append(name)
    return out


def _is_one(scale):
    if torch.is_tensor(scale):
        return bool((scale == 1).all())
    return scale == 1


def check_bound(model_trace: Trace, guide_trace: Trace, spec: str = "iwae/renyi", *, data_plate: str = "data") -> Any:
    """Raise or warn when importance-weighted objectives are not per-datapoint bounds (module docstring).

    Returns the names of the latent sites outside the ``data_plate`` (empty when
    the objective is a per-datapoint bound).
    """
    for trace in (model_trace, guide_trace):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or _is_one(site["scale"]):
                continue
            subsampled = [f.name for f in site["cond_indep_stack"] if f.full_size is not None and f.full_size != f.size]
            if subsampled:
                raise UsageError(
                    f"{spec}: site {name!r} is in the subsampled plate {subsampled[0]!r}, whose N/B scale lands inside "
                    "the log-sum-exp over particles, which is not a bound; use a plate over the minibatch itself "
                    "(inference.fit already averages the objective per datapoint)"
                )
            raise UsageError(
                f"{spec}: site {name!r} is scaled (poutine.scale, e.g. a beta-VAE's beta or KL annealing); inside "
                "the log-sum-exp over particles the scaled objective is not a bound on log p(x). Use beta=1 with "
                "iwae/renyi, or the 'trace' ELBO for beta != 1"
            )
    outside = [
        name
        for name, site, _ in _latent_sites(model_trace, guide_trace)
        if not any(f.name == data_plate for f in site["cond_indep_stack"])
    ]
    return outside


def external_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning to the first caller outside pyro, torch and inference."""
    level = 1
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("pyro", "torch", "inference"):
        frame = frame.f_back
        level += 1
    return level


def warn_global_latents(outside: Any, spec: Any) -> None:
    warnings.warn(
        f"{spec}: latent site(s) {', '.join(map(repr, outside))} lie outside the 'data' plate, so each particle's "
        "log weight sums over the whole batch: the objective bounds the batch's joint log p(x_1..x_B), not each "
        "log p(x_n), and changes with the batch size",
        NotABoundWarning,
        stacklevel=external_stacklevel(),
    )


def _groups(module, groups):
    named = list(module.named_parameters())
    if groups is None:
        groups = {}
        for name, _ in named:
            groups.setdefault(name.split(".")[0], [name.split(".")[0]])
    out = {}
    for group, prefixes in groups.items():
        prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
        params = [
            p for n, p in named if p.requires_grad and any(n == pre or n.startswith(pre + ".") for pre in prefixes)
        ]
        if not params:
            raise UsageError(f"gradient_snr: no parameters of {type(module).__name__} match group {group!r} {prefixes}")
        out[group] = params
    return out


def gradient_snr(module: torch.nn.Module, elbo: Any, batch: Any, *, samples: int = 100, groups: Any = None) -> Any:
    """Per-parameter gradient signal-to-noise ratio of an objective, summarised per parameter group.

    ``samples`` independent gradients g_s of the loss ``-objective(batch) / B``
    are drawn at the current parameters on the fixed ``batch`` (the only
    randomness is the particles drawn from the guide). For every scalar
    parameter, SNR = |mean_s g_s| / sd_s(g_s) (unbiased sd; parameters whose
    gradient has zero variance, to round-off, are left out). ``groups`` maps a group name to
    parameter-name prefixes (default: one group per top-level submodule or
    parameter); ``elbo`` is a Pyro ELBO object with ``differentiable_loss``.

    Returns ``{group: {"snr_mean", "snr_median", "n_params"}}``. Rainforth et al.
    (2018) show that for IWAE the encoder's SNR decreases like 1/sqrt(K) while the
    decoder's grows like sqrt(K).
    """
    if not isinstance(samples, int) or samples < 2:
        raise UsageError(f"gradient_snr needs samples >= 2, got {samples!r}")
    parts = _groups(module, groups)
    flat = [p for ps in parts.values() for p in ps]
    size = batch.shape[0] if torch.is_tensor(batch) else len(next(iter(batch.values())))
    s1 = [torch.zeros_like(p, dtype=torch.float64) for p in flat]
    s2 = [torch.zeros_like(p, dtype=torch.float64) for p in flat]
    was_training = module.training
    module.train()
    try:
        for _ in range(samples):
            loss = elbo.differentiable_loss(module.model, module.guide, batch) / size
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
            for i, g in enumerate(grads):
                if g is not None:
                    g = g.detach().double()
                    s1[i] += g
                    s2[i] += g * g
    finally:
        module.train(was_training)
    out, i = {}, 0
    for group, params in parts.items():
        snrs = []
        for _ in params:
            mean = s1[i] / samples
            var = (s2[i] - samples * mean * mean).clamp_min(0) / (samples - 1)
            sd = var.sqrt()
            keep = sd > 1e-7 * mean.abs()  # zero (or round-off) variance: no noise to speak of
            snrs.append((mean.abs()[keep] / sd[keep]).reshape(-1))
            i += 1
        snr = torch.cat(snrs)
        out[group] = {
            "snr_mean": float(snr.mean()) if snr.numel() else math.nan,
            "snr_median": float(snr.median()) if snr.numel() else math.nan,
            "n_params": int(snr.numel()),
        }
    return out
