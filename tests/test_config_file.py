"""``pplm train MODEL --config FILE``, ``python -m ppl_models``, ``pplm --verbose/--quiet`` and the version."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ppl_models import __version__
from ppl_models.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOML = """\
epochs = 2
batch-size = 32
particles = 20
quiet = true
hidden = [32]
latent_dim = 4
seed = 3
"""


def metrics(run):
    return json.loads((Path(run) / "metrics.json").read_text())


def stored(run):
    config = json.loads((Path(run) / "config.json").read_text())
    return config["run"], config["options"]


@pytest.fixture(scope="module")
def toml_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("config")
    (folder / "run.toml").write_text(TOML)
    assert main(["train", "vae", "--config", str(folder / "run.toml"), "--device", "cpu", "--out", str(folder / "a")]) == 0
    return folder


def test_a_toml_file_sets_the_options(toml_run):
    run, options = stored(toml_run / "a")
    assert (run["epochs"], run["batch_size"], run["particles"], run["seed"], run["quiet"]) == (2, 32, 20, 3, True)
    assert (options["hidden"], options["latent_dim"]) == ([32], 4)


def test_a_run_folders_config_json_repeats_the_run(toml_run):
    """Same stored options, same seed, CPU: every metric but the timings is equal, bit for bit."""
    assert main(["train", "vae", "--config", str(toml_run / "a" / "config.json"), "--out", str(toml_run / "b")]) == 0
    assert stored(toml_run / "b") == stored(toml_run / "a")
    timing = {"train_seconds", "wall_seconds"}
    first, second = metrics(toml_run / "a"), metrics(toml_run / "b")
    assert {k: v for k, v in first.items() if k not in timing} == {k: v for k, v in second.items() if k not in timing}
    assert (toml_run / "a" / "history.csv").read_text().splitlines()[1].split(",")[:3] == \
        (toml_run / "b" / "history.csv").read_text().splitlines()[1].split(",")[:3]


def test_the_command_line_overrides_the_file(toml_run):
    out = toml_run / "c"
    assert main(["train", "vae", "--config", str(toml_run / "run.toml"), "--seed", "4", "--epochs", "1",
                 "--device", "cpu", "--out", str(out)]) == 0
    run, options = stored(out)
    assert (run["seed"], run["epochs"], run["batch_size"], options["latent_dim"]) == (4, 1, 32, 4)


@pytest.mark.parametrize("text, words", [
    ("epochs = 2\nlearning_rate = 0.1\n", ["unknown option 'learning_rate'"]),
    ("epochs = 'many'\n", ["--epochs", "positive integer"]),
    ("jit = 3\n", ["jit must be true or false"]),
    ("epochs = [2\n", ["not valid TOML"]),
])
def test_a_bad_file_is_refused_in_one_line(tmp_path, capsys, text, words):
    """Refused with exit status 2 (argparse's own check of a value exits with it)."""
    (tmp_path / "bad.toml").write_text(text)
    try:
        code = main(["train", "vae", "--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "run")])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(("pplm: error:", "pplm train vae: error:"))
    assert all(w in err for w in words), err
    assert not (tmp_path / "run").exists()


def test_a_run_of_another_model_or_a_missing_file_is_refused(toml_run, tmp_path, capsys):
    assert main(["train", "gmm", "--config", str(toml_run / "a" / "config.json"), "--out", str(tmp_path / "g")]) == 2
    assert "a run of 'vae', not of 'gmm'" in capsys.readouterr().err
    assert main(["train", "vae", "--config", str(tmp_path / "none.toml"), "--out", str(tmp_path / "g")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_quiet_and_verbose_set_the_log_level(toml_run, capsys):
    run = str(toml_run / "a")
    assert main(["evaluate", run, "--particles", "5", "--device", "cpu", "--quiet"]) == 0
    assert "test log-likelihood with 5 particles" in capsys.readouterr().err  # the phase line (INFO)
    assert main(["--quiet", "evaluate", run, "--particles", "5", "--device", "cpu", "--quiet"]) == 0
    assert "pplm:" not in capsys.readouterr().err
    assert main(["--verbose", "evaluate", run, "--particles", "5", "--device", "cpu", "--quiet"]) == 0
    assert "test log-likelihood with 5 particles" in capsys.readouterr().err


def test_python_dash_m_runs_pplm_and_prints_the_version():
    out = subprocess.run([sys.executable, "-m", "ppl_models", "--version"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"pplm {__version__}"
    setup = (ROOT / "setup.py").read_text()
    assert '"0.1.0"' not in setup and "_version.py" in setup  # the version is defined once
