"""``pplm train vae``: the VAE's options and its run recipe (figures: prior samples, test reconstructions)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference.errors import UsageError
from inference.plots import save_image_grid

from ..flows import parse_guide
from ..vae import VAE
from .options import add_data_options, positive_float, positive_int
from .recipe import Recipe, RunConfig, default_list


@dataclass
class VAEOptions:
    likelihood: str = "bernoulli"
    latent_dim: int = 16
    hidden: list = default_list([256])
    arch: str = "mlp"
    beta: float = 1.0
    guide: str = "diag"


def guide_spec(text: str) -> str:
    """argparse type of ``--guide``: a spec :func:`ppl_models.flows.parse_guide` accepts."""
    try:
        parse_guide(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_options(p: Any) -> None:
    d = VAEOptions()
    add_data_options(p, binarize=VAERecipe.default_binarize)
    p.add_argument("--likelihood", default=d.likelihood, help="bernoulli, cbernoulli, normal[:S|:learned], laplace[:S]")
    p.add_argument("--latent-dim", type=positive_int, default=d.latent_dim)
    p.add_argument("--hidden", type=positive_int, nargs="+", default=d.hidden, help="MLP hidden widths")
    p.add_argument("--arch", choices=("mlp", "conv"), default=d.arch)
    p.add_argument("--beta", type=positive_float, default=d.beta, help="KL weight (beta != 1 is not a bound on log p(x))")
    p.add_argument("--guide", type=guide_spec, default=d.guide,
                   help="q(z|x): diag (Gaussian), iaf:K (K inverse-autoregressive-flow steps, Kingma et al. 2016) "
                        "or spline:K (neural spline flow steps, Durkan et al. 2019)")


class VAERecipe(Recipe):
    name = "vae"
    help = "variational autoencoder (Bernoulli, continuous-Bernoulli, Normal or Laplace likelihood; beta weight)"
    model_class = VAE
    Options = VAEOptions
    default_binarize = "dynamic"
    default_epochs = 200
    default_batch_size = 64

    def build(self, run: RunConfig, train: Any) -> Any:
        o = run.options
        return VAE(
            train.dim,
            latent_dim=o.latent_dim,
            hidden=o.hidden,
            likelihood=o.likelihood,
            beta=o.beta,
            arch=o.arch,
            image_shape=train.image_shape,
            guide=o.guide,
        )

    def figures(self, run_dir: Path, module: Any, train: Any, test: Any, run: RunConfig) -> list[Any]:
        shape = train.image_shape
        samples = module.sample(100)
        save_image_grid(samples, shape, run_dir / "samples.png", nrow=10, title="samples from the prior (E[x|z])")
        x = test.data[:50].to(samples.device)
        recon = module.reconstruct(x)
        rows = [t for i in range(0, 50, 10) for t in (x[i : i + 10], recon[i : i + 10])]
        save_image_grid(torch.cat(rows), shape, run_dir / "reconstructions.png", nrow=10,
                        title="test images (odd rows) and reconstructions (even rows)")
        return ["samples.png", "reconstructions.png"]


RECIPE = VAERecipe()
