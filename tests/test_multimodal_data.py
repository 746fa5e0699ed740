"""Multimodal datasets: exact construction from their sources, reproducibility, ranges."""

from pathlib import Path

import numpy as np
import pytest
import torch

from inference.errors import UsageError
from ppl_models.data import load_digits_arrays
from ppl_models.multimodal_data import load_multimodal

MNIST_ROOT = "/work/shared/data"
HAVE_MNIST = (Path(MNIST_ROOT) / "MNIST" / "raw").is_dir()


def test_digits_halves_reassemble_the_digits_exactly():
    train, test = load_multimodal("digits-halves")
    x_tr, y_tr, x_te, y_te = load_digits_arrays()
    for split, x, y in ((train, x_tr, y_tr), (test, x_te, y_te)):
        whole = torch.cat([split.x["top"].reshape(-1, 4, 8), split.x["bottom"].reshape(-1, 4, 8)], 1)
        assert torch.equal(whole.reshape(len(y), 64), torch.as_tensor(x))
        assert torch.equal(split.x["label"], torch.as_tensor(y)) and torch.equal(split.y, torch.as_tensor(y))
    assert [m["name"] for m in train.modalities] == ["top", "bottom", "label"]
    assert train.modalities[2]["likelihood"] == "categorical"


def test_dynamic_binarisation_redraws_image_modalities_only():
    train, _ = load_multimodal("digits-label", binarize="dynamic")
    torch.manual_seed(0)
    a, b = train.epoch(), train.epoch()
    assert set(a["image"].unique().tolist()) <= {0.0, 1.0} and not torch.equal(a["image"], b["image"])
    assert torch.equal(a["label"], train.y)


def test_unknown_dataset_is_rejected():
    with pytest.raises(UsageError, match="valid: digits-label"):
        load_multimodal("cifar-label")


@pytest.mark.skipif(not HAVE_MNIST, reason="MNIST raw files not found")
def test_polymnist_views_share_the_class_and_are_reproducible():
    import torchvision

    from ppl_models.data import torchvision_root

    kw = dict(data_root=MNIST_ROOT, views=4, max_train=600, max_test=100)
    train, test = load_multimodal("polymnist", seed=3, **kw)
    again, _ = load_multimodal("polymnist", seed=3, **kw)
    other, _ = load_multimodal("polymnist", seed=4, **kw)
    assert all(torch.equal(train.x[k], again.x[k]) for k in train.x)  # same seed, same data
    assert not torch.equal(train.x["m1"], other.x["m1"])
    mnist = torchvision.datasets.MNIST(str(torchvision_root("mnist", MNIST_ROOT)), train=True)
    labels = mnist.targets.numpy()[:600]
    for v in range(4):
        x = train.x[f"m{v}"]
        assert x.shape == (600, 784) and float(x.min()) >= 0 and float(x.max()) <= 1
        assert (labels[train.sources[f"m{v}"]] == train.y.numpy()).all()  # every view shows the tuple's class
    # the views use different instances: most tuples' view 1 differs from view 0's image
    assert np.mean(train.sources["m1"] != train.sources["m0"]) > 0.9
    # background pixels (digit grey level 0) are the view's texture, in [0, 0.4]
    digit = torch.as_tensor(mnist.data.numpy()[train.sources["m0"]] / 255.0).reshape(600, -1)
    assert float(train.x["m0"][digit == 0].max()) <= 0.4 + 1e-6
