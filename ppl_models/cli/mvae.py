"""``pplm train mvae`` (multimodal VAE with a chosen fusion rule) and ``pplm generate`` (cross-modal grids)."""

import argparse

import pyro
import torch

from inference.errors import UsageError
from inference.metrics import modality_classifiers, multimodal_metrics
from inference.plots import generation_grid, save_image_grid

from ..data import BINARIZE
from ..experts import RULES
from ..multimodal import OBJECTIVES, SUBSET_WEIGHTS, MultimodalVAE
from ..multimodal_data import MULTIMODAL_DATASETS, load_multimodal
from .base import ModelCommand, positive_float, positive_int, register


def _float(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


@register
class MVAECommand(ModelCommand):
    name = "mvae"
    help = "multimodal VAE: PoE, MoE, MoPoE or CoDE(rho) fusion, joint or subset ELBO, cross-modal generation"
    default_epochs = 100
    default_batch_size = 128

    def add_data_arguments(self, p):
        p.add_argument("--dataset", default="digits-halves", choices=MULTIMODAL_DATASETS)
        p.add_argument("--data-root", default=None, help="folder holding MNIST/raw (mnist-label, polymnist)")
        p.add_argument("--download", action="store_true", help="allow torchvision to download missing files")
        p.add_argument("--binarize", choices=BINARIZE, default="none", help="image modalities")
        p.add_argument("--modalities", type=positive_int, default=3, help="polymnist views (2..5)")
        p.add_argument("--data-seed", type=int, default=0, help="seed of the PolyMNIST-like construction")
        p.add_argument("--max-train", type=positive_int, default=None, help="keep the first N training tuples")
        p.add_argument("--max-test", type=positive_int, default=None, help="keep the first N test tuples")

    def add_arguments(self, p):
        p.add_argument("--rule", choices=RULES, default="mopoe")
        p.add_argument("--rho", type=_float, default=None, help="CoDE's expert error correlation in (-1/(M-1), 1)")
        p.add_argument("--prior-expert", action="store_true", help="N(0, I) joins PoE/MoPoE as an expert")
        p.add_argument("--objective", choices=OBJECTIVES, default="subset")
        p.add_argument("--subset-weights", choices=SUBSET_WEIGHTS, default="uniform")
        p.add_argument("--subset-entropy", type=_float, default=1.0)
        p.add_argument("--likelihood", default=None, help="image likelihood: bernoulli, cbernoulli, laplace[:S], normal[:S]")
        p.add_argument("--latent-dim", type=positive_int, default=16)
        p.add_argument("--private-dim", type=int, default=0, help="modality-specific latent size (0: none)")
        p.add_argument("--hidden", type=positive_int, nargs="+", default=[256])
        p.add_argument("--arch", choices=("mlp", "conv"), default="mlp")
        p.add_argument("--beta", type=positive_float, default=1.0)
        p.add_argument("--classifier", choices=("logistic", "mlp", "cnn"), default="logistic", help="coherence judge")

    def check_args(self, args):
        if args.rho is not None and args.rule != "code":
            raise UsageError(f"--rho is CoDE's parameter; --rule {args.rule} takes none")
        if args.elbo.split(":")[0] in ("iwae", "renyi") and (args.objective == "subset" or args.beta != 1.0):
            raise UsageError("iwae/renyi need --objective joint and --beta 1 (the subset sum and beta would sit "
                             "inside the log-sum-exp, which is no bound)")
        if args.private_dim < 0:
            raise UsageError(f"--private-dim must be >= 0, got {args.private_dim}")

    def load_data(self, args):
        return load_multimodal(args.dataset, data_root=args.data_root, views=args.modalities,
                               binarize=args.binarize, seed=args.data_seed, max_train=args.max_train,
                               max_test=args.max_test, download=args.download)

    def build(self, args, train):
        specs = [dict(m) for m in train.modalities]
        if args.likelihood:
            for m in specs:
                if m["likelihood"] != "categorical":
                    m["likelihood"] = args.likelihood
        if args.binarize == "none" and any(m["likelihood"] == "bernoulli" for m in specs):
            raise UsageError("the bernoulli likelihood needs --binarize fixed|dynamic (or use cbernoulli)")
        return MultimodalVAE(
            specs, latent_dim=args.latent_dim, hidden=args.hidden, rule=args.rule, rho=args.rho or 0.0,
            prior_expert=args.prior_expert, objective=args.objective, subset_weights=args.subset_weights,
            subset_entropy=args.subset_entropy, beta=args.beta, private_dim=args.private_dim, arch=args.arch,
        )

    def rebuild(self, config):
        return MultimodalVAE.from_config(config["module"])

    def metrics(self, module, train, test, args):
        classifiers, accuracy = modality_classifiers(train.data, train.y, test.data, test.y, kind=args.classifier)
        # the test ELBO and log-likelihood are runs.py's: not scored twice
        out = multimodal_metrics(module, train.data, train.y, test.data, test.y, classifiers,
                                 particles=min(args.particles, 100), seed=args.seed)
        out["classifier_accuracy"] = accuracy
        out["coherence_particles"] = out.pop("particles")
        return out

    def figures(self, run_dir, module, train, test, args):
        images = [n for n in module.names if module.specs[n]["image_shape"]]
        written = []
        if images:
            given = images[0]
            generation_grid(module, test.data, given, [n for n in module.names if n != given],
                            run_dir / "generation.png", image_shapes=module.image_shapes, title=f"generated from {given}")
            pyro.set_rng_seed(args.seed)
            self.save_samples(module, 10, run_dir / "samples.png")
            written = ["generation.png", "samples.png"]
        return written

    def save_samples(self, module, n, path, config=None):
        """Joint draws from the prior: one row per image modality (those sharing the first one's shape)."""
        images = [m for m in module.names if module.specs[m]["image_shape"]]
        if not images:
            raise UsageError("this mvae run has no image modality to draw")
        shape = module.specs[images[0]]["image_shape"]
        same = [m for m in images if module.specs[m]["image_shape"] == shape]
        draws = module.sample(n)
        return save_image_grid(torch.cat([draws[m].cpu() for m in same]), shape, path, nrow=n, row_labels=same,
                               title="joint draws from the prior (E[x|z])")


def generate_run(run_dir, given, target, out_file, *, n=10, device="auto", seed=0):
    """``pplm generate``: a grid of the run's test tuples' ``given`` modalities and ``target`` generated from them."""
    from ..runs import _command_and_args, _load_module
    from inference.train import resolve_device

    command, config, args = _command_and_args(run_dir)
    if config["model"] != "mvae":
        raise UsageError(f"{run_dir} holds a {config['model']!r} run; generate needs an mvae run")
    module, _ = _load_module(command, config, resolve_device(device))
    given = [g for g in given.split(",") if g]
    targets = [t for t in target.split(",") if t]
    unknown = [m for m in given + targets if m not in module.names]
    if unknown or not given or not targets:
        raise UsageError(f"--given and --target take modality names among {module.names}, got {given} / {targets}")
    _, test = command.load_data(args)
    return generation_grid(module, test.data, given, targets, out_file, image_shapes=module.image_shapes, n=n,
                           seed=seed, title=f"{config['module']['rule']}: {'+'.join(given)} -> {'+'.join(targets)}")
