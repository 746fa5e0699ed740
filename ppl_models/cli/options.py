"""argparse wiring shared by every model: value parsers, the shared options, and the one conversion
from argparse's ``Namespace`` to a typed :class:`~ppl_models.cli.recipe.RunConfig`.

A model's own options are added by the ``add_options(parser)`` function in its
recipe's file; their ``dest`` names are the fields of its recipe's ``Options``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, NoReturn

from inference.elbo import ELBO_SPECS
from inference.errors import UsageError

from ..data import BINARIZE, DATASETS
from .recipe import LR_SCHEDULES, Recipe, RunConfig, lr_scheduler


def is_rank0() -> bool:
    """Whether this process prints user errors: True unless it is a rank other than 0 under ``torchrun``
    (which sets ``RANK``; every rank runs the same checks, so rank 0 alone says what failed)."""
    return os.environ.get("RANK", "0") in ("", "0")


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (``pplm: error: ...``), printed by rank 0 alone under ``torchrun``,
    and ``--help`` shows every option's default."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n" if is_rank0() else None)

    def add_argument(self, *args: Any, **kwargs: Any) -> Any:
        action = super().add_argument(*args, **kwargs)
        shown = action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
        if shown and "%(default)" not in (action.help or ""):
            default = " ".join(map(str, action.default)) if isinstance(action.default, list) else "%(default)s"
            action.help = f"{action.help} (default: {default})" if action.help else f"default: {default}"
        return action


def suppress_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Set every option's default of ``parser`` and its subparsers to ``SUPPRESS``, so that parsing gives the
    options the command line names, and only those (what ``--resume`` compares with the stored run)."""
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            action.default = argparse.SUPPRESS
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                suppress_defaults(sub)
    return parser


def _int_at_least(minimum, word, expected=None):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected or f'a {word} integer'}, got {text!r}")
        return value

    parse.__name__ = f"{word.replace('-', '_')}_int"
    return parse


positive_int = _int_at_least(1, "positive")
non_negative_int = _int_at_least(0, "non-negative")
# Monte Carlo moments (a flow guide's sd) need two draws at least
draws_int = _int_at_least(2, "draws", "an integer of at least 2")
MAX_SEED = 2**32 - 1


def seed(text: str) -> int:
    """A seed in 0 .. 2^32 - 1 (what ``pyro.set_rng_seed`` and NumPy accept)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed in 0..{MAX_SEED}, got {text!r}")
    return value


def out_path(text: str) -> str:
    """A non-empty path."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty one")
    return text


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def lr_schedule(text: str) -> str:
    """argparse type of ``--lr-schedule``: the spec, checked by :func:`~ppl_models.cli.recipe.lr_scheduler`."""
    try:
        lr_scheduler(text, 1)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_data_options(p: Any, binarize: str = "none") -> None:
    """``--dataset`` (digits, MNIST, Fashion-MNIST or a .npz file), ``--data-root``, ``--download``, ``--binarize``."""
    p.add_argument("--dataset", default="digits", help=f"{' | '.join(DATASETS)} or a .npz file")
    p.add_argument("--data-root", default=None, help="folder holding MNIST/raw or FashionMNIST/raw")
    p.add_argument("--download", action="store_true", help="allow torchvision to download missing files")
    p.add_argument("--binarize", choices=BINARIZE, default=binarize)


def add_training_options(p: Any, recipe: Recipe) -> None:
    """The options every ``pplm train MODEL`` takes, with ``recipe``'s defaults."""
    p.add_argument("--elbo", default=recipe.default_elbo, help=f"objective spec: {', '.join(ELBO_SPECS)}")
    p.add_argument("--epochs", type=positive_int, default=recipe.default_epochs)
    p.add_argument("--batch-size", type=positive_int, default=recipe.default_batch_size)
    p.add_argument("--lr", type=positive_float, default=recipe.default_lr)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--particles", type=positive_int, default=1000, help="importance samples for the test log-likelihood")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads of torch (default: chosen from the model's size and the free cores)")
    p.add_argument("--no-validate", action="store_true", help="switch Pyro's validation off (faster)")
    p.add_argument("--no-compile", action="store_true",
                   help="keep the eager loss (default: the fastest of eager, the flattened loss graph and "
                        "torch.compile that the run is long enough to repay, timed on the first batch; see "
                        "inference.Trainer)")
    p.add_argument("--jit", action="store_true",
                   help="deprecated: compile the loss whatever the run's length (torch.compile; was torch.jit.trace)")
    p.add_argument("--validation", type=fraction, default=0.1,
                   help="fraction of the training data held out to monitor the ELBO each epoch (0: none)")
    p.add_argument("--patience", type=positive_int, default=None,
                   help="stop when the validation ELBO has not improved for this many epochs; keep the best epoch")
    p.add_argument("--lr-schedule", type=lr_schedule, default="none", help=f"learning-rate schedule: {LR_SCHEDULES}")
    p.add_argument("--tensorboard", default=None, metavar="DIR", help="write TensorBoard event files to DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars (long phases still say one line each)")
    p.add_argument("--out", type=out_path, required=True, help="run folder")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="read options from a TOML or JSON file (keys: these options' names; a run folder's "
                        "config.json repeats that run); options given here override the file's")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (options not given are the stored run's)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (once the new run has finished its first epoch)")


def run_config(ns: Any, recipe: Recipe) -> RunConfig:
    """The typed configuration of ``pplm train`` from argparse's namespace ``ns`` (the CLI boundary)."""
    shared = {f.name: getattr(ns, f.name) for f in dataclasses.fields(RunConfig) if f.name not in ("options", "validate", "given")}
    options = recipe.Options(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(recipe.Options)})
    given = getattr(ns, "named_options", None)
    if given is not None:
        given = frozenset("validate" if name == "no_validate" else name for name in given)
    return RunConfig(**shared, options=options, validate=not ns.no_validate, given=given)
