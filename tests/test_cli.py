"""The pplm command line: the main job, evaluate/sample, and every refusal leaving the disk untouched."""

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.checkpoint import save_checkpoint
from ppl_models.cli import build_parser, main
from ppl_models.cli.options import run_config
from ppl_models.cli.recipe import RunConfig
from ppl_models.cli.recipes import RECIPES
from ppl_models.cli.runs import read_config, read_run_config

FAST = ["--epochs", "2", "--particles", "20", "--quiet", "--hidden", "32", "--latent-dim", "4"]


def snapshot(folder):
    folder = Path(folder)
    if not folder.exists():
        return None
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "vae"
    assert main(["train", "vae", "--out", str(out), "--seed", "1", *FAST]) == 0
    return out


def test_train_writes_the_run_folder(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "checkpoint.pt", "history.csv", "metrics.json", "loss.png", "samples.png", "reconstructions.png"} <= names
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("model", "dataset", "binarize", "likelihood", "elbo", "epochs", "seed", "device", "test_elbo",
                "test_log_likelihood", "particles", "train_seconds", "versions"):
        assert key in metrics
    assert metrics["dataset"] == "digits" and metrics["binarize"] == "dynamic" and metrics["particles"] == 20
    # the importance-weighted estimate uses the ELBO's particles too: log-mean-exp >= mean, per point
    assert metrics["test_log_likelihood"] >= metrics["test_elbo"]
    assert set(metrics["versions"]) >= {"torch", "pyro"}
    assert (run_dir / "history.csv").read_text().splitlines()[0].startswith("epoch,train_loss")


def test_evaluate_reproduces_the_metrics(run_dir, capsys):
    before = json.loads((run_dir / "metrics.json").read_text())
    assert main(["evaluate", str(run_dir), "--quiet"]) == 0
    after = json.loads((run_dir / "evaluation.json").read_text())
    # same checkpoint, same seed, same particles: the same numbers
    assert after["test_log_likelihood"] == pytest.approx(before["test_log_likelihood"], abs=1e-9)
    assert main(["evaluate", str(run_dir), "--particles", "200", "--quiet"]) == 0
    assert json.loads((run_dir / "evaluation.json").read_text())["particles"] == 200
    assert json.loads((run_dir / "metrics.json").read_text()) == before  # the training-time metrics are kept
    assert "test_log_likelihood=" in capsys.readouterr().out


def test_sample_writes_a_png(run_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", str(run_dir), "-n", "16", "--out", str(out), "--seed", "3", "--device", "cpu"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_extends_a_run(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    argv = ["train", "vae", "--out", str(copy), "--resume", "--epochs", "3", "--quiet", "--particles", "20", "--no-validate"]
    assert main(argv) == 0
    history = (copy / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 3


def test_conv_vae_run_rebuilds_from_its_config(tmp_path):
    out = tmp_path / "conv"
    assert main(["train", "vae", "--arch", "conv", "--no-compile", "--out", str(out), "--device", "cpu", *FAST]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["module"]["arch"] == "conv" and config["module"]["image_shape"] == [1, 8, 8]
    before = json.loads((out / "metrics.json").read_text())
    assert main(["evaluate", str(out), "--quiet", "--device", "cpu"]) == 0  # rebuilt from config.json alone
    assert json.loads((out / "evaluation.json").read_text())["test_elbo"] == pytest.approx(before["test_elbo"], abs=1e-9)


# config.json "args" of `pplm train vae --out DIR --seed 1 *FAST` as written by format ppl-models/run/1
FORMAT_1_ARGS = {
    "model": "vae", "dataset": "digits", "data_root": None, "download": False, "binarize": "dynamic",
    "likelihood": "bernoulli", "latent_dim": 4, "hidden": [32], "arch": "mlp", "beta": 1.0, "elbo": "trace",
    "epochs": 2, "batch_size": 64, "lr": 0.001, "device": "auto", "seed": 1, "particles": 20, "no_validate": False,
    "jit": False, "quiet": True,
}


def test_the_stored_configuration_is_the_command_lines(run_dir):
    """config.json gives back the RunConfig the command line built (all but the folder flags)."""
    recipe = RECIPES["vae"]
    ns = build_parser().parse_args(["train", "vae", "--out", str(run_dir), "--seed", "1", *FAST])
    assert read_run_config(read_config(run_dir), recipe, out=str(run_dir)) == run_config(ns, recipe)


def test_a_run_folder_of_format_1_still_loads(tmp_path):
    """A folder written before the typed configuration (format run/1, argparse's namespace as "args")
    evaluates to the same numbers and resumes; the resumed run is rewritten in the current format."""
    copy = tmp_path / "v1"
    # format run/1 had no validation split: the same run now is --validation 0
    assert main(["train", "vae", "--out", str(copy), "--seed", "1", "--validation", "0", *FAST]) == 0
    config = json.loads((copy / "config.json").read_text())
    old = {"format": "ppl-models/run/1", "model": "vae", "args": FORMAT_1_ARGS, "module": config["module"],
           "versions": config["versions"], "outputs": config["outputs"]}
    assert read_run_config(old, RECIPES["vae"]) == read_run_config(config, RECIPES["vae"])
    assert main(["evaluate", str(copy), "--quiet"]) == 0  # the reference, from the current format
    before = json.loads((copy / "evaluation.json").read_text())
    (copy / "config.json").write_text(json.dumps(old))
    assert main(["evaluate", str(copy), "--quiet"]) == 0
    after = json.loads((copy / "evaluation.json").read_text())
    assert after["particles"] == 20 and after["test_log_likelihood"] == pytest.approx(before["test_log_likelihood"], abs=1e-9)
    assert main(["train", "vae", "--out", str(copy), "--resume", "--epochs", "3", "--quiet"]) == 0
    assert len((copy / "history.csv").read_text().splitlines()) == 1 + 3
    resumed = json.loads((copy / "config.json").read_text())
    assert resumed["format"] == "ppl-models/run/2" and resumed["options"]["hidden"] == [32]
    assert resumed["run"]["epochs"] == 3 and resumed["run"]["seed"] == 1


def test_each_models_options_are_its_recipes_fields():
    """Every option of ``pplm train MODEL`` lands in RunConfig or the recipe's Options, and the parser's
    defaults are the dataclasses' own (a run built in code means what the same command line means)."""
    for name, recipe in RECIPES.items():
        ns = build_parser().parse_args(["train", name, "--out", "x"])
        shared = {f.name for f in dataclasses.fields(RunConfig)} - {"options", "validate", "given"}
        fields = {f.name for f in dataclasses.fields(recipe.Options)}
        assert set(vars(ns)) == shared | fields | {"no_validate", "command", "model", "func", "config", "log_level"}, name
        assert not shared & fields, name
        run = run_config(ns, recipe)
        assert run.options == recipe.Options(), name
        defaults = RunConfig(out="x", options=recipe.Options(), elbo=recipe.default_elbo, epochs=recipe.default_epochs,
                             batch_size=recipe.default_batch_size, lr=recipe.default_lr, binarize=ns.binarize,
                             dataset=ns.dataset)
        assert run == defaults, name


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "MNIST" / "raw").is_dir(), reason="no MNIST files beside the repository")
def test_mnist_run_from_the_shared_folder(tmp_path, monkeypatch):
    """The README's MNIST command (one short epoch): the official split, read-only data, no download
    although --download is allowed (the files are there, so nothing is fetched)."""
    monkeypatch.setenv("PPLM_CACHE", str(tmp_path / "cache"))
    before = snapshot(SHARED / "MNIST" / "raw")
    out = tmp_path / "mnist"
    argv = ["train", "vae", "--dataset", "mnist", "--data-root", str(SHARED), "--binarize", "dynamic", "--download",
            "--batch-size", "500", "--out", str(out), *FAST[:2], "--particles", "5", "--quiet", "--epochs", "1"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["n_train"], metrics["n_test"], metrics["binarize"]) == (60000, 10000, "dynamic")
    # one epoch already beats 784 coin flips (543 nats) by far
    assert -543 < metrics["test_elbo"] <= metrics["test_log_likelihood"] < 0
    assert snapshot(SHARED / "MNIST" / "raw") == before


def _npz(path, x):
    np.savez(path, x=x)
    return str(path)


def bad_cases(tmp, run_dir):
    grey = np.random.default_rng(0).random((30, 16)).astype(np.float32)
    nan = grey.copy()
    nan[0, 0] = np.nan
    other = tmp / "other"
    other.mkdir()
    (other / "config.json").write_text((run_dir / "config.json").read_text())
    save_checkpoint(other / "checkpoint.pt", {"model": "SomethingElse", "epoch": 1})
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((run_dir / "config.json").read_text())
    (corrupt / "checkpoint.pt").write_bytes(b"\x00garbage")
    future = tmp / "future"
    future.mkdir()
    (future / "config.json").write_text(json.dumps({**json.loads((run_dir / "config.json").read_text()),
                                                    "format": "ppl-models/run/99"}))
    wrong_model = tmp / "wrongmodel"
    wrong_model.mkdir()
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["model"] = "gmm-or-other"
    (wrong_model / "config.json").write_text(json.dumps(cfg))
    out = str(tmp / "new")
    return {
        "unknown model": (["train", "nosuchmodel", "--out", out], "invalid choice", out),
        "unknown dataset": (["train", "vae", "--dataset", "cifar", "--out", out], "unknown dataset", out),
        "unknown elbo": (["train", "vae", "--elbo", "magic", "--out", out], "unknown ELBO spec", out),
        "unknown likelihood": (["train", "vae", "--likelihood", "poisson", "--out", out], "unknown likelihood", out),
        "missing data root": (["train", "vae", "--dataset", "mnist", "--out", out], "needs --data-root", out),
        "empty data root": (["train", "vae", "--dataset", "mnist", "--data-root", str(tmp), "--out", out],
                            "train-images-idx3-ubyte", out),
        "nan data": (["train", "vae", "--dataset", _npz(tmp / "nan.npz", nan), "--binarize", "none",
                      "--likelihood", "normal", "--out", out], "NaN", out),
        "conv on flat data": (["train", "vae", "--arch", "conv", "--out", out,
                               "--dataset", _npz(tmp / "flat.npz", (grey > 0.5).astype(np.float32))],
                              "image_shape (C, H, W)", out),
        "outside support": (["train", "vae", "--dataset", _npz(tmp / "grey.npz", grey), "--binarize", "none",
                             "--out", out], "binary data", out),
        "cuda absent": (["train", "vae", "--device", "cuda", "--out", out], "CUDA", out)
        if not torch.cuda.is_available() else None,
        "beta with iwae": (["train", "vae", "--beta", "2", "--elbo", "iwae:5", "--out", out], "site 'z' is scaled", out),
        "zero epochs": (["train", "vae", "--epochs", "0", "--out", out], "positive integer", out),
        "bad schedule": (["train", "vae", "--lr-schedule", "step:0:0.5", "--out", out], "learning-rate schedule", out),
        "validation fraction": (["train", "vae", "--validation", "1", "--out", out], "fraction in [0, 1)", out),
        "negative batch": (["train", "vae", "--batch-size", "-3", "--out", out], "positive integer", out),
        "zero lr": (["train", "vae", "--lr", "0", "--out", out], "positive number", out),
        "existing run": (["train", "vae", "--out", str(run_dir)], "already holds a run", str(run_dir)),
        "both flags": (["train", "vae", "--out", str(run_dir), "--resume", "--overwrite"], "not allowed with", str(run_dir)),
        "checkpoint of another model": (["train", "vae", "--out", str(other), "--resume", "--epochs", "3"],
                                        "holds a 'SomethingElse' model", str(other)),
        "corrupt checkpoint": (["train", "vae", "--out", str(corrupt), "--resume", "--epochs", "3"], "corrupt", str(corrupt)),
        "run of another model": (["train", "vae", "--out", str(wrong_model), "--resume"], "holds a 'gmm-or-other' run",
                                 str(wrong_model)),
        "evaluate corrupt": (["evaluate", str(corrupt)], "corrupt", str(corrupt)),
        "evaluate future format": (["evaluate", str(future)], "format 'ppl-models/run/99'", str(future)),
        "evaluate nothing": (["evaluate", str(tmp / "nothing")], "holds no run", str(tmp / "nothing")),
        "sample zero": (["sample", str(run_dir), "-n", "0", "--out", str(tmp / "s.png")], "positive integer", str(run_dir)),
    }


CASES = [
    "unknown model", "unknown dataset", "unknown elbo", "unknown likelihood", "missing data root", "empty data root",
    "nan data", "conv on flat data", "outside support", "cuda absent", "beta with iwae", "zero epochs", "negative batch", "zero lr",
    "existing run", "both flags", "checkpoint of another model", "corrupt checkpoint", "run of another model",
    "evaluate corrupt", "evaluate future format", "evaluate nothing", "sample zero",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_touches_nothing(case, run_dir, tmp_path, capsys):
    spec = bad_cases(tmp_path, run_dir)[case]
    if spec is None:
        pytest.skip("CUDA is available here")
    argv, message, folder = spec
    before = snapshot(folder)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pplm"), err
    assert message in lines[0]
    assert "Traceback" not in err
    assert snapshot(folder) == before


def test_every_option_is_exercised_by_some_test():
    """Pyro's habit: an option that no test runs is an option that may not work."""
    tests_text = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    parser = build_parser()
    options = set()

    def walk(p):
        for action in p._actions:
            options.update(o for o in action.option_strings if o.startswith("--") and o != "--help")
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for sub in action.choices.values():
                    walk(sub)

    walk(parser)
    missing = sorted(o for o in options if f'"{o}"' not in tests_text)
    assert not missing, f"options no test passes: {missing}"


def test_validation_early_stopping_schedule_and_tensorboard_from_the_command_line(tmp_path):
    """--validation holds 20% of the 1,437 digits out and records their ELBO; --lr-schedule step:1:0.5 halves
    the learning rate every epoch; --patience stops at the patience bound and the run keeps the best epoch;
    --tensorboard writes the epochs' scalars."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, tb = tmp_path / "run", tmp_path / "tb"
    argv = ["train", "vae", "--out", str(out), "--validation", "0.2", "--lr-schedule", "step:1:0.5", "--patience", "1",
            "--tensorboard", str(tb), "--lr", "0.02", *FAST[:1], "6", *FAST[2:]]
    assert main(argv) == 0
    with open(out / "history.csv") as f:
        history = list(csv.DictReader(f))
    lrs = [float(r["lr"]) for r in history]
    assert lrs == pytest.approx([0.02 * 0.5**k for k in range(len(history))], rel=1e-12)
    val = [float(r["val_elbo"]) for r in history]
    metrics = json.loads((out / "metrics.json").read_text())
    best = max(range(len(val)), key=val.__getitem__) + 1
    assert metrics["best_epoch"] == best and metrics["validation"] == 0.2
    if metrics["stopped_early"]:  # patience 1: stopped right after the first epoch that did not improve
        assert len(history) == best + 1 < 6
    else:
        assert len(history) == 6
    events = EventAccumulator(str(tb))
    events.Reload()
    assert [e.value for e in events.Scalars("val/elbo")] == pytest.approx(val, rel=1e-6)


def test_verbose_shows_the_engines_debug_lines(tmp_path, capsys):
    """pplm -v: the Trainer's set-up summary and each epoch's record reach stderr (default: they do not)."""
    assert main(["-v", "train", "vae", "--out", str(tmp_path / "v"), *FAST]) == 0
    err = capsys.readouterr().err
    assert "objective trace, latents ['z']" in err and "epoch {'epoch': 1," in err
    assert main(["train", "vae", "--out", str(tmp_path / "q"), *FAST]) == 0
    assert "epoch {'epoch': 1," not in capsys.readouterr().err
