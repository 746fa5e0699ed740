r"""The loss a training step runs, built in one place (:func:`make_step_loss`).

It is the objective's ``differentiable_loss`` computed without host syncs and,
optionally, compiled by ``torch.jit.trace``. Use it for training (it is what
:func:`inference.fit` runs); use the Pyro ELBO objects of :mod:`inference.elbo`
to report or compare bounds.

:class:`StepLoss` wraps one of Pyro's :class:`~pyro.infer.Trace_ELBO`,
:class:`~pyro.infer.TraceMeanField_ELBO` or this package's
:class:`~inference.elbo.DifferentiableRenyiELBO` (IWAE/Renyi) and computes the
same ``differentiable_loss`` (the negative objective summed over the batch,
averaged over particles) from the same Pyro traces, with two differences that
only change speed:

* **No host reads.** Pyro's ``Trace_ELBO.differentiable_loss`` turns every
  site's log-density sum into a Python float (``.item()``) to report the loss,
  which on a GPU stalls the host once per site per step. Here the value stays
  a tensor. For Trace_ELBO, with ``L`` the surrogate objective whose gradient is
  the ELBO gradient (Ranganath et al. 2014; Schulman et al. 2015),

      loss = -ELBO_hat + (-L) - stop_gradient(-L),

  which is Pyro's formula with the float replaced by a detached tensor. When
  every guide site is reparameterised, ``L`` equals ``ELBO_hat`` exactly as a
  function, so the loss is ``-L`` itself. TraceMeanField_ELBO uses the analytic
  KL(q || p) wherever ``torch.distributions.kl_divergence`` has it, as Pyro does.

* **Compiled (``jit=True``).** The first call for a given model, guide and
  input signature (shapes, dtypes, devices, and the plain Python attributes of
  the module the model/guide are methods of, e.g. ``training`` or ``beta``)
  runs the eager loss with the current validation setting (so Pyro checks the
  model/guide pair and the data once), then records the loss as a TorchScript
  graph with :func:`torch.jit.trace`: every module parameter and ``pyro.param``
  is an input of the graph, so gradients flow to them, and the random draws
  (``Normal.rsample``) are ops of the graph, so each call draws fresh noise.
  Dead and repeated bookkeeping ops are removed, and later calls run the graph
  in TorchScript's plain interpreter (per-op autograd, as eager) without Pyro's
  Python effect handlers or validation. The graph is checked twice, on its
  first call and on the next one (new data, new draws): with the same random
  state it must give the eager loss and gradients to float tolerance
  (:data:`CHECK_RTOL`), or the wrapper warns and stays eager for that
  signature; the same happens when tracing fails (e.g. a tensor that requires
  grad but is no parameter). A trace is only valid for a model with static
  structure: no Python control flow on tensor values and no Python-side state
  that changes between steps other than the keyed attributes above; the checks
  catch what the first two batches reveal, not more. A replaced ``pyro.param``
  (e.g. after ``pyro.clear_param_store()``) is traced again. Each distinct
  batch shape gets its own graph, so a ragged last batch costs one more trace;
  ``fit(drop_last=True)`` keeps a single shape.

Pyro's own ``JitTrace_ELBO`` family takes only ``pyro.param`` tensors as graph
inputs, so tracing fails ("Cannot insert a Tensor that requires grad as a
constant") for the plain ``nn.Module`` parameters every model here uses.
"""
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled
from pyro.util import warn_if_nan

from .elbo import DifferentiableRenyiELBO, make_elbo
from .errors import UsageError

SUPPORTED = (DifferentiableRenyiELBO, TraceMeanField_ELBO, Trace_ELBO)  # most specific first

# first-call check of a compiled graph against the eager loss: both run the same
# float32 ops in the same order on the same random draws, so they agree to a few
# ulps; 1e-4 relative leaves room for a reordered reduction and nothing more.
CHECK_RTOL = 1e-4


def supports(elbo: Any) -> bool:
    """True when :class:`StepLoss` has a specialised path for this ELBO object.

    That is an instance of one of :data:`SUPPORTED` whose class keeps that
    class's loss (a subclass may change how traces are made or checked, e.g.
    ``make_elbo``'s reporting mean-field ELBO, but not the loss: Pyro's
    ``JitTrace_ELBO`` is not supported).
    """
    for base in SUPPORTED:
        if isinstance(elbo, base):
            cls = type(elbo)
            return all(getattr(cls, m, None) is getattr(base, m, None)
                       for m in ("differentiable_loss", "_differentiable_loss_particle"))
    return False


def _trace_elbo_particle(model_trace, guide_trace):
    """Trace_ELBO's differentiable loss for one particle, as a tensor (no ``.item()``)."""
    value = 0.0
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            value = value + site["log_prob_sum"]
    guide_sites = [site for site in guide_trace.nodes.values() if site["type"] == "sample"]
    for site in guide_sites:
        value = value - site["log_prob_sum"]
    if all(is_identically_zero(site["score_parts"].score_function) for site in guide_sites):
        # every guide site is reparameterised: Pyro's surrogate is then
        # sum log p - sum log q, the same function as the value
        return -value
    surrogate = 0.0
    log_r = None
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            surrogate = surrogate + site["log_prob_sum"]
    for site in guide_sites:
        _, score_function_term, entropy_term = site["score_parts"]
        if not is_identically_zero(entropy_term):
            surrogate = surrogate - entropy_term.sum()
        if not is_identically_zero(score_function_term):
            if log_r is None:
                log_r = _compute_log_r(model_trace, guide_trace)
            term = log_r.sum_to(site["cond_indep_stack"])
            surrogate = surrogate + (term * score_function_term).sum()
    # value of -ELBO_hat, gradient of the surrogate (Pyro's formula, without the host read)
    return -value.detach() - (surrogate - surrogate.detach())


def _meanfield_particle(model_trace, guide_trace):
    """TraceMeanField_ELBO's surrogate loss for one particle (the loss is its value)."""
    elbo = 0.0
    for name, model_site in model_trace.nodes.items():
        if model_site["type"] != "sample":
            continue
        if model_site["is_observed"]:
            elbo = elbo + model_site["log_prob_sum"]
            continue
        guide_site = guide_trace.nodes[name]
        if is_validation_enabled():
            check_fully_reparametrized(guide_site)
        try:
            kl = torch.distributions.kl_divergence(guide_site["fn"], model_site["fn"])
        except NotImplementedError:
            elbo = elbo + model_site["log_prob_sum"] - guide_site["score_parts"].entropy_term.sum()
            continue
        kl = scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])
        elbo = elbo - (kl.sum() if torch.is_tensor(kl) else kl * guide_site["fn"].batch_shape.numel())
    for name, guide_site in guide_trace.nodes.items():
        if guide_site["type"] == "sample" and name not in model_trace.nodes:
            if is_validation_enabled():
                check_fully_reparametrized(guide_site)
            elbo = elbo - guide_site["score_parts"].entropy_term.sum()
    return -elbo


def _flatten(args):
    """Tensors of ``args`` (tensors, mappings of tensors, None) and a hashable description of the rest."""
    tensors, spec = [], []
    for a in args:
        if torch.is_tensor(a):
            tensors.append(a)
            spec.append(("T", tuple(a.shape), a.dtype, str(a.device), a.requires_grad))
        elif isinstance(a, Mapping):
            keys = tuple(a)
            spec.append(("M", keys, tuple(
                None if a[k] is None else (tuple(a[k].shape), a[k].dtype, str(a[k].device)) for k in keys
            )))
            tensors.extend(a[k] for k in keys if a[k] is not None)
        else:
            spec.append(("V", a))  # baked into the graph; must be hashable
    return tensors, tuple(spec)


def _unflatten(spec, tensors):
    it = iter(tensors)
    out = []
    for entry in spec:
        if entry[0] == "T":
            out.append(next(it))
        elif entry[0] == "M":
            out.append({k: (None if s is None else next(it)) for k, s in zip(entry[1], entry[2])})
        else:
            out.append(entry[1])
    return out


def _owner(fn):
    return getattr(fn, "__self__", None)


_PLAIN = (bool, int, float, str, type(None))


def _fingerprint(owner):
    """The plain Python attributes of a model's owner (``training``, ``beta``, ``num_data``, ...).

    A trace freezes them; keying graphs on them means that changing one (e.g. KL
    annealing of ``module.beta`` between epochs) builds a new graph instead of
    silently reusing the old value.
    """
    if owner is None:
        return None
    return tuple((k, v) for k, v in vars(owner).items() if type(v) in _PLAIN)


def _rng_state(devices):
    state = {"cpu": torch.get_rng_state()}
    for d in devices:
        if d.type == "cuda":
            state[d] = torch.cuda.get_rng_state(d)
    return state


def _set_rng_state(state):
    for key, value in state.items():
        if key == "cpu":
            torch.set_rng_state(value)
        else:
            torch.cuda.set_rng_state(value, key)


class StepLoss:
    """The loss of a Pyro ELBO without per-step host reads; ``jit=True`` compiles it (see the module docstring).

    ``differentiable_loss(model, guide, *args)`` has the signature and meaning
    of the wrapped ELBO's. Other attributes (``num_particles``,
    ``max_plate_nesting``, ...) are the wrapped ELBO's. ``compiled`` lists the
    signatures with a graph; ``fallbacks`` maps signatures that stayed eager to
    the reason.
    """

    def __init__(self, elbo: Any, *, jit: bool = False) -> None:
        if not supports(elbo):
            names = ", ".join(c.__name__ for c in SUPPORTED)
            raise UsageError(f"StepLoss supports {names} (and subclasses keeping their loss), not {type(elbo).__name__}")
        self.elbo = elbo
        self.jit = bool(jit)
        self._graphs: dict[Any, Any] = {}
        self.fallbacks: dict[Any, Any] = {}
        self.tracer_warnings: dict[Any, Any] = {}

    def __getattr__(self, name):
        if name == "elbo":
            raise AttributeError(name)
        return getattr(self.elbo, name)

    def __repr__(self):
        return f"StepLoss({type(self.elbo).__name__}, jit={self.jit})"

    @property
    def compiled(self) -> list[Any]:
        return list(self._graphs)

    # ---- the loss --------------------------------------------------------------------
    def eager_loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
                   **kwargs: Any) -> torch.Tensor:
        """The loss computed eagerly through Pyro's traces (the reference for the compiled graph)."""
        elbo = self.elbo
        if isinstance(elbo, DifferentiableRenyiELBO):
            return elbo.differentiable_loss(model, guide, *args, **kwargs)
        particle = _meanfield_particle if isinstance(elbo, TraceMeanField_ELBO) else _trace_elbo_particle
        loss: Any = 0.0
        for model_trace, guide_trace in elbo._get_traces(model, guide, args, kwargs):
            loss = loss + particle(model_trace, guide_trace)
        if elbo.num_particles > 1:
            loss = loss / elbo.num_particles
        if is_validation_enabled():
            warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any,
                            **kwargs: Any) -> torch.Tensor:
        if not self.jit or kwargs:
            return self.eager_loss(model, guide, *args, **kwargs)
        tensors, spec = _flatten(args)
        owners = tuple(_owner(f) for f in (model, guide))
        key = (
            getattr(model, "__func__", model),
            getattr(guide, "__func__", guide),
            tuple(id(o) for o in owners),
            tuple(_fingerprint(o) for o in owners),
            spec,
            torch.is_grad_enabled(),
        )
        entry = self._graphs.get(key)
        if entry is None:
            if key in self.fallbacks:
                return self.eager_loss(model, guide, *args)
            return self._compile(key, model, guide, owners, tensors, spec, args)
        graph, params, store_params, checks_left = entry
        if store_params and _store_changed(store_params):
            # a pyro.param was replaced (e.g. the param store was cleared): trace again
            del self._graphs[key]
            return self._compile(key, model, guide, owners, tensors, spec, args)
        if checks_left:
            # the second call sees new data and new draws: the graph must still match
            self._graphs[key] = (graph, params, store_params, checks_left - 1)
            return self._checked_call(key, graph, params, tensors, model, guide, args)
        return _run(graph, params, tensors)

    # ---- compiling -------------------------------------------------------------------
    def _params(self, model, guide, owners, args):
        with poutine.block(), poutine.trace(param_only=True) as capture, torch.no_grad():
            self.eager_loss(model, guide, *args)
        params, seen = [], set()
        candidates = [p for o in owners if isinstance(o, torch.nn.Module) for p in o.parameters()]
        store = [(name, site["value"].unconstrained()) for name, site in capture.trace.nodes.items()]
        candidates += [t for _, t in store]
        for p in candidates:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params, store

    def _fallback(self, key, reason, model, guide, args, start):
        self._graphs.pop(key, None)
        self.fallbacks[key] = reason
        warnings.warn(f"StepLoss(jit=True): using the eager loss for this model/input signature: {reason}", stacklevel=4)
        _set_rng_state(start)  # the step then draws what one eager step draws
        return self.eager_loss(model, guide, *args)

    def _checked_call(self, key, graph, params, tensors, model, guide, args, reference=None, start=None):
        """Run the graph and compare its loss and gradients with the eager loss on the same draws."""
        if start is None:
            start = _rng_state({t.device for t in tensors})
        if reference is None:
            reference = self.eager_loss(model, guide, *args)
        ref_grads = torch.autograd.grad(reference, params, allow_unused=True)
        _set_rng_state(start)
        loss = _run(graph, params, tensors)
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        bad = _mismatch(reference, loss, ref_grads, grads)
        if bad:
            return self._fallback(key, f"the compiled loss differs from the eager loss ({bad})", model, guide, args, start)
        return loss

    def _compile(self, key, model, guide, owners, tensors, spec, args):
        start = _rng_state({t.device for t in tensors})
        # 1. the eager reference, with validation as the caller set it (checks the pair and the data)
        reference = self.eager_loss(model, guide, *args)
        params, store_params = self._params(model, guide, owners, args)
        if not torch.is_tensor(reference) or not reference.requires_grad or not params:
            self.fallbacks[key] = "the loss depends on no parameter"
            return reference
        n = len(params)

        def loss_of(*inputs):
            return self.eager_loss(model, guide, *_unflatten(spec, inputs[n:]))

        # 2. record the graph (validation off: its checks would be frozen into the graph)
        _set_rng_state(start)
        try:
            with warnings.catch_warnings(record=True) as caught, pyro.validation_enabled(False):
                warnings.simplefilter("always")
                graph = torch.jit.trace(loss_of, (*params, *tensors), check_trace=False)
        except Exception as exc:  # e.g. a captured tensor that requires grad but is no parameter
            reason = f"torch.jit.trace failed ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            return self._fallback(key, reason, model, guide, args, start)
        try:
            _simplify(graph.graph, (*params, *tensors))
        except Exception as exc:
            return self._fallback(key, f"simplifying the graph failed ({type(exc).__name__})", model, guide, args, start)
        # shape checks inside torch (e.g. binary_cross_entropy_with_logits) warn while
        # tracing; graphs are keyed by input shapes, so only value-dependent control
        # flow would be wrong, and the checks below compare the graph with the eager loss
        self.tracer_warnings[key] = sorted({str(w.message).split(".")[0] for w in caught if _is_tracer(w)})
        for w in caught:
            if not _is_tracer(w) and not issubclass(w.category, FutureWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        # 3. on the same draws the graph must reproduce the eager loss and gradients,
        #    here and once more on the next call with new data
        self._graphs[key] = (graph, params, store_params, 1)
        return self._checked_call(key, graph, params, tensors, model, guide, args, reference=reference, start=start)


_PASSES = (
    "_jit_pass_dce",
    "_jit_pass_cse",
    "_jit_pass_peephole",
    "_jit_pass_constant_propagation",
    "_jit_pass_peephole",
    "_jit_pass_constant_propagation",
    "_jit_pass_dce",
)


def _simplify(graph, inputs):
    """Drop the bookkeeping a trace of Pyro leaves: about half the ops of a VAE's graph.

    A graph serves one input signature, so its inputs get their complete types
    (shapes, dtypes, devices); then TorchScript's own passes fold the sizes and
    what depends on them only (plate scales, ``expand``, the zeros and ones fed
    to the random draws), and drop dead and repeated ops (common-subexpression
    elimination leaves random ops alone). The passes are private to torch, so a
    torch without them keeps the graph as traced; either way the graph is then
    checked against the eager loss.
    """
    passes = [getattr(torch._C, name, None) for name in _PASSES]
    if any(p is None for p in passes) or not hasattr(torch._C.TensorType, "create_from_tensor"):
        return
    for value, tensor in zip(list(graph.inputs()), inputs):
        value.setType(torch._C.TensorType.create_from_tensor(tensor))
    for p in passes:
        p(graph)


def _store_changed(store_params):
    current = pyro.get_param_store()._params
    return any(current.get(name) is not tensor for name, tensor in store_params)


def _run(graph, params, tensors):
    # the plain interpreter: ops and their autograd are exactly the eager ones (no
    # profiling executor, no symbolic differentiation or fusion), so the compiled loss
    # and gradients are the eager ones; measured as fast on small nets (benchmarks/throughput.py)
    with torch.jit.optimized_execution(False):
        return graph(*params, *tensors)


def _is_tracer(w):
    return issubclass(w.category, torch.jit.TracerWarning)


def _close(a, b):
    if a is None or b is None:
        return (a is None) == (b is None) or float((a if b is None else b).abs().max()) == 0.0
    scale = float(a.detach().abs().max()) if a.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=CHECK_RTOL, atol=CHECK_RTOL * max(scale, 1e-12)))


def _mismatch(reference, loss, ref_grads, grads):
    if not _close(reference.detach(), loss.detach()):
        return f"loss {float(reference.detach()):.6g} vs {float(loss.detach()):.6g}"
    for i, (a, b) in enumerate(zip(ref_grads, grads)):
        if not _close(a, b):
            return f"gradient of parameter {i}"
    return None


def make_step_loss(elbo: Any, *, max_plate_nesting: int | None = None, jit: bool = False) -> tuple[Any, ...]:
    """The loss a training step runs: the one place where it is built (by :func:`inference.fit` and the CLI).

    :param elbo: an ELBO spec for :func:`inference.elbo.make_elbo` (``"trace"``,
        ``"iwae:5"``, ...) or a Pyro ELBO object.
    :param max_plate_nesting: passed to :func:`~inference.elbo.make_elbo` with a spec.
    :param jit: compile the loss with ``torch.jit.trace`` (see the module docstring).
    :returns: ``(objective, loss)``: the Pyro ELBO object (to report, compare, or
        check validity) and an object with its ``differentiable_loss`` signature.
        For Trace_ELBO, TraceMeanField_ELBO and the IWAE/Renyi bounds the loss is
        a :class:`StepLoss` (the same value and gradients without per-site host
        reads; compiled with ``jit=True``); other objectives (enum, tracegraph,
        a user's own ELBO) are used as they are, and ``jit=True`` warns that they
        have no compiled path.
    :raises inference.errors.UsageError: for an unknown or malformed spec, or an
        ELBO object without a ``differentiable_loss`` (Pyro's ``TraceGraph_ELBO``).
    """
    objective = make_elbo(elbo, max_plate_nesting=max_plate_nesting) if isinstance(elbo, str) else elbo
    if not callable(getattr(objective, "differentiable_loss", None)):
        raise UsageError(
            f"{type(objective).__name__} has no differentiable_loss, which training with a torch optimiser needs; "
            "for Pyro's TraceGraph_ELBO use the spec 'tracegraph' (inference.elbo.DifferentiableTraceGraphELBO)"
        )
    if supports(objective):
        return objective, StepLoss(objective, jit=jit)
    if jit:
        warnings.warn(
            f"{type(objective).__name__} has no compiled path; jit=True is ignored and the eager loss is used",
            stacklevel=2,
        )
    return objective, objective
