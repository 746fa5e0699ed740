"""What the ``pplm`` command line knows about each model: one small class per model.

A :class:`ModelCommand` says how to add the model's options to ``pplm train
<name>``, how to load its data, build the module, and which extra figures and
metrics a run of it writes. The run itself (checking the output folder, fit,
evaluate, writing ``config.json``, ``metrics.json``, ``history.csv`` and figures)
is :func:`ppl_models.runs.train_run`, shared by every model. Adding a model to the
CLI is one file in ``ppl_models/cli/`` that defines a subclass and decorates it
with :func:`register`; every module of the package is imported on start.
"""

import argparse
import math

from inference.errors import UsageError

from ..data import BINARIZE, DATASETS, load_dataset


def _int_at_least(minimum, word):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {word} integer, got {text!r}")
        return value

    parse.__name__ = f"{word.replace('-', '_')}_int"
    return parse


positive_int = _int_at_least(1, "positive")
non_negative_int = _int_at_least(0, "non-negative")


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


class ModelCommand:
    """Base class: the pieces of ``pplm train <name>`` that differ between models."""

    name = None
    help = ""
    default_elbo = "trace"
    default_epochs = 100
    default_batch_size = 64
    default_lr = 1e-3
    default_binarize = "none"
    default_likelihood = None  # for models with an image likelihood option

    # ---- options ---------------------------------------------------------------------
    def add_data_arguments(self, p):
        p.add_argument("--dataset", default="digits", help=f"{' | '.join(DATASETS)} or a .npz file (default digits)")
        p.add_argument("--data-root", default=None, help="folder holding MNIST/raw or FashionMNIST/raw")
        p.add_argument("--download", action="store_true", help="allow torchvision to download missing files")
        p.add_argument("--binarize", choices=BINARIZE, default=self.default_binarize)

    def add_arguments(self, p):
        """Model-specific options (override)."""

    # ---- what a run does -------------------------------------------------------------
    def load_data(self, args):
        """(train, test) on the CPU."""
        return load_dataset(args.dataset, data_root=args.data_root, binarize=args.binarize, download=args.download)

    def build(self, args, train):
        """A fresh module for these options and this training data."""
        raise NotImplementedError

    def rebuild(self, config):
        """The module of a finished run, from its ``config.json`` (``config["module"]``)."""
        raise NotImplementedError

    def before_fit(self, module, train, args, device):
        """Optional initialisation before SVI (e.g. VaDE's pretraining). Returns a dict for metrics."""
        return {}

    def metrics(self, module, train, test, args):
        """Extra entries for metrics.json (e.g. clustering accuracy)."""
        return {}

    def figures(self, run_dir, module, train, test, args):
        """Write the model's PNG figures into ``run_dir`` (loss.png is written for every model)."""

    def check_args(self, args):
        """Raise UsageError for option combinations that make no sense."""

    def save_samples(self, module, n, path, config):
        """``pplm sample``: a grid of ``n`` draws from the model (``module.sample(n)``) saved to ``path``."""
        from inference.plots import save_image_grid

        shape = (config.get("module") or {}).get("image_shape")
        if not hasattr(module, "sample") or not shape:
            raise UsageError(f"the {config['model']} model of this run cannot draw image samples")
        return save_image_grid(module.sample(n), shape, path, nrow=max(1, math.ceil(n**0.5)))


_COMMANDS = {}


def register(cls):
    """Class decorator: make ``pplm train <cls.name>`` available."""
    _COMMANDS[cls.name] = cls()
    return cls


def get_command(name):
    _load_builtin()
    if name not in _COMMANDS:
        raise UsageError(f"unknown model {name!r}; valid: {', '.join(sorted(_COMMANDS))}")
    return _COMMANDS[name]


def all_commands():
    _load_builtin()
    return dict(sorted(_COMMANDS.items()))


def _load_builtin():
    import importlib
    import pkgutil

    from .. import cli

    for info in pkgutil.iter_modules(cli.__path__):
        if info.name not in ("base", "__main__"):
            importlib.import_module(f"{cli.__name__}.{info.name}")
