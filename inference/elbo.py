"""ELBOs chosen by short spec strings.

=====================  ==========================================================
spec                   objective
=====================  ==========================================================
``trace[:K]``          :class:`~pyro.infer.Trace_ELBO`, K vectorised particles
                       (default 1): E_q[log p(x, z) - log q(z | x)].
``meanfield[:K]``      :class:`~pyro.infer.TraceMeanField_ELBO`: the same bound with
                       analytic KL(q || p) at every site where
                       ``torch.distributions.kl_divergence`` has a closed form.
                       Valid only when the guide is mean-field with respect to the
                       model's dependency structure (see Pyro's docstring).
``enum[:K]``           :class:`~pyro.infer.TraceEnum_ELBO`: discrete sites marked
                       ``infer={"enumerate": "parallel"}`` are summed out exactly.
``tracegraph[:K]``     :class:`DifferentiableTraceGraphELBO` (Pyro's
                       :class:`~pyro.infer.TraceGraph_ELBO`): score-function
                       gradients with Rao-Blackwellisation over the plate graph.
``iwae:K``             :class:`~pyro.infer.RenyiELBO` with alpha = 0 and K
                       vectorised particles: the importance-weighted bound
                       E[log (1/K) sum_k p(x, z_k) / q(z_k | x)]
                       (Burda et al. 2015), per datapoint.
``renyi:ALPHA:K``      the variational Renyi bound (Li & Turner 2016),
                       1/(1-alpha) log (1/K) sum_k w_k^(1-alpha), alpha != 1.
=====================  ==========================================================

Every objective is returned as a Pyro ELBO with a ``differentiable_loss``, so the
training loop can use a plain torch optimiser.

When is it a bound? (checks in :mod:`inference.diagnostics`)

* ``meanfield``: sites without a closed-form KL are estimated by Monte Carlo
  (Pyro does so silently); the objective warns once with a
  :class:`~inference.diagnostics.MonteCarloKLWarning` naming them and lists them
  in ``elbo.mc_sites``. The JIT variant does not report.
* ``iwae``/``renyi``: bounds *per datapoint* only on unscaled log weights. A
  ``poutine.scale`` (beta-VAE, annealing) or a subsampled plate puts a scale
  inside the log-sum-exp and raises :class:`UsageError`; a latent outside the
  ``"data"`` plate makes the log-mean-exp run over whole-batch weights (a bound
  on the batch's joint log-likelihood) and warns with a
  :class:`~inference.diagnostics.NotABoundWarning`.
* Renyi: L_alpha decreases in alpha, with L_0 = log p(x) and L_1 = the ELBO
  (Li & Turner 2016), so 0 < alpha < 1 lies between them and alpha > 1 below the
  ELBO; alpha < 0 lies *above* log p(x) and warns (NotABoundWarning).
"""
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.util import get_dependent_plate_dims, is_validation_enabled, torch_sum
from pyro.util import warn_if_nan

from .diagnostics import (
    MonteCarloKLWarning,
    NotABoundWarning,
    check_bound,
    external_stacklevel,
    meanfield_mc_sites,
    warn_global_latents,
)
from .errors import UsageError

ELBO_SPECS = (
    "trace[:K]",
    "meanfield[:K]",
    "enum[:K]",
    "tracegraph[:K]",
    "iwae:K",
    "renyi:ALPHA:K",
)


class DifferentiableRenyiELBO(RenyiELBO):
    """:class:`~pyro.infer.RenyiELBO` with a ``differentiable_loss``.

    For reparameterised guides the gradient of the Renyi bound
    ``L_alpha = 1/(1-alpha) * log (1/K) sum_k exp((1-alpha) log w_k)`` is
    ``sum_k softmax((1-alpha) log w)_k * grad log w_k``, which is exactly the
    gradient of ``L_alpha`` itself, so the loss below is both the objective and
    its surrogate. Guides with non-reparameterised sites are refused: they need
    score-function terms (use :meth:`loss_and_grads`).
    """

    def _get_traces(self, model, guide, args, kwargs):
        for model_trace, guide_trace in super()._get_traces(model, guide, args, kwargs):
            outside = check_bound(model_trace, guide_trace, self._spec())
            if outside and not getattr(self, "_warned_global", False):
                self._warned_global = True
                warn_global_latents(outside, self._spec())
            yield model_trace, guide_trace

    def _spec(self):
        return f"iwae:{self.num_particles}" if self.alpha == 0 else f"renyi:{self.alpha:g}:{self.num_particles}"

    def log_weights(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
                    **kwargs: Any) -> torch.Tensor:
        """log w = log p(x, z) - log q(z | x): shape (K, *batch) for vectorised particles."""
        particles: list[torch.Tensor] = []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
            log_w: Any = 0.0
            for site in model_trace.nodes.values():
                if site["type"] == "sample":
                    log_w = log_w + torch_sum(site["log_prob"], sum_dims)
            for name, site in guide_trace.nodes.items():
                if site["type"] == "sample":
                    if not site["fn"].has_rsample and not site["is_observed"]:
                        raise UsageError(
                            f"iwae/renyi training needs reparameterised guide sites; "
                            f"site {name!r} ({type(site['fn']).__name__}) is not"
                        )
                    log_w = log_w - torch_sum(site["log_prob"], sum_dims)
            particles.append(log_w)
        if self.vectorize_particles and self.num_particles > 1:
            return particles[0]
        return torch.stack(particles)

    def differentiable_loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
                            **kwargs: Any) -> torch.Tensor:
        log_w = (1.0 - self.alpha) * self.log_weights(model, guide, *args, **kwargs)
        bound = (torch.logsumexp(log_w, dim=0) - math.log(self.num_particles)) / (1.0 - self.alpha)
        loss = -bound.sum()
        if is_validation_enabled():
            warn_if_nan(loss, "loss")
        return loss


class DifferentiableTraceGraphELBO(TraceGraph_ELBO):
    """:class:`~pyro.infer.TraceGraph_ELBO` with a ``differentiable_loss``.

    Pyro's class only offers ``loss_and_grads``. Its surrogate (Schulman et al.
    2015, "Gradient Estimation Using Stochastic Computation Graphs"; the
    Rao-Blackwellised downstream costs and optional baselines of Mnih & Gregor
    2014) is built by ``TraceGraph_ELBO._loss_and_surrogate_loss``; the loss
    returned here has the *value* of -ELBO and the *gradient* of that surrogate:
    ``-elbo.detach() + surrogate - surrogate.detach()``. Its gradient is an
    unbiased estimate of the gradient of -ELBO, as Pyro's ``loss_and_grads``.
    """

    def differentiable_loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
                            **kwargs: Any) -> torch.Tensor:
        elbo, surrogate_loss = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        elbo, surrogate_loss = torch.as_tensor(elbo), torch.as_tensor(surrogate_loss)
        loss = -elbo.detach() + (surrogate_loss - surrogate_loss.detach())
        if is_validation_enabled():
            warn_if_nan(loss, "loss")
        return loss


class ReportingMeanFieldELBO(TraceMeanField_ELBO):
    """:class:`~pyro.infer.TraceMeanField_ELBO` that says which sites it could not give an analytic KL.

    ``mc_sites`` lists the latent sites estimated by Monte Carlo (checked on the
    first trace of every new set of sites); a :class:`MonteCarloKLWarning` names
    them once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mc_sites: list[str] = []
        self._checked: set[Any] = set()

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        key = tuple(name for name, site in guide_trace.nodes.items() if site["type"] == "sample")
        if key not in self._checked:
            self._checked.add(key)
            new = [s for s in meanfield_mc_sites(model_trace, guide_trace) if s not in self.mc_sites]
            if new:
                self.mc_sites.extend(new)
                warnings.warn(
                    f"meanfield: no closed-form KL(q || p) for site(s) {', '.join(map(repr, new))}; "
                    "TraceMeanField_ELBO estimates them by Monte Carlo (unbiased, but not analytic)",
                    MonteCarloKLWarning,
                    stacklevel=external_stacklevel(),
                )
        return model_trace, guide_trace


def _int(text, what, spec):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"ELBO spec {spec!r}: {what} must be a positive integer, got {text!r}")
    return value


def make_elbo(spec: str, *, max_plate_nesting: int | None = None) -> ELBO:
    """Build a Pyro ELBO from a spec string such as ``"trace"``, ``"iwae:50"`` or ``"renyi:0.5:5"``.

    ``max_plate_nesting`` is passed to the ELBO when given (enumeration and
    vectorised particles need it; Pyro guesses it by running the model otherwise).
    The loss a training step runs (without host syncs, optionally compiled) is
    built from this object by :func:`inference.loss.make_step_loss`.
    Raises :class:`~inference.errors.UsageError` (a ``ValueError``) listing the valid specs.
    """
    if not isinstance(spec, str):
        raise UsageError(f"ELBO spec must be a string, got {type(spec).__name__}")
    name, *rest = spec.strip().lower().split(":")
    kwargs = {} if max_plate_nesting is None else {"max_plate_nesting": max_plate_nesting}
    simple = {
        "trace": Trace_ELBO,
        "meanfield": ReportingMeanFieldELBO,
        "enum": TraceEnum_ELBO,
        "tracegraph": DifferentiableTraceGraphELBO,
    }
    if name in simple and len(rest) <= 1:
        k = _int(rest[0], "the number of particles", spec) if rest else 1
        cls: Any = simple[name]  # a concrete Pyro ELBO class
        if name == "enum" and "max_plate_nesting" not in kwargs:
            raise UsageError("ELBO spec 'enum' needs max_plate_nesting (the model's number of plates)")
        return cls(num_particles=k, vectorize_particles=k > 1, **kwargs)
    if name == "iwae" and len(rest) == 1:
        k = _int(rest[0], "the number of particles", spec)
        return DifferentiableRenyiELBO(alpha=0.0, num_particles=k, vectorize_particles=True, **kwargs)
    if name == "renyi" and len(rest) == 2:
        try:
            alpha = float(rest[0])
        except ValueError:
            raise UsageError(f"ELBO spec {spec!r}: ALPHA must be a number") from None
        if alpha == 1.0 or not math.isfinite(alpha):
            raise UsageError(f"ELBO spec {spec!r}: ALPHA must be finite and != 1 (alpha=1 is the ELBO: use 'trace')")
        if alpha < 0:
            warnings.warn(
                f"ELBO spec {spec!r}: for alpha < 0 the Renyi objective lies above log p(x) (Li & Turner 2016); "
                "it is not a lower bound",
                NotABoundWarning,
                stacklevel=2,
            )
        k = _int(rest[1], "the number of particles", spec)
        return DifferentiableRenyiELBO(alpha=alpha, num_particles=k, vectorize_particles=True, **kwargs)
    raise UsageError(f"unknown ELBO spec {spec!r}; valid specs: {', '.join(ELBO_SPECS)}")


def particles_of(elbo: Any) -> int:
    """Number of particles an ELBO object draws per step."""
    return int(getattr(elbo, "num_particles", 1))
