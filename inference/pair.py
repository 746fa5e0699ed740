r"""The model/guide pair contract, its adapter, and the one inspection every other part reads.

The contract
============

A *pair* is what :func:`inference.fit` trains and :func:`inference.evaluate`
scores. It is written down once, here, as :class:`ModelGuidePair`:

* ``model(*args, **kwargs)``: the generative program, a Pyro function with
  ``pyro.sample`` statements; everything indexed by datapoint lives inside one
  ``pyro.plate("data", ...)`` (the *data plate*).
* ``guide(*args, **kwargs)``: the variational family q, called with the same
  arguments; it samples every latent site of the model that is not enumerated
  (a Pyro autoguide qualifies).
* ``max_plate_nesting`` (optional int): the number of nested vectorised plates;
  enumeration (``enum``) and vectorised particles need it. Found by inspection
  when absent.

Optional hooks, looked up by ``hasattr`` on the user's object:

* ``num_data`` (settable int): the full number of datapoints; the engine sets it
  before training so a pair with global latents can scale minibatches by N/B.
* ``check_data(batch)``: raise :class:`~inference.errors.UsageError` for data the
  pair cannot model.
* ``log_weights(batch, num_particles)``: exact or custom importance log weights,
  shape (K, B), used by ``evaluate`` instead of tracing.
* ``sample(n)``: n draws from the model, for figures.
* ``config`` (dict): the constructor's arguments, stored in checkpoints.

A batch is passed to the pair by :meth:`Pair.arguments`: a tensor is one
positional argument (``model(x)``), a tuple or list is spread over positional
arguments (``model(x, y)``), and a dict becomes keyword arguments when every key
names a parameter of the model (``model(x=..., y=...)``), else one positional
argument (the multimodal models here take a dict).

Pairs that subsample their own data plate
(``pyro.plate("data", len(x), subsample_size=B)`` with the full data passed in)
are bound by :meth:`Pair.bind`: the full data is passed and the plate's indices
are set to the engine's minibatch by giving the plate's subsample site its value
(:class:`SetSubsample`; Pyro's plate draws its indices through a sample site
named after the plate, see ``pyro.poutine.subsample_messenger``). The minibatch
size must equal the plate's ``subsample_size``. A local-latent
:class:`~pyro.infer.autoguide.AutoNormal` creates its plates with the model's
full size and the same name, so its per-datapoint parameters (N rows) are
indexed by the same rows.

The inspection
==============

:func:`inspect_pair` traces the guide and the model replayed against it, once,
on a small batch, and returns a :class:`PairInfo` that classifies every sample
site. :func:`check_objective` decides from that record, up front, whether an
objective is valid for the pair, and refuses it in one line naming the site;
:func:`check_minibatching` refuses minibatches that an autoguide with local
latents cannot follow.
"""

from __future__ import annotations

import inspect
import numbers
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuide
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from pyro.util import check_site_shape, get_rng_state, set_rng_state

from .errors import UsageError

DATA_PLATE = "data"
HOOKS = ("num_data", "check_data", "log_weights", "sample", "config")


@typing.runtime_checkable
class ModelGuidePair(typing.Protocol):
    """The written contract of a pair (see the module docstring for the optional hooks)."""

    def model(self, *args: Any, **kwargs: Any) -> None: ...

    def guide(self, *args: Any, **kwargs: Any) -> None: ...


def as_pair(obj: Any = None, *, model: Any = None, guide: Any = None) -> "Pair":
    """The :class:`Pair` for ``obj``, or for ``model=``/``guide=`` given as keywords.

    ``obj`` may be: a :class:`Pair` (returned as is); an object with ``model``
    and ``guide`` methods (an ``nn.Module`` or not), kept as the pair's
    ``owner`` for its hooks; or a ``(model, guide)`` tuple of callables, where
    the model may be a :class:`~pyro.nn.PyroModule` and the guide a Pyro
    autoguide (``AutoNormal``, ``AutoDiagonalNormal``,
    ``AutoLowRankMultivariateNormal``, ``AutoIAFNormal``...), the way
    :class:`pyro.infer.SVI` takes them.

    Raises :class:`UsageError` for anything else (a missing or non-callable
    model or guide, both ``obj`` and keywords).
    """
    if obj is not None and (model is not None or guide is not None):
        raise UsageError("give either a pair or model=/guide=, not both")
    if isinstance(obj, Pair):
        return obj
    if obj is None:
        return Pair(model, guide, owner=None)
    if isinstance(obj, (tuple, list)):
        if len(obj) != 2:
            raise UsageError(f"a pair given as a tuple must be (model, guide), got {len(obj)} items")
        return Pair(obj[0], obj[1], owner=None)
    m, g = getattr(obj, "model", None), getattr(obj, "guide", None)
    if m is None or g is None:
        raise UsageError(
            f"{type(obj).__name__} is not a model/guide pair: it needs model and guide methods "
            "(or pass (model, guide) or model=..., guide=...)"
        )
    return Pair(m, g, owner=obj)


def _name_of(fn):
    return getattr(fn, "__qualname__", None) or type(fn).__name__


class Pair:
    """A model/guide pair adapted to the contract: callables, modules, hooks, arguments.

    ``owner`` is the user's object (None for a plain tuple). Build it with
    :func:`as_pair`.
    """

    def __init__(self, model: Callable[..., Any], guide: Callable[..., Any], owner: Any = None) -> None:
        for what, fn in (("model", model), ("guide", guide)):
            if fn is None:
                raise UsageError(f"the pair has no {what}")
            if not callable(fn):
                raise UsageError(f"the pair's {what} must be callable, got {type(fn).__name__}")
        self.model, self.guide, self.owner = model, guide, owner

    def __repr__(self):
        if self.owner is not None:
            return f"Pair({type(self.owner).__name__})"
        return f"Pair(model={_name_of(self.model)}, guide={_name_of(self.guide)})"

    @property
    def name(self) -> str:
        """The owner's class name, or the model's name for a plain pair."""
        return type(self.owner).__name__ if self.owner is not None else _name_of(self.model)

    def modules(self) -> Any:
        """Every ``nn.Module`` involved: the owner, a module model (PyroModule), a module guide (autoguide)."""
        found, seen = [], set()
        for obj in (self.owner, self.model, self.guide, getattr(self.model, "__self__", None), getattr(self.guide, "__self__", None)):
            if isinstance(obj, torch.nn.Module) and id(obj) not in seen:
                seen.add(id(obj))
                found.append(obj)
        return found

    def parameters(self) -> list[torch.Tensor]:
        """The parameters of :meth:`modules`, deduplicated, in order.

        An autoguide creates its parameters on its first call (run
        :func:`inspect_pair` first); ``pyro.param`` store tensors are not
        listed (the engine finds them with a param-only trace).
        """
        params, seen = [], set()
        for module in self.modules():
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def train(self, mode: bool = True) -> Pair:
        for module in self.modules():
            module.train(mode)
        return self

    def eval(self) -> Pair:
        return self.train(False)

    def to(self, device: str | torch.device) -> Pair:
        for module in self.modules():
            module.to(device)
        return self

    @property
    def max_plate_nesting(self) -> int | None:
        """The owner's (or model's) declared ``max_plate_nesting``, or None."""
        for obj in (self.owner, self.model):
            value = getattr(obj, "max_plate_nesting", None)
            if value is not None:
                return int(value)
        return None

    def has(self, hook: Any) -> bool:
        """True when the owner provides ``hook`` (one of :data:`HOOKS`)."""
        return self.owner is not None and hasattr(self.owner, hook)

    def hook(self, name: str) -> Any:
        """The owner's hook ``name`` (a bound method or attribute); raises AttributeError when absent."""
        if self.owner is None:
            raise AttributeError(f"{self!r} has no hook {name!r}")
        return getattr(self.owner, name)

    def arguments(self, batch: Any) -> tuple[Any, ...]:
        """``(args, kwargs)`` to call model and guide with for ``batch``.

        A tensor -> ``(batch,), {}``; a tuple or list -> ``(*batch,), {}``; a
        dict -> ``(), dict(batch)`` when every key names a parameter of the
        model's signature (or the model takes ``**kwargs`` and needs no
        positional argument), otherwise ``(batch,), {}``.
        """
        if isinstance(batch, (tuple, list)):
            return tuple(batch), {}
        if isinstance(batch, Mapping) and _takes_keywords(self.model, batch.keys()):
            return (), dict(batch)
        return (batch,), {}

    def bind(self, batch: Any, index: torch.Tensor | None = None, info: PairInfo | None = None) -> tuple[Any, ...]:
        """``(model, guide, args, kwargs)`` for one step on the rows ``index`` of ``batch``.

        * When ``info`` (a :class:`PairInfo`) says the pair subsamples its own
          data plate, ``batch`` is the full data and is passed whole; the data
          plate's indices are set to ``index`` (a long tensor of B rows) in model
          and guide by :class:`SetSubsample`. Pyro checks the number of indices
          against the plate's ``subsample_size``, so ``index`` must hold
          exactly ``info.batch_size`` rows (else :class:`UsageError`).
        * Otherwise, with ``index`` given, the pair gets those rows of ``batch``
          (a tensor, a tuple/list of tensors or a dict of tensors, indexed on the
          first dimension); without ``index`` it gets ``batch`` itself.
        """
        model, guide = self.model, self.guide
        if info is not None and info.subsampled and index is not None:
            if len(index) != info.batch_size:
                raise UsageError(
                    f"the pair subsamples its plate {info.data_plate!r} with subsample_size={info.batch_size}; "
                    f"a batch of {len(index)} rows cannot be given to it (use batch_size={info.batch_size})"
                )
            model = SetSubsample(info.data_plate, index)(model)
            guide = SetSubsample(info.data_plate, index)(guide)
        elif index is not None:
            batch = take_rows(batch, index)
        args, kwargs = self.arguments(batch)
        return model, guide, args, kwargs


class SetSubsample(Messenger):
    """Set the indices that ``pyro.plate(name, N, subsample_size=B)`` draws to ``index``.

    A plate draws its indices through a sample site named after the plate
    (``pyro.poutine.subsample_messenger``); this gives that site its value
    without marking it observed (``poutine.condition`` would, and Pyro's
    model/guide check would then miss the model's plate).
    """

    def __init__(self, name: str, index: torch.Tensor) -> None:
        super().__init__()
        self.name, self.index = name, index

    def _pyro_sample(self, msg):
        if msg["name"] == self.name and site_is_subsample(msg) and msg["value"] is None:
            msg["value"] = self.index


def _takes_keywords(fn, keys):
    if isinstance(fn, torch.nn.Module):  # a PyroModule model: its forward's signature, not __call__'s
        fn = fn.forward
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if all(isinstance(k, str) and k in named for k in keys):
        return True
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    required_positional = any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params
    )
    return var_kw and not required_positional and all(isinstance(k, str) for k in keys)


def take_rows(batch: Any, index: torch.Tensor | slice) -> Any:
    """Rows ``index`` (a slice or index tensor) of a tensor, of each tensor in a tuple/list, or of each dict value.

    Non-tensor items (and None) are passed through unchanged.
    """
    if torch.is_tensor(batch):
        return batch[index]
    if isinstance(batch, Mapping):
        return {k: take_rows(v, index) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(take_rows(v, index) for v in batch)
    return batch


@dataclass(frozen=True)
class Site:
    """How one sample site of a pair is classified (see :func:`inspect_pair`).

    * ``observed``: ``obs`` given (fully, or partly with ``obs_mask``).
    * ``partly_observed``: given with ``obs_mask``. Pyro splits such a site
      ``x`` into ``x_observed`` (observed), ``x_unobserved`` (a latent: the
      missing entries) and ``x`` itself (their interleaving); all three carry
      the flag.
    * ``in_model`` / ``in_guide``: where the site appears.
    * ``local``: inside the data plate (in the model; in the guide for a
      guide-only site).
    * ``enumerated``: ``infer={"enumerate": ...}`` in model or guide
      (``config_enumerate`` included).
    * ``discrete``: the distribution's support is discrete.
    * ``reparameterized``: the guide's distribution has ``rsample`` (False for
      sites not in the guide).
    * ``scaled``: its log-density is scaled by something other than 1
      (``poutine.scale``, or a subsampled plate's N/B).
    * ``plates``: names of its plates, outermost first.
    """

    name: str
    observed: bool
    partly_observed: bool
    in_model: bool
    in_guide: bool
    local: bool
    enumerated: bool
    discrete: bool
    reparameterized: bool
    scaled: bool
    plates: tuple

    @property
    def latent(self) -> bool:
        return not self.observed


@dataclass(frozen=True)
class PairInfo:
    """The one record of a pair's structure, made by :func:`inspect_pair`.

    ``sites`` maps names to :class:`Site` (sample sites; plate subsample sites
    and plain ``pyro.deterministic`` sites excluded). ``num_data`` is the full
    size N of the data plate and ``batch_size`` its (sub)sample size B in the
    inspected call (both None without a data plate). ``subsampled`` is True when
    the pair draws its own subsample of the data plate
    (``pyro.plate("data", N, subsample_size=B)``, B < N): the engine then passes
    the full data and sets the indices with :meth:`Pair.bind`.
    """

    sites: dict
    data_plate: str
    num_data: typing.Optional[int]
    batch_size: typing.Optional[int]
    subsampled: bool
    max_plate_nesting: int

    def _names(self, keep):
        return tuple(name for name, site in self.sites.items() if keep(site))

    @property
    def latents(self) -> tuple[str, ...]:
        """Latent sites (not observed), in trace order: the guide's first, then model-only ones."""
        return self._names(lambda s: not s.observed)

    @property
    def observed(self) -> tuple[str, ...]:
        return self._names(lambda s: s.observed)

    @property
    def enumerated(self) -> tuple[str, ...]:
        return self._names(lambda s: s.enumerated)

    @property
    def model_only_latents(self) -> tuple[str, ...]:
        """Latents of the model that the guide does not sample."""
        return self._names(lambda s: not s.observed and s.in_model and not s.in_guide)

    @property
    def global_latents(self) -> tuple[str, ...]:
        """Latents outside the data plate (guide-only auxiliary latents of autoguides included)."""
        return self._names(lambda s: not s.observed and not s.local)

    @property
    def non_reparameterized(self) -> tuple[str, ...]:
        """Guide latents sampled without ``rsample`` (not enumerated): they need score-function terms."""
        return self._names(lambda s: not s.observed and s.in_guide and not s.enumerated and not s.reparameterized)

    @property
    def scaled(self) -> tuple[str, ...]:
        return self._names(lambda s: s.scaled)


class _PlateFound(Exception):
    pass


class _PlateProbe(Messenger):
    """Stops the model at the data plate's subsample site, recording its size and subsample size."""

    def __init__(self, name):
        super().__init__()
        self.name, self.found = name, None

    def _pyro_sample(self, msg):
        if msg["name"] == self.name and site_is_subsample(msg):
            self.found = (msg["fn"].size, msg["fn"].subsample_size)
            raise _PlateFound


def _self_subsampling(pair, args, kwargs, data_plate):
    """(N, B) when the model draws its own subsample of the data plate, else None; stops at the plate."""
    probe = _PlateProbe(data_plate)
    try:
        with probe:
            pair.model(*args, **kwargs)
    except _PlateFound:
        pass
    if probe.found is None:
        return None
    size, subsample_size = probe.found
    if subsample_size is not None and subsample_size < size:
        return int(size), int(subsample_size)
    return None


def _is_enumerated(site):
    return site is not None and bool(site["infer"].get("enumerate"))


def _scaled(site):
    scale = site["scale"]
    if isinstance(scale, numbers.Number):
        return scale != 1.0
    return bool((torch.as_tensor(scale) != 1).any())


def _guess_plate_nesting(traces):
    depth = 0
    for trace in traces:
        for site in trace.nodes.values():
            if site["type"] == "sample":
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        depth = max(depth, -frame.dim)
    return depth


def _traces(pair, args, kwargs, max_plate_nesting):
    """Guide trace, then the model replayed against it, enumerating marked sites as TraceEnum_ELBO does."""
    guide = EnumMessenger(first_available_dim=-1 - max_plate_nesting)(pair.guide)
    model = EnumMessenger()(pair.model)  # keeps the allocator state after the guide, as TraceEnum_ELBO
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return model_trace, guide_trace


def _plain_traces(pair, args, kwargs):
    guide_trace = poutine.trace(pair.guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(pair.model, trace=guide_trace)).get_trace(*args, **kwargs)
    return model_trace, guide_trace


def _sample_sites(trace):
    return {n: s for n, s in trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}


def inspect_pair(pair: Any, batch: Any, *, max_plate_nesting: int | None = None, rows: Any = None) -> "PairInfo":
    """Trace the pair once on ``batch`` and classify every sample site: a :class:`PairInfo`.

    The guide is traced, then the model replayed against it (as every ELBO
    does), under ``torch.no_grad`` and ``poutine.block``; sites marked for
    enumeration are enumerated in parallel (``first_available_dim =
    -max_plate_nesting - 1``, as :class:`~pyro.infer.TraceEnum_ELBO`) so models
    whose enumerated sites are model-only run. The RNG states (torch, numpy,
    random) are restored afterwards. Parameters the pair creates on first use
    (``pyro.param``, an autoguide's) are created.

    * ``batch``: what the pair is called with (see :meth:`Pair.arguments`).
    * ``rows``: when given, the pair is traced on the first ``rows`` rows of
      ``batch`` only, unless it subsamples its own data plate (found by a probe
      that runs the model up to the plate), in which case it gets the whole
      ``batch`` and draws its own B rows.
    * ``max_plate_nesting``: overrides the pair's; when neither is known it is
      the deepest vectorised plate of a first plain trace.

    Raises :class:`UsageError` when the pair uses more nested plates than the
    declared ``max_plate_nesting`` (a site's shape, or enumeration failing for it).
    """
    pair = as_pair(pair)
    state = get_rng_state()
    try:
        with torch.no_grad(), poutine.block():
            args, kwargs = pair.arguments(batch)
            if rows is not None and _self_subsampling(pair, args, kwargs, DATA_PLATE) is None:
                args, kwargs = pair.arguments(take_rows(batch, slice(0, int(rows))))
            declared = max_plate_nesting if max_plate_nesting is not None else pair.max_plate_nesting
            if declared is None:
                model_trace, guide_trace = _plain_traces(pair, args, kwargs)
                mpn = _guess_plate_nesting((model_trace, guide_trace))
                marked = any(_is_enumerated(s) for t in (model_trace, guide_trace) for s in _sample_sites(t).values())
                if marked:
                    model_trace, guide_trace = _traces(pair, args, kwargs, mpn)
            else:
                mpn = int(declared)
                try:
                    model_trace, guide_trace = _traces(pair, args, kwargs, mpn)
                except Exception as error:
                    _check_declared_nesting(pair, args, kwargs, mpn, error)
                    raise
        return _classify(model_trace, guide_trace, mpn)
    except UsageError:
        raise
    except (ValueError, RuntimeError, IndexError, KeyError, TypeError) as error:
        raise UsageError(_failure(pair, error)) from error
    finally:
        set_rng_state(state)


def _masked(site):
    """Whether a site's log-density is masked (``poutine.mask``, or a ``.mask(...)`` distribution)."""
    if site["mask"] is not None:
        return True
    fn = site["fn"]
    while fn is not None:
        if isinstance(fn, MaskedDistribution):
            return True
        fn = getattr(fn, "base_dist", None)
    return False


def _failure(pair, error):
    """One line for a pair that fails when run on the data it was given (the user's code raised)."""
    text = " ".join(str(error).split())[:200] or "no message"
    hint = ""
    if "subsample_size" in text:
        hint = "; the data hold fewer rows than the plate's subsample_size"
    elif isinstance(pair.guide, AutoGuide):
        hint = (f"; {type(pair.guide).__name__} with latents inside the data plate keeps parameters per datapoint "
                "and runs only on the rows it was first called with")
    return f"{pair.name} fails on this data ({type(error).__name__}: {text}){hint}"


def _check_declared_nesting(pair, args, kwargs, declared, error):
    """Turn a failure of the enumerated trace into a UsageError when the declared plate nesting is too small."""
    try:
        depth = _guess_plate_nesting(_plain_traces(pair, args, kwargs))
    except Exception:
        return
    if depth > declared:
        raise UsageError(
            f"max_plate_nesting={declared} is too small: the pair uses {depth} nested plate(s) "
            f"(enumeration failed: {' '.join(str(error).split())[:200]})"
        ) from error


def _classify(model_trace, guide_trace, mpn):
    model_sites, guide_sites = _sample_sites(model_trace), _sample_sites(guide_trace)
    data_frame, subsample_fn = None, None
    for trace in (model_trace, guide_trace):  # the model's plate decides (an autoguide copies its sizes)
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site_is_subsample(site) and name == DATA_PLATE and subsample_fn is None:
                subsample_fn = site["fn"]
            for frame in site["cond_indep_stack"]:
                if frame.name == DATA_PLATE and data_frame is None:
                    data_frame = frame
    num_data = batch_size = None
    if data_frame is not None:
        batch_size = int(data_frame.size)
        num_data = int(data_frame.full_size if data_frame.full_size is not None else data_frame.size)
    subsampled = bool(
        subsample_fn is not None
        and subsample_fn.subsample_size is not None
        and subsample_fn.subsample_size < subsample_fn.size
    )

    partly = set()
    for name, site in model_sites.items():
        if site["infer"].get("_deterministic") and f"{name}_observed" in model_sites and f"{name}_unobserved" in model_sites:
            partly.update((name, f"{name}_observed", f"{name}_unobserved"))

    sites = {}
    names = list(guide_sites) + [n for n in model_sites if n not in guide_sites]
    for name in names:
        m, g = model_sites.get(name), guide_sites.get(name)
        if m is not None and m["infer"].get("_deterministic") and name not in partly:
            continue
        own = m if m is not None else g
        if name in partly and name.endswith("_unobserved") and g is not None and not _masked(g):
            raise UsageError(
                f"the guide samples {name!r} at every entry, but the model scores it only where obs_mask is False; "
                "mask the guide's site with the model's missing entries (e.g. .mask(~obs_mask)): an autoguide "
                "does not (its unobserved latent then inflates the bound)"
            )
        for site in (m, g):
            if site is not None:
                try:
                    check_site_shape(site_with_log_prob_shape(site), mpn)
                except ValueError as e:
                    raise UsageError(f"site {name!r}: {' '.join(str(e).split())} (max_plate_nesting={mpn})") from None
        plates = tuple(f.name for f in own["cond_indep_stack"])  # outermost first, as Pyro records them
        sites[name] = Site(
            name=name,
            observed=bool(m is not None and m["is_observed"]),
            partly_observed=name in partly,
            in_model=m is not None,
            in_guide=g is not None,
            local=DATA_PLATE in plates,
            enumerated=_is_enumerated(m) or _is_enumerated(g),
            discrete=bool(own["fn"].support.is_discrete),
            reparameterized=bool(g is not None and getattr(g["fn"], "has_rsample", False)),
            scaled=_scaled(own),
            plates=plates,
        )
    return PairInfo(
        sites=sites,
        data_plate=DATA_PLATE,
        num_data=num_data,
        batch_size=batch_size,
        subsampled=subsampled,
        max_plate_nesting=mpn,
    )


def site_with_log_prob_shape(site: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``site`` whose ``log_prob`` has the shape Pyro's shape check needs (no density computed)."""
    fn, value = site["fn"], site["value"]
    shape = torch.broadcast_shapes(fn.batch_shape, value.shape[: value.dim() - fn.event_dim] if torch.is_tensor(value) else ())
    return dict(site, log_prob=torch.empty(shape, device="meta"))


OBJECTIVES = ("trace", "meanfield", "enum", "tracegraph", "iwae", "renyi")
_SPEC_OF = {"trace": "trace[:K]", "meanfield": "meanfield[:K]", "enum": "enum[:K]", "tracegraph": "tracegraph[:K]", "iwae": "iwae:K", "renyi": "renyi:ALPHA:K"}


def objective_kind(elbo: Any) -> str | None:
    """The objective family of a spec string or a Pyro ELBO object (one of :data:`OBJECTIVES`), or None if unknown."""
    if isinstance(elbo, str):
        name = elbo.strip().lower().split(":")[0]
        return name if name in OBJECTIVES else None
    inner = getattr(elbo, "elbo", None)  # a wrapper such as inference.loss.StepLoss
    if inner is not None and not isinstance(elbo, ELBO):
        return objective_kind(inner)
    if isinstance(elbo, TraceEnum_ELBO):
        return "enum"
    if isinstance(elbo, TraceGraph_ELBO):
        return "tracegraph"
    if isinstance(elbo, TraceMeanField_ELBO):
        return "meanfield"
    if isinstance(elbo, RenyiELBO):
        return "iwae" if elbo.alpha == 0 else "renyi"
    if isinstance(elbo, Trace_ELBO):
        return "trace"
    return None


def _refusal(info, kind):
    """Why objective ``kind`` cannot train the pair described by ``info`` (a phrase naming the site), or None."""
    for name in info.model_only_latents:
        site = info.sites[name]
        if site.enumerated:
            continue
        if site.discrete:
            return (
                f"site {name!r} is a discrete latent of the model that the guide does not sample and that is not "
                "marked for enumeration; mark it with infer={'enumerate': 'parallel'} (or @config_enumerate) "
                "and train with 'enum', or sample it in the guide"
            )
        return f"site {name!r} is a continuous latent of the model that the guide does not sample; add it to the guide"
    if info.enumerated and kind != "enum":
        return (
            f"site {info.enumerated[0]!r} is marked for enumeration; only 'enum[:K]' (TraceEnum_ELBO) sums it out"
        )
    if kind in ("iwae", "renyi", "meanfield") and info.non_reparameterized:
        name = info.non_reparameterized[0]
        return (
            f"guide site {name!r} is not reparameterised (no rsample); '{kind}' has no score-function terms "
            "for it (use 'trace' or 'tracegraph')"
        )
    if kind in ("iwae", "renyi") and info.scaled:
        return (
            f"site {info.scaled[0]!r} is scaled (poutine.scale or a subsampled plate's N/B); '{kind}' is a "
            "per-datapoint bound only on unscaled log weights"
        )
    return None


def valid_objectives(info: PairInfo) -> tuple[str, ...]:
    """The objective families (of :data:`OBJECTIVES`) that are valid for the pair described by ``info``."""
    return tuple(kind for kind in OBJECTIVES if _refusal(info, kind) is None)


def check_objective(info: "PairInfo", elbo: Any, *, spec: str | None = None) -> None:
    """Raise :class:`UsageError` in one line when objective ``elbo`` cannot train the pair described by ``info``.

    ``elbo`` is a spec string (see :func:`inference.elbo.make_elbo`) or a Pyro
    ELBO object; ``spec`` is the name shown in the message (default: ``elbo``
    itself, or its class name). The rules, from the site records:

    * a model latent the guide does not sample must be discrete and marked for
      enumeration; an unmarked discrete one is refused with the hint to mark it
      (``infer={"enumerate": "parallel"}`` / ``config_enumerate``: nothing is
      enumerated behind the user's back); a continuous one is refused for every
      objective;
    * enumerated sites train only with ``enum`` (TraceEnum_ELBO sums them out);
    * non-reparameterised guide sites need score-function terms: ``trace``,
      ``tracegraph`` and ``enum`` have them; ``iwae``, ``renyi`` and
      ``meanfield`` are refused;
    * ``iwae``/``renyi`` are refused when a site is scaled (``poutine.scale``,
      a subsampled plate).

    An ELBO object of an unknown class is accepted unchecked.
    """
    kind = objective_kind(elbo)
    if kind is None:
        return
    reason = _refusal(info, kind)
    if reason is None:
        return
    shown = spec if spec is not None else (elbo if isinstance(elbo, str) else type(elbo).__name__)
    valid = [_SPEC_OF[k] for k in valid_objectives(info)]
    tail = f"valid specs for this pair: {', '.join(valid)}" if valid else "no objective trains this pair as written"
    raise UsageError(f"objective {shown!r} refused: {reason}; {tail}")


def check_minibatching(pair: Pair, info: PairInfo, *, num_data: int, batch_size: int) -> None:
    """Raise :class:`UsageError` when minibatches of ``batch_size`` out of ``num_data`` rows cannot train the pair.

    A Pyro autoguide keeps parameters for every latent it saw on its first call;
    for latents inside the data plate that is one set per datapoint, sized by
    the plate. Unless the model subsamples its own plate
    (``pyro.plate("data", len(x), subsample_size=B)``, bound by
    :meth:`Pair.bind`), minibatches would pair the first batch's parameters with
    other rows (or fail on a ragged batch). Refused when ``batch_size <
    num_data``; full-batch training is fine.
    """
    if info.subsampled or batch_size >= num_data:
        return
    guide = pair.guide
    if not isinstance(guide, AutoGuide):
        return
    local = [name for name, s in info.sites.items() if s.in_model and s.in_guide and s.local and not s.observed]
    if local:
        raise UsageError(
            f"{type(guide).__name__} has per-datapoint parameters for the local latent {local[0]!r}; minibatches of "
            f"{batch_size} out of {num_data} rows need the model to subsample its own plate "
            f"(pyro.plate({info.data_plate!r}, len(x), subsample_size={batch_size}) and index the data by its "
            "indices), or train on the full batch"
        )
