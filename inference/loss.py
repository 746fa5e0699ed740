r"""The loss a training step runs, built in one place (:func:`make_step_loss`).

It is the objective's ``differentiable_loss`` computed without host syncs and,
optionally, compiled by ``torch.compile``. Use it for training (it is what
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

* **Compiled (``compile=True``).** The first call for a given model, guide
  and input signature (shapes, dtypes, devices, and the plain Python attributes
  of the module the model/guide are methods of, e.g. ``training`` or ``beta``)
  runs the eager loss with the current validation setting (so Pyro checks the
  model/guide pair and the data), then flattens the loss into a pure function
  ``(parameters, data) -> loss``: every module parameter (through
  :func:`torch.func.functional_call`) and every ``pyro.param`` (its
  unconstrained tensor, swapped into the param store) is an input, and
  :func:`torch.fx.experimental.proxy_tensor.make_fx` records the aten ops that
  Pyro's code runs for them, random draws (``normal_``) included, without
  Pyro's Python effect handlers (which break a TorchDynamo graph); operations
  whose results the loss does not use are dropped. That graph is
  compiled by :func:`torch.compile` (``backend="inductor"`` by default;
  AOTAutograd derives the backward pass), or, with ``compile="flat"``
  (:data:`FLAT`), run as it is: the same aten ops executed one by one, the
  backward by autograd as for eager code, which costs a fraction of a second to
  build and still drops Pyro's per-step Python. Inductor is told to take its random
  numbers from PyTorch's own generator (``fallback_random``), so the compiled
  loss draws exactly what the eager loss draws from the same random state. The
  graph is checked twice, on its first call and on the next one (new data, new
  draws): with the same random state it must give the eager loss and gradients
  to float tolerance (:data:`CHECK_RTOL`), or the wrapper warns, naming the
  reason, and stays eager for that signature; the same happens when flattening
  or compiling fails (e.g. a tensor that requires grad but is no parameter). A
  flattened graph is only valid for a model with static structure: no Python
  control flow on tensor values and no Python-side state that changes between
  steps other than the keyed attributes above; the checks catch what the first
  two batches reveal, not more. A replaced ``pyro.param`` (e.g. after
  ``pyro.clear_param_store()``) is compiled again. Each distinct batch shape
  gets its own graph; ``compile_rows`` limits compilation to chosen batch sizes
  (:class:`inference.Trainer` compiles the full batch only: the ragged last
  batch of an epoch runs eager, as compiling it for one step an epoch would
  never repay).

* **Validation on the first calls only.** Pyro's validation (argument and
  support checks of every distribution) runs, as the caller set it, on the
  first :data:`VALIDATE_CALLS` calls of each signature and is then switched off
  for that signature: the checks look at shapes and supports, which the later
  calls of the same signature repeat with other values only. Values and
  gradients do not depend on validation.

:func:`worth_compiling` is the rule by which :func:`inference.fit` chooses the
paths it tries by default (:data:`DEFAULT_PATHS`: flat, then inductor). Pyro's own ``JitTrace_ELBO`` family takes only
``pyro.param`` tensors as graph inputs and is built on ``torch.jit.trace``,
which PyTorch deprecates; neither is used here.
"""
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled
from pyro.util import warn_if_nan
from torch.fx.experimental.proxy_tensor import make_fx

from .elbo import DifferentiableRenyiELBO, make_elbo
from .errors import UsageError

SUPPORTED = (DifferentiableRenyiELBO, TraceMeanField_ELBO, Trace_ELBO)  # most specific first

# first-call check of a compiled graph against the eager loss: both run the same
# float32 ops in the same order on the same random draws, so they agree to a few
# ulps; 1e-4 relative leaves room for a reordered reduction and nothing more.
CHECK_RTOL = 1e-4
# calls of each signature that run with Pyro's validation as the caller set it (then off)
VALIDATE_CALLS = 2
# the default torch.compile backend of ``compile=True``
BACKEND = "inductor"
# the path name (``compile="flat"``) of the flattened graph run as it is: the make_fx graph's aten
# ops executed one by one by PyTorch (autograd derives the backward as for any eager code), without
# torch.compile; it drops Pyro's Python (effect handlers, trace bookkeeping) and generates no code
FLAT = "flat"
# worth_compiling's estimates for inductor: seconds of one first compilation of a small network's
# loss (fwd + bwd; measured 25-35 s for the MLP VAEs with inductor on a 2-core CPU, one thread,
# cold cache, benchmarks/throughput.py), and the fraction of an eager step that the compiled
# step saves (measured 0.15-0.4 on CPU for the MLP VAEs; 0.2 is the cautious end)
COMPILE_SECONDS = {"cpu": 40.0, "cuda": 60.0}
COMPILED_SAVING = 0.2
# the same for the flat path: flattening (make_fx) plus the first checked call, on any device
# (measured 0.2-0.3 s for the MLP VAEs under load; a host-side trace, so not device-dependent),
# and its saving (measured 0.12-0.24 of the eager step on CPU: trace 0.24, iwae:5 0.12)
FLAT_SECONDS = 0.5
FLAT_SAVING = 0.15
# the paths fit's default considers, cheapest first (each one the rule admits is timed, the fastest kept)
DEFAULT_PATHS = (FLAT, BACKEND)
# runs shorter than this stay eager without measuring a step (the flat path's 0.5 s / 0.15 needs
# 3.3 s of eager steps: over 16 ms a step at 200 steps; inductor's 40 s / 0.2, over 1 s a step)
MIN_COMPILE_STEPS = 200


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


# compile= names that are not torch.compile backends (the paths this module runs itself)
PATH_NAMES = (FLAT,)


def _backend(compile):
    """The torch.compile backend named by a ``compile`` option (None: eager)."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return BACKEND
    if isinstance(compile, str) and compile:
        known = [*PATH_NAMES, *torch.compiler.list_backends(exclude_tags=())]
        if compile not in known:
            raise UsageError(f"compile={compile!r} names no torch.compile backend; valid: True, False, {', '.join(known)}")
        return compile
    raise UsageError(f"compile must be True, False or a torch.compile backend name, got {compile!r}")


def _rows(tensors):
    return tensors[0].shape[0] if tensors and tensors[0].dim() else None


class _FlatLoss(torch.nn.Module):
    """The eager loss as a module whose submodules are the pair's owners, for :func:`torch.func.functional_call`."""

    def __init__(self, step_loss, model, guide, owners, spec):
        super().__init__()
        self.owners = torch.nn.ModuleList([])
        for o in owners:
            if isinstance(o, torch.nn.Module) and not any(o is m for m in self.owners):
                self.owners.append(o)
        self._loss, self._model, self._guide, self._spec = step_loss.eager_loss, model, guide, spec

    def forward(self, *tensors):
        return self._loss(self._model, self._guide, *_unflatten(self._spec, tensors))


@contextmanager
def _store_swapped(values):
    """Pyro's param store with some unconstrained tensors replaced (restored on exit)."""
    params = pyro.get_param_store()._params
    old = {name: params[name] for name in values}
    params.update(values)
    try:
        yield
    finally:
        params.update(old)


class StepLoss:
    """The loss of a Pyro ELBO without per-step host reads; ``compile=True`` compiles it (see the module docstring).

    ``differentiable_loss(model, guide, *args)`` has the signature and meaning
    of the wrapped ELBO's. Other attributes (``num_particles``,
    ``max_plate_nesting``, ...) are the wrapped ELBO's.

    :param elbo: one of :data:`SUPPORTED` (see :func:`supports`).
    :param compile: False (eager), True (``torch.compile`` with :data:`BACKEND`,
        inductor), :data:`FLAT` (``"flat"``: the flattened graph run as it is, no
        ``torch.compile``) or the name of a ``torch.compile`` backend
        (``"aot_eager"`` compiles nothing but runs the same flattened graph through
        AOTAutograd; tests use it). The attribute ``backend`` may be changed later
        (the Trainer does, once it has chosen the path); graphs, fallbacks and
        compile seconds are kept per backend and signature.
    :param validate_calls: calls of each signature that run with Pyro's
        validation as set by the caller (None: every call).
    :param jit: deprecated alias of ``compile`` (a ``FutureWarning``).

    ``compiled`` lists the keys ``(backend, *signature)`` with a graph,
    ``fallbacks`` maps the keys that stayed eager to the reason,
    ``compile_seconds`` maps keys to the seconds their flattening and first
    (compiling) call took.
    ``compile_rows``: None, or the set of leading batch sizes that are compiled
    (others run eager).
    """

    def __init__(self, elbo: Any, *, compile: bool | str = False, validate_calls: int | None = VALIDATE_CALLS,
                 jit: bool | None = None) -> None:
        if not supports(elbo):
            names = ", ".join(c.__name__ for c in SUPPORTED)
            raise UsageError(f"StepLoss supports {names} (and subclasses keeping their loss), not {type(elbo).__name__}")
        if jit is not None:
            warnings.warn("StepLoss(jit=...) is deprecated: use compile=...", FutureWarning, stacklevel=2)
            compile = compile or jit
        self.elbo = elbo
        self.backend = _backend(compile)
        self.validate_calls = validate_calls
        self.compile_rows: set[int] | None = None
        self._graphs: dict[Any, Any] = {}
        self._calls: dict[Any, int] = {}
        self.fallbacks: dict[Any, Any] = {}
        self.compile_seconds: dict[Any, float] = {}
        self._flatten_seconds: dict[Any, float] = {}

    def __getattr__(self, name):
        if name == "elbo":
            raise AttributeError(name)
        return getattr(self.elbo, name)

    def __repr__(self):
        return f"StepLoss({type(self.elbo).__name__}, compile={self.backend or False!r})"

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
        if kwargs:
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
        calls = self._calls.get(key, 0)
        self._calls[key] = calls + 1
        quiet = self.validate_calls is not None and calls >= self.validate_calls
        with pyro.validation_enabled(False) if quiet else nullcontext():
            # graphs (and fallbacks) per path too: the Trainer's probe builds one for each candidate
            return self._loss((self.backend, *key), model, guide, owners, tensors, spec, args)

    def _loss(self, key, model, guide, owners, tensors, spec, args):
        if (self.backend is None or not torch.is_grad_enabled() or key in self.fallbacks
                or (self.compile_rows is not None and _rows(tensors) not in self.compile_rows)):
            return self.eager_loss(model, guide, *args)
        entry = self._graphs.get(key)
        if entry is None:
            return self._compile(key, model, guide, owners, tensors, spec, args)
        graph, params, store_params, checks_left = entry
        if store_params and _store_changed(store_params):
            # a pyro.param was replaced (e.g. the param store was cleared): compile again
            del self._graphs[key]
            return self._compile(key, model, guide, owners, tensors, spec, args)
        if checks_left:
            # the second call sees new data and new draws: the graph must still match
            self._graphs[key] = (graph, params, store_params, checks_left - 1)
            return self._checked_call(key, graph, params, tensors, model, guide, args)
        return graph(*params, *tensors)

    # ---- compiling -------------------------------------------------------------------
    def _store(self, model, guide, args):
        """``(name, unconstrained tensor)`` of each ``pyro.param`` the loss reads."""
        with poutine.block(), poutine.trace(param_only=True) as capture, torch.no_grad():
            self.eager_loss(model, guide, *args)
        return [(name, site["value"].unconstrained()) for name, site in capture.trace.nodes.items()]

    def _fallback(self, key, reason, model, guide, args, start):
        self._graphs.pop(key, None)
        self.fallbacks[key] = reason
        warnings.warn(f"StepLoss(compile={self.backend!r}): using the eager loss for this model/input signature: "
                      f"{reason}", stacklevel=5)
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
        t0 = time.perf_counter()
        try:
            loss = graph(*params, *tensors)
            if key not in self.compile_seconds:
                self.compile_seconds[key] = self._flatten_seconds.pop(key, 0.0) + time.perf_counter() - t0
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        except Exception as exc:  # inductor compiles on the first call, the backward on the first grad
            return self._fallback(key, f"torch.compile failed ({_describe(exc)})", model, guide, args, start)
        bad = _mismatch(reference, loss, ref_grads, grads)
        if bad:
            return self._fallback(key, f"the compiled loss differs from the eager loss ({bad})", model, guide, args, start)
        # the compiled backward frees its buffers (no retain_graph), so the caller's loss is a second
        # run of the graph on the same draws
        _set_rng_state(start)
        return graph(*params, *tensors)

    def _compile(self, key, model, guide, owners, tensors, spec, args):
        start = _rng_state({t.device for t in tensors})
        # 1. the eager reference, with validation as the caller set it (checks the pair and the data)
        reference = self.eager_loss(model, guide, *args)
        t0 = time.perf_counter()
        flat = _FlatLoss(self, model, guide, owners, spec)
        named = [(name, p) for name, p in flat.named_parameters() if p.requires_grad]
        store = self._store(model, guide, args)
        params = [p for _, p in named]
        index = {id(p): i for i, p in enumerate(params)}
        for _, t in store:
            if t.requires_grad and id(t) not in index:
                index[id(t)] = len(params)
                params.append(t)
        store_params = [(name, t) for name, t in store if id(t) in index]
        if not torch.is_tensor(reference) or not reference.requires_grad or not params:
            self.fallbacks[key] = "the loss depends on no parameter"
            return reference
        n = len(params)

        def flat_loss(*inputs):
            # the parameters are this function's inputs: swapped into the modules and the param store
            swap = {name: inputs[index[id(t)]] for name, t in store_params}
            with _store_swapped(swap):
                return torch.func.functional_call(flat, {name: inputs[i] for i, (name, _) in enumerate(named)},
                                                  tuple(inputs[n:]), strict=False)

        # 2. flatten to aten ops (validation off: its checks would be frozen into the graph), then compile
        _set_rng_state(start)
        try:
            with pyro.validation_enabled(False):
                graph = make_fx(flat_loss)(*params, *tensors)
            _simplify(graph)
        except Exception as exc:  # e.g. a captured tensor that requires grad but is no parameter
            return self._fallback(key, f"flattening the loss with make_fx failed ({_describe(exc)})",
                                  model, guide, args, start)
        options = {"fallback_random": True} if self.backend == "inductor" else None
        try:
            compiled = graph if self.backend == FLAT else torch.compile(
                graph, backend=self.backend, options=options, fullgraph=True, dynamic=False)
        except Exception as exc:
            return self._fallback(key, f"torch.compile failed ({_describe(exc)})", model, guide, args, start)
        self._flatten_seconds[key] = time.perf_counter() - t0
        # 3. on the same draws the graph must reproduce the eager loss and gradients,
        #    here and once more on the next call with new data
        self._graphs[key] = (compiled, params, store_params, 1)
        return self._checked_call(key, compiled, params, tensors, model, guide, args, reference=reference, start=start)


_aten = torch.ops.aten
# ops whose value depends on their tensor input's shape, dtype and device only (which key the graph)
_LIKE = {_aten.zeros_like.default: 0.0, _aten.ones_like.default: 1.0, _aten.new_zeros.default: 0.0,
         _aten.new_ones.default: 1.0}
# (op, the scalar that makes it the identity) for ``op(x, scalar)``
_IDENTITY = {_aten.add.Tensor: 0, _aten.sub.Tensor: 0, _aten.mul.Tensor: 1, _aten.div.Tensor: 1}


def _pure(node):
    op = node.target
    return (isinstance(op, torch._ops.OpOverload) and not op._schema.is_mutable
            and torch.Tag.nondeterministic_seeded not in op.tags and op.overloadpacket is not _aten.empty)


def _simplify(graph: torch.fx.GraphModule) -> None:
    """Drop from a flattened loss graph what costs a dispatch and an autograd node a step but computes nothing new.

    * identities: ``expand`` to the input's own shape, ``x + 0``, ``x - 0``, ``x * 1``, ``x / 1`` (same dtype
      and shape; Pyro's bookkeeping adds them, e.g. its ``0.0 +`` accumulators and ``expand`` to the plate shape);
    * constants: every pure op whose inputs are the graph's constant tensors, or only the shape, dtype and device
      of an input (``zeros_like``, ``new_zeros``, ...; the graph is specialised to those), is computed once
      here (e.g. a N(0, I) prior's scale, expanded, squared and logged each step);
    * dead code (unused index ranges, aliases; ops with side effects, the random draws, stay).

    Values and gradients are unchanged (identities are exact; folded constants carry no gradient); nothing is
    done when an in-place op would write into a value that this would share. The flattened graph's check
    against the eager loss runs after this.
    """
    g = graph.graph
    mutable = [n for n in g.nodes if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]
    written = {a for n in mutable for a in n.args if isinstance(a, torch.fx.Node)}
    values: dict[torch.fx.Node, torch.Tensor] = {}
    for node in list(g.nodes):
        meta = node.meta.get("val")
        if node.op == "get_attr":
            values[node] = getattr(graph, node.target)
            continue
        if node.op != "call_function" or node in written or not isinstance(meta, torch.Tensor):
            continue
        args = node.args
        if node.target in _LIKE:
            values[node] = torch.full(meta.shape, _LIKE[node.target], dtype=meta.dtype, device=meta.device)
        elif (_pure(node) and all(a in values for a in node.all_input_nodes)
              and node.all_input_nodes):
            mapped = torch.fx.node.map_arg((args, node.kwargs), lambda a: values[a])
            values[node] = node.target(*mapped[0], **mapped[1])
        elif node.target is _aten.expand.default and isinstance(args[0], torch.fx.Node):
            source = args[0].meta.get("val")
            if isinstance(source, torch.Tensor) and tuple(source.shape) == tuple(meta.shape):
                node.replace_all_uses_with(args[0])
        elif (node.target in _IDENTITY and not node.kwargs and len(args) == 2 and isinstance(args[0], torch.fx.Node)
              and type(args[1]) in (int, float) and args[1] == _IDENTITY[node.target]):
            source = args[0].meta.get("val")
            if (isinstance(source, torch.Tensor) and source.dtype == meta.dtype
                    and tuple(source.shape) == tuple(meta.shape)):
                node.replace_all_uses_with(args[0])
    # folded values that a computed node uses become the graph's attributes
    for k, (node, value) in enumerate(values.items()):
        if node.op == "get_attr" or not node.users:
            continue
        name = f"_folded{k}"
        graph.register_buffer(name, value.detach(), persistent=False)
        with g.inserting_before(node):
            node.replace_all_uses_with(g.get_attr(name))
    g.eliminate_dead_code()
    graph.recompile()


def _describe(exc):
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _store_changed(store_params):
    current = pyro.get_param_store()._params
    return any(current.get(name) is not tensor for name, tensor in store_params)


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


def worth_compiling(eager_step_seconds: float, steps: int, device_type: str = "cpu", backend: str = BACKEND) -> bool:
    """Whether the path ``backend`` is expected to repay its flattening/compilation over ``steps`` steps.

    The rule: ``steps * eager_step_seconds * saving > cost``, i.e. the time the path
    is expected to save (a fraction of the measured eager step) over the run
    exceeds an estimate of its one-off cost. For :data:`FLAT` (the flattened graph,
    no code generation) the saving is :data:`FLAT_SAVING` and the cost
    :data:`FLAT_SECONDS` on any device; for a ``torch.compile`` backend (inductor)
    :data:`COMPILED_SAVING` and :data:`COMPILE_SECONDS` of ``device_type`` (60 s for a
    device type not listed). Runs of fewer than :data:`MIN_COMPILE_STEPS` steps
    take no path but eager.

    :param eager_step_seconds: measured seconds of one eager step (loss and backward).
    :param steps: the steps the run has left.
    :param device_type: ``"cpu"``, ``"cuda"``, ...
    :param backend: :data:`FLAT` or a ``torch.compile`` backend name.
    """
    if steps < MIN_COMPILE_STEPS:
        return False
    if backend == FLAT:
        return steps * eager_step_seconds * FLAT_SAVING > FLAT_SECONDS
    return steps * eager_step_seconds * COMPILED_SAVING > COMPILE_SECONDS.get(device_type, 60.0)


def make_step_loss(elbo: Any, *, max_plate_nesting: int | None = None, compile: bool | str = False,
                   jit: bool | None = None) -> tuple[Any, ...]:
    """The loss a training step runs: the one place where it is built (by :func:`inference.fit` and the CLI).

    :param elbo: an ELBO spec for :func:`inference.elbo.make_elbo` (``"trace"``,
        ``"iwae:5"``, ...) or a Pyro ELBO object.
    :param max_plate_nesting: passed to :func:`~inference.elbo.make_elbo` with a spec.
    :param compile: compile the loss with ``torch.compile`` (True: inductor; a
        string: that backend, or :data:`FLAT` for the flattened graph without
        ``torch.compile``; see the module docstring).
    :param jit: deprecated alias of ``compile`` (a ``FutureWarning``).
    :returns: ``(objective, loss)``: the Pyro ELBO object (to report, compare, or
        check validity) and an object with its ``differentiable_loss`` signature.
        For Trace_ELBO, TraceMeanField_ELBO and the IWAE/Renyi bounds the loss is
        a :class:`StepLoss` (the same value and gradients without per-site host
        reads; compiled with ``compile=True``); other objectives (enum, tracegraph,
        a user's own ELBO) are used as they are, and ``compile=True`` warns that they
        have no compiled path.
    :raises inference.errors.UsageError: for an unknown or malformed spec, an
        ELBO object without a ``differentiable_loss`` (Pyro's ``TraceGraph_ELBO``),
        or a ``compile`` that is neither a bool nor a backend name.
    """
    if jit is not None:
        warnings.warn("make_step_loss(jit=...) is deprecated: use compile=...", FutureWarning, stacklevel=2)
        compile = compile or jit
    backend = _backend(compile)
    objective = make_elbo(elbo, max_plate_nesting=max_plate_nesting) if isinstance(elbo, str) else elbo
    if not callable(getattr(objective, "differentiable_loss", None)):
        raise UsageError(
            f"{type(objective).__name__} has no differentiable_loss, which training with a torch optimiser needs; "
            "for Pyro's TraceGraph_ELBO use the spec 'tracegraph' (inference.elbo.DifferentiableTraceGraphELBO)"
        )
    if supports(objective):
        return objective, StepLoss(objective, compile=backend or False)
    if backend is not None:
        warnings.warn(
            f"{type(objective).__name__} has no compiled path; compile={compile!r} is ignored and the eager loss is used",
            stacklevel=2,
        )
    return objective, objective
