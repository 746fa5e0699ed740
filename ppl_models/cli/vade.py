"""``pplm train vade --clusters K``: VaDE, a VAE with a Gaussian-mixture prior, for clustering."""

from inference import batching
from inference.errors import UsageError
from inference.metrics import cluster_accuracy

from ..vade import VaDE
from ..vade_init import initialise
from .base import ModelCommand, non_negative_int, positive_float, positive_int, register


def save_latent_projection(z, clusters, path, labels=None, title=None):
    """Scatter the first two principal components of the codes ``z`` (N, L), coloured by ``clusters``.

    With ``labels`` the title also gives the clustering accuracy against them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.decomposition import PCA

    from inference.plots import _save

    z = z.detach().cpu().double().numpy()
    clusters = np.asarray(clusters.detach().cpu() if hasattr(clusters, "detach") else clusters)
    xy = PCA(n_components=2).fit_transform(z) if z.shape[1] > 2 else np.pad(z, ((0, 0), (0, 2 - z.shape[1])))
    fig, ax = plt.subplots(figsize=(6, 5))
    k = int(clusters.max()) + 1
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    for c in range(k):
        sel = clusters == c
        if sel.any():
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=cmap(c % cmap.N), label=str(c), alpha=0.7, linewidths=0)
    ax.set_xlabel("PC 1 of the latent means")
    ax.set_ylabel("PC 2")
    ax.legend(title="cluster", markerscale=3, fontsize=7, loc="best", ncol=2 if k > 10 else 1)
    if labels is not None:
        from inference.metrics import cluster_accuracy

        title = (title or "") + f" (ACC {cluster_accuracy(labels, clusters):.3f})"
    if title:
        ax.set_title(title)
    return _save(fig, path)


@register
class VaDECommand(ModelCommand):
    name = "vade"
    help = "VaDE: VAE with a learned Gaussian-mixture prior (clustering); AE pretraining + t-SNE/GMM initialisation"
    default_binarize = "none"
    default_epochs = 150
    default_batch_size = 128
    default_lr = 2e-3

    def add_arguments(self, p):
        p.add_argument("--clusters", type=positive_int, default=10, help="number of mixture components K")
        p.add_argument("--likelihood", default="normal:0.3", help="bernoulli, cbernoulli, normal[:S|:learned], laplace[:S]")
        p.add_argument("--latent-dim", type=positive_int, default=10)
        p.add_argument("--hidden", type=positive_int, nargs="+", default=[256, 256], help="MLP hidden widths")
        p.add_argument("--arch", choices=("mlp", "conv"), default="mlp")
        p.add_argument("--min-scale", type=positive_float, default=1e-3, help="floor of the components' std devs")
        p.add_argument("--pretrain-epochs", type=non_negative_int, default=50, help="autoencoder pretraining epochs")
        p.add_argument("--pretrain-lr", type=positive_float, default=1e-3)
        p.add_argument("--pretrain-dropout", type=float, default=0.2, help="input dropout of the denoising pretraining")
        p.add_argument("--init", choices=("tsne", "gmm"), default="tsne",
                       help="mixture initialisation: tsne (a GMM in a 2-D t-SNE map moved to the latent space) or "
                            "gmm (EM on the codes, as the VaDE paper)")
        p.add_argument("--embed", choices=("codes", "inputs"), default="codes", help="what --init tsne embeds")
        p.add_argument("--embed-points", type=positive_int, default=10000,
                       help="points embedded by t-SNE (a seeded random subset beyond that)")
        p.add_argument("--perplexity", type=positive_float, default=30.0, help="t-SNE perplexity")
        p.add_argument("--align-epochs", type=non_negative_int, default=0,
                       help="epochs pulling the codes towards the t-SNE map's clusters before SVI (VaDE.align)")
        p.add_argument("--align-weight", type=float, default=100.0, help="weight of the cross-entropy in the alignment")
        p.add_argument("--gmm-restarts", type=positive_int, default=5, help="EM restarts of the initial GMM")
        p.add_argument("--init-candidates", type=positive_int, default=1,
                       help="initialisations tried; the highest training ELBO after --select-epochs of SVI is kept")
        p.add_argument("--select-epochs", type=positive_int, default=10, help="SVI epochs per candidate (with --init-candidates > 1)")

    def check_args(self, args):
        if not 0 <= args.pretrain_dropout < 1:
            raise UsageError(f"--pretrain-dropout must lie in [0, 1), got {args.pretrain_dropout}")
        if args.init == "tsne" and args.embed_points <= args.clusters:
            raise UsageError(f"--embed-points {args.embed_points} must exceed --clusters {args.clusters}")
        if args.align_weight < 0:
            raise UsageError(f"--align-weight must be non-negative, got {args.align_weight}")
        if args.align_epochs and args.init != "tsne":
            raise UsageError("--align-epochs aligns to the t-SNE map's clusters: it needs --init tsne")
        if args.pretrain_epochs == 0:
            raise UsageError("--pretrain-epochs 0 leaves the mixture fitted to random codes; VaDE needs pretraining")

    def build(self, args, train):
        if args.clusters > len(train):
            raise UsageError(f"--clusters {args.clusters} exceeds the {len(train)} training points")
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

    def rebuild(self, config):
        return VaDE.from_config(config["module"])

    def before_fit(self, module, train, args, device):
        """Pretrain the autoencoder and set the mixture (``--init``: from a t-SNE map or a GMM on the codes)."""
        module.to(device)
        info = initialise(
            module,
            batching.to_device(train, device),
            pretrain_epochs=args.pretrain_epochs,
            batch_size=args.batch_size,
            lr=args.pretrain_lr,
            dropout=args.pretrain_dropout,
            restarts=args.gmm_restarts,
            seed=args.seed,
            candidates=args.init_candidates,
            select_epochs=args.select_epochs,
            select_lr=args.lr,
            init=args.init,
            embed=args.embed,
            embed_points=args.embed_points,
            perplexity=args.perplexity,
            align_epochs=args.align_epochs,
            align_weight=args.align_weight,
            progress=not getattr(args, "quiet", False),
        )
        if train.y is not None:
            x = batching.fixed_view(train).to(device)
            info["init_train_acc"] = cluster_accuracy(train.y, module.cluster(x))
        return info

    def metrics(self, module, train, test, args):
        """Clustering accuracy (Hungarian), NMI and ARI of q(c | x) on the training and test sets."""
        from inference.metrics import clustering_scores

        device = next(module.parameters()).device
        out = {"cluster_weights": module.mixture_weights.detach().cpu().tolist()}
        for split_name, split in (("train", train), ("test", test)):
            if split.y is not None:
                pred = module.cluster(split.data.to(device))
                out.update({f"{split_name}_{k}": v for k, v in clustering_scores(split.y, pred).items()})
        return out

    def figures(self, run_dir, module, train, test, args):
        """Samples per cluster (one row each) and the PCA of the test set's latent means coloured by cluster."""
        from inference.plots import save_image_grid

        outputs = []
        shape = train.image_shape
        if shape is not None and len(shape) == 3:
            import torch

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
