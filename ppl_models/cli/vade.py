"""``pplm train vade --clusters K``: VaDE, a VAE with a Gaussian-mixture prior, for clustering."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference import batching, resolve_device
from inference.errors import UsageError
from inference.metrics import cluster_accuracy, clustering_scores
from inference.plots import save_image_grid, save_latent_projection

from ..vade import VaDE
from ..vade_init import PRECISIONS, initialise, resolve_precision
from .options import add_data_options, non_negative_int, positive_float, positive_int
from .recipe import Recipe, RunConfig, default_list


@dataclass
class VaDEOptions:
    clusters: int = 10
    likelihood: str = "normal:0.3"
    latent_dim: int = 10
    hidden: list = default_list([256, 256])
    arch: str = "mlp"
    min_scale: float = 1e-3
    pretrain_epochs: int = 50
    pretrain_lr: float = 1e-3
    pretrain_dropout: float = 0.2
    pretrain_validation: float = 0.0
    pretrain_patience: int | None = None
    init: str = "tsne"
    embed: str = "codes"
    embed_points: int = 10000
    perplexity: float = 30.0
    align_epochs: int = 0
    align_weight: float = 100.0
    gmm_restarts: int = 5
    init_candidates: int = 1
    select_epochs: int = 10
    precision: str = "auto"


def add_options(p: Any) -> None:
    d = VaDEOptions()
    add_data_options(p, binarize=VaDERecipe.default_binarize)
    p.add_argument("--clusters", type=positive_int, default=d.clusters, help="number of mixture components K")
    p.add_argument("--likelihood", default=d.likelihood, help="bernoulli, cbernoulli, normal[:S|:learned], laplace[:S]")
    p.add_argument("--latent-dim", type=positive_int, default=d.latent_dim)
    p.add_argument("--hidden", type=positive_int, nargs="+", default=d.hidden, help="MLP hidden widths")
    p.add_argument("--arch", choices=("mlp", "conv"), default=d.arch)
    p.add_argument("--min-scale", type=positive_float, default=d.min_scale, help="floor of the components' std devs")
    p.add_argument("--pretrain-epochs", type=non_negative_int, default=d.pretrain_epochs,
                   help="autoencoder pretraining epochs")
    p.add_argument("--pretrain-lr", type=positive_float, default=d.pretrain_lr)
    p.add_argument("--pretrain-dropout", type=float, default=d.pretrain_dropout,
                   help="input dropout of the denoising pretraining")
    p.add_argument("--pretrain-validation", type=float, default=d.pretrain_validation,
                   help="fraction of the points held out of the pretraining to watch its reconstruction")
    p.add_argument("--pretrain-patience", type=positive_int, default=d.pretrain_patience,
                   help="stop pretraining after this many epochs without a held-out improvement and keep the best "
                        "epoch (needs --pretrain-validation)")
    p.add_argument("--init", choices=("tsne", "gmm"), default=d.init,
                   help="mixture initialisation: tsne (a GMM in a 2-D t-SNE map moved to the latent space) or "
                        "gmm (EM on the codes, as the VaDE paper)")
    p.add_argument("--embed", choices=("codes", "inputs"), default=d.embed, help="what --init tsne embeds")
    p.add_argument("--embed-points", type=positive_int, default=d.embed_points,
                   help="points embedded by t-SNE (a seeded random subset beyond that)")
    p.add_argument("--perplexity", type=positive_float, default=d.perplexity, help="t-SNE perplexity")
    p.add_argument("--align-epochs", type=non_negative_int, default=d.align_epochs,
                   help="epochs pulling the codes towards the t-SNE map's clusters before SVI (vade_init.align)")
    p.add_argument("--align-weight", type=float, default=d.align_weight,
                   help="weight of the cross-entropy in the alignment")
    p.add_argument("--gmm-restarts", type=positive_int, default=d.gmm_restarts, help="EM restarts of the initial GMM")
    p.add_argument("--init-candidates", type=positive_int, default=d.init_candidates,
                   help="initialisations tried; the highest training ELBO after --select-epochs of SVI is kept")
    p.add_argument("--select-epochs", type=positive_int, default=d.select_epochs,
                   help="SVI epochs per candidate (with --init-candidates > 1)")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="arithmetic of the pretraining and alignment: bf16 (mixed precision, the networks under "
                        "bfloat16 autocast), fp32, or auto (bf16 where the device has hardware bfloat16); SVI and "
                        "the ELBO stay float32")


class VaDERecipe(Recipe):
    name = "vade"
    help = "VaDE: VAE with a learned Gaussian-mixture prior (clustering); AE pretraining + t-SNE/GMM initialisation"
    model_class = VaDE
    Options = VaDEOptions
    default_binarize = "none"
    default_epochs = 150
    default_batch_size = 128
    default_lr = 2e-3

    def check(self, run: RunConfig) -> None:
        args = run.options
        if not 0 <= args.pretrain_dropout < 1:
            raise UsageError(f"--pretrain-dropout must lie in [0, 1), got {args.pretrain_dropout}")
        if args.init == "tsne" and args.embed_points <= args.clusters:
            raise UsageError(f"--embed-points {args.embed_points} must exceed --clusters {args.clusters}")
        if args.align_weight < 0:
            raise UsageError(f"--align-weight must be non-negative, got {args.align_weight}")
        if args.align_epochs and args.init != "tsne":
            raise UsageError("--align-epochs aligns to the t-SNE map's clusters: it needs --init tsne")
        if not 0 <= args.pretrain_validation < 1:
            raise UsageError(f"--pretrain-validation must lie in [0, 1), got {args.pretrain_validation}")
        if args.pretrain_patience is not None and not args.pretrain_validation:
            raise UsageError("--pretrain-patience needs --pretrain-validation (a held-out fraction above 0)")
        if args.pretrain_epochs == 0:
            raise UsageError("--pretrain-epochs 0 leaves the mixture fitted to random codes; VaDE needs pretraining")
        resolve_precision(args.precision, resolve_device(run.device))  # bf16 without the hardware: refused here

    def build(self, run: RunConfig, train: Any) -> Any:
        args = run.options
        if args.clusters > len(train):
            raise UsageError(f"--clusters {args.clusters} exceeds the {len(train)} training points")
        embedded = min(args.embed_points, len(train))
        if args.init == "tsne" and embedded <= max(args.perplexity, args.clusters):
            raise UsageError(f"t-SNE with --perplexity {args.perplexity:g} and --clusters {args.clusters} needs more "
                             f"than {max(args.perplexity, args.clusters):g} points to embed, got {embedded}")
        return VaDE(
            train.dim,
            n_clusters=args.clusters,
            latent_dim=args.latent_dim,
            hidden=args.hidden,
            likelihood=args.likelihood,
            arch=args.arch,
            image_shape=train.image_shape,
            min_scale=args.min_scale,
        )

    def before_fit(self, module: Any, train: Any, run: RunConfig, device: str | torch.device) -> Any:
        """Pretrain the autoencoder and set the mixture (``--init``: from a t-SNE map or a GMM on the codes)."""
        args = run.options
        module.to(device)
        info = initialise(
            module,
            batching.to_device(train, device),
            pretrain_epochs=args.pretrain_epochs,
            batch_size=run.batch_size,
            lr=args.pretrain_lr,
            dropout=args.pretrain_dropout,
            pretrain_validation=args.pretrain_validation,
            pretrain_patience=args.pretrain_patience,
            restarts=args.gmm_restarts,
            seed=run.seed,
            candidates=args.init_candidates,
            select_epochs=args.select_epochs,
            select_lr=run.lr,
            init=args.init,
            embed=args.embed,
            embed_points=args.embed_points,
            perplexity=args.perplexity,
            align_epochs=args.align_epochs,
            align_weight=args.align_weight,
            precision=args.precision,
            progress=not run.quiet,
        )
        if train.y is not None:
            x = batching.fixed_view(train).to(device)
            info["init_train_acc"] = cluster_accuracy(train.y, module.cluster(x))
        return info

    def metrics(self, module: Any, train: Any, test: Any, run: RunConfig) -> dict[str, Any]:
        """Clustering accuracy (Hungarian), NMI and ARI of q(c | x) on the training and test sets."""
        device = next(module.parameters()).device
        out = {"cluster_weights": module.mixture_weights.detach().cpu().tolist()}
        for split_name, split in (("train", train), ("test", test)):
            if split.y is not None:
                pred = module.cluster(split.data.to(device))
                out.update({f"{split_name}_{k}": v for k, v in clustering_scores(split.y, pred).items()})
        return out

    def figures(self, run_dir: Path, module: Any, train: Any, test: Any, run: RunConfig) -> Any:
        """Samples per cluster (one row each) and the PCA of the test set's latent means coloured by cluster."""
        outputs = []
        shape = train.image_shape
        if shape is not None and len(shape) == 3:
            n = 10
            rows = torch.cat([module.sample(n, component=c) for c in range(module.n_clusters)])
            save_image_grid(rows, shape, run_dir / "cluster_samples.png", nrow=n,
                            title="E[x | z], z ~ p(z | c): one row per cluster c",
                            row_labels=[str(c) for c in range(module.n_clusters)])
            outputs.append("cluster_samples.png")
        device = next(module.parameters()).device
        x = test.data.to(device)
        save_latent_projection(module.latent_means(x), module.cluster(x), run_dir / "latent_pca.png",
                               labels=test.y, title="test latent means, PCA, coloured by cluster")
        outputs.append("latent_pca.png")
        return outputs


RECIPE = VaDERecipe()
