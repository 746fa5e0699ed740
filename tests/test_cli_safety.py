"""The command line under bad input, damaged folders and divergence: nothing lost, nothing silently changed,
no traceback. One table (``CASES``) of inputs with their exit status, message fragment and what the folder
must look like afterwards (its checksums unchanged, or no folder at all), run in-process through
``ppl_models.cli.main`` on copies of one trained run; then the behaviours that succeed (overwrite, resume,
evaluate, progress lines, help, version, threads, warnings) and the checkpoint's safety."""

import argparse
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import inference.loss
from inference.checkpoint import FILENAME, load_checkpoint, set_rng_state
from inference.errors import CheckpointError
from ppl_models.cli import main, runs
from ppl_models.cli.options import MAX_SEED

PROGRESS = re.compile(r"pplm: (?!error)[^:]*(: done in [0-9.]+ s| \.\.\.)$")
FAST = ["--epochs", "1", "--particles", "10", "--quiet", "--hidden", "32", "--latent-dim", "4"]


def snapshot(folder):
    """Checksums of every file under ``folder`` (hidden ones and subfolders included); None when it is absent."""
    folder = Path(folder)
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_main(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals and --help/--version
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """One finished run (VAE on digits, one epoch, 10 particles) every case copies."""
    out = tmp_path_factory.mktemp("done") / "run"
    assert main(["train", "vae", "--out", str(out), "--seed", "1", *FAST]) == 0
    return out


def copy_of(done, tmp):
    target = tmp / "run"
    shutil.copytree(done, target)
    return target


def npz(tmp, name, **arrays):
    path = tmp / f"{name}.npz"
    np.savez(path, **arrays)
    return str(path)


GREY = np.random.default_rng(0).random((30, 16)).astype(np.float32)
BINARY = (GREY > 0.5).astype(np.float32)


def _without_checkpoint(run):
    (run / FILENAME).unlink()


def _crafted_pickle(run, marker):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"format": "ppl-models/checkpoint/2", "model": "VAE", "x": Payload()}, run / FILENAME)


def _refuse_replace_of(name):
    """os.replace failing for one file name (a file that cannot be moved or deleted)."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(src).name == name:
            raise PermissionError(13, "Permission denied", str(src))
        return real(src, dst, *args, **kwargs)

    return replace


def _read_only_mkdir(self, *args, **kwargs):
    raise PermissionError(13, "Permission denied", str(self))


def _read_only_mkstemp(*args, **kwargs):
    raise PermissionError(13, "Permission denied", str(kwargs.get("dir")))


def cases(tmp, done, monkeypatch):
    """name -> (argv, folder whose checksums are compared, expected code, message fragment, "same"|"absent")."""
    new = tmp / "new"
    run = lambda: copy_of(done, tmp)  # noqa: E731
    train = ["train", "vae", *FAST]

    def resume_differing(option, value):
        r = run()
        return ["train", "vae", "--out", str(r), "--resume", "--epochs", "2", option, value], r, 2, option, "same"

    def data_case(name, fragment, **arrays):
        return [*train, "--binarize", "none", "--likelihood", "cbernoulli", "--dataset", npz(tmp, name, **arrays),
                "--out", str(new)], new, 2, fragment, "absent"

    def c_resume_without_checkpoint():
        r = run()
        _without_checkpoint(r)
        return ["train", "vae", "--out", str(r), "--resume", "--epochs", "2"], r, 2, "no checkpoint.pt", "same"

    def c_overwrite_bad_scale():
        r = run()
        return [*train, "--out", str(r), "--overwrite", "--likelihood", "laplace:inf", "--binarize", "none"], r, 2, \
            "fixed scale", "same"

    def c_overwrite_diverging():
        r = run()
        return [*train, "--out", str(r), "--overwrite", "--lr", "1e30"], r, 2, "diverged", "same"

    def c_overwrite_undeletable():
        r = run()
        monkeypatch.setattr(runs.os, "replace", _refuse_replace_of("samples.png"))
        return [*train, "--out", str(r), "--overwrite"], r, 2, "samples.png: Permission denied", "same"

    def c_stub(extra, fragment):
        return lambda: ([*train, *extra, "--out", str(new)], new, 2, fragment, "absent")

    def c_output_in_run(command, name):
        def make():
            r = run()
            extra = ["-n", "4"] if command == "sample" else []
            return [command, str(r), *extra, "--out", str(r / name)], r, 2, "names a file of the run", "same"
        return make

    def c_config_twice():
        path = tmp / "twice.toml"
        path.write_text("latent-dim = 4\nlatent_dim = 8\n")
        return ["train", "vae", "--config", str(path), *FAST, "--out", str(new)], new, 2, "name the same option", \
            "absent"

    def c_read_only_train():
        monkeypatch.setattr(Path, "mkdir", _read_only_mkdir)
        return [*train, "--out", str(new)], new, 2, "Permission denied", "absent"

    def c_read_only_evaluate():
        r = run()
        monkeypatch.setattr("tempfile.mkstemp", _read_only_mkstemp)
        return ["evaluate", str(r), "--quiet"], r, 2, f"{r}: Permission denied", "same"

    def c_crafted_pickle():
        r = run()
        _crafted_pickle(r, tmp / "executed")
        return ["evaluate", str(r)], r, 2, "refused (loading it could run code)", "same"

    table = {
        # 1. a finished run is never lost or silently replaced
        "resume without checkpoint": c_resume_without_checkpoint,
        "overwrite, new run refused": c_overwrite_bad_scale,
        "overwrite, new run diverges in epoch 1": c_overwrite_diverging,
        "overwrite, an undeletable old file": c_overwrite_undeletable,
        "resume with another --elbo": lambda: resume_differing("--elbo", "iwae:2"),
        "resume with another --lr": lambda: resume_differing("--lr", "0.01"),
        "resume with another --seed": lambda: resume_differing("--seed", "2"),
        "resume with another --latent-dim": lambda: resume_differing("--latent-dim", "8"),
        "resume with another --batch-size": lambda: resume_differing("--batch-size", "32"),
        "resume with another --likelihood": lambda: resume_differing("--likelihood", "cbernoulli"),
        "already finished": lambda: (lambda r: (["train", "vae", "--out", str(r), "--resume"], r, 2,
                                                "already finished 1 epochs", "same"))(run()),
        "no stub: bad scale normal:inf": c_stub(["--likelihood", "normal:inf", "--binarize", "none"], "fixed scale"),
        "no stub: bad scale normal:1e-30": c_stub(["--likelihood", "normal:1e-30", "--binarize", "none"],
                                                  "fixed scale"),
        "no stub: t-SNE perplexity": lambda: (["train", "vade", "--dataset", npz(tmp, "small", x=GREY),
                                               "--clusters", "2", "--perplexity", "30", *FAST[:4], "--quiet",
                                               "--out", str(new)], new, 2, "--perplexity 30", "absent"),
        "no stub: mvae --max-train 1": lambda: (["train", "mvae", "--max-train", "1", *FAST[:4], "--quiet",
                                                 "--out", str(new)], new, 2, "validation", "absent"),
        "sample --out RUN/loss.png": c_output_in_run("sample", "loss.png"),
        "embed --out RUN/history.csv": c_output_in_run("embed", "history.csv"),
        "sample --out RUN/samples.png": c_output_in_run("sample", "samples.png"),
        "evaluate --out RUN/metrics.json": c_output_in_run("evaluate", "metrics.json"),
        "sample --out ''": lambda: (lambda r: (["sample", str(r), "--out", ""], r, 2, "empty", "same"))(run()),
        "train --out ''": lambda: ([*train, "--out", ""], new, 2, "empty", "absent"),
        # 2. one clear line, never a traceback
        "npz: 0 rows": lambda: data_case("rows0", "is empty", x=GREY[:0]),
        "npz: 1 row": lambda: data_case("rows1", "needs at least 3", x=GREY[:1]),
        "npz: 2 rows (empty test split)": lambda: data_case("rows2", "needs at least 3", x=GREY[:2]),
        "npz: empty x_test": lambda: data_case("emptytest", "'x_test' is empty", x_train=GREY, x_test=GREY[:0]),
        "npz: 0-d x": lambda: data_case("zerod", "got shape ()", x=np.float32(1.0)),
        "npz: 1-D x": lambda: data_case("oned", "reshape", x=GREY[:, 0]),
        "npz: complex x": lambda: data_case("complex", "complex", x=GREY + 1j * GREY),
        "npz: string labels": lambda: data_case("strlabels", "integer labels", x=GREY, y=np.array(["a"] * 30)),
        "npz: y shorter than x": lambda: data_case("yshort", "29 labels for 30 rows", x=GREY, y=np.zeros(29, int)),
        "npz: y longer than x": lambda: data_case("ylong", "31 labels for 30 rows", x=GREY, y=np.zeros(31, int)),
        "npz: non-integer labels": lambda: data_case("yfloat", "non-integer", x=GREY, y=np.full(30, 0.5)),
        "npz: train/test widths differ": lambda: data_case("widths", "different shapes", x_train=GREY,
                                                           x_test=GREY[:, :8]),
        "npz: an array the loader does not read": lambda: data_case("xtest", "does not read (x_test)", x=GREY,
                                                                    x_test=GREY[:5]),
        "npz: negative labels": lambda: data_case("yneg", "negative labels", x=GREY, y=np.full(30, -1)),
        "config: one option twice": c_config_twice,
        "read-only --out": c_read_only_train,
        "read-only run (evaluate)": c_read_only_evaluate,
        "seed -1": lambda: ([*train, "--seed", "-1", "--out", str(new)], new, 2, "expected a seed", "absent"),
        "seed 2^32": lambda: ([*train, "--seed", str(MAX_SEED + 1), "--out", str(new)], new, 2, "expected a seed",
                              "absent"),
        "sample --out x.txt": lambda: (lambda r: (["sample", str(r), "--out", str(tmp / "x.txt")], r, 2,
                                                  "unknown image format '.txt'", "same"))(run()),
        "conv on flat data": lambda: ([*train, "--arch", "conv", "--dataset", npz(tmp, "flat", x=BINARY),
                                       "--out", str(new)], new, 2, "image_shape (C, H, W)", "absent"),
        # 3. divergence
        "--lr 1e30 (non-finite outputs)": lambda: ([*train, "--lr", "1e30", "--out", str(new)], new, 2, "diverged",
                                                   "absent"),
        "--lr 1e6 (loss grows 1e3-fold)": lambda: ([*train, "--lr", "1e6", "--out", str(new)], new, 2, "diverged",
                                                   "absent"),
        "fixed scale laplace:inf": c_stub(["--likelihood", "laplace:inf", "--binarize", "none"], "fixed scale"),
        "fixed scale normal:0": c_stub(["--likelihood", "normal:0", "--binarize", "none"], "fixed scale"),
        # 4. someone else's run
        "crafted pickle in checkpoint.pt": c_crafted_pickle,
    }
    return table


CASES = [
    "resume without checkpoint", "overwrite, new run refused", "overwrite, new run diverges in epoch 1",
    "overwrite, an undeletable old file", "resume with another --elbo", "resume with another --lr",
    "resume with another --seed", "resume with another --latent-dim", "resume with another --batch-size",
    "resume with another --likelihood", "already finished", "no stub: bad scale normal:inf",
    "no stub: bad scale normal:1e-30", "no stub: t-SNE perplexity", "no stub: mvae --max-train 1",
    "sample --out RUN/loss.png", "sample --out RUN/samples.png", "evaluate --out RUN/metrics.json",
    "embed --out RUN/history.csv", "npz: an array the loader does not read", "npz: negative labels",
    "config: one option twice",
    "sample --out ''", "train --out ''",
    "npz: 0 rows", "npz: 1 row", "npz: 2 rows (empty test split)", "npz: empty x_test", "npz: 0-d x", "npz: 1-D x",
    "npz: complex x", "npz: string labels", "npz: y shorter than x", "npz: y longer than x",
    "npz: non-integer labels", "npz: train/test widths differ", "read-only --out", "read-only run (evaluate)",
    "seed -1", "seed 2^32", "sample --out x.txt", "conv on flat data",
    "--lr 1e30 (non-finite outputs)", "--lr 1e6 (loss grows 1e3-fold)", "fixed scale laplace:inf",
    "fixed scale normal:0", "crafted pickle in checkpoint.pt",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_loses_nothing(case, done, tmp_path, monkeypatch, capsys):
    argv, folder, expected_code, fragment, after = cases(tmp_path, done, monkeypatch)[case]()
    before = snapshot(folder)
    code, _, err = run_main(argv, capsys)
    monkeypatch.undo()
    # one line says what is wrong (after the one-line progress messages of any phase that had started)
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert code == expected_code, err
    assert len(lines) == 1 and lines[0].startswith("pplm"), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert snapshot(folder) == (before if after == "same" else None)
    assert not (tmp_path / "executed").exists()  # the crafted pickle ran nothing


def test_the_table_covers_every_case(done, tmp_path, monkeypatch):
    assert set(cases(tmp_path, done, monkeypatch)) == set(CASES)


# ---- what succeeds: replaced only when the new run has an epoch, resumed with the stored options -----------


def test_overwrite_replaces_after_the_first_epoch_and_removes_a_killed_runs_leftovers(done, tmp_path, capsys):
    r = copy_of(done, tmp_path)
    (r / runs.STAGING).mkdir()
    (r / runs.STAGING / "config.json").write_text("{}")  # what a run killed before its first checkpoint leaves
    before = json.loads((r / "config.json").read_text())
    code, _, _ = run_main(["train", "vae", "--out", str(r), "--overwrite", "--seed", "5", *FAST], capsys)
    assert code == 0
    assert not (r / runs.STAGING).exists() and not (r / runs.REPLACED).exists()
    after = json.loads((r / "config.json").read_text())
    assert (before["run"]["seed"], after["run"]["seed"]) == (1, 5)
    assert load_checkpoint(r / FILENAME)["settings"]["seed"] == 5


def test_resume_takes_the_stored_options_and_completes_a_run_killed_in_its_final_evaluation(
        done, tmp_path, monkeypatch, capsys):
    """A run killed while computing its test metrics is finished by --resume (no "already finished"); a resume
    that names no option keeps the stored --particles 10, not the default 1000, and may change --epochs."""
    out = tmp_path / "killed"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "_evaluate_metrics", killed)
    code, _, err = run_main(["train", "vae", "--out", str(out), "--seed", "1", *FAST], capsys)
    monkeypatch.undo()
    assert code == 130 and "--resume" in err
    assert (out / FILENAME).exists() and not (out / "metrics.json").exists()
    code, _, _ = run_main(["train", "vae", "--out", str(out), "--resume", "--quiet"], capsys)
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["particles"] == 10 and metrics["epochs_trained"] == 1
    # the same numbers as the uninterrupted run of the same command
    reference = json.loads((done / "metrics.json").read_text())
    assert metrics["test_elbo"] == pytest.approx(reference["test_elbo"], abs=1e-9)
    monkeypatch.setattr(inference.loss, "BACKEND", "aot_eager")  # --jit compiles; aot_eager keeps it cheap
    code, _, _ = run_main(["train", "vae", "--out", str(out), "--resume", "--epochs", "2", "--jit", "--quiet"],
                          capsys)
    monkeypatch.undo()
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["particles"] == 10 and config["run"]["epochs"] == 2 and config["options"]["hidden"] == [32]
    history = (out / "history.csv").read_text().splitlines()
    assert history[0].endswith(",jit") and [h.split(",")[-1] for h in history[1:]] == ["0", "1"]


def test_resume_of_a_config_without_checkpoint_that_never_finished_an_epoch_starts_it(done, tmp_path, capsys):
    out = tmp_path / "fresh"
    out.mkdir()
    shutil.copy(done / "config.json", out / "config.json")
    code, _, _ = run_main(["train", "vae", "--out", str(out), "--resume"], capsys)
    assert code == 0 and json.loads((out / "metrics.json").read_text())["epochs_trained"] == 1


def test_evaluate_writes_beside_the_training_metrics(done, tmp_path, capsys):
    r = copy_of(done, tmp_path)
    metrics = (r / "metrics.json").read_bytes()
    code, out, _ = run_main(["evaluate", str(r), "--particles", "20", "--quiet"], capsys)
    assert code == 0 and "test_log_likelihood=" in out
    assert (r / "metrics.json").read_bytes() == metrics
    assert json.loads((r / runs.EVALUATION).read_text())["particles"] == 20
    code, _, _ = run_main(["evaluate", str(r), "--quiet", "--out", str(tmp_path / "e.json")], capsys)
    again = json.loads((tmp_path / "e.json").read_text())
    assert code == 0 and again["particles"] == 10
    assert again["test_elbo"] == pytest.approx(json.loads(metrics)["test_elbo"], abs=1e-9)


# ---- 4. safe to open someone else's run --------------------------------------------------------------------


def test_run_files_have_the_users_umask_and_checkpoints_load_without_pickled_code(done):
    old = os.umask(0o022)
    os.umask(old)
    for p in done.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~old, p.name
    state = load_checkpoint(done / FILENAME)
    assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)


def test_a_checkpoint_of_format_1_with_numpys_array_still_loads(tmp_path):
    """The previous format stored NumPy's RNG state as an array: read through the allow-list, restored exactly."""
    np.random.seed(3)
    expected = np.random.rand(3)
    np.random.seed(3)
    torch.save({"format": "ppl-models/checkpoint/1", "model": "VAE",
                "rng": {"python": __import__("random").getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state()}}, tmp_path / "old.pt")
    np.random.seed(0)
    set_rng_state(load_checkpoint(tmp_path / "old.pt", expect_model="VAE")["rng"])
    assert np.array_equal(np.random.rand(3), expected)


def test_a_crafted_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "executed"
    _crafted_pickle(tmp_path, marker)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / FILENAME)
    assert not marker.exists()


# ---- 5. the user is told what is happening ----------------------------------------------------------------


def test_help_shows_defaults_and_version(capsys):
    code, out, _ = run_main(["train", "vae", "--help"], capsys)
    for shown in ("--lr LR               default: 0.001", "(default: 1000)", "default: dynamic", "default: 0\n"):
        assert code == 0 and shown in out, shown
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0 and "pplm: train, evaluate and sample" in out and "``" not in out
    code, out, _ = run_main(["--version"], capsys)
    assert code == 0 and out.strip() == f"pplm {__import__('ppl_models').__version__}"


def test_quiet_runs_say_their_long_phases_and_the_gmm_reference_can_be_skipped(tmp_path, capsys):
    out = tmp_path / "gmm"
    code, _, err = run_main(["train", "gmm", "--clusters", "3", "--epochs", "1", "--particles", "10", "--quiet",
                             "--no-em-reference", "--threads", "1", "--out", str(out)], capsys)
    assert code == 0
    assert "pplm: test log-likelihood with 10 particles ..." in err and "EM reference" not in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert "em_test_log_likelihood" not in metrics and metrics["threads"] == 1


def test_threads_follow_the_work_size_and_are_restored(done, capsys):
    small = torch.nn.Linear(64, 32)
    run = argparse.Namespace(threads=None, batch_size=64)
    assert runs.choose_threads(small, run, torch.device("cpu")) == 1  # 2e5 multiply-adds a step: one thread
    run.threads = 3
    assert runs.choose_threads(small, run, torch.device("cpu")) == 3
    big = torch.nn.Linear(4096, 4096)
    run.threads = None
    assert 1 <= runs.choose_threads(big, run, torch.device("cpu")) <= os.cpu_count()
    before = torch.get_num_threads()
    assert main(["evaluate", str(done), "--quiet", "--out", str(done.parent / "e.json")]) == 0
    assert torch.get_num_threads() == before


def test_warnings_are_shown_once_in_one_line(done, monkeypatch, capsys):
    def noisy(*args, **kwargs):
        for _ in range(3):
            warnings.warn("a warning a user cannot act on", UserWarning)
        return {}

    monkeypatch.setattr("ppl_models.cli.evaluate_run", noisy)
    code, _, err = run_main(["evaluate", str(done)], capsys)
    assert code == 0
    assert err.splitlines() == ["pplm: warning: UserWarning: a warning a user cannot act on"]


@pytest.mark.parametrize("rank, lines", [("0", 1), ("1", 0)])
def test_under_torchrun_rank_0_alone_prints_a_user_error(rank, lines, tmp_path, monkeypatch, capsys):
    """Every rank runs the same checks, so the one-line error comes from rank 0 only; every rank exits 2."""
    monkeypatch.setenv("RANK", rank)
    np.savez(tmp_path / "bad.npz", foo=np.zeros(3))
    assert main(["train", "vae", "--dataset", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "run")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == lines and all(line.startswith("pplm") for line in err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rank, lines", [("0", 1), ("1", 0)])
def test_under_torchrun_rank_0_alone_prints_an_argument_error(rank, lines, monkeypatch, capsys):
    """argparse's errors (an unknown option) and a config file's, too: one line from rank 0, exit 2 everywhere."""
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "vae", "--out", "run", "--no-such-option", "1"])
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == lines and all("--no-such-option" in line for line in err)
    assert main(["train", "vae", "--config", "/nonexistent/run.toml"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == lines and all(line.startswith("pplm: error:") for line in err)


@pytest.mark.parametrize("command", ["embed", "explore"])
def test_samples_below_two_is_refused_before_any_run_is_opened(command, tmp_path, capsys):
    """A flow guide's sd needs two draws: --samples 1 is an argument error, before the (missing) run is read."""
    with pytest.raises(SystemExit) as exit_:
        main([command, str(tmp_path / "no-run"), "--out", str(tmp_path / "codes.npz"), "--samples", "1"])
    assert exit_.value.code == 2
    assert "--samples: expected an integer of at least 2, got '1'" in capsys.readouterr().err
