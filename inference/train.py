"""One training engine for every model/guide pair: a :class:`Trainer` (state and step), a short epoch loop, callbacks.

The shape follows NumPyro's SVI: :class:`Trainer` is built once (every check
on the data, the pair and the objective runs here, and the objective runs once
to find the parameters), :meth:`Trainer.run` is a short loop over epochs of
:meth:`Trainer.step`, and everything optional (progress bar, validation-based
early stopping, checkpoints and resume, TensorBoard, the user's own hooks) is a
callback (:mod:`inference.callbacks`). :func:`fit` is the one-call convenience.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import pyro.poutine as poutine
import torch

from . import batching
from . import distributed as parallel
from .callbacks import Callback, Checkpoint, EarlyStopping, ProgressBar, TensorBoard, as_callback
from .checkpoint import get_rng_state, set_rng_state
from .elbo import DifferentiableRenyiELBO
from .errors import DivergenceError, NonFiniteLossError, UsageError
from .evaluate import evaluate
from .loss import DEFAULT_PATHS, MIN_COMPILE_STEPS, StepLoss, make_step_loss, worth_compiling
from .pair import Pair, PairInfo, as_pair, check_minibatching, check_objective, inspect_pair

# a step's loss per datapoint this far above the epoch's first (in units of max(|first|, 1 nat)) is divergence
GROWTH = 1e3
# host reads of the losses between checks of the parameters: they are checked on the first and the last read
# of each epoch (so no checkpoint, written at the next read, holds a non-finite value), on every
# PARAM_CHECK_READS-th read, and whenever a loss read is not finite (to name the cause); a parameter that turns
# non-finite in between makes the next losses non-finite or is found at the epoch's last read
PARAM_CHECK_READS = 16
# timed rounds of the loss-path probe (Trainer._time_paths): each path's fastest step over the rounds is kept
PROBE_ROUNDS = 3
# torch.distributions' message for arguments outside their constraint (Pyro's validation)
_INVALID_VALUES = "but found invalid values"

_log = logging.getLogger(__name__)


def _fused(cls):
    """``cls(params, lr=lr)`` in torch's fused implementation where it has one for the parameters (floating point,
    on CPU or CUDA): one kernel over all parameters instead of a loop of small ops per parameter, the same update;
    measured 2.5-4x faster than the default on the MLP VAEs' parameters on CPU (benchmarks/throughput.py)."""

    def build(params, lr):
        params = list(params)
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return cls(params, lr=lr, fused=True) if fused else cls(params, lr=lr)

    build.__name__ = build.__qualname__ = cls.__name__
    return build


OPTIMIZERS = {"adam": _fused(torch.optim.Adam), "adamw": _fused(torch.optim.AdamW), "sgd": torch.optim.SGD}
SCHEDULER_INTERVALS = ("epoch", "step")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; asking for CUDA without one is a :class:`UsageError`."""
    if isinstance(device, torch.device):
        device = str(device)
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' asked for, but CUDA is not available here")
    return dev


def _positive(name, value, kind=float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)
    if not ok or (kind is int and int(value) != value):
        raise UsageError(f"{name} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")


@dataclass
class FitResult:
    """What :func:`fit` (and :meth:`Trainer.run`) returns.

    ``history`` has one dict per epoch: ``epoch``, ``train_loss`` (the negative
    training objective per datapoint, averaged over the epoch's steps), ``lr``
    (the learning rate the epoch started with), ``seconds`` (training time of
    the epoch) and, with validation data, ``val_elbo`` (per datapoint, one
    particle per point) and ``eval_seconds``. ``best_epoch`` is the epoch whose
    parameters early stopping restored (None without early stopping);
    ``stopped_early`` says whether it ended training before ``epochs``. ``elbo``
    is the objective (a Pyro ELBO object), ``loss`` what each step ran
    (:func:`inference.loss.make_step_loss`).
    """

    history: list = field(default_factory=list)
    checkpoint: Path | None = None
    device: torch.device | None = None
    elbo: object = None
    loss: object = None
    train_seconds: float = 0.0
    best_epoch: int | None = None
    stopped_early: bool = False


def collect_params(pair: Pair, objective: Any, batch: Any, info: PairInfo | None = None) -> list[torch.Tensor]:
    """The tensors to optimise: the pair's module parameters plus any ``pyro.param`` it touches.

    Parameters kept in Pyro's param store (``pyro.param``) and an autoguide's
    are created lazily, so they are found by running the objective once on
    ``batch`` under a param-only trace.
    """
    pair = as_pair(pair)
    model, guide, args, kwargs = pair.bind(batch, _first_rows(batch, info), info)
    capture = poutine.trace(param_only=True)
    try:
        with capture:
            objective.differentiable_loss(model, guide, *args, **kwargs)
    except ValueError:
        # TraceEnum_ELBO refuses a loss that depends on no parameter: say so in the engine's words
        if not pair.parameters() and not capture.trace.nodes:
            raise UsageError(f"{pair.name} has no parameters to optimise") from None
        raise
    params, seen = [], set()
    # pyro's Message types "value" as optional; a traced param site always holds its tensor
    for p in pair.parameters() + [site["value"].unconstrained()  # type: ignore[union-attr]
                                  for site in capture.trace.nodes.values()]:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    if not params:
        raise UsageError(f"{pair.name} has no parameters to optimise")
    return params


def _model_site(info, names):
    """The first of ``names`` that the model samples (an autoguide's auxiliary sites name no model site)."""
    return next((n for n in names if info.sites[n].in_model), names[0])


def _first_rows(batch, info):
    """The rows of a self-subsampling pair's first step (None: the batch is used as it is)."""
    if info is None or not info.subsampled:
        return None
    return torch.arange(info.batch_size, device=batching.data_device(batch))


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def held_out(n: int, validation: float | None) -> int:
    """How many of ``n`` training points a validation fraction holds out (``round(validation * n)``; 0 for None)."""
    return int(round(validation * n)) if validation else 0


def _validation_split(train, validation, seed):
    """``(train, validation)``: a fraction is held out of ``train`` by a permutation seeded with ``seed``."""
    if validation is None or not _is_number(validation):
        return train, validation
    if validation == 0:
        return train, None
    if not 0.0 < validation < 1.0:
        raise UsageError(f"a validation fraction must lie in [0, 1), got {validation!r}")
    n = batching.length(train)
    held = held_out(n, validation)
    if held < 1 or held >= n:
        raise UsageError(f"a validation fraction of {validation} of {n} training points leaves no validation "
                         "or no training data")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return batching.subset(train, order[held:].sort().values), batching.subset(train, order[:held].sort().values)


class Trainer:
    """The state of one SVI run and its step; :meth:`run` is the epoch loop.

    Built once per run, it checks everything before any step: positive sizes,
    the device, non-empty finite data, the pair's own ``check_data``, and the
    objective against the pair's one inspection (:func:`inference.pair.inspect_pair`,
    :func:`inference.pair.check_objective`: an unknown spec or an objective
    that is invalid for the pair raises here, in one line). It holds a
    validation split out of the training data, moves the data to the device,
    runs the objective once to find the parameters (the pair's modules'
    parameters and every ``pyro.param``), and builds the optimiser and LR scheduler.

    :param pair: what to train: an object with ``model`` and ``guide`` methods
        (e.g. an ``nn.Module``), a ``(model, guide)`` tuple of callables (the
        guide may be a Pyro autoguide), or ``model=``/``guide=`` keywords; the
        contract and its optional hooks (``max_plate_nesting``, ``num_data``,
        ``check_data``, ...) are :class:`inference.pair.ModelGuidePair`'s.
    :param train: a tensor (N, ...), a mapping of such tensors (modalities, or
        the model's keyword arguments), a tuple of them (its positional
        arguments), or a data object with ``.data`` (a fixed view), ``.epoch()``
        (a fresh view, e.g. dynamic binarisation: training takes
        ``rows(index).epoch()`` per batch, a fresh draw of the batch's rows) and
        ``.rows(index)`` (:class:`ppl_models.data.DataSplit`).
    :param elbo: an ELBO spec (:func:`inference.make_elbo`) or a Pyro ELBO object.
    :param batch_size: datapoints per step; ``drop_last`` drops the ragged last batch.
        A pair that subsamples its own data plate
        (``pyro.plate("data", N, subsample_size=B)``) is given the full data and
        the step's B indices (:meth:`inference.pair.Pair.bind`); ``batch_size``
        must then equal B, and the ragged last batch is dropped.
    :param lr: learning rate.
    :param optimizer: ``"adam"``, ``"adamw"``, ``"sgd"``, or ``f(params) -> torch.optim.Optimizer``.
    :param scheduler: None or ``f(optimizer) -> torch.optim.lr_scheduler.LRScheduler``,
        stepped after every epoch (``scheduler_interval="epoch"``) or step
        (``"step"``); ``ReduceLROnPlateau`` is stepped with the negative
        validation ELBO (or the training loss without validation data). Its
        state is checkpointed, so resuming stays exact.
    :param validation: None, data to monitor, or a fraction in (0, 1) of the
        training points held out (a permutation seeded by ``seed``): the ELBO on
        it (one particle per point) is recorded after every epoch as ``val_elbo``.
    :param validate: switch Pyro's validation on/off for the run (None leaves it).
    :param compile: how the step's loss runs (:mod:`inference.loss`). None
        (default) chooses when :meth:`run` starts, when the objective has a
        compiled path (Trace_ELBO, TraceMeanField_ELBO, IWAE/Renyi) and the pair
        does not subsample its own plate. With ``S`` the full-batch steps left and
        ``t`` the eager step's seconds measured on the first batch (three
        loss-and-backward calls with the random state restored, only when
        ``S >= 200``), each path of :data:`inference.loss.DEFAULT_PATHS` whose
        expected saving repays its one-off cost
        (:func:`inference.loss.worth_compiling`) is built on the first batch, eager
        and the built paths are timed taking turns (the fastest of 3 rounds each),
        and the fastest is kept:
        ``"flat"`` (the flattened graph without code generation) when
        ``S * t * 0.15 > 0.5 s``; ``"inductor"`` (``torch.compile``) when
        ``S * t * 0.2 > 40 s`` on CPU (60 s on CUDA). A path whose graph fails its
        check or cannot be built warns, naming the reason, and is not kept. A
        resumed run keeps the choice its history records, so it continues
        exactly. True compiles (inductor), ``"flat"`` or another
        ``torch.compile`` backend's name forces that path, False stays eager.
        The choice is ``settings["loss_path"]`` and each history record's
        ``loss_path`` (``"eager"``, ``"flat"`` or the backend's name); the
        probe's step times are ``settings["step_seconds"]``.
    :param jit: deprecated alias of ``compile`` (``jit=True`` is ``compile=True``,
        ``jit=False`` is ``compile=False``; a ``FutureWarning``).
    :param sync_every: steps between host reads of the losses (default 1 on CPU,
        where a read costs nothing, 50 on CUDA); a non-finite loss is found at
        the next read and stops the run with :class:`NonFiniteLossError`.
    :param distributed: data parallelism on ``torch.distributed``
        (:mod:`inference.distributed`): True (join the default process group,
        initialised from torchrun's environment if needed), a process group, False
        (off) or None (on when ``WORLD_SIZE > 1``). ``batch_size`` is then per rank:
        each step trains on a global batch of ``world_size * batch_size`` rows.
    :param stream: keep the training data in host memory and copy each batch's
        rows to the device (pinned memory, non-blocking copies); None chooses it on
        CUDA when the data exceed ``batching.STREAM_FRACTION`` of the free device
        memory. Batches and results are the same as with the data on the device.

    Divergence stops the run with :class:`~inference.errors.DivergenceError`
    (a :class:`NonFiniteLossError`): non-finite parameters (their largest
    absolute value, one fused reduction read with a window's losses, so no
    extra host read, on the first and last read of each epoch and every
    ``PARAM_CHECK_READS``-th (16) read), a distribution argument outside its support during
    training (Pyro's validation error raised by non-finite network outputs), or
    a step's loss per datapoint more than ``GROWTH`` (1e3) times
    ``max(|first|, 1)`` above the epoch's first step's.

    Per datapoint: the loss of a step is divided by the number of points it
    stands for: B for a plain minibatch, the full N when the data plate is
    scaled to the full data (a subsampled plate, or a ``num_data`` hook that
    sets the plate's full size), so ``train_loss`` is always the negative
    objective per datapoint of the training data.

    :raises inference.errors.UsageError: for any bad argument or data, and for
        global latents trained on unscaled minibatches (each step would treat
        its batch as the whole data set).
    """

    def __init__(
        self,
        pair: Any = None,
        train: Any = None,
        *,
        model: Callable[..., Any] | None = None,
        guide: Callable[..., Any] | None = None,
        elbo: str = "trace",
        batch_size: int,
        lr: float,
        optimizer: str = "adam",
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        device: str | torch.device = "auto",
        seed: int = 0,
        validation: Any = None,
        clip_norm: float | None = None,
        drop_last: bool = False,
        validate: bool | None = None,
        compile: bool | str | None = None,
        jit: bool | None = None,
        sync_every: int | None = None,
        distributed: Any = None,
        stream: bool | None = None,
    ) -> None:
        _positive("batch_size", batch_size, int)
        _positive("lr", lr)
        if scheduler_interval not in SCHEDULER_INTERVALS:
            raise UsageError(f"scheduler_interval must be one of {SCHEDULER_INTERVALS}, got {scheduler_interval!r}")
        if not (isinstance(optimizer, str) and optimizer in OPTIMIZERS) and not callable(optimizer):
            raise UsageError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)} or a callable")
        if scheduler is not None and not callable(scheduler):
            raise UsageError(f"scheduler must be a function of the optimiser (e.g. lambda opt: StepLR(opt, 10)), "
                             f"got a {type(scheduler).__name__}")
        if train is None:
            raise UsageError("no training data given")
        self.pair = as_pair(pair, model=model, guide=guide)
        self.batch_size, self.lr, self.seed = batch_size, lr, seed
        self.device = resolve_device(device)
        self.parallel = None
        if parallel.wanted(distributed):
            self.device = parallel.rank_device(self.device)
            self.parallel = parallel.setup(distributed, self.device)
        self.world_size = 1 if self.parallel is None else self.parallel.world_size
        self.spec = elbo if isinstance(elbo, str) else type(elbo).__name__
        if batching.length(train) == 0:
            raise UsageError("the training data is empty")
        fraction = float(validation) if _is_number(validation) else None
        train, validation = _validation_split(train, validation, seed)
        for data, what in ((train, "training data"), (validation, "validation data")):
            if data is not None:
                batching.check_finite(data, what)
                if self.pair.has("check_data"):
                    self.pair.hook("check_data")(batching.fixed_view(data))
        self.optimizer_spec, self.scheduler_spec, self.scheduler_interval = optimizer, scheduler, scheduler_interval
        self.clip_norm, self.drop_last, self.validate = clip_norm, drop_last, validate
        self.sync_every = sync_every or (1 if self.device.type == "cpu" else 50)
        self.pair.to(self.device)
        self.stream = batching.should_stream(train, self.device) if stream is None else bool(stream)
        self.train_data = batching.to_host(train, self.device) if self.stream else batching.to_device(train, self.device)
        self.validation = batching.to_device(validation, self.device) if validation is not None else None
        self.num_data = batching.length(self.train_data)
        if self.pair.has("num_data"):
            self.pair.owner.num_data = self.num_data
        self.settings = {"elbo": self.spec, "batch_size": batch_size, "seed": seed, "lr": lr, "validation": fraction}
        if self.parallel is not None:
            self.settings["world_size"] = self.world_size
        self.history: list[dict[str, Any]]
        self.callbacks: list[Callback]
        self.checkpoint_path: Path | None
        self.epoch, self.epochs, self.history = 0, 0, []
        self.should_stop, self.best_epoch, self.checkpoint_path, self.callbacks = False, None, None, []
        with self._pyro_validation():
            pyro.set_rng_seed(seed)
            self.info = inspect_pair(self.pair, self._device_view(), rows=batch_size)
            self._build_step_loss(elbo, compile, jit)
            check_objective(self.info, self.objective, spec=self.spec)
            self._check_batching()
            self._check_parallel()
            self.steps_per_epoch = batching.num_batches(self.num_data, self.global_batch_size, drop_last=self.drop_last)
            self._collect_parameters()
            self._check_validation()
        _log.debug("%s: %d training and %d validation points, objective %s, latents %s (global %s, enumerated %s), "
                   "%d parameter tensors", self.pair.name, self.num_data,
                   0 if self.validation is None else batching.length(self.validation), self.spec,
                   list(self.info.latents), list(self.info.global_latents), list(self.info.enumerated),
                   len(self.params))

    def _build_step_loss(self, elbo, compile, jit):
        """The objective and the step's loss (eager until :meth:`run` chooses the path, see ``compile``)."""
        if jit is not None:
            warnings.warn("jit= is deprecated: use compile= (jit=True is compile=True, jit=False is compile=False)",
                          FutureWarning, stacklevel=3)
            if compile is None:
                compile = bool(jit)
        if compile and self.info.subsampled:
            warnings.warn("compile: a pair that subsamples its own plate runs the eager loss", stacklevel=3)
        asked = compile if compile and not self.info.subsampled else False
        self.objective, self.loss = make_step_loss(elbo, max_plate_nesting=self.info.max_plate_nesting, compile=asked)
        self.compile, self.loss_path = compile, "eager"
        if isinstance(self.loss, StepLoss):
            self._backend, self.loss.backend = self.loss.backend, None

    def _choose_loss_path(self, epochs):
        """Set the step loss's path for this run (see ``compile``); records it in ``settings``."""
        path = "eager"
        if isinstance(self.loss, StepLoss) and not self.info.subsampled and self.compile is not False:
            recorded = self.history[-1].get("loss_path") if self.history else None
            steps = (epochs - self.epoch) * (self.num_data // self.global_batch_size or 1)
            # the ragged last batch (one step an epoch) stays eager: its compilation would never repay
            self.loss.compile_rows = {min(self.batch_size, self.num_data)}
            if self.compile is not None:
                path = self._backend
            elif recorded is not None:
                path = recorded
            elif steps >= MIN_COMPILE_STEPS:
                eager = self._step_seconds(self.loss.eager_loss)
                candidates = [b for b in DEFAULT_PATHS if worth_compiling(eager, steps, self.device.type, backend=b)]
                if candidates:
                    path = self._fastest(eager, candidates)
            if self.parallel is not None:
                path = self.parallel.broadcast_object(path)  # every rank runs rank 0's choice
            self.loss.backend = None if path == "eager" else path
        self.loss_path = self.settings["loss_path"] = path
        _log.debug("step loss: %s", path)

    def _fastest(self, eager, candidates):
        """Build each candidate path on the first batch (its graph checked against eager on two calls), time
        eager and the built paths interleaved (:meth:`_time_paths`), and return the fastest path (``"eager"``
        when none beats eager or each fell back); the times go to ``settings``."""
        built = []
        for backend in candidates:
            self.loss.backend = backend
            failed = len(self.loss.fallbacks)
            self._step_seconds(self.loss.differentiable_loss, calls=3)  # build, then 2 checked calls
            if len(self.loss.fallbacks) == failed:  # a fallback warned, naming the reason; its time is eager's
                built.append(backend)
        seconds = {"eager": eager}
        if built:
            timed = self._time_paths(["eager", *built])
            seconds = {"eager": min(eager, timed["eager"]), **{b: timed[b] for b in built}}
        self.settings["step_seconds"] = seconds
        best = min(seconds, key=seconds.get)
        _log.info("step seconds by path %s: %s", seconds, best)
        return best

    def _time_paths(self, paths, rounds=PROBE_ROUNDS):
        """The fastest of ``rounds`` timed steps of each path, the paths taking turns within each round, so that
        a burst of load from other processes slows them alike (the minimum is the estimate least affected by
        interference)."""
        seconds = dict.fromkeys(paths, math.inf)
        for _ in range(rounds):
            for path in paths:
                self.loss.backend = None if path == "eager" else path
                seconds[path] = min(seconds[path], self._step_seconds(self.loss.differentiable_loss, calls=1))
        return seconds

    def _step_seconds(self, loss, calls=3):
        """Seconds of one loss-and-backward on the first batch, the fastest of the last 2 of ``calls`` calls
        (validation as set; the random state is restored and the gradients dropped, so training is unchanged)."""
        state = get_rng_state()
        rows = torch.arange(min(self.batch_size, self.num_data), device=self.device)
        model, guide, args, kwargs = self.pair.bind(self._device_view(), rows, self.info)
        times = []
        try:
            for _ in range(calls):
                _synchronize(self.device)
                t0 = time.perf_counter()
                loss(model, guide, *args, **kwargs).backward()
                _synchronize(self.device)
                times.append(time.perf_counter() - t0)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            set_rng_state(state)
        return min(times[-2:])

    def validation_elbo(self) -> float:
        """The ELBO per datapoint of the validation data, one particle per point (see :func:`evaluate`).

        Data-parallel, each rank scores its contiguous shard and the sums are
        all-reduced (a pair with a global latent: every rank scores all of it and
        the ranks' values are averaged)."""
        size = max(self.batch_size, 1000)
        if self.parallel is None:
            return evaluate(self.pair, self.validation, particles=1, batch_size=size).elbo
        n = batching.length(self.validation)
        part = slice(0, n) if self.info.global_latents else parallel.shard(n, self.world_size, self.parallel.rank)
        rows = part.stop - part.start
        local = 0.0
        if rows:
            data = batching.subset(self.validation, torch.arange(part.start, part.stop, device=self.device))
            local = evaluate(self.pair, data, particles=1, batch_size=size).elbo * rows
        total, count = self.parallel.sum([local, float(rows)])
        return total / count

    def _check_validation(self):
        """Score the validation data once before training (RNG state kept), so that a pair that cannot score
        held-out points (a guide with parameters per training point, too few rows for a subsampled plate,
        a model that does not broadcast over evaluate's particle plate) is refused before the first step."""
        if self.validation is None:
            return
        state = get_rng_state()
        try:
            self.validation_elbo()
        except UsageError as exc:
            raise UsageError(f"the validation data cannot be scored: {exc}") from None
        finally:
            set_rng_state(state)
            self.pair.train()

    def _check_batching(self):
        """Minibatches must stand for the full data: refuse what would silently train another objective."""
        info = self.info
        if info.subsampled:
            if info.num_data != self.num_data:
                raise UsageError(f"the pair's plate {info.data_plate!r} has size {info.num_data}, but the training "
                                 f"data hold {self.num_data} points")
            if self.batch_size != info.batch_size:
                raise UsageError(f"the pair subsamples its plate {info.data_plate!r} with subsample_size="
                                 f"{info.batch_size}: use batch_size={info.batch_size}")
            self.drop_last = True
            return
        if self.global_batch_size >= self.num_data:
            return
        check_minibatching(self.pair, info, num_data=self.num_data, batch_size=self.batch_size)
        if info.global_latents and not self.scaled_to_full_data:
            raise UsageError(
                f"site {_model_site(info, info.global_latents)!r} is a global latent, but minibatches of {self.batch_size} of the "
                f"{self.num_data} training points are not scaled to the full data, so each step would treat its "
                f"batch as the whole data set; subsample the plate in the model (pyro.plate({info.data_plate!r}, N, "
                f"subsample_size={self.batch_size}) with the full data passed in) or use batch_size >= {self.num_data}"
            )

    def _check_parallel(self):
        """Data-parallel runs: refuse what cannot be split across ranks; warn where the objective changes."""
        if self.parallel is None or self.world_size == 1:
            return
        info = self.info
        if not info.global_latents or self.scaled_to_full_data:
            return
        site = _model_site(info, info.global_latents)
        if isinstance(self.objective, DifferentiableRenyiELBO):
            warnings.warn(f"{self.spec} with the global latent {site!r} is a whole-batch bound: on {self.world_size} "
                          "ranks each bounds its own part of the batch (the global latent's terms once per rank), "
                          "which is another objective than one process's", stacklevel=3)
            return
        raise UsageError(
            f"site {site!r} is a global latent and the data plate is not scaled to the full data, so each of the "
            f"{self.world_size} ranks would count its terms once: give the pair a num_data hook or subsample the "
            "plate in the model to train it data-parallel")

    @property
    def global_batch_size(self) -> int:
        """Rows per step over all ranks: ``world_size * batch_size``."""
        return self.batch_size * self.world_size

    @property
    def is_writer(self) -> bool:
        """Whether this process writes files and prints (rank 0, or the only process)."""
        return self.parallel is None or self.parallel.is_writer

    @property
    def shuffle(self) -> bool:
        """Minibatches are drawn from a fresh permutation each epoch; one batch of every point keeps their order
        (a guide with parameters per datapoint, e.g. a local AutoNormal, relies on it)."""
        return self.info.subsampled or self.global_batch_size < self.num_data

    @property
    def scaled_to_full_data(self) -> bool:
        """True when the pair's data plate scales each minibatch to the full data (its full size is N, not B)."""
        return self.info.subsampled or (self.info.num_data is not None and self.info.num_data != self.info.batch_size)

    def points_per_step(self, size: int) -> int:
        """How many datapoints a step's loss stands for: N when scaled to the full data, else its ``size`` rows."""
        return self.num_data if self.scaled_to_full_data else size

    # ---- state ---------------------------------------------------------------------------
    def _pyro_validation(self):
        return pyro.validation_enabled(self.validate) if self.validate is not None else nullcontext()

    def _collect_parameters(self):
        """Find the parameters (one run of the objective) and build the optimiser and scheduler for them."""
        self.pair.train()
        data = self._device_view()
        first = data if self.info.subsampled else batching.take(data, slice(0, min(self.batch_size, self.num_data)))
        self.params = collect_params(self.pair, self.objective, first, self.info)
        self._nonempty = [p for p in self.params if p.numel()]
        spec = self.optimizer_spec
        self.optimizer = OPTIMIZERS[spec](self.params, lr=self.lr) if isinstance(spec, str) else spec(self.params)
        self.scheduler = self.scheduler_spec(self.optimizer) if self.scheduler_spec is not None else None
        plateau = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if plateau and self.scheduler_interval == "step":
            raise UsageError("ReduceLROnPlateau steps on the validation ELBO once an epoch: use scheduler_interval='epoch'")

    def _device_view(self):
        """The fixed view of the training data on the device (streaming: its first rows, copied once)."""
        if not self.stream:
            return batching.fixed_view(self.train_data)
        if not hasattr(self, "_first"):
            rows = min(self.batch_size, self.num_data)
            self._first = batching.to_device(batching.take(batching.fixed_view(self.train_data), slice(0, rows)),
                                             self.device)
        return self._first

    def _modules_state(self):
        owner = self.pair.owner
        if isinstance(owner, torch.nn.Module):
            return owner.state_dict()
        return {str(i): m.state_dict() for i, m in enumerate(self.pair.modules())}

    def _load_modules_state(self, state):
        owner = self.pair.owner
        if isinstance(owner, torch.nn.Module):
            owner.load_state_dict(state)
            return
        for i, m in enumerate(self.pair.modules()):
            m.load_state_dict(state[str(i)])

    def parameters_state(self) -> dict[str, Any]:
        """Copies of the modules' and the param store's state (what early stopping keeps of its best epoch)."""
        return copy.deepcopy({"module": self._modules_state(), "param_store": pyro.get_param_store().get_state()})

    def load_parameters_state(self, state: dict[str, Any]) -> None:
        """Copy a :meth:`parameters_state` back in place (the optimiser keeps the same tensors)."""
        self._load_modules_state(state["module"])
        store = pyro.get_param_store()
        for name, value in state["param_store"]["params"].items():
            # pyro types the store's values as plain tensors; they carry their unconstrained() weakref
            store[name].unconstrained().data.copy_(value)  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint needs to continue this run exactly."""
        return {
            "model": self.pair.name,
            "config": self.pair.hook("config") if self.pair.has("config") else None,
            "module": self._modules_state(),
            "param_store": pyro.get_param_store().get_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": get_rng_state(),
            **({} if self.parallel is None else {"rank_rng": self.parallel.gather_objects(get_rng_state())}),
            "epoch": self.epoch,
            "history": self.history,
            "settings": self.settings,
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks},
            "stopped": self.should_stop,
            "best_epoch": self.best_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: parameters, optimiser, scheduler, RNG, history and callbacks' states."""
        self._load_modules_state(state["module"])
        if state["param_store"]["params"]:
            # the store's tensors are replaced: find the parameters again, then restore the optimiser
            pyro.get_param_store().set_state(state["param_store"])
            with self._pyro_validation():
                self._collect_parameters()
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"] if self.parallel is None else state["rank_rng"][self.parallel.rank])
        self.epoch, self.history = state["epoch"], list(state["history"])
        self.should_stop, self.best_epoch = state.get("stopped", False), state.get("best_epoch")
        saved = state.get("callbacks", {})
        for cb in self.callbacks:
            if type(cb).__name__ in saved:
                cb.load_state_dict(saved[type(cb).__name__])

    # ---- the step: loss_of (no host read), then update ----------------------------------------
    def loss_of(self, data: Any, index: torch.Tensor) -> torch.Tensor:
        """The step's loss on rows ``index`` of ``data`` (the negative objective): a device tensor, no host read."""
        model, guide, args, kwargs = self.pair.bind(data, index, self.info)
        return self.loss.differentiable_loss(model, guide, *args, **kwargs)

    def update(self, loss: torch.Tensor, points: int) -> None:
        """One optimiser step on ``loss / points`` (the per-datapoint objective).

        Data-parallel, ``loss`` is this rank's contribution (a rank without rows
        or whose model failed has no gradient), and the gradients are summed over
        ranks after backward (:meth:`inference.distributed.DataParallel.all_reduce_gradients`)."""
        if self.parallel is None or loss.requires_grad:
            (loss / points).backward()
        if self.parallel is not None:
            self.parallel.all_reduce_gradients(self.params)
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()

    def parameters_max(self) -> torch.Tensor:
        """The largest absolute value over all parameters (a device scalar, no host read; NaN if any is NaN).

        Each tensor's minimum and maximum (``torch.aminmax``, which propagates NaN), then the largest absolute
        value of those: the same number as the infinity norm, whose CPU kernel (``_foreach_norm(ps, inf)``) is
        not vectorised and took about 15 times as long on an MNIST VAE's 0.7 M parameters, a sixth of a step.
        """
        return torch.stack([torch.stack(torch.aminmax(p.detach())) for p in self._nonempty]).abs().max()

    def parameters_finite(self) -> bool:
        """Whether every parameter is finite (one host read)."""
        return math.isfinite(float(self.parameters_max()))

    # ---- the loop ------------------------------------------------------------------------
    def run(self, epochs: int, *, callbacks: Iterable[Any] = (), progress: bool = True) -> "FitResult":
        """Train until epoch ``epochs`` (or an early stop); returns a :class:`FitResult`."""
        _positive("epochs", epochs, int)
        self.epochs = epochs
        self.callbacks = sorted([ProgressBar(progress), *map(as_callback, callbacks)], key=lambda cb: cb.order)
        with self._pyro_validation():
            for cb in self.callbacks:
                cb.setup(self)
            if self.parallel is not None:
                self._start_parallel()
            self._choose_loss_path(epochs)
            for cb in self.callbacks:
                cb.on_fit_start(self)
            try:
                while self.epoch < epochs and not self.should_stop:
                    record = self._epoch(self.epoch + 1)
                    self.epoch = record["epoch"]
                    self.history.append(record)
                    _log.debug("epoch %s", {k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()})
                    for cb in self.callbacks:
                        cb.on_epoch_end(self, record)
                for cb in self.callbacks:
                    cb.on_fit_end(self)
            finally:
                self.pair.eval()
                self.callbacks[0].on_fit_end(self)  # the progress bar is closed whatever happened
        return FitResult(
            history=self.history,
            checkpoint=self.checkpoint_path,
            device=self.device,
            elbo=self.objective,
            loss=self.loss,
            train_seconds=sum(r["seconds"] for r in self.history),
            best_epoch=self.best_epoch,
            stopped_early=self.should_stop and self.epoch < epochs,  # a stop at the last epoch ends nothing early
        )

    def _start_parallel(self):
        """Rank 0's parameters (and module buffers) on every rank; a fresh run seeds each rank's noise."""
        buffers = list({id(b): b for m in self.pair.modules() for b in m.buffers()}.values())
        self.parallel.broadcast_tensors(self.params + buffers)
        if self.epoch == 0 and not getattr(self, "_seeded", False):
            pyro.set_rng_seed(parallel.rank_seed(self.seed, self.parallel.rank))
            self._seeded = True

    def _epoch(self, epoch):
        t0 = time.perf_counter()
        self.pair.train()
        lr = self.optimizer.param_groups[0]["lr"]
        train_loss = self._train_epoch(epoch)
        record = {"epoch": epoch, "train_loss": train_loss, "lr": lr, "seconds": time.perf_counter() - t0,
                  "loss_path": self.loss_path}
        if self.validation is not None:
            t1 = time.perf_counter()
            try:
                record["val_elbo"] = self.validation_elbo()
            except (ValueError, FloatingPointError) as exc:
                if isinstance(exc, ValueError) and _INVALID_VALUES not in str(exc):
                    raise
                raise DivergenceError(f"training diverged in epoch {epoch}: the validation ELBO is not finite"
                                      f"{self._kept()}") from None
            record["eval_seconds"] = time.perf_counter() - t1
            self.pair.train()
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(-record["val_elbo"] if "val_elbo" in record else train_loss)
            else:
                self.scheduler.step()
        return record

    def _batches(self, epoch):
        """``(rows of this process, rows of the step over all ranks)`` for each step of the epoch."""
        if self.parallel is not None:
            where = torch.device("cpu") if self.stream else self.device
            return self.parallel.batches(self.num_data, self.batch_size, seed=self.seed, epoch=epoch,
                                         shuffle=self.shuffle, drop_last=self.drop_last, device=where)
        batches = batching.batch_indices(
            self.num_data, self.batch_size, shuffle=self.shuffle, device=self.device, drop_last=self.drop_last,
            host=self.stream,
        )
        return [(idx, idx.shape[0]) for idx in batches]

    def _step_loss(self, source, idx):
        """The loss on rows ``idx``: of the epoch's view ``source``, or (None) of a batch drawn for this step."""
        if source is not None:
            return self.loss_of(source, idx)
        if idx.shape[0] == 0:  # a rank without rows in a ragged last batch
            return torch.zeros((), device=self.device)
        return self.loss_of(batching.batch(self.train_data, idx, self.device if self.stream else None), None)

    def _train_epoch(self, epoch):
        """One pass over the training data; the losses are read to the host every ``sync_every`` steps.

        Batches are drawn per step (:func:`inference.batching.batch`: dynamic
        binarisation draws each batch's rows); a pair that subsamples its own
        plate, or a data object without ``rows``, gets the epoch's view whole."""
        per_batch = not self.info.subsampled and batching.per_batch(self.train_data)
        source = None if per_batch else batching.epoch_view(self.train_data)
        batches = self._batches(epoch)
        last, window, sizes, total, points, first, failed = len(batches), [], [], 0.0, 0, None, 0
        reads = 0
        for step, (idx, rows) in enumerate(batches, start=1):
            try:
                loss = self._step_loss(source, idx)
            except ValueError as exc:
                if _INVALID_VALUES not in str(exc):
                    raise
                if self.parallel is None:
                    raise DivergenceError(f"training diverged at epoch {epoch}, step {step}: the networks' outputs "
                                          f"left their distributions' support (non-finite values){self._kept()}"
                                          ) from None
                # the other ranks learn of it in the next read; until then this rank takes part without a gradient
                loss, failed = torch.full((), math.nan, device=self.device), failed + 1
            size = self.points_per_step(rows)
            if self.parallel is not None:
                loss = self.parallel.contribution(loss, idx.shape[0], rows, self.points_per_step(max(idx.shape[0], 1)))
            window.append(loss.detach())
            sizes.append(size)
            if step % self.sync_every == 0 or step == last:
                # the only host read: the losses of the window and (see PARAM_CHECK_READS) the parameters'
                # largest absolute value, checked before this step's update
                reads += 1
                checked = reads == 1 or step == last or reads % PARAM_CHECK_READS == 0
                largest = self.parameters_max().to(window[0].dtype) if checked else window[0].new_zeros(())
                if self.parallel is None:
                    *values, largest = _read(window + [largest])
                else:
                    values, failures, largest = self.parallel.read(window, failed, largest)
                    values = [v * s for v, s in zip(values, sizes)]
                    if failures:
                        bad = next((k for k, v in enumerate(values) if not math.isfinite(v)), len(values) - 1)
                        raise DivergenceError(
                            f"training diverged at epoch {epoch}, step {step - len(values) + 1 + bad}: the networks' "
                            f"outputs left their distributions' support (non-finite values; {failures} failed "
                            f"step(s) over the {self.world_size} ranks){self._kept()}")
                if not checked and not all(map(math.isfinite, values)):
                    largest = float(self.parameters_max())  # the same on every rank: no collective needed
                self._check_finite(values, epoch, step, largest)
                if first is None:
                    first = values[0] / sizes[0]
                self._check_growth(values, sizes, first, epoch, step)
                window, sizes = [], []
                total += math.fsum(values)
                for cb in self.callbacks:
                    cb.on_steps(self, len(values), total, points + size)
            self.update(loss, size if self.parallel is None else 1)  # data-parallel: loss is already per datapoint
            points += size
        return total / points

    def _kept(self):
        good = self.checkpoint_path if self.checkpoint_path is not None and self.checkpoint_path.exists() else None
        return f"; the last good checkpoint {good} is kept" if good is not None else ""

    def _check_finite(self, values, epoch, step, largest=0.0):
        for k, value in enumerate(values):
            if not math.isfinite(value):
                where = f"non-finite loss at epoch {epoch}, step {step - len(values) + 1 + k}"
                if not math.isfinite(largest):
                    # non-finite parameters make the loss non-finite too (Pyro's validation, which would have
                    # named them, runs on the first calls of each batch shape only)
                    raise DivergenceError(f"training diverged: {where}, and the parameters are not finite"
                                          f"{self._kept()}")
                raise NonFiniteLossError(f"{where}{self._kept()}")
        if not math.isfinite(largest):
            raise DivergenceError(f"training diverged at epoch {epoch}, step {step}: non-finite parameters"
                                  f"{self._kept()}")

    def _check_growth(self, values, sizes, first, epoch, step):
        for k, (value, size) in enumerate(zip(values, sizes)):
            if value / size - first > GROWTH * max(abs(first), 1.0):
                raise DivergenceError(
                    f"training diverged at epoch {epoch}, step {step - len(values) + 1 + k}: the loss grew from "
                    f"{first:.4g} to {value / size:.4g} per datapoint within the epoch (lower --lr?){self._kept()}"
                )


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read(window):
    """Host copies of the losses in ``window``: one device-to-host transfer."""
    if len(window) == 1:
        return [float(window[0])]
    return torch.stack(window).tolist()


def fit(
    pair: Any = None,
    train: Any = None,
    *,
    epochs: int,
    validation: Any = None,
    patience: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    tensorboard: str | Path | None = None,
    callbacks: Iterable[Any] = (),
    progress: bool = True,
    **trainer_options: Any,
) -> FitResult:
    """Train a model/guide pair by SVI; returns a :class:`FitResult`.

    ``pair`` is an object with ``model`` and ``guide`` methods (an ``nn.Module``),
    a ``(model, guide)`` tuple (the guide may be a Pyro autoguide), or give
    ``model=``/``guide=`` as keywords (see :class:`Trainer`).

    Each step draws a minibatch B, computes the differentiable loss of the
    chosen objective per datapoint (``-ELBO(B) / |B|``, or ``/ N`` when the data
    plate scales the batch to the full data; see :class:`Trainer`) and takes a
    step of a plain torch optimiser over the pair's parameters and any
    ``pyro.param`` it uses. This
    is ``Trainer(pair, train, validation=validation, **trainer_options).run(epochs, callbacks=...)``
    (see :class:`Trainer` for ``elbo``, ``batch_size``, ``lr``, ``optimizer``,
    ``scheduler``, ``device``, ``seed``, ``clip_norm``, ``drop_last``,
    ``validate``, ``compile``, ``sync_every``, ``distributed``, ``stream``), with these callbacks
    (:mod:`inference.callbacks`) switched on by keyword:

    * ``progress``: a progress bar on stderr;
    * ``patience``: :class:`~inference.callbacks.EarlyStopping` on the validation
      ELBO (needs ``validation``), restoring the best epoch's parameters;
    * ``checkpoint_dir`` / ``resume``: :class:`~inference.callbacks.Checkpoint`,
      an atomic checkpoint after every epoch, and exact resume from it;
    * ``tensorboard``: :class:`~inference.callbacks.TensorBoard` event files in that folder;
    * ``callbacks``: more callbacks, or plain functions ``f(record)`` of each epoch's record.

    A non-finite loss raises :class:`~inference.errors.NonFiniteLossError` naming
    the epoch and step; the checkpoint on disk is then the last good one.

    Fast by default (see :class:`Trainer`'s ``compile``): the step's loss runs
    on the fastest of the eager loss and the paths the run is long enough to
    repay (:func:`inference.loss.worth_compiling`), each timed on the first
    batch: the flattened graph without code generation (``"flat"``, about half a
    second to build: ``steps * eager_step_seconds * 0.15 > 0.5 s``) and
    ``torch.compile``/inductor (``steps * eager_step_seconds * 0.2 > 40 s`` on
    CPU, 60 s on CUDA). ``compile=False`` keeps the eager loss; the choice is
    each history record's ``loss_path``.
    """
    _positive("epochs", epochs, int)
    if resume and checkpoint_dir is None:
        raise UsageError("resume=True needs the checkpoint_dir to resume from")
    missing = [name for name in ("batch_size", "lr") if name not in trainer_options]
    if missing:
        raise TypeError(f"fit() missing required keyword argument(s): {', '.join(missing)}")
    trainer = Trainer(pair, train, validation=validation, **trainer_options)
    extra = list(callbacks)
    if patience is not None:
        extra.append(EarlyStopping(patience))
    if tensorboard is not None:
        extra.append(TensorBoard(tensorboard))
    if checkpoint_dir is not None:
        extra.append(Checkpoint(checkpoint_dir, resume=resume))
    return trainer.run(epochs, callbacks=extra, progress=progress)
