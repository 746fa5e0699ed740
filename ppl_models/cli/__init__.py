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

import argparse
import sys

from inference.elbo import ELBO_SPECS
from inference.errors import NonFiniteLossError, UsageError

from .base import all_commands, positive_float, positive_int


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line: ``pplm: error: ...``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_training_arguments(p, command):
    command.add_data_arguments(p)
    command.add_arguments(p)
    p.add_argument("--elbo", default=command.default_elbo, help=f"objective spec: {', '.join(ELBO_SPECS)}")
    p.add_argument("--epochs", type=positive_int, default=command.default_epochs)
    p.add_argument("--batch-size", type=positive_int, default=command.default_batch_size)
    p.add_argument("--lr", type=positive_float, default=command.default_lr)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--particles", type=positive_int, default=1000, help="importance samples for the test log-likelihood")
    p.add_argument("--no-validate", action="store_true", help="switch Pyro's validation off (faster)")
    p.add_argument("--jit", action="store_true",
                   help="compile the loss with torch.jit.trace (checked against the eager loss; fastest)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="run folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out")


def build_parser():
    parser = _Parser(prog="pplm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model and write a run folder")
    models = train.add_subparsers(dest="model", required=True, metavar="MODEL", parser_class=_Parser)
    for name, command in all_commands().items():
        p = models.add_parser(name, help=command.help, description=command.help)
        _add_training_arguments(p, command)
        p.set_defaults(func=_train, command_obj=command)

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


def _train(args):
    from ..runs import print_metrics, train_run

    command = args.command_obj
    del args.command_obj
    metrics = train_run(command, args)
    print_metrics(metrics)
    print(f"run written to {args.out}")


def _evaluate(args):
    from ..runs import evaluate_run, print_metrics

    print_metrics(evaluate_run(args.run_dir, particles=args.particles, device=args.device, quiet=args.quiet))


def _sample(args):
    from ..runs import sample_run

    print(f"samples written to {sample_run(args.run_dir, args.n, args.out, device=args.device, seed=args.seed)}")


def _generate(args):
    from .mvae import generate_run

    path = generate_run(args.run_dir, args.given, args.target, args.out, n=args.n, device=args.device, seed=args.seed)
    print(f"generation grid written to {path}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UsageError, NonFiniteLossError) as exc:
        print(f"pplm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pplm: interrupted; the last checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
