"""Runs on disk: what ``pplm train``, ``pplm evaluate``, ``pplm sample`` and ``pplm generate`` do, as functions.

A run folder holds ``config.json`` (the model, the run's configuration, the
module's config and versions), ``checkpoint.pt`` (written atomically after every
epoch), ``history.csv``, ``metrics.json`` and PNG figures (``loss.png`` for every
model, plus the model's own, e.g. ``samples.png`` and ``reconstructions.png`` for
the VAE).

Every check on the input (options, data, the model, the objective, the output
folder, a checkpoint to resume from) happens once, before anything is written,
so a refused command leaves the disk as it was.

``config.json`` formats: ``ppl-models/run/2`` (written now: ``"run"``, the
shared options of :class:`~ppl_models.cli.recipe.RunConfig`, and ``"options"``,
the model's) and ``ppl-models/run/1`` (earlier versions: ``"args"``, argparse's
namespace as a dict) are both read.
"""

import csv
import dataclasses
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy
import pyro
import torch

from inference import batching
from inference.callbacks import Checkpoint, EarlyStopping, TensorBoard
from inference.checkpoint import FILENAME, atomic_write, load_checkpoint
from inference.errors import CheckpointError, UsageError
from inference.evaluate import evaluate
from inference.plots import plot_history
from inference.psis import khat_summary, min_particles, psis_khat
from inference.train import Trainer, resolve_device

from .recipe import RunConfig, lr_scheduler
from .recipes import RECIPES, get_recipe

RUN_FILES = ("config.json", FILENAME, "history.csv", "metrics.json", "loss.png")
CONFIG_FORMAT = "ppl-models/run/2"
READABLE_FORMATS = ("ppl-models/run/1", CONFIG_FORMAT)


def versions():
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
    """The dict in ``run_dir/config.json``; UsageError without one, CheckpointError if it is no run config
    of a format this version reads."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UsageError(f"{run_dir} holds no run (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is corrupt (not JSON)") from None
    fmt = config.get("format") if isinstance(config, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith("ppl-models/run/"):
        raise CheckpointError(f"{path} is not a ppl-models run configuration")
    if fmt not in READABLE_FORMATS:
        raise CheckpointError(f"{path} has format {fmt!r}; this version reads {' and '.join(READABLE_FORMATS)}")
    return config


def read_run_config(config, recipe, **changes):
    """The :class:`RunConfig` a run folder's ``config`` (from :func:`read_config`) was trained with, with ``changes``."""
    if config["format"] == "ppl-models/run/1":
        shared = dict(config["args"])
        shared["validate"] = not shared.get("no_validate", False)
        shared["validation"] = 0.0  # those runs held no validation split out
        options = config["args"]
    else:
        shared, options = config["run"], config["options"]
    shared = {k: v for k, v in shared.items() if k in RunConfig.STORED}
    return RunConfig(**{**shared, **changes}, options=recipe.options_from_dict(options))


def write_history(path, history):
    keys = []
    for record in history:
        keys += [k for k in record if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def open_run(run_dir, **changes):
    """A finished run's recipe, its ``config.json`` dict and its :class:`RunConfig` (with ``changes``)."""
    config = read_config(run_dir)
    recipe = get_recipe(config["model"])
    return recipe, config, read_run_config(config, recipe, **changes)


def load_module(recipe, config, run_dir, device):
    """The trained module of the run in ``run_dir`` (rebuilt from ``config``, weights from its checkpoint), in eval mode."""
    module = recipe.rebuild(config["module"])
    state = load_checkpoint(Path(run_dir) / FILENAME, expect_model=type(module).__name__, map_location=device)
    module.load_state_dict(state["module"])
    pyro.get_param_store().set_state(state["param_store"])
    return module.to(device).eval()


def prepare_training(module, train, test, run, device):
    """Every check of the data, the model and the objective, each once, before the run folder is touched.

    The test set is checked here (finite, accepted by the model's ``check_data``);
    the training data, the validation split and the objective by the
    :class:`~inference.train.Trainer` this returns (its construction runs every
    check and the objective once). Raises UsageError.
    """
    batching.check_finite(test, "test data")
    if hasattr(module, "check_data"):
        module.check_data(batching.fixed_view(test))
    return Trainer(
        module,
        train,
        elbo=run.elbo,
        batch_size=run.batch_size,
        lr=run.lr,
        device=device,
        seed=run.seed,
        validation=run.validation or None,
        scheduler=lr_scheduler(run.lr_schedule, run.epochs),
        validate=run.validate,
        jit=run.jit,
    )


def _train(trainer, run):
    """The one run of the training engine, with the run's callbacks."""
    callbacks = [Checkpoint(run.out, resume=run.resume)]
    if run.patience is not None:
        callbacks.append(EarlyStopping(run.patience))
    if run.tensorboard is not None:
        callbacks.append(TensorBoard(run.tensorboard))
    return trainer.run(run.epochs, callbacks=callbacks, progress=not run.quiet)


def train_run(recipe, run):
    """Train ``recipe``'s model as the :class:`RunConfig` ``run`` says, into the folder ``run.out``.

    Refuses, before writing anything, a folder that already holds a run unless
    ``run.resume`` (continue it; its stored configuration wins except
    ``RunConfig.RESUME_OVERRIDES``: epochs, device, particles, quiet, validate
    and jit) or ``run.overwrite`` (replace it). Returns the metrics dict.
    """
    out = Path(run.out)
    if run.resume and run.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if run.resume:
        config = read_config(out)
        if config["model"] != recipe.name:
            raise CheckpointError(f"{out} holds a {config['model']!r} run, not {recipe.name!r}")
        run = read_run_config(config, recipe, **{k: getattr(run, k) for k in RunConfig.RESUME_OVERRIDES},
                              out=str(out), resume=True, overwrite=False)
    elif held and not run.overwrite:
        raise UsageError(f"{out} already holds a run ({', '.join(held)}); pass --resume to continue it or --overwrite to replace it")
    recipe.check(run)
    device = resolve_device(run.device)
    train, test = recipe.load_data(run)
    pyro.set_rng_seed(run.seed)
    module = recipe.build(run, train)
    trainer = prepare_training(module, train, test, run, device)
    ckpt = out / FILENAME
    resuming = run.resume and ckpt.exists()
    if resuming:
        state = load_checkpoint(ckpt, expect_model=type(module).__name__)
        if state["epoch"] >= run.epochs:
            raise UsageError(f"{out} already finished {state['epoch']} epochs; ask for more with --epochs")
    # ---- every check passed: from here on we write ------------------------------------
    if run.overwrite:
        old = read_config(out).get("outputs", []) if (out / "config.json").exists() else []
        for name in set(RUN_FILES) | set(old):
            if (out / name).is_file():
                (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "format": CONFIG_FORMAT,
        "model": recipe.name,
        **run.stored(),
        "module": getattr(module, "config", None),
        "versions": versions(),
    }
    if not run.resume:
        write_json(out / "config.json", config)
    init = {}
    if not resuming:
        init = recipe.before_fit(module, train, run, device) or {}
    t0 = time.perf_counter()
    result = _train(trainer, run)
    wall = time.perf_counter() - t0
    write_history(out / "history.csv", result.history)
    plot_history(result.history, out / "loss.png", title=f"{recipe.name} on {train.name} [{run.elbo}]")
    metrics = _evaluate_metrics(recipe, module, train, test, run, device)
    metrics.update(
        train_seconds=result.train_seconds,
        wall_seconds=wall,
        final_train_loss=result.history[-1]["train_loss"],
        epochs_trained=result.history[-1]["epoch"],
        **init,
    )
    if result.best_epoch is not None:
        metrics.update(best_epoch=result.best_epoch, stopped_early=result.stopped_early)
    outputs = recipe.figures(out, module, train, test, run) or []
    config["outputs"] = sorted(set(RUN_FILES) | {Path(p).name for p in outputs})
    write_json(out / "config.json", config)
    write_json(out / "metrics.json", metrics)
    return metrics


def _evaluate_metrics(recipe, module, train, test, run, device):
    pyro.set_rng_seed(run.seed)
    ev = evaluate(
        module, batching.to_device(test, device), particles=run.particles, progress=not run.quiet,
        keep_log_weights=True,
    )
    metrics = {
        "model": recipe.name,
        "dataset": train.name,
        "binarize": run.binarize,
        "likelihood": getattr(run.options, "likelihood", None),
        "elbo": run.elbo,
        "epochs": run.epochs,
        "seed": run.seed,
        "device": str(device),
        "n_train": batching.length(train),
        "validation": run.validation,
        "n_test": batching.length(test),
        "test_elbo": ev.elbo,
        "test_elbo_se": ev.elbo_se,
        "test_log_likelihood": ev.log_likelihood,
        "test_log_likelihood_se": ev.log_likelihood_se,
        "particles": ev.particles,
        **_psis_metrics(ev),
        "versions": versions(),
    }
    metrics.update(recipe.metrics(module, train, test, run) or {})
    return metrics


def _psis_metrics(ev):
    """Pareto k-hat summary of the test importance weights (Yao et al. 2018); see :mod:`inference.psis`."""
    if ev.particles < min_particles():
        return {"psis": f"skipped: PSIS needs --particles >= {min_particles()}"}
    return khat_summary(psis_khat(ev.log_weights))


def evaluate_run(run_dir, *, particles=None, device="auto", quiet=False):
    """Reload a finished run, recompute its test metrics and update its metrics.json."""
    recipe, config, run = open_run(run_dir, quiet=quiet)
    if particles is not None:
        run = dataclasses.replace(run, particles=particles)
    dev = resolve_device(device)
    train, test = recipe.load_data(run)
    module = load_module(recipe, config, run_dir, dev)
    metrics_path = Path(run_dir) / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    except json.JSONDecodeError:
        metrics = {}
    metrics.update(_evaluate_metrics(recipe, module, train, test, run, dev))
    write_json(metrics_path, metrics)
    return metrics


def sample_run(run_dir, n, out_file, *, device="auto", seed=0):
    """Draw ``n`` samples from a finished run's model and save them as an image grid."""
    if n < 1:
        raise UsageError(f"-n must be positive, got {n}")
    recipe, config, _ = open_run(run_dir)
    module = load_module(recipe, config, run_dir, resolve_device(device))
    pyro.set_rng_seed(seed)
    return recipe.save_samples(module, n, out_file, config["module"])


def generate_run(run_dir, given, target, out_file, *, n=10, device="auto", seed=0):
    """``pplm generate``: a grid of the run's test tuples' ``given`` modalities and ``target`` generated from them."""
    recipe, config, run = open_run(run_dir)
    if recipe.generate is None:
        kinds = " or ".join(name for name, r in RECIPES.items() if r.generate is not None)
        raise UsageError(f"{run_dir} holds a {config['model']!r} run; generate needs an {kinds} run")
    module = load_module(recipe, config, run_dir, resolve_device(device))
    return recipe.generate(module, run, given, target, out_file, n=n, seed=seed)


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
