"""``pplm train m2 --labels N``: the semi-supervised M2 model (Kingma et al. 2014); figures: a style x class grid
and samples per class; metrics: the test classification error."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference.errors import UsageError
from inference.plots import save_image_grid
from inference.train import held_out

from ..data import load_dataset
from ..m2 import M2, choose_labels, split_labels
from .options import add_data_options, positive_int
from .recipe import Recipe, RunConfig, default_list


@dataclass
class M2Options:
    labels: str = "100"
    latent_dim: int = 50
    hidden: list = default_list([500])
    likelihood: str = "bernoulli"
    activation: str = "softplus"
    alpha: float = 60.0
    labelled_weight: str = "paper"


def labels_spec(text: str) -> str:
    """argparse type of ``--labels``: a positive number of labels, or ``all``."""
    if text != "all":
        try:
            ok = int(text) >= 1
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a positive number of labels or 'all', got {text!r}")
    return text


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def add_options(p: Any) -> None:
    d = M2Options()
    add_data_options(p, binarize=M2Recipe.default_binarize)
    p.add_argument("--labels", type=labels_spec, default=d.labels,
                   help="labels kept for training, balanced over the classes and drawn with --seed; 'all': the "
                        "labels the data give (a .npz's y, with -1 for an unlabelled row)")
    p.add_argument("--latent-dim", type=positive_int, default=d.latent_dim, help="size of the style z")
    p.add_argument("--hidden", type=positive_int, nargs="+", default=d.hidden, help="MLP hidden widths")
    p.add_argument("--likelihood", default=d.likelihood, help="bernoulli, cbernoulli, normal[:S|:learned], laplace[:S]")
    p.add_argument("--activation", choices=("softplus", "relu", "tanh", "elu", "gelu"), default=d.activation)
    p.add_argument("--alpha", type=non_negative_float, default=d.alpha,
                   help="classification weight per row (the paper's alpha = 0.1 N is 0.1 with --labelled-weight paper; "
                        "the default is chosen by measurement: ppl_models.m2's docstring)")
    p.add_argument("--labelled-weight", choices=("equal", "paper"), default=d.labelled_weight,
                   help="weight of the labelled minibatch's ELBO: equal (as much as the unlabelled minibatch's) or "
                        "paper (each labelled point as one datapoint of the data set, J^alpha's sum)")


class M2Recipe(Recipe):
    name = "m2"
    help = "semi-supervised M2 (Kingma et al. 2014): labels y summed out exactly where missing, style z"
    model_class = M2
    Options = M2Options
    default_elbo = "enum"
    default_binarize = "dynamic"
    default_epochs = 100
    default_batch_size = 200
    default_lr = 3e-4

    def check(self, run: RunConfig) -> None:
        if not run.elbo.startswith("enum"):
            raise UsageError(f"M2 sums the missing labels out exactly: train it with --elbo enum, not {run.elbo!r}")

    def load_data(self, run: RunConfig) -> Any:
        """(train, test): the training split as :class:`~ppl_models.m2.SemiSupervisedData`, the test split
        with its labels (for the classification error)."""
        train, test = load_dataset(run.dataset, data_root=run.data_root, binarize=run.binarize,
                                   download=run.download, unlabelled=True)
        if train.y is None:
            raise UsageError(f"M2 needs labels: the training data of {train.name!r} carry none")
        labels, k = run.options.labels, _num_classes(train, test)
        y = train.y if labels == "all" else choose_labels(train.y, int(labels), seed=run.seed, num_classes=k)
        return split_labels(train, y, num_classes=k), test

    def build(self, run: RunConfig, train: Any) -> Any:
        o = run.options
        return M2(train.dim, num_classes=max(train.num_classes, 2), latent_dim=o.latent_dim, hidden=o.hidden,
                  likelihood=o.likelihood, activation=o.activation, alpha=o.alpha,
                  labelled_fraction=train.labelled_fraction if o.labelled_weight == "paper" else None,
                  image_shape=train.image_shape)

    def metrics(self, module: Any, train: Any, test: Any, run: RunConfig) -> dict[str, Any]:
        # the validation split holds out unlabelled points only (SemiSupervisedData.rows)
        held = held_out(len(train), run.validation)
        out = {"labels": train.num_labelled, "unlabelled": len(train) - held, "validation_rows": held,
               "alpha": run.options.alpha,
               "labelled_weight": run.options.labelled_weight}
        keep = test.y >= 0 if test.y is not None else None  # a .npz's y split 80/20 may leave -1 test rows
        if keep is not None and bool(keep.any()):
            x, y = test.data[keep], test.y[keep]
            device = next(module.parameters()).device
            pred = torch.cat([module.classify(x[i : i + 1000].to(device)).cpu() for i in range(0, len(x), 1000)])
            out["test_classification_error"] = float((pred != y).float().mean())
        return out

    def figures(self, run_dir: Path, module: Any, train: Any, test: Any, run: RunConfig) -> list[Any]:
        shape, k = train.image_shape, module.num_classes
        device = next(module.parameters()).device
        x = test.data[:10].to(device)
        # rows: a test image, then its style drawn as every class
        cells = [torch.cat([x[i : i + 1], module.style_transfer(x[i].expand(k, -1), torch.arange(k))]) for i in range(len(x))]
        save_image_grid(torch.cat(cells), shape, run_dir / "style_transfer.png", nrow=k + 1,
                        title="test image (left), its style z drawn as classes 0..9")
        torch.manual_seed(run.seed)
        samples = torch.cat([module.sample(k, y=c) for c in range(k)])
        save_image_grid(samples, shape, run_dir / "samples_per_class.png", nrow=k,
                        title="samples E[x|y,z], z ~ N(0,I): one row per class y", row_labels=[str(c) for c in range(k)])
        return ["style_transfer.png", "samples_per_class.png"]


def _num_classes(train, test):
    ys = [t.y for t in (train, test) if t.y is not None]
    return int(max(int(y.max()) for y in ys)) + 1


RECIPE = M2Recipe()
