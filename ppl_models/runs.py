"""Runs on disk: what ``pplm train``, ``pplm evaluate`` and ``pplm sample`` do, as functions.

A run folder holds ``config.json`` (the model, its options and versions),
``checkpoint.pt`` (written atomically after every epoch), ``history.csv``,
``metrics.json`` and PNG figures (``loss.png`` for every model, plus the
model's own, e.g. ``samples.png`` and ``reconstructions.png`` for the VAE).

Every check on the input (options, data, the model, the output folder, a
checkpoint to resume from) happens before anything is written, so a refused
command leaves the disk as it was.
"""

import argparse
import csv
import io
import json
import platform
import sys
import time
from pathlib import Path

import pyro
import torch

from inference import batching
from inference.checkpoint import FILENAME, atomic_write, get_rng_state, load_checkpoint, set_rng_state
from inference.elbo import make_elbo
from inference.errors import CheckpointError, UsageError
from inference.evaluate import evaluate
from inference.plots import plot_history
from inference.train import fit, resolve_device

RUN_FILES = ("config.json", FILENAME, "history.csv", "metrics.json", "loss.png")
CONFIG_FORMAT = "ppl-models/run/1"


def versions():
    import numpy

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": numpy.__version__,
    }


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, default=_jsonable) + "\n").encode()))


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return float(value)


def read_config(run_dir):
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UsageError(f"{run_dir} holds no run (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is corrupt (not JSON)") from None
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        raise CheckpointError(f"{path} is not a ppl-models run configuration")
    return config


def write_history(path, history):
    keys = []
    for record in history:
        keys += [k for k in record if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def _load_module(command, config, device):
    module = command.rebuild(config)
    state = load_checkpoint(Path(config["run_dir"]) / FILENAME, expect_model=type(module).__name__, map_location=device)
    module.load_state_dict(state["module"])
    pyro.get_param_store().set_state(state["param_store"])
    return module.to(device).eval(), state


def _check_objective(module, spec, train):
    """Run the objective once on two training points, so that its own refusals (an unknown spec, a scale
    inside IWAE's log-sum-exp, ...) come before anything is written. The RNG state is left as it was."""
    elbo = make_elbo(spec, max_plate_nesting=getattr(module, "max_plate_nesting", None))
    state = get_rng_state()
    try:
        # not under no_grad: TraceEnum_ELBO refuses a loss it cannot differentiate; nothing calls backward
        elbo.differentiable_loss(module.model, module.guide, batching.take(batching.fixed_view(train), slice(0, 2)))
    finally:
        set_rng_state(state)


def train_run(command, args):
    """Train ``command``'s model as ``args`` say, into the folder ``args.out``.

    Refuses, before writing anything, a folder that already holds a run unless
    ``args.resume`` (continue it; its stored options win except ``--epochs``,
    ``--device``, ``--particles``, ``--quiet``, ``--no-validate`` and ``--jit``) or ``args.overwrite`` (replace it).
    Returns the metrics dict.
    """
    out = Path(args.out)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if args.resume:
        config = read_config(out)
        if config["model"] != command.name:
            raise CheckpointError(f"{out} holds a {config['model']!r} run, not {command.name!r}")
        stored = dict(config["args"])
        stored.update(epochs=args.epochs, device=args.device, particles=args.particles, quiet=args.quiet,
                      no_validate=args.no_validate, jit=args.jit)
        args = argparse.Namespace(**{**vars(args), **stored, "resume": True, "overwrite": False, "out": str(out)})
    elif held and not args.overwrite:
        raise UsageError(f"{out} already holds a run ({', '.join(held)}); pass --resume to continue it or --overwrite to replace it")
    command.check_args(args)
    device = resolve_device(args.device)
    train, test = command.load_data(args)
    batching.check_finite(train, "training data")
    batching.check_finite(test, "test data")
    pyro.set_rng_seed(args.seed)
    module = command.build(args, train)
    if hasattr(module, "check_data"):
        module.check_data(batching.fixed_view(train))
        module.check_data(batching.fixed_view(test))
    _check_objective(module, args.elbo, train)
    ckpt = out / FILENAME
    resuming = args.resume and ckpt.exists()
    if resuming:
        state = load_checkpoint(ckpt, expect_model=type(module).__name__)
        if state["epoch"] >= args.epochs:
            raise UsageError(f"{out} already finished {state['epoch']} epochs; ask for more with --epochs")
    # ---- every check passed: from here on we write ------------------------------------
    if args.overwrite:
        old = read_config(out).get("outputs", []) if (out / "config.json").exists() else []
        for name in set(RUN_FILES) | set(old):
            if (out / name).is_file():
                (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "resume", "overwrite", "out")}
    config = {
        "format": CONFIG_FORMAT,
        "model": command.name,
        "args": options,
        "module": getattr(module, "config", None),
        "versions": versions(),
    }
    if not args.resume:
        write_json(out / "config.json", config)
    quiet = getattr(args, "quiet", False)
    init = {}
    if not resuming:
        init = command.before_fit(module, train, args, device) or {}
    t0 = time.perf_counter()
    result = fit(
        module,
        train,
        elbo=args.elbo,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device=device,
        seed=args.seed,
        validation=test,
        checkpoint_dir=out,
        resume=args.resume,
        progress=not quiet,
        validate=not getattr(args, "no_validate", False),
        jit=getattr(args, "jit", False),
    )
    wall = time.perf_counter() - t0
    write_history(out / "history.csv", result.history)
    plot_history(result.history, out / "loss.png", title=f"{command.name} on {train.name} [{args.elbo}]")
    metrics = _evaluate_metrics(command, module, train, test, args, device, quiet)
    metrics.update(
        train_seconds=result.train_seconds,
        wall_seconds=wall,
        final_train_loss=result.history[-1]["train_loss"],
        **init,
    )
    outputs = command.figures(out, module, train, test, args) or []
    config["outputs"] = sorted(set(RUN_FILES) | {Path(p).name for p in outputs})
    write_json(out / "config.json", config)
    write_json(out / "metrics.json", metrics)
    return metrics


def _evaluate_metrics(command, module, train, test, args, device, quiet):
    pyro.set_rng_seed(args.seed)
    ev = evaluate(
        module, batching.to_device(test, device), particles=args.particles, progress=not quiet, keep_log_weights=True
    )
    metrics = {
        "model": command.name,
        "dataset": train.name,
        "binarize": getattr(args, "binarize", None),
        "likelihood": getattr(args, "likelihood", None),
        "elbo": args.elbo,
        "epochs": args.epochs,
        "seed": args.seed,
        "device": str(device),
        "n_train": batching.length(train),
        "n_test": batching.length(test),
        "test_elbo": ev.elbo,
        "test_elbo_se": ev.elbo_se,
        "test_log_likelihood": ev.log_likelihood,
        "test_log_likelihood_se": ev.log_likelihood_se,
        "particles": ev.particles,
        **_psis_metrics(ev),
        "versions": versions(),
    }
    metrics.update(command.metrics(module, train, test, args) or {})
    return metrics


def _psis_metrics(ev):
    """Pareto k-hat summary of the test importance weights (Yao et al. 2018); see :mod:`inference.psis`."""
    from inference.psis import khat_summary, min_particles, psis_khat

    if ev.particles < min_particles():
        return {"psis": f"skipped: PSIS needs --particles >= {min_particles()}"}
    return khat_summary(psis_khat(ev.log_weights))


def _command_and_args(run_dir):
    from .cli.base import get_command

    config = read_config(run_dir)
    config["run_dir"] = str(run_dir)
    command = get_command(config["model"])
    return command, config, argparse.Namespace(**config["args"])


def evaluate_run(run_dir, *, particles=None, device="auto", quiet=False):
    """Reload a finished run, recompute its test metrics and update its metrics.json."""
    command, config, args = _command_and_args(run_dir)
    if particles is not None:
        args.particles = particles
    dev = resolve_device(device)
    train, test = command.load_data(args)
    module, _ = _load_module(command, config, dev)
    metrics_path = Path(run_dir) / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    except json.JSONDecodeError:
        metrics = {}
    metrics.update(_evaluate_metrics(command, module, train, test, args, dev, quiet))
    write_json(metrics_path, metrics)
    return metrics


def sample_run(run_dir, n, out_file, *, device="auto", seed=0):
    """Draw ``n`` samples from a finished run's model and save them as an image grid."""
    if n < 1:
        raise UsageError(f"-n must be positive, got {n}")
    command, config, args = _command_and_args(run_dir)
    module, _ = _load_module(command, config, resolve_device(device))
    pyro.set_rng_seed(seed)
    return command.save_samples(module, n, out_file, config)


def print_metrics(metrics, file=None):
    keys = ("test_elbo", "test_log_likelihood", "train_seconds")
    parts = []
    for k in keys:
        if k in metrics:
            se = metrics.get(f"{k}_se")
            parts.append(f"{k}={metrics[k]:.3f}" + (f" (se {se:.3f})" if se is not None else ""))
    if "khat_above_0_7" in metrics:
        parts.append(
            "PSIS k-hat <0.5/0.5-0.7/>0.7: "
            + "/".join(f"{metrics[k]:.0%}" for k in ("khat_below_0_5", "khat_0_5_to_0_7", "khat_above_0_7"))
        )
    print(", ".join(parts), file=file or sys.stdout)
