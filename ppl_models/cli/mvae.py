"""``pplm train mvae`` (multimodal VAE with a chosen fusion rule), its ``pplm generate`` (cross-modal grids) and
``pplm impute`` (fill a file's missing modalities).

Data: a built-in set (:data:`ppl_models.multimodal_data.MULTIMODAL_DATASETS`) or your own ``.npz`` file
(:func:`ppl_models.multimodal_data.load_multimodal_file`) with each modality declared by
``--modality NAME=LIKELIHOOD`` (and ``--shape NAME=HxW``), or a TOML spec file naming the ``.npz``
(:func:`ppl_models.multimodal_data.read_spec`)::

    pplm train mvae --dataset data.npz --modality top=bernoulli --modality img=normal:0.3 --shape img=8x8 \
        --standardize --weights top=1,img=2 --objective cross --out runs/mine
    pplm impute runs/mine --dataset data.npz --out filled.npz
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch

from inference.errors import UsageError
from inference.metrics import modality_classifiers, multimodal_metrics
from inference.plots import generation_grid, save_image_grid

from ..data import BINARIZE
from ..experts import RULES
from ..multimodal import OBJECTIVES, SUBSET_WEIGHTS, MultimodalVAE
from ..multimodal_data import (
    MULTIMODAL_DATASETS,
    impute_file,
    load_multimodal,
    load_multimodal_file,
    parse_assignments,
    parse_weights,
    read_spec,
)
from .options import number, positive_float, positive_int
from .recipe import Recipe, RunConfig, default_list


def file_source(run: RunConfig) -> Any:
    """None for a built-in dataset; else {"file", "modalities", "shapes", "standardize", "weights"} of the
    run's ``.npz`` file (options) or TOML spec file. Raises UsageError (one line) for malformed options."""
    o, name = run.options, str(run.dataset)
    if name in MULTIMODAL_DATASETS:
        if o.modality or o.shape or o.standardize:
            raise UsageError("--modality, --shape and --standardize describe your own .npz file; "
                             f"{name} is a built-in dataset")
        return None
    if name.endswith(".toml"):
        if o.modality or o.shape:
            raise UsageError(f"{name} declares the modalities; drop --modality/--shape")
        spec = read_spec(name)
        if o.weights is not None and spec["weights"] is not None:
            raise UsageError(f"{name} sets weights; drop --weights")
        spec["standardize"] = spec["standardize"] or o.standardize
        spec["weights"] = spec["weights"] if o.weights is None else parse_weights(o.weights)
        return spec
    if name.endswith(".npz"):
        return {"file": Path(name), "modalities": parse_assignments(o.modality, "--modality"),
                "shapes": parse_assignments(o.shape, "--shape"), "standardize": o.standardize,
                "weights": parse_weights(o.weights)}
    raise UsageError(f"unknown multimodal dataset {name!r}; valid: {', '.join(MULTIMODAL_DATASETS)}, "
                     "a .npz file or a .toml spec file")


@dataclass
class MVAEOptions:
    modalities: int = 3
    data_seed: int = 0
    max_train: int | None = None
    max_test: int | None = None
    rule: str = "mopoe"
    rho: float | None = None
    prior_expert: bool = False
    objective: str = "subset"
    subset_weights: str = "uniform"
    subset_entropy: float = 1.0
    likelihood: str | None = None
    latent_dim: int = 16
    private_dim: int = 0
    hidden: list = default_list([256])
    arch: str = "mlp"
    beta: float = 1.0
    classifier: str = "logistic"
    modality: list = default_list([])
    shape: list = default_list([])
    standardize: bool = False
    weights: str | None = None


def add_options(p: Any) -> None:
    d = MVAEOptions()
    p.add_argument("--dataset", default="digits-halves",
                   help=f"{' | '.join(MULTIMODAL_DATASETS)}, your own FILE.npz (with --modality) or a SPEC.toml")
    p.add_argument("--modality", action="append", default=[], metavar="NAME=LIKELIHOOD",
                   help="a modality of your .npz (array x_NAME): bernoulli, cbernoulli, normal[:S], laplace[:S], "
                        "categorical[:K]; repeat for each")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=HxW",
                   help="image shape of a modality of your .npz (HxW or CxHxW)")
    p.add_argument("--standardize", action="store_true",
                   help="rescale normal/laplace modalities of your .npz to mean 0, sd 1 per feature (training rows)")
    p.add_argument("--weights", default=None, metavar="NAME=W,...|auto",
                   help="per-modality likelihood weights (auto: max dimension / dimension); != 1 is no bound")
    p.add_argument("--data-root", default=None, help="folder holding MNIST/raw (mnist-label, polymnist)")
    p.add_argument("--download", action="store_true", help="allow torchvision to download missing files")
    p.add_argument("--binarize", choices=BINARIZE, default=MVAERecipe.default_binarize, help="image modalities")
    p.add_argument("--modalities", type=positive_int, default=d.modalities, help="polymnist views (2..5)")
    p.add_argument("--data-seed", type=int, default=d.data_seed, help="seed of the PolyMNIST-like construction")
    p.add_argument("--max-train", type=positive_int, default=d.max_train, help="keep the first N training tuples")
    p.add_argument("--max-test", type=positive_int, default=d.max_test, help="keep the first N test tuples")
    p.add_argument("--rule", choices=RULES, default=d.rule)
    p.add_argument("--rho", type=number, default=d.rho, help="CoDE's expert error correlation in (-1/(M-1), 1)")
    p.add_argument("--prior-expert", action="store_true", help="N(0, I) joins PoE/MoPoE as an expert")
    p.add_argument("--objective", choices=OBJECTIVES, default=d.objective)
    p.add_argument("--subset-weights", choices=SUBSET_WEIGHTS, default=d.subset_weights)
    p.add_argument("--subset-entropy", type=number, default=d.subset_entropy)
    p.add_argument("--likelihood", default=d.likelihood,
                   help="image likelihood: bernoulli, cbernoulli, laplace[:S], normal[:S]")
    p.add_argument("--latent-dim", type=positive_int, default=d.latent_dim)
    p.add_argument("--private-dim", type=int, default=d.private_dim, help="modality-specific latent size (0: none)")
    p.add_argument("--hidden", type=positive_int, nargs="+", default=d.hidden)
    p.add_argument("--arch", choices=("mlp", "conv"), default=d.arch)
    p.add_argument("--beta", type=positive_float, default=d.beta)
    p.add_argument("--classifier", choices=("logistic", "mlp", "cnn"), default=d.classifier, help="coherence judge")


class MVAERecipe(Recipe):
    name = "mvae"
    help = ("multimodal VAE: PoE, MoE, MoPoE or CoDE(rho) fusion, joint, subset or cross objective, incomplete "
            "samples, your own .npz, cross-modal generation")
    model_class = MultimodalVAE
    Options = MVAEOptions
    default_epochs = 100
    default_batch_size = 128

    def check(self, run: RunConfig) -> None:
        args = run.options
        if args.rho is not None and args.rule != "code":
            raise UsageError(f"--rho is CoDE's parameter; --rule {args.rule} takes none")
        source = file_source(run)
        if run.elbo.split(":")[0] in ("iwae", "renyi") and (args.objective != "joint" or args.beta != 1.0
                                                              or args.weights is not None
                                                              or (source or {}).get("weights") is not None):
            raise UsageError("iwae/renyi need --objective joint, --beta 1 and no --weights (the subset or cross "
                             "sum, beta and the weights would sit inside the log-sum-exp, which is no bound)")
        if args.private_dim < 0:
            raise UsageError(f"--private-dim must be >= 0, got {args.private_dim}")
        if source is not None and (args.likelihood or run.binarize != "none"):
            raise UsageError("with your own file each --modality declares its likelihood: drop --likelihood and "
                             "--binarize")

    def load_data(self, run: RunConfig) -> Any:
        o = run.options
        source = file_source(run)
        if source is not None:
            return load_multimodal_file(source["file"], source["modalities"], shapes=source["shapes"],
                                        standardize=source["standardize"], seed=o.data_seed,
                                        max_train=o.max_train, max_test=o.max_test)
        return load_multimodal(run.dataset, data_root=run.data_root, views=o.modalities, binarize=run.binarize,
                               seed=o.data_seed, max_train=o.max_train, max_test=o.max_test, download=run.download)

    def build(self, run: RunConfig, train: Any) -> Any:
        args = run.options
        source = file_source(run)
        specs = [dict(m) for m in train.modalities]
        if args.likelihood:
            for m in specs:
                if m["likelihood"] != "categorical":
                    m["likelihood"] = args.likelihood
        if source is None and run.binarize == "none" and any(m["likelihood"] == "bernoulli" for m in specs):
            raise UsageError("the bernoulli likelihood needs --binarize fixed|dynamic (or use cbernoulli)")
        return MultimodalVAE(
            specs, latent_dim=args.latent_dim, hidden=args.hidden, rule=args.rule, rho=args.rho or 0.0,
            prior_expert=args.prior_expert, objective=args.objective, subset_weights=args.subset_weights,
            subset_entropy=args.subset_entropy, beta=args.beta, private_dim=args.private_dim, arch=args.arch,
            weights=source["weights"] if source else parse_weights(args.weights),
        )

    def metrics(self, module: Any, train: Any, test: Any, run: RunConfig) -> dict[str, Any]:
        out = {"likelihood_weights": module.weights}
        if train.scaling:
            out["standardized"] = {k: {"mean": m.tolist(), "std": s.tolist()} for k, (m, s) in train.scaling.items()}
        if train.mask is not None or test.mask is not None:
            out["missing_fraction"] = {
                split: {n: float(1 - d.mask[:, i].double().mean()) if d.mask is not None else 0.0
                        for i, n in enumerate(module.names)} for split, d in (("train", train), ("test", test))}
        if train.y is None or test.y is None:
            return out  # no classes: no coherence
        classifiers, accuracy = modality_classifiers(train.data, train.y, test.data, test.y,
                                                     kind=run.options.classifier)
        # the test ELBO and log-likelihood are the run's: not scored twice
        out.update(multimodal_metrics(module, train.data, train.y, test.data, test.y, classifiers,
                                      particles=min(run.particles, 100), seed=run.seed))
        out["classifier_accuracy"] = accuracy
        out["coherence_particles"] = out.pop("particles")
        return out

    def figures(self, run_dir: Path, module: Any, train: Any, test: Any, run: RunConfig) -> Any:
        images = [n for n in module.names if module.specs[n]["image_shape"]]
        written = []
        if images:
            given = images[0]
            generation_grid(module, test.data, given, [n for n in module.names if n != given],
                            run_dir / "generation.png", image_shapes=module.image_shapes, title=f"generated from {given}")
            pyro.set_rng_seed(run.seed)
            self.save_samples(module, 10, run_dir / "samples.png")
            written = ["generation.png", "samples.png"]
        return written

    def save_samples(self, module: Any, n: int, path: str | Path, module_config: dict[str, Any] | None = None) -> Any:
        """Joint draws from the prior: one row per image modality (those sharing the first one's shape)."""
        images = [m for m in module.names if module.specs[m]["image_shape"]]
        if not images:
            raise UsageError("this mvae run has no image modality to draw")
        shape = module.specs[images[0]]["image_shape"]
        same = [m for m in images if module.specs[m]["image_shape"] == shape]
        draws = module.sample(n)
        return save_image_grid(torch.cat([draws[m].cpu() for m in same]), shape, path, nrow=n, row_labels=same,
                               title="joint draws from the prior (E[x|z])")

    def generate(self, module: Any, run: RunConfig, given: Any, target: Any, out_file: str | Path, *, n: int = 10,
                 seed: int = 0) -> Any:
        """``pplm generate``: a grid of the run's first ``n`` test tuples' ``given`` modalities and ``target``
        generated from them. ``given`` and ``target`` are comma-separated modality names; anything else
        raises UsageError (before the data are loaded)."""
        given = [g for g in given.split(",") if g]
        targets = [t for t in target.split(",") if t]
        unknown = [m for m in given + targets if m not in module.names]
        if unknown or not given or not targets:
            raise UsageError(f"--given and --target take modality names among {module.names}, got {given} / {targets}")
        _, test = self.load_data(run)
        return generation_grid(module, test.data, given, targets, out_file, image_shapes=module.image_shapes, n=n,
                               seed=seed, title=f"{module.rule}: {'+'.join(given)} -> {'+'.join(targets)}")


    def impute(self, module: Any, run: RunConfig, dataset: Any, out_file: str | Path) -> Any:
        """``pplm impute``: fill the absent entries of ``dataset`` (a .npz with the run's modalities) by
        cross-modal generation and write ``out_file``; the run's standardisation is applied and undone.
        Returns the number of (row, modality) entries filled."""
        source = file_source(run)
        if source is None:
            raise UsageError(f"impute needs a run trained on your own .npz file, not the built-in {run.dataset}")
        train, _ = self.load_data(run) if source["standardize"] else (None, None)
        return impute_file(module, dataset, out_file, source["modalities"], shapes=source["shapes"],
                           scaling=train.scaling if train is not None else None)


RECIPE = MVAERecipe()
