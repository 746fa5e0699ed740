"""Runs on disk: what ``pplm train``, ``pplm evaluate``, ``pplm sample`` and ``pplm generate`` do, as functions.

A run folder holds ``config.json`` (the model, the run's configuration, the
module's config and versions), ``checkpoint.pt`` (written atomically after every
epoch), ``history.csv``, ``metrics.json`` and PNG figures (``loss.png`` for every
model, plus the model's own, e.g. ``samples.png`` and ``reconstructions.png`` for
the VAE).

Every check on the input (options, data, the model, the objective, the output
folder, a checkpoint to resume from) happens once, before anything is written,
so a refused command leaves the disk as it was. A new run is written into a
hidden staging folder inside ``--out`` (``.pplm-staging``) and moved into place
when its first checkpoint is written, replacing the old run's files only then
(``--overwrite``); a run that fails before that leaves nothing behind, and the
staging folder of a killed run is removed by the next run in that folder.
``pplm evaluate`` writes ``evaluation.json`` beside the training-time
``metrics.json`` (or its ``--out``), and no output path may name a run's files.

Under ``torchrun --nproc-per-node=N -m ppl_models.cli train ...`` the same
command trains data-parallel (:mod:`inference.distributed`): every rank checks
the input and trains, rank 0 alone runs the model's initialisation (its
parameters reach the other ranks when training starts), writes the one run
folder, evaluates, draws the figures and prints; the others wait for it at a
barrier.

``config.json`` formats: ``ppl-models/run/2`` (written now: ``"run"``, the
shared options of :class:`~ppl_models.cli.recipe.RunConfig`, and ``"options"``,
the model's) and ``ppl-models/run/1`` (earlier versions: ``"args"``, argparse's
namespace as a dict) are both read.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import numpy
import pyro
import torch

from inference import batching
from inference import distributed as parallel
from inference.callbacks import Callback, Checkpoint, EarlyStopping, TensorBoard
from inference.checkpoint import FILENAME, atomic_write, load_checkpoint
from inference.errors import CheckpointError, DivergenceError, UsageError
from inference.evaluate import evaluate
from inference.plots import plot_history
from inference.psis import khat_summary, min_particles, psis_khat
from inference.train import Trainer, resolve_device

from .recipe import Recipe, RunConfig, lr_scheduler
from .recipes import RECIPES, get_recipe

RUN_FILES = ("config.json", FILENAME, "history.csv", "metrics.json", "loss.png")
EVALUATION = "evaluation.json"
STAGING = ".pplm-staging"  # inside --out: the new run until its first checkpoint
REPLACED = ".pplm-replaced"  # inside --out: the old run's files while the new ones are moved in
IMAGE_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "tif", "tiff", "webp", "eps", "ps")
# multiply-adds per step (batch x parameters) below which one CPU thread is fastest
SMALL_WORK = 5e7
log = logging.getLogger(__name__)
CONFIG_FORMAT = "ppl-models/run/2"
READABLE_FORMATS = ("ppl-models/run/1", CONFIG_FORMAT)


def versions() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": numpy.__version__,
    }


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, default=_jsonable) + "\n").encode()))


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return float(value)


def read_config(run_dir: str | Path) -> dict[str, Any]:
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


def read_run_config(config: dict[str, Any], recipe: Recipe, **changes: Any) -> RunConfig:
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


def write_history(path: str | Path, history: list[dict[str, Any]]) -> None:
    keys = []
    for record in history:
        keys += [k for k in record if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def open_run(run_dir: str | Path, **changes: Any) -> tuple[Any, ...]:
    """A finished run's recipe, its ``config.json`` dict and its :class:`RunConfig` (with ``changes``)."""
    config = read_config(run_dir)
    recipe = get_recipe(config["model"])
    return recipe, config, read_run_config(config, recipe, **changes)


def load_module(recipe: Recipe, config: dict[str, Any], run_dir: str | Path, device: str | torch.device) -> Any:
    """The trained module of the run in ``run_dir`` (rebuilt from ``config``, weights from its checkpoint), in eval mode."""
    module = recipe.rebuild(config["module"])
    state = load_checkpoint(Path(run_dir) / FILENAME, expect_model=type(module).__name__, map_location=device)
    module.load_state_dict(state["module"])
    pyro.get_param_store().set_state(state["param_store"])
    return module.to(device).eval()


def prepare_training(module: Any, train: Any, test: Any, run: RunConfig, device: str | torch.device) -> Trainer:
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
        compile=False if run.no_compile else (True if run.jit else None),
    )


class _RecordSwitches(Callback):
    """Adds the switches a resumed run may change (``jit``) to each epoch's history record."""

    def __init__(self, run):
        self.jit = int(run.jit)

    def on_epoch_end(self, trainer, record):
        record["jit"] = self.jit


def _train(trainer, run, *callbacks):
    """The one run of the training engine, with the run's callbacks."""
    callbacks = [_RecordSwitches(run), *callbacks]
    if run.patience is not None:
        callbacks.append(EarlyStopping(run.patience))
    if run.tensorboard is not None:
        callbacks.append(TensorBoard(run.tensorboard))
    return trainer.run(run.epochs, callbacks=callbacks, progress=not run.quiet)


@contextmanager
def phase(what: str, quiet: bool = True) -> Iterator[Any]:
    """A long phase without a progress bar: one line on stderr when it starts and one when it ends."""
    if quiet:
        log.info(f"{what} ...")
    t0 = time.perf_counter()
    yield
    if quiet:
        log.info(f"{what}: done in {time.perf_counter() - t0:.1f} s")


def choose_threads(module: Any, run: RunConfig, device: torch.device) -> int:
    """torch's CPU threads for a run: ``--threads``, else 1 for small work (an MLP's ``batch x parameters``
    multiply-adds per step below ``SMALL_WORK``: more threads only add overhead), else the cores this process
    may use, divided among the ranks of this machine (``LOCAL_WORLD_SIZE``), less the load of other processes."""
    if run.threads is not None:
        return run.threads
    if parallel.env_world_size() > 1 and device.type == "cpu":
        return 1  # data-parallel on CPU: one intra-op thread per rank
    work = run.batch_size * sum(p.numel() for p in module.parameters())
    if device.type != "cpu" or work < SMALL_WORK:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy)))


@contextmanager
def threads(n: int) -> Iterator[Any]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _option(name):
    return "--" + {"validate": "no-validate"}.get(name, name).replace("_", "-")


def resumed_run(config: dict[str, Any], recipe: Recipe, run: RunConfig) -> RunConfig:
    """The :class:`RunConfig` of ``--resume``: the stored run's, with the options that may change
    (``RunConfig.RESUME_OVERRIDES``) taken from ``run`` where its command line gave them; any other option
    the command line gave that differs from the stored run is refused, naming it."""
    stored = read_run_config(config, recipe)
    given = run.given if run.given is not None else frozenset(RunConfig.RESUME_OVERRIDES)
    changes = {k: getattr(run, k) for k in RunConfig.RESUME_OVERRIDES if k in given}
    differ = [f"{_option(k)} {getattr(stored, k)!r} (not {getattr(run, k)!r})" for k in RunConfig.STORED
              if k in given and k not in RunConfig.RESUME_OVERRIDES and getattr(run, k) != getattr(stored, k)]
    differ += [f"{_option(f.name)} {getattr(stored.options, f.name)!r} (not {getattr(run.options, f.name)!r})"
               for f in dataclasses.fields(recipe.Options)
               if f.name in given and getattr(run.options, f.name) != getattr(stored.options, f.name)]
    if differ:
        raise UsageError(f"{run.out} was trained with {', '.join(differ)}; --resume continues the stored run "
                         "(it may change only --epochs, --device, --particles, --quiet, --threads, --jit, "
                         "--no-compile, --no-validate and --tensorboard): drop those options or train a new run")
    return dataclasses.replace(stored, **changes, out=run.out, resume=True, overwrite=False, given=run.given)


def _run_file_names(folder):
    """The names of the run's files in ``folder`` (a damaged config.json: the standard ones)."""
    try:
        outputs = read_config(folder).get("outputs", []) if (Path(folder) / "config.json").is_file() else []
    except UsageError:
        outputs = []
    return set(RUN_FILES) | {EVALUATION} | {str(n) for n in outputs if isinstance(n, str)}


def check_output_file(path: str | Path, *, image: bool = False) -> Path:
    """Refuse an empty path, a folder, an unknown image format (``image=True``) and a path naming a file of a run.

    :raises inference.errors.UsageError: naming the path.
    """
    if not str(path).strip():
        raise UsageError("--out is empty")
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"--out {p} is a folder, not a file")
    if image and p.suffix.lower().lstrip(".") not in IMAGE_FORMATS:
        raise UsageError(f"--out {p}: unknown image format {p.suffix or '(none)'!r}; use one of "
                         f"{', '.join('.' + f for f in IMAGE_FORMATS)}")
    if (p.parent / "config.json").is_file() and p.name in _run_file_names(p.parent):
        raise UsageError(f"--out {p} names a file of the run in {p.parent}; write it elsewhere")
    return p


def _finished_files(out):
    """Files of ``out``'s run written after its first checkpoint (a run holding any of them has finished
    an epoch)."""
    return sorted(n for n in _run_file_names(out) - {"config.json", FILENAME} if (out / n).exists())


def _clear_leftovers(out):
    """Remove what a killed run left in ``out``: its staging folder, and the old run's files of an
    interrupted replacement (moved back when the replacement had not finished)."""
    staging, replaced = out / STAGING, out / REPLACED
    if replaced.is_dir():
        if staging.is_dir():  # killed while swapping: the old run goes back
            for p in replaced.iterdir():
                os.replace(p, out / p.name)
        shutil.rmtree(replaced)
    if staging.is_dir():
        shutil.rmtree(staging)


def _commit(stage, out):
    """Move the staged new run (config.json and its first checkpoint) into ``out``, replacing the old run's
    files; undone if any move fails, so ``out`` holds either run, never a mix."""
    old = [n for n in _run_file_names(out) if (out / n).is_file()]
    replaced = out / REPLACED
    replaced.mkdir()
    moved, new = [], []
    try:
        for name in old:
            os.replace(out / name, replaced / name)
            moved.append(name)
        for p in sorted(stage.iterdir()):
            os.replace(p, out / p.name)
            new.append(p.name)
    except OSError:
        for name in new:
            os.replace(out / name, stage / name)
        for name in moved:
            os.replace(replaced / name, out / name)
        replaced.rmdir()
        raise
    stage.rmdir()
    shutil.rmtree(replaced)


class _Commit(Callback):
    """Moves a staged run into its folder once its first checkpoint is on disk (after :class:`Checkpoint`)."""

    order = 101

    def __init__(self, checkpoint, stage, out):
        self.checkpoint, self.stage, self.out, self.done = checkpoint, stage, out, False

    def on_steps(self, trainer, steps, loss_sum, points):
        self._commit(trainer)

    def on_fit_end(self, trainer):
        self._commit(trainer)

    def _commit(self, trainer):
        if not self.done and self.checkpoint.path.exists():
            _commit(self.stage, self.out)
            self.checkpoint.path = trainer.checkpoint_path = self.out / FILENAME
            self.done = True


def train_run(recipe: Recipe, run: RunConfig) -> dict[str, Any]:
    """Train ``recipe``'s model as the :class:`RunConfig` ``run`` says, into the folder ``run.out``.

    Refuses, before writing anything, a folder that already holds a run unless
    ``run.resume`` (continue it: see :func:`resumed_run`; a folder whose run has
    no checkpoint is refused unless it never finished an epoch; a run killed
    during its final evaluation is completed) or ``run.overwrite`` (replace it,
    once the new run has written its first checkpoint). Returns the metrics dict.
    """
    if run.out is None:
        raise UsageError("a training run needs its output folder (--out)")
    out = Path(run.out)
    if run.resume and run.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if out.name in (STAGING, REPLACED) or out.parent.name in (STAGING, REPLACED):
        raise UsageError(f"--out {out} is inside a run's temporary folder")
    held = [name for name in RUN_FILES if (out / name).exists()]
    ckpt = out / FILENAME
    if run.resume:
        config = read_config(out)
        if config["model"] != recipe.name:
            raise CheckpointError(f"{out} holds a {config['model']!r} run, not {recipe.name!r}")
        run = resumed_run(config, recipe, run)
        if not ckpt.exists() and _finished_files(out):
            raise UsageError(f"{out} holds a run but no {FILENAME} to resume from ({', '.join(_finished_files(out))}"
                             "); train it again with --overwrite, or into another --out")
    elif held and not run.overwrite:
        raise UsageError(f"{out} already holds a run ({', '.join(held)}); pass --resume to continue it or --overwrite to replace it")
    recipe.check(run)
    device = resolve_device(run.device)
    train, test = recipe.load_data(run)
    pyro.set_rng_seed(run.seed)
    module = recipe.build(run, train)
    trainer = prepare_training(module, train, test, run, device)
    device = trainer.device  # data-parallel on CUDA: this rank's device
    resuming = run.resume and ckpt.exists()
    if resuming:
        state = load_checkpoint(ckpt, expect_model=type(module).__name__)
        if state["epoch"] > run.epochs:
            raise UsageError(f"{out} has trained {state['epoch']} epochs; --epochs must be at least that "
                             f"(--epochs {state['epoch']} completes its evaluation)")
        if state["epoch"] >= run.epochs and (out / "metrics.json").exists():
            raise UsageError(f"{out} already finished {state['epoch']} epochs; ask for more with --epochs")
    config = {
        "format": CONFIG_FORMAT,
        "model": recipe.name,
        **run.stored(),
        "module": getattr(module, "config", None),
        "versions": versions(),
    }
    n_threads = choose_threads(module, run, device)
    # ---- every check passed: from here on we write ------------------------------------
    created = not out.exists()
    stage = None
    if not trainer.is_writer:
        return _follow(recipe, run, trainer, n_threads)
    if not run.resume:
        if not created:
            _clear_leftovers(out)
        stage = out / STAGING
        stage.mkdir(parents=True)
    try:
        with threads(n_threads):
            return _write_run(recipe, run, module, trainer, train, test, device, config, resuming, stage, n_threads)
    except BaseException:
        if stage is not None and stage.exists():  # failed before its first checkpoint: leave nothing behind
            shutil.rmtree(stage, ignore_errors=True)
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise


def _follow(recipe, run, trainer, n_threads):
    """What a rank other than 0 does in a data-parallel run: train (writing nothing), then wait for rank 0."""
    with threads(n_threads):
        _train(trainer, run, Checkpoint(run.out, resume=run.resume))
    trainer.parallel.barrier()
    return {}


def _write_run(recipe, run, module, trainer, train, test, device, config, resuming, stage, n_threads):
    out = Path(run.out)
    checkpoint = Checkpoint(stage or out, resume=run.resume)
    callbacks = [checkpoint] if stage is None else [checkpoint, _Commit(checkpoint, stage, out)]
    if stage is not None:
        write_json(stage / "config.json", config)
    init = {}
    if not resuming:
        init = recipe.before_fit(module, train, run, device) or {}
    t0 = time.perf_counter()
    result = _train(trainer, run, *callbacks)
    wall = time.perf_counter() - t0
    write_history(out / "history.csv", result.history)
    plot_history(result.history, out / "loss.png", title=f"{recipe.name} on {train.name} [{run.elbo}]")
    metrics = _evaluate_metrics(recipe, module, train, test, run, device)
    metrics.update(
        train_seconds=result.train_seconds,
        wall_seconds=wall,
        final_train_loss=result.history[-1]["train_loss"],
        epochs_trained=result.history[-1]["epoch"],
        threads=n_threads,
        world_size=trainer.world_size,
        **init,
    )
    if result.best_epoch is not None:
        # the parameters kept are the best epoch's: its losses describe the model scored above
        best = result.history[result.best_epoch - 1]
        metrics.update(best_epoch=result.best_epoch, stopped_early=result.stopped_early,
                       best_epoch_train_loss=best["train_loss"], best_epoch_val_elbo=best["val_elbo"])
    outputs = recipe.figures(out, module, train, test, run) or []
    config["outputs"] = sorted(set(RUN_FILES) | {Path(p).name for p in outputs})
    write_json(out / "config.json", config)
    write_json(out / "metrics.json", metrics)
    if trainer.parallel is not None:
        trainer.parallel.barrier()  # the other ranks wait for the run folder
    return metrics


def _evaluate_metrics(recipe, module, train, test, run, device):
    pyro.set_rng_seed(run.seed)
    with phase(f"test log-likelihood with {run.particles} particles", run.quiet):
        try:
            ev = evaluate(
                module, batching.to_device(test, device), particles=run.particles, progress=not run.quiet,
                keep_log_weights=True,
            )
        except FloatingPointError as exc:
            raise DivergenceError(f"the trained model's test evaluation is not finite ({exc})") from None
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


def evaluate_run(run_dir: str | Path, *, particles: int | None = None, device: str | torch.device = "auto",
                 quiet: bool = False, out: Any = None) -> dict[str, Any]:
    """Reload a finished run and recompute its test metrics into ``out`` (default: ``evaluation.json`` in the
    run folder, beside the training-time ``metrics.json``, which is kept). Returns the metrics."""
    target = check_output_file(out) if out is not None else Path(run_dir) / EVALUATION
    recipe, config, run = open_run(run_dir, quiet=quiet)
    if particles is not None:
        run = dataclasses.replace(run, particles=particles)
    dev = resolve_device(device)
    train, test = recipe.load_data(run)
    module = load_module(recipe, config, run_dir, dev)
    metrics = _evaluate_metrics(recipe, module, train, test, run, dev)
    write_json(target, metrics)
    return metrics


def sample_run(run_dir: str | Path, n: int, out_file: str | Path, *, device: str | torch.device = "auto",
               seed: int = 0) -> Any:
    """Draw ``n`` samples from a finished run's model and save them as an image grid."""
    if n < 1:
        raise UsageError(f"-n must be positive, got {n}")
    check_output_file(out_file, image=True)
    recipe, config, _ = open_run(run_dir)
    module = load_module(recipe, config, run_dir, resolve_device(device))
    pyro.set_rng_seed(seed)
    return recipe.save_samples(module, n, out_file, config["module"])


def generate_run(run_dir: str | Path, given: Any, target: Any, out_file: str | Path, *, n: int = 10,
                 device: str | torch.device = "auto", seed: int = 0) -> Any:
    """``pplm generate``: a grid of the run's test tuples' ``given`` modalities and ``target`` generated from them."""
    check_output_file(out_file, image=True)
    recipe, config, run = open_run(run_dir)
    if recipe.generate is None:
        kinds = " or ".join(name for name, r in RECIPES.items() if r.generate is not None)
        raise UsageError(f"{run_dir} holds a {config['model']!r} run; generate needs an {kinds} run")
    module = load_module(recipe, config, run_dir, resolve_device(device))
    return recipe.generate(module, run, given, target, out_file, n=n, seed=seed)


def impute_run(run_dir: str | Path, dataset: Any, out_file: str | Path, *, device: str | torch.device = "auto",
               seed: int = 0) -> Any:
    """``pplm impute``: fill the missing entries of ``dataset`` by cross-modal generation from a run's model."""
    out = check_output_file(out_file)
    if out.suffix != ".npz":
        raise UsageError(f"--out must end in .npz, got {out.name!r}")
    if isinstance(dataset, (str, Path)) and Path(dataset).resolve() == out.resolve():
        raise UsageError(f"--out {out} is the input file; write the filled data elsewhere")
    recipe, config, run = open_run(run_dir)
    if getattr(recipe, "impute", None) is None:
        raise UsageError(f"{run_dir} holds a {config['model']!r} run; impute needs an mvae run")
    module = load_module(recipe, config, run_dir, resolve_device(device))
    pyro.set_rng_seed(seed)
    return recipe.impute(module, run, dataset, out_file)


def print_metrics(metrics: Any, file: TextIO | None = None) -> None:
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
