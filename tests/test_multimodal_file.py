"""Multimodal data from your own .npz (or a TOML spec naming it): every refusal is one line and writes nothing;
NaN rows become masks; standardisation; scikit-learn's Linnerud two-view table end to end (train, impute)."""

import json

import numpy as np
import pytest
import torch

from inference.errors import UsageError
from inference.metrics import PRESENT
from ppl_models.cli import main
from ppl_models.multimodal_data import load_multimodal, load_multimodal_file, parse_weights, read_spec, with_missing

MODS = {"img": "bernoulli", "val": "normal", "label": "categorical:3"}
FAST = ["--epochs", "1", "--particles", "4", "--hidden", "8", "--latent-dim", "2", "--quiet", "--no-validate",
        "--batch-size", "16", "--validation", "0"]


def arrays(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return {"x_img": (rng.random((n, 2, 3)) < 0.5).astype(np.float32), "x_val": rng.normal(5, 2, (n, 4)),
            "x_label": rng.integers(0, 3, n), "y": rng.integers(0, 3, n)}


def write(path, **arrs):
    np.savez(path, **arrs)
    return path


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


def _with(d, **changes):
    out = {k: np.array(v, copy=True) for k, v in d.items()}
    for k, change in changes.items():
        out[k] = change(out[k]) if callable(change) else change
    return out


def _set(index, value):
    def change(a):
        a = a.astype(np.float64)
        a[index] = value
        return a
    return change


BAD = [
    (lambda a: _with(a, y=a["y"][:-1]), MODS, "disagree on the number of rows"),
    (lambda a: _with(a, x_val=_set((3, 1), np.nan)), MODS, "row 3 holds NaN"),
    (lambda a: _with(a, x_val=_set(3, np.nan), mask_val=np.ones(30, bool)), MODS, "row 3 is all NaN but mask_val"),
    (lambda a: _with(a, x_img=_set((0, 0, 0), 0.5)), MODS, "must be binary"),
    (lambda a: _with(a, x_img=_set((0, 0, 0), 1.5)), {**MODS, "img": "cbernoulli"}, "must lie in [0, 1]"),
    (lambda a: a, {**MODS, "val": "gamma"}, "unknown likelihood"),
    (lambda a: _with(a, x_label=_set(2, 3)), MODS, "labels outside 0..2"),
    (lambda a: _with(a, x_label=_set(2, 1.5)), MODS, "integer labels"),
    (lambda a: _without(a, "x_val"), MODS, "no array 'x_val'"),
    (lambda a: _with(a, x_extra=np.zeros(30)), MODS, "no modality declares it"),
    (lambda a: _with(a, x_img=_set(4, np.nan), x_val=_set(4, np.nan), x_label=_set(4, np.nan)), MODS,
     "row 4 has no modality present"),
    (lambda a: _with(a, x_img_test=a["x_img"]), MODS, "missing x_val_test"),
    (lambda a: _with(a, mask_val=np.full(30, 2)), MODS, "one bool (or 0/1) per row"),
    (lambda a: _with(a, y=_set(0, 0.5)), MODS, "one integer class per row"),
]


@pytest.mark.parametrize("make,mods,message", BAD)
def test_every_refusal_is_one_line_and_writes_nothing(make, mods, message, tmp_path, capsys):
    path = write(tmp_path / "d.npz", **make(arrays()))
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_multimodal_file(path, mods)
    out = tmp_path / "run"
    argv = ["train", "mvae", "--dataset", str(path), *[f"--modality={k}={v}" for k, v in mods.items()],
            "--out", str(out), *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "digits-halves", "--modality", "a=normal"], "built-in dataset"),
    (["--dataset", "nofile.npz", "--modality", "a=normal"], "no data file"),
    (["--dataset", "{npz}", "--modality", "img"], "NAME=VALUE"),
    (["--dataset", "{npz}", "--modality", "img=bernoulli", "--modality", "val=normal", "--modality",
      "label=categorical:3", "--shape", "img=4x4"], "does not match"),
    (["--dataset", "{npz}", "--modality", "img=bernoulli", "--modality", "val=normal", "--modality",
      "label=categorical", "--weights", "img=0"], "positive number"),
    (["--dataset", "{npz}", "--modality", "img=bernoulli", "--modality", "val=normal", "--modality",
      "label=categorical", "--weights", "top=1"], "unknown modalities"),
    (["--dataset", "{npz}", "--modality", "img=bernoulli", "--modality", "val=normal", "--modality",
      "label=categorical", "--objective", "cross", "--elbo", "iwae:3"], "no bound"),
])
def test_cli_refuses_bad_file_options(argv, message, tmp_path, capsys):
    npz = write(tmp_path / "d.npz", **arrays())
    out = tmp_path / "run"
    assert main(["train", "mvae", *[a.format(npz=npz) for a in argv], "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_nan_rows_and_masks_become_one_presence_mask_with_zero_filled_entries(tmp_path):
    a = arrays()
    mask_label = np.ones(30, bool)
    mask_label[[1, 2]] = False
    a = _with(a, x_val=_set([0, 5], np.nan), x_label=_set(2, 7), mask_label=mask_label)  # 7 sits under the mask
    train, test = load_multimodal_file(write(tmp_path / "d.npz", **a), MODS, standardize=True, seed=3)
    again, _ = load_multimodal_file(tmp_path / "d.npz", MODS, standardize=True, seed=3)
    assert len(train) == 24 and len(test) == 6 and torch.equal(train.x["val"], again.x["val"])
    mask = torch.cat([train.mask, test.mask])
    assert mask.shape == (30, 3) and int((~mask).sum()) == 4
    assert [m["image_shape"] for m in train.modalities] == [[1, 2, 3], None, None]  # kept from the (N, 2, 3) array
    assert train.modalities[2]["dim"] == 3 and train.x["label"].dtype == torch.long
    for split in (train, test):
        for i, name in enumerate(["img", "val", "label"]):
            assert (split.x[name][~split.mask[:, i]] == 0).all()  # absent entries zero-filled
        assert torch.equal(split.data[PRESENT], split.mask)
    present = train.x["val"][train.mask[:, 1]]  # standardised on the training rows that have it
    assert torch.allclose(present.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(present.std(0, unbiased=False), torch.ones(4), atol=1e-4)
    mean, std = train.scaling["val"]  # the training rows' (the seeded 80%) that have the modality
    rows = [i for i in np.random.default_rng(3).permutation(30)[6:] if np.isfinite(a["x_val"][i]).all()]
    assert torch.allclose(mean, torch.as_tensor(a["x_val"][rows].mean(0)).float())
    assert torch.allclose(std, torch.as_tensor(a["x_val"][rows].std(0)).float())
    assert set(train.scaling) == {"val"}  # bernoulli and categorical modalities are not rescaled


def test_spec_file_and_weights():
    assert parse_weights("top=1,bottom=1,label=50") == {"top": 1.0, "bottom": 1.0, "label": 50.0}
    assert parse_weights("auto") == "auto"


def test_toml_spec_trains_with_incomplete_samples_and_scores_each_present_subset(tmp_path):
    a = _with(arrays(), x_val=_set(slice(0, 30, 3), np.nan))  # every third row lacks val
    write(tmp_path / "d.npz", **a)
    (tmp_path / "spec.toml").write_text('file = "d.npz"\nstandardize = true\nweights = {label = 5}\n'
                                        '[modalities.img]\nlikelihood = "bernoulli"\nshape = "2x3"\n'
                                        '[modalities.val]\nlikelihood = "normal"\n'
                                        '[modalities.label]\nlikelihood = "categorical:3"\n')
    spec = read_spec(tmp_path / "spec.toml")
    assert spec["modalities"] == MODS and spec["shapes"] == {"img": (1, 2, 3)} and spec["weights"] == {"label": 5.0}
    out = tmp_path / "run"
    assert main(["train", "mvae", "--dataset", str(tmp_path / "spec.toml"), "--out", str(out), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["likelihood_weights"] == {"img": 1.0, "val": 1.0, "label": 5.0} and "val" in metrics["standardized"]
    # the seeded split's 6 test rows; coherence given a subset is scored on the rows that have all of it
    test_rows = np.random.default_rng(0).permutation(30)[:6]
    with_val = int(sum(r % 3 != 0 for r in test_rows))
    by = {(r["given"], r["target"]): r["n"] for r in metrics["coherence"]}
    assert by[("img", "val")] == 6 and by[("val", "img")] == with_val and by[("img+val", "label")] == with_val
    assert sum(p["n"] for p in metrics["by_pattern"].values()) == 6
    assert metrics["by_pattern"].get("img+label", {"n": 0})["n"] == 6 - with_val
    (tmp_path / "bad.toml").write_text('file = "d.npz"\n[modalities.img]\nshape = "2x3"\n')
    assert main(["train", "mvae", "--dataset", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "r2"), *FAST]) == 2


def test_linnerud_two_views_end_to_end(tmp_path):
    """scikit-learn's Linnerud table (20 men: 3 exercise counts, 3 physiological measurements) as two
    normal views, a quarter of the physiological rows missing (NaN); train with the cross objective and
    automatic weights, then impute the missing rows back in the file's units."""
    from sklearn.datasets import load_linnerud

    d = load_linnerud()
    physio = d.target.copy()
    physio[::4] = np.nan  # rows 0, 4, 8, 12, 16: absent
    path = write(tmp_path / "linnerud.npz", x_exercise=d.data, x_physio=physio)
    out = tmp_path / "run"
    argv = ["train", "mvae", "--dataset", str(path), "--modality", "exercise=normal", "--modality", "physio=normal",
            "--standardize", "--objective", "cross", "--weights", "auto", "--rule", "poe", "--epochs", "30",
            "--batch-size", "8", "--hidden", "16", "--latent-dim", "2", "--particles", "20", "--quiet",
            "--validation", "0", "--seed", "1", "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["test_elbo"]) and metrics["test_log_likelihood"] >= metrics["test_elbo"]
    assert metrics["likelihood_weights"] == {"exercise": 1.0, "physio": 1.0}  # 3 and 3 values
    assert metrics["missing_fraction"]["train"]["exercise"] == 0.0
    assert metrics["missing_fraction"]["train"]["physio"] + metrics["missing_fraction"]["test"]["physio"] > 0
    filled = tmp_path / "filled.npz"
    assert main(["impute", str(out), "--dataset", str(path), "--out", str(filled), "--device", "cpu"]) == 0
    with np.load(filled) as f:
        x, mask = f["x_physio"], f["mask_physio"]
        assert np.array_equal(f["x_exercise"], d.data)
    assert mask.tolist() == [i % 4 != 0 for i in range(20)]
    assert np.array_equal(x[mask], d.target[mask].astype(np.float32))  # present rows unchanged
    # the filled rows are in the file's units (weight in pounds ~ 140-250, not standardised ~ N(0, 1)):
    # within 3 sd of the observed rows' range
    lo, hi, sd = d.target[mask].min(0), d.target[mask].max(0), d.target[mask].std(0)
    assert np.isfinite(x).all() and ((x[~mask] > lo - 3 * sd) & (x[~mask] < hi + 3 * sd)).all()
    assert main(["impute", str(out), "--dataset", str(tmp_path / "none.npz"), "--out", str(filled)]) == 2


def test_with_missing_drops_a_seeded_fraction_and_keeps_a_modality_per_row():
    train, _ = load_multimodal("digits-halves", max_train=100, max_test=10)
    half = with_missing(train, "top", 0.3, seed=1)
    assert int((~half.mask[:, 0]).sum()) == 30 and half.mask[:, 1:].all()
    assert (half.x["top"][~half.mask[:, 0]] == 0).all()
    assert torch.equal(half.x["top"][half.mask[:, 0]], train.x["top"][half.mask[:, 0]])
    assert torch.equal(with_missing(train, "top", 0.3, seed=1).mask, half.mask)
    again = with_missing(half, "bottom", 0.5, seed=2)  # only rows that keep another modality lose bottom
    assert again.mask.any(1).all() and int((~again.mask[:, 1]).sum()) == 50
    with pytest.raises(UsageError, match="rows can lose"):
        with_missing(again, "label", 0.9)
