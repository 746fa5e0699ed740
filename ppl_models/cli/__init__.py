"""``pplm``: train, evaluate and sample from the library's models.

    pplm train <model> --out DIR [options]      train, evaluate, write the run folder
    pplm evaluate DIR [--particles K]            recompute a run's test metrics
    pplm sample DIR -n N --out FILE.png          a grid of samples from a run's model
    pplm generate DIR --given MOD[,MOD] --target MOD --out FILE.png
                                                 cross-modal generation from a multimodal run

Bad input (an unknown name, a missing data folder, data outside a likelihood's
support, a corrupt checkpoint, a folder that already holds a run, ...) gets one
line on stderr and exit status 2, and nothing on disk is changed.
"""

import sys

from inference.errors import NonFiniteLossError, UsageError

from .options import Parser, add_training_options, positive_int, run_config
from .recipes import ADD_OPTIONS, RECIPES
from .runs import evaluate_run, generate_run, print_metrics, sample_run, train_run


def build_parser():
    parser = Parser(prog="pplm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = sub.add_parser("train", help="train a model and write a run folder")
    models = train.add_subparsers(dest="model", required=True, metavar="MODEL", parser_class=Parser)
    for name, recipe in RECIPES.items():
        p = models.add_parser(name, help=recipe.help, description=recipe.help)
        ADD_OPTIONS[name](p)
        add_training_options(p, recipe)
        p.set_defaults(func=_train)

    ev = sub.add_parser("evaluate", help="recompute a run's test metrics")
    ev.add_argument("run_dir")
    ev.add_argument("--particles", type=positive_int, default=None)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=_evaluate)

    sm = sub.add_parser("sample", help="save a grid of samples from a run's model")
    sm.add_argument("run_dir")
    sm.add_argument("-n", type=positive_int, default=64)
    sm.add_argument("--out", required=True, help="PNG file")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--device", default="auto")
    sm.set_defaults(func=_sample)

    gen = sub.add_parser("generate", help="cross-modal generation grid from a multimodal (mvae) run")
    gen.add_argument("run_dir")
    gen.add_argument("--given", required=True, help="comma-separated modalities to condition on")
    gen.add_argument("--target", required=True, help="comma-separated modalities to generate")
    gen.add_argument("-n", type=positive_int, default=10, help="test tuples (columns)")
    gen.add_argument("--out", required=True, help="PNG file")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto")
    gen.set_defaults(func=_generate)
    return parser


def _train(ns):
    recipe = RECIPES[ns.model]
    run = run_config(ns, recipe)
    print_metrics(train_run(recipe, run))
    print(f"run written to {run.out}")


def _evaluate(ns):
    print_metrics(evaluate_run(ns.run_dir, particles=ns.particles, device=ns.device, quiet=ns.quiet))


def _sample(ns):
    print(f"samples written to {sample_run(ns.run_dir, ns.n, ns.out, device=ns.device, seed=ns.seed)}")


def _generate(ns):
    path = generate_run(ns.run_dir, ns.given, ns.target, ns.out, n=ns.n, device=ns.device, seed=ns.seed)
    print(f"generation grid written to {path}")


def main(argv=None):
    ns = build_parser().parse_args(argv)
    try:
        ns.func(ns)
    except (UsageError, NonFiniteLossError) as exc:
        print(f"pplm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pplm: interrupted; the last checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
