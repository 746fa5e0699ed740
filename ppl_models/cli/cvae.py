"""``pplm train cvae``: the conditional VAE (Sohn et al. 2015), conditioned on the class or on the top half of
an image; figures: samples per class, or completions of test images' bottom halves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference.errors import UsageError
from inference.plots import save_image_grid

from ..cvae import CONDITIONS, CVAE, PRIORS, ConditionalData
from ..data import load_dataset
from .options import add_data_options, positive_int
from .recipe import Recipe, RunConfig, default_list


@dataclass
class CVAEOptions:
    condition: str = "class"
    prior: str = "learned"
    latent_dim: int = 16
    hidden: list = default_list([256])
    likelihood: str = "bernoulli"


def add_options(p: Any) -> None:
    d = CVAEOptions()
    add_data_options(p, binarize=CVAERecipe.default_binarize)
    p.add_argument("--condition", choices=CONDITIONS, default=d.condition,
                   help="y: the class label (one-hot), or the top half of the image (x is then the bottom half)")
    p.add_argument("--prior", choices=PRIORS, default=d.prior, help="p(z|y) learned, or N(0,I)")
    p.add_argument("--latent-dim", type=positive_int, default=d.latent_dim)
    p.add_argument("--hidden", type=positive_int, nargs="+", default=d.hidden, help="MLP hidden widths")
    p.add_argument("--likelihood", default=d.likelihood, help="bernoulli, cbernoulli, normal[:S|:learned], laplace[:S]")


class CVAERecipe(Recipe):
    name = "cvae"
    help = "conditional VAE (Sohn et al. 2015): p(x|y,z), q(z|x,y), prior p(z|y) or N(0,I); y a class or the top half"
    model_class = CVAE
    Options = CVAEOptions
    default_binarize = "dynamic"
    default_epochs = 100
    default_batch_size = 64

    def load_data(self, run: RunConfig) -> Any:
        train, test = load_dataset(run.dataset, data_root=run.data_root, binarize=run.binarize, download=run.download)
        condition = run.options.condition
        if condition == "class" and train.y is not None and test.y is not None and len(train.y) and len(test.y):
            seen, wanted = int(train.y.max()), int(test.y.max())
            if wanted > seen:
                raise UsageError(f"the test split has class {wanted} but the training split's classes stop at {seen}: "
                                 "a class condition can only be learned for classes the training split holds")
        return ConditionalData(train, condition), ConditionalData(test, condition)

    def build(self, run: RunConfig, train: Any) -> Any:
        o = run.options
        classes = None
        if o.condition == "class":
            classes = max(int(train.split.y.max()) + 1, 2)
        return CVAE(train.dim, y_dim=train.y_dim, num_classes=classes, latent_dim=o.latent_dim, hidden=o.hidden,
                    likelihood=o.likelihood, prior=o.prior, image_shape=train.image_shape)

    def figures(self, run_dir: Path, module: Any, train: Any, test: Any, run: RunConfig) -> list[Any]:
        device = next(module.parameters()).device
        torch.manual_seed(run.seed)
        if run.options.condition == "class":
            k = module.num_classes
            samples = torch.cat([module.sample(10, y=c) for c in range(k)])
            save_image_grid(samples, train.image_shape, run_dir / "samples_per_class.png", nrow=10,
                            title="samples E[x|y,z], z ~ p(z|y): one row per class y",
                            row_labels=[str(c) for c in range(k)])
            return ["samples_per_class.png"]
        data = test.data
        x, y = data["x"][:10].to(device), data["y"][:10].to(device)
        c, h, w = test.split.image_shape
        rows = []
        for i in range(len(x)):
            top = y[i].reshape(c, -1)
            bottoms = [x[i]] + [module.sample(1, y=y[i])[0] for _ in range(5)]
            rows += [torch.cat([top, b.reshape(c, -1)], -1).reshape(-1) for b in bottoms]
        save_image_grid(torch.stack(rows), (c, h, w), run_dir / "completions.png", nrow=6,
                        title="test image (left), five bottom halves drawn from p(x_bottom | x_top)")
        return ["completions.png"]

    def save_samples(self, module: Any, n: int, path: str | Path, module_config: dict[str, Any] | None = None) -> Any:
        """``pplm sample``: ``n`` draws, classes cycling through 0..K-1 (a class condition only)."""
        if module.num_classes is None:
            raise UsageError("pplm sample needs a class-conditioned cvae; a top-half cvae completes images "
                             "(see its completions.png)")
        shape = (module_config or {}).get("image_shape")
        if shape is None:
            raise UsageError("this cvae run stores no image shape")
        y = torch.arange(n) % module.num_classes
        return save_image_grid(module.sample(n, y=y), shape, path, nrow=module.num_classes)


RECIPE = CVAERecipe()
