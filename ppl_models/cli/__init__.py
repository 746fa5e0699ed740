"""``pplm``: train, evaluate and sample from the library's models.

    pplm [--verbose | --quiet] COMMAND ...     the library's log lines: debug too / warnings only
    pplm train <model> --out DIR [options]      train, evaluate, write the run folder
    pplm train <model> --config FILE --out DIR  options from a TOML/JSON file (or a run's config.json)
    pplm evaluate DIR [--particles K]            recompute a run's test metrics
    pplm sample DIR -n N --out FILE.png          a grid of samples from a run's model
    pplm generate DIR --given MOD[,MOD] --target MOD --out FILE.png
                                                 cross-modal generation from a multimodal run
    pplm impute DIR --dataset FILE.npz --out FILLED.npz
                                                 fill a file's missing modalities from an mvae run
    pplm embed DIR --split test --out codes.npz  a run's latent codes (posterior means and sds; .csv too)
    pplm explore DIR [--out DIR]                 figures of a run's latent space (traversals, interpolations,
                                                 manifold, 2-D map, activity)

Bad input (an unknown name, a missing data folder, data outside a likelihood's
support, a corrupt checkpoint, a folder that already holds a run, a path that
cannot be written, ...) gets one line on stderr and exit status 2, and nothing
on disk is changed; so does a run that diverges (its last good checkpoint is
kept). Warnings are shown once each, in one line.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from inference import distributed as parallel
from inference.errors import UsageError

from .. import __version__
from .config_file import expand_config
from .latent import MAP_METHODS, SPLITS, embed_run, explore_run
from .options import (
    Parser,
    add_training_options,
    draws_int,
    is_rank0,
    out_path,
    positive_int,
    run_config,
    seed,
    suppress_defaults,
)
from .recipes import ADD_OPTIONS, RECIPES
from .runs import evaluate_run, generate_run, impute_run, print_metrics, sample_run, train_run

DESCRIPTION = "pplm: train, evaluate and sample from the library's models."


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pplm", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"pplm {__version__}")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=logging.DEBUG,
                       default=logging.INFO, help="log the library's debug lines too")
    level.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=logging.WARNING,
                       help="only warnings and errors (no lines for long phases; a command's own --quiet "
                            "switches its progress bars off)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = sub.add_parser("train", help="train a model and write a run folder")
    models = train.add_subparsers(dest="model", required=True, metavar="MODEL", parser_class=Parser)
    for name, recipe in RECIPES.items():
        p = models.add_parser(name, help=recipe.help, description=recipe.help)
        ADD_OPTIONS[name](p)
        add_training_options(p, recipe)
        p.set_defaults(func=_train)

    ev = _run_command(sub, "evaluate", "recompute a run's test metrics (into evaluation.json beside metrics.json)",
                      _evaluate, with_seed=False)
    ev.add_argument("--particles", type=positive_int, default=None, help="importance samples (default: the run's)")
    ev.add_argument("--out", type=out_path, default=None, help="JSON file (default: RUN_DIR/evaluation.json)")
    ev.add_argument("--quiet", action="store_true")

    sm = _run_command(sub, "sample", "save a grid of samples from a run's model", _sample)
    sm.add_argument("-n", type=positive_int, default=64)
    sm.add_argument("--out", type=out_path, required=True, help="image file (.png, .pdf, .svg, ...)")

    gen = _run_command(sub, "generate", "cross-modal generation grid from a multimodal (mvae) run", _generate)
    gen.add_argument("--given", required=True, help="comma-separated modalities to condition on")
    gen.add_argument("--target", required=True, help="comma-separated modalities to generate")
    gen.add_argument("-n", type=positive_int, default=10, help="test tuples (columns)")
    gen.add_argument("--out", type=out_path, required=True, help="image file (.png, .pdf, .svg, ...)")

    imp = _run_command(sub, "impute", "fill the missing modalities of a .npz file from an mvae run", _impute)
    imp.add_argument("--dataset", required=True, help=".npz file with the run's modalities (x_NAME, mask_NAME)")
    imp.add_argument("--out", type=out_path, required=True, help=".npz file to write")

    em = _run_command(sub, "embed", "write a run's latent codes (posterior means and sds) to .npz or .csv", _embed)
    em.add_argument("--split", choices=SPLITS, default="test")
    em.add_argument("--out", type=out_path, required=True, help=".npz or .csv file")
    em.add_argument("--samples", type=draws_int, default=256,
                    help="draws per point for a flow guide's moments (at least 2)")

    ex = _run_command(sub, "explore", "figures of a run's latent space: traversals, interpolations, maps", _explore)
    ex.add_argument("--out", default=None, help="folder for the figures (default RUN/explore)")
    ex.add_argument("--split", choices=SPLITS, default="test")
    ex.add_argument("--index", type=int, default=0, help="the datapoint whose code is traversed")
    ex.add_argument("--map", choices=MAP_METHODS, default="pca", help="2-D map of the codes")
    ex.add_argument("--samples", type=draws_int, default=256,
                    help="draws per point for a flow guide's moments (at least 2)")
    return parser


def _run_command(sub, name, help, func, *, with_seed=True):
    """A subcommand acting on a finished run: its folder RUN_DIR, ``--device`` and (with_seed) ``--seed``."""
    p = sub.add_parser(name, help=help)
    p.add_argument("run_dir")
    p.add_argument("--device", default="auto")
    if with_seed:
        p.add_argument("--seed", type=seed, default=0)
    p.set_defaults(func=func)
    return p


def _train(ns):
    recipe = RECIPES[ns.model]
    run = run_config(ns, recipe)
    try:
        metrics = train_run(recipe, run)
        if parallel.is_writer():  # under torchrun, rank 0 prints
            print_metrics(metrics)
            print(f"run written to {run.out}")
    finally:
        parallel.shutdown()


def _evaluate(ns):
    print_metrics(evaluate_run(ns.run_dir, particles=ns.particles, device=ns.device, quiet=ns.quiet, out=ns.out))


def _sample(ns):
    print(f"samples written to {sample_run(ns.run_dir, ns.n, ns.out, device=ns.device, seed=ns.seed)}")


def _generate(ns):
    path = generate_run(ns.run_dir, ns.given, ns.target, ns.out, n=ns.n, device=ns.device, seed=ns.seed)
    print(f"generation grid written to {path}")


def _embed(ns):
    path = embed_run(ns.run_dir, ns.out, split=ns.split, samples=ns.samples, device=ns.device, seed=ns.seed)
    print(f"codes written to {path}")


def _explore(ns):
    paths = explore_run(ns.run_dir, ns.out, split=ns.split, index=ns.index, method=ns.map, samples=ns.samples,
                        device=ns.device, seed=ns.seed)
    print(f"figures written to {paths[0].parent}: {', '.join(p.name for p in paths)}")


def _impute(ns):
    filled = impute_run(ns.run_dir, ns.dataset, ns.out, device=ns.device, seed=ns.seed)
    print(f"{filled} missing entries filled; written to {ns.out}")


def _train_parser(model):
    """The argparse parser of ``pplm train MODEL``."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    models = next(a for a in commands.choices["train"]._actions if isinstance(a, argparse._SubParsersAction))
    return models.choices[model]


def _warning_line(message, category, filename, lineno, file=None, line=None):
    print(f"pplm: warning: {category.__name__}: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """``pplm`` with the arguments ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        argv = expand_config(argv, _train_parser)
    except (UsageError, OSError) as exc:
        if is_rank0():
            print(f"pplm: error: {exc}", file=sys.stderr)
        return 2
    ns = build_parser().parse_args(argv)
    # the options the command line names (what --resume compares with the stored run)
    ns.named_options = set(vars(suppress_defaults(build_parser()).parse_args(argv))) - {
        "command", "model", "func", "log_level", "config"}
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pplm: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("ppl_models", "inference")]
    levels = [lg.level for lg in loggers]
    # under torchrun, ranks other than 0 log warnings only and leave user errors to rank 0
    rank0 = is_rank0()
    level = ns.log_level if rank0 else max(ns.log_level, logging.WARNING)
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(level)
    try:
        with warnings.catch_warnings():
            # after any filter already set (a test's "error" stays an error): each warning once, in one line
            warnings.filterwarnings("once", append=True)
            warnings.showwarning = _warning_line
            ns.func(ns)
    except (UsageError, FloatingPointError) as exc:  # NonFiniteLossError and evaluate's non-finite weights
        # under torchrun every rank runs the same checks and all-reduces divergence: rank 0 alone says it
        if rank0:
            print(f"pplm: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"pplm: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(ns, "out", None)
        saved = ns.command != "train" or (out is not None and (Path(out) / "checkpoint.pt").is_file())
        if saved:
            print("pplm: interrupted; the last checkpoint is kept (continue with --resume)", file=sys.stderr)
        else:
            print("pplm: interrupted before the first checkpoint: nothing was saved", file=sys.stderr)
        return 130
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(lvl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
