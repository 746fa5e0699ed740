"""``pplm train mvae`` and ``pplm generate``: a run folder with coherence metrics and grids; clear refusals."""

import json

import pytest

from ppl_models.cli import main

FAST = ["--epochs", "1", "--particles", "5", "--hidden", "32", "--latent-dim", "4", "--quiet", "--no-validate"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mvae") / "run"
    assert main(["train", "mvae", "--rule", "code", "--rho", "0.4", "--out", str(out), *FAST]) == 0
    return out


def test_train_writes_run_with_multimodal_metrics(run):
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert config["module"]["rule"] == "code" and config["module"]["rho"] == 0.4
    # digits halves + label: 3 given-size-1 subsets x 2 targets + 3 given-size-2 subsets x 1 target
    assert len(metrics["coherence"]) == 9 and set(metrics["coherence_by_size"]) == {"1", "2"}
    assert all(0 <= r["coherence"] <= 1 for r in metrics["coherence"])
    assert metrics["classifier_accuracy"]["label"] == 1.0
    assert {"generation.png", "samples.png", "loss.png"} <= {p.name for p in run.iterdir()}


def test_generate_writes_a_grid(run, tmp_path):
    out = tmp_path / "g.png"
    assert main(["generate", str(run), "--given", "top,label", "--target", "bottom", "--out", str(out),
                 "--device", "cpu"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,message", [
    (["train", "mvae", "--rule", "poe", "--rho", "0.3"], "takes none"),
    (["train", "mvae", "--rule", "code", "--rho", "-0.7"], "rho must lie in"),
    (["train", "mvae", "--elbo", "iwae:5"], "no bound"),
])
def test_train_refuses_bad_options(argv, message, tmp_path, capsys):
    out = tmp_path / "r"
    assert main([*argv, "--out", str(out), *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()


def test_generate_refuses_unknown_modality(run, tmp_path, capsys):
    assert main(["generate", str(run), "--given", "left", "--target", "bottom", "--out", str(tmp_path / "g.png"),
                 "--device", "cpu"]) == 2
    assert "modality names among" in capsys.readouterr().err


def test_options_reach_the_model_and_data(tmp_path):
    out = tmp_path / "r"
    argv = ["train", "mvae", "--rule", "mopoe", "--prior-expert", "--objective", "subset", "--subset-weights",
            "learned", "--subset-entropy", "0.5", "--private-dim", "2", "--classifier", "logistic",
            "--modalities", "3", "--data-seed", "1", "--max-train", "200", "--max-test", "50", "--out", str(out), *FAST]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())["module"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (config["prior_expert"], config["subset_weights"], config["subset_entropy"], config["private_dim"]) == (
        True, "learned", 0.5, 2)
    assert (metrics["n_train"], metrics["n_test"]) == (200, 50)
