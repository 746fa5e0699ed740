"""A run's typed configuration and the base class of the per-model recipes.

:class:`RunConfig` is what one ``pplm train`` run is asked to do: the options
every model shares (folder, data, objective, optimiser, device, seed, ...) and
the model's own options (``options``: a dataclass the model's recipe defines).
It is built once from the command line (:func:`ppl_models.cli.options.run_config`)
or from a run folder's ``config.json`` (:func:`ppl_models.cli.runs.read_run_config`).

A :class:`Recipe` is what differs between models in a run: how to load the
data, build the module (and rebuild it from ``config.json``), initialise it
before SVI, which metrics and figures a run writes and how to draw samples. It
knows nothing of argparse: each model's file pairs its recipe with an
``add_options(parser)`` function that declares the same fields as ``Options``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inference.errors import UsageError
from inference.plots import save_image_grid

from ..data import load_dataset


@dataclass
class RunConfig:
    """What one run is asked to do.

    ``out`` is the run folder; ``resume`` (continue the run in ``out``) and
    ``overwrite`` (replace it) exclude each other. ``validate=False`` switches
    Pyro's validation off. ``validation`` is the fraction of the training data
    held out to monitor the ELBO after every epoch (0: none); ``patience`` stops
    training when that ELBO has not improved for so many epochs (restoring the
    best epoch); ``lr_schedule`` is a spec for
    :func:`ppl_models.cli.options.lr_scheduler`; ``tensorboard`` a folder for
    TensorBoard event files. ``particles`` is the number of importance samples of
    the test log-likelihood. ``threads`` is torch's CPU thread count (None:
    chosen from the work size). ``options`` is the model's own options (the
    dataclass ``recipe.Options``). ``given`` names the options the command line
    set (None for a run built in code).
    """

    out: str | None = None
    options: Any = None
    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    binarize: str = "none"
    elbo: str = "trace"
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    device: str = "auto"
    seed: int = 0
    particles: int = 1000
    quiet: bool = False
    validate: bool = True
    jit: bool = False
    no_compile: bool = False
    validation: float = 0.1
    patience: int | None = None
    lr_schedule: str = "none"
    tensorboard: str | None = None
    threads: int | None = None
    resume: bool = False
    overwrite: bool = False
    # the options the command line named (None: built in code); --resume takes the others from the stored run
    given: frozenset | None = field(default=None, compare=False)

    # what a finished run stores in config.json ("run"); the rest say how to run this command
    STORED = ("dataset", "data_root", "download", "binarize", "elbo", "epochs", "batch_size", "lr", "device", "seed",
              "particles", "quiet", "validate", "jit", "no_compile", "validation", "patience", "lr_schedule")
    # what a resumed run may change (taken from the command line when given there); any other option given
    # with --resume must equal the stored run's
    RESUME_OVERRIDES = ("epochs", "device", "particles", "quiet", "validate", "jit", "no_compile", "tensorboard",
                        "threads")

    def stored(self) -> dict[str, Any]:
        """The JSON-able record of this run for ``config.json``: ``{"run": {...}, "options": {...}}``."""
        # typeshed narrows is_dataclass() to an instance or a dataclass type; options is always an instance
        options = (dataclasses.asdict(self.options)  # type: ignore[arg-type]
                   if dataclasses.is_dataclass(self.options) else {})
        return {"run": {k: getattr(self, k) for k in self.STORED}, "options": options}


LR_SCHEDULES = "none, cosine, exponential:GAMMA, step:EPOCHS:GAMMA, plateau:PATIENCE:FACTOR"


def lr_scheduler(spec: Any, epochs: int) -> Any:
    """``None`` or ``f(optimizer) -> scheduler`` for a ``--lr-schedule`` spec (stepped once per epoch).

    * ``none``: a constant learning rate;
    * ``cosine``: ``torch.optim.lr_scheduler.CosineAnnealingLR`` over ``epochs`` (Loshchilov & Hutter 2017);
    * ``exponential:GAMMA``: lr * GAMMA^epoch, 0 < GAMMA <= 1;
    * ``step:EPOCHS:GAMMA``: lr * GAMMA every EPOCHS epochs;
    * ``plateau:PATIENCE:FACTOR``: ``ReduceLROnPlateau`` on the validation ELBO (the training loss without one).

    :raises inference.errors.UsageError: for a malformed spec.
    """
    name, *rest = spec.split(":")
    sched = torch.optim.lr_scheduler
    forms = {"none": (), "cosine": (), "exponential": ("GAMMA",), "step": ("EPOCHS", "GAMMA"),
             "plateau": ("PATIENCE", "FACTOR")}
    if name not in forms:
        raise UsageError(f"unknown learning-rate schedule {spec!r}; valid: {LR_SCHEDULES}")
    if len(rest) != len(forms[name]):
        form = ":".join((name, *forms[name]))
        raise UsageError(f"learning-rate schedule {spec!r}: write it as {form}")

    def whole(text, what, low):
        try:
            v = int(text)
        except ValueError:
            v = low - 1
        if v < low:
            raise UsageError(f"learning-rate schedule {spec!r}: {what} must be a whole number >= {low}, got {text!r}")
        return v

    def fraction(text, what, closed):
        try:
            v = float(text)
        except ValueError:
            v = -1.0
        if not (0 < v < 1 or (closed and v == 1)):
            raise UsageError(f"learning-rate schedule {spec!r}: {what} must be a number in (0, 1{']' if closed else ')'}, "
                             f"got {text!r}")
        return v

    if name == "none":
        return None
    if name == "cosine":
        return lambda opt: sched.CosineAnnealingLR(opt, T_max=epochs)
    if name == "exponential":
        gamma = fraction(rest[0], "GAMMA", closed=True)
        return lambda opt: sched.ExponentialLR(opt, gamma=gamma)
    if name == "step":
        every, gamma = whole(rest[0], "EPOCHS", 1), fraction(rest[1], "GAMMA", closed=True)
        return lambda opt: sched.StepLR(opt, step_size=every, gamma=gamma)
    patience, factor = whole(rest[0], "PATIENCE", 0), fraction(rest[1], "FACTOR", closed=False)
    return lambda opt: sched.ReduceLROnPlateau(opt, patience=patience, factor=factor)


@dataclass
class NoOptions:
    """No model options (the ``Options`` of a recipe that declares none)."""


class Recipe:
    """Base class: the pieces of a run that differ between models.

    Subclasses set ``name``, ``help``, ``model_class`` (with ``from_config``)
    and ``Options`` (a dataclass of the model's options, every field with a
    default), and override :meth:`build` (and whichever hooks they need).
    ``default_*`` are the defaults of the shared options for this model.
    """

    name: str | None = None
    help = ""
    model_class: Any = None
    default_elbo = "trace"
    default_epochs = 100
    default_batch_size = 64
    default_lr = 1e-3
    default_binarize = "none"

    Options: Any = NoOptions

    def options_from_dict(self, stored: Any) -> Any:
        """``Options`` from a stored dict; keys it does not know are ignored, missing ones take their defaults."""
        names = {f.name for f in dataclasses.fields(self.Options)}
        return self.Options(**{k: v for k, v in stored.items() if k in names})

    # ---- what a run does -------------------------------------------------------------
    def check(self, run: RunConfig) -> None:
        """Raise UsageError for option combinations that make no sense (before anything is loaded)."""

    def load_data(self, run: RunConfig) -> Any:
        """(train, test) on the CPU."""
        return load_dataset(run.dataset, data_root=run.data_root, binarize=run.binarize, download=run.download)

    def build(self, run: RunConfig, train: Any) -> Any:
        """A fresh module for this run and this training data."""
        raise NotImplementedError

    def rebuild(self, module_config: dict[str, Any]) -> Any:
        """The module of a finished run, from its ``config.json``'s ``"module"`` entry."""
        return self.model_class.from_config(module_config)

    def before_fit(self, module: Any, train: Any, run: RunConfig, device: str | torch.device) -> dict[str, Any]:
        """Optional initialisation before SVI (e.g. VaDE's pretraining). Returns a dict for metrics.json."""
        return {}

    def metrics(self, module: Any, train: Any, test: Any, run: RunConfig) -> dict[str, Any]:
        """Extra entries for metrics.json (e.g. clustering accuracy)."""
        return {}

    def figures(self, run_dir: Path, module: Any, train: Any, test: Any, run: RunConfig) -> list[Any]:
        """Write the model's PNG figures into ``run_dir`` (loss.png is written for every model); returns their names."""
        return []

    def save_samples(self, module: Any, n: int, path: str | Path, module_config: dict[str, Any] | None = None) -> Any:
        """``pplm sample``: a grid of ``n`` draws from the model (``module.sample(n)``) saved to ``path``."""
        shape = (module_config or {}).get("image_shape")
        if not hasattr(module, "sample") or not shape:
            raise UsageError(f"the {self.name} model of this run cannot draw image samples")
        return save_image_grid(module.sample(n), shape, path, nrow=max(1, math.ceil(n**0.5)))

    # ``pplm generate``: a recipe whose model generates one modality from others sets this to a method
    # ``generate(module, run, given, target, path, *, n, seed)`` (see the mvae recipe).
    generate: Callable[..., Any] | None = None


def default_list(values: Any) -> Any:
    """A dataclass field whose default is the list ``values`` (a fresh copy per instance)."""
    return field(default_factory=lambda: list(values))
