"""Data loading: deterministic splits, binarisation, MNIST from a read-only folder, clear errors."""

from pathlib import Path

import numpy as np
import pytest
import torch

from inference.errors import UsageError
from ppl_models.data import DataError, load_dataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_digits_split_is_deterministic_and_scaled():
    torch.manual_seed(1)
    a_train, a_test = load_dataset("digits")
    torch.manual_seed(2)  # the training seed must not move the split
    b_train, b_test = load_dataset("digits")
    assert torch.equal(a_train.x, b_train.x) and torch.equal(a_test.y, b_test.y)
    assert len(a_train) + len(a_test) == 1797 and len(a_test) == 359
    assert a_train.x.min() == 0 and a_train.x.max() == 1
    assert a_train.image_shape == (1, 8, 8) and a_train.dim == 64
    # scikit-learn's digits are integers 0..16, so x * 16 must be integral
    assert torch.equal(a_train.x * 16, (a_train.x * 16).round())


def test_fixed_binarisation_thresholds_at_one_half():
    grey, _ = load_dataset("digits")
    binary, _ = load_dataset("digits", binarize="fixed")
    assert torch.equal(binary.x, (grey.x > 0.5).float())


def test_dynamic_binarisation_is_a_fresh_unbiased_draw():
    train, test = load_dataset("digits", binarize="dynamic")
    assert set(train.x.unique().tolist()) <= {0.0, 1.0} and set(test.x.unique().tolist()) <= {0.0, 1.0}
    torch.manual_seed(0)
    draws = torch.stack([train.epoch() for _ in range(200)])
    assert not torch.equal(draws[0], draws[1])
    # E[draw] = grey level; the mean of 200 Bernoulli draws has sd <= 0.5 / sqrt(200) = 0.035,
    # so 6 sd (0.22) bounds every one of the ~92k entries with overwhelming probability.
    assert (draws.mean(0) - train.grey).abs().max() < 0.22
    # the evaluation view is the same fixed-seed draw every time it is loaded
    again, _ = load_dataset("digits", binarize="dynamic")
    assert torch.equal(again.x, train.x)


def test_unknown_names_are_refused_with_the_valid_ones():
    with pytest.raises(UsageError, match="valid: digits, mnist, fashion-mnist"):
        load_dataset("cifar")
    with pytest.raises(UsageError, match="none, fixed, dynamic"):
        load_dataset("digits", binarize="sometimes")


def test_missing_mnist_folder_names_the_folder_and_files(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("mnist", data_root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    with pytest.raises(DataError, match="needs --data-root"):
        load_dataset("fashion-mnist")


def test_npz_with_nan_is_refused(tmp_path):
    x = np.random.default_rng(0).random((20, 4)).astype(np.float32)
    x[3, 1] = np.nan
    np.savez(tmp_path / "bad.npz", x=x)
    with pytest.raises(DataError, match="NaN"):
        load_dataset(str(tmp_path / "bad.npz"))


def test_npz_split_and_shapes(tmp_path):
    x = np.random.default_rng(0).random((50, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", x=x, y=np.arange(50) % 3)
    train, test = load_dataset(str(tmp_path / "mine.npz"))
    assert (len(train), len(test)) == (40, 10) and train.image_shape == (1, 6, 6)
    assert sorted(torch.cat([train.x, test.x]).sum(1).tolist()) == pytest.approx(sorted(x.reshape(50, -1).sum(1).tolist()))


@pytest.mark.skipif(not (SHARED / "MNIST" / "raw").is_dir(), reason="no MNIST files beside the repository")
def test_mnist_from_a_read_only_gzip_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PPLM_CACHE", str(tmp_path))
    train, test = load_dataset("mnist", data_root=SHARED, binarize="fixed")
    assert (len(train), len(test)) == (60000, 10000) and train.dim == 784 and train.image_shape == (1, 28, 28)
    # the official label counts of the MNIST test set (LeCun et al.): 980 zeros, 1135 ones, ...
    assert torch.bincount(test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert set(train.x.unique().tolist()) == {0.0, 1.0}
    assert not any((SHARED / "MNIST" / "raw").glob("*ubyte")), "the shared folder must stay untouched"
