"""Datasets as tensors on the run's device.

* ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images shipped with
  scikit-learn, so nothing downloads), scaled from 0..16 to [0, 1]; a fixed
  80/20 train/test split drawn with its own seed (``split_seed``, default 0), so
  the split does not change with the training seed.
* ``mnist``, ``fashion-mnist``: through torchvision from a folder holding the
  standard raw files (``<root>/MNIST/raw`` or ``<root>/FashionMNIST/raw``, gzipped
  or not); the official 60,000/10,000 split. Gzipped files are unpacked into a
  cache folder (``$PPLM_CACHE``, default ``~/.cache/ppl-models``), never next to
  the originals, so a read-only data folder works. Nothing downloads unless
  ``download=True``.
* ``sprites``: 6,144 procedurally generated 32x32 binary sprites with known
  factors (:mod:`ppl_models.sprites`), labelled by shape; a 90/10 split drawn
  with ``split_seed``.
* a path to a ``.npz`` file of your own with ``x`` (and optionally ``y``), or
  ``x_train``/``x_test`` (and ``y_train``/``y_test``).

Binarisation (recorded in a run's metrics):

* ``none``: grey levels in [0, 1];
* ``fixed``: x > 0.5;
* ``dynamic``: a fresh Bernoulli(x) draw every training epoch (Burda et al.
  2015), from the global torch RNG on the data's device, so it is reproducible
  from the run's seed and restored on resume. The evaluation view (the test set,
  and ``DataSplit.data`` of the training set) is one Bernoulli draw with a fixed
  seed, the same for every run.
"""
import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.errors import UsageError

from .sprites import SIZE as SPRITE_SIZE
from .sprites import load_sprites_arrays

DATASETS = ("digits", "mnist", "fashion-mnist", "sprites")
BINARIZE = ("none", "fixed", "dynamic")
EVAL_BINARIZE_SEED = 12345

_TORCHVISION = {
    "mnist": ("MNIST", "MNIST"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST"),
}
_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DataError(UsageError):
    """Missing, malformed or out-of-range data."""


@dataclass
class DataSplit:
    """One split of a dataset: flat float images ``x`` (N, D), optional labels ``y``.

    ``data`` is the fixed view used for evaluation; ``epoch()`` the view to train
    on for one epoch (a fresh draw under dynamic binarisation).
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor | None = None
    image_shape: tuple | None = None
    binarize: str = "none"
    grey: torch.Tensor | None = None  # grey levels kept for dynamic binarisation

    @property
    def data(self) -> torch.Tensor:
        return self.x

    def epoch(self) -> torch.Tensor:
        if self.binarize == "dynamic" and self.grey is not None:
            return torch.bernoulli(self.grey)
        return self.x

    def __len__(self):
        return self.x.shape[0]

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    def to(self, device: str | torch.device) -> "DataSplit":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, x=self.x.to(device), y=move(self.y), grey=move(self.grey))

    def rows(self, index: torch.Tensor) -> "DataSplit":
        """The datapoints ``index`` (an index tensor) of this split, as a split of the same kind."""
        pick = lambda t: None if t is None else t[index.to(t.device)]  # noqa: E731
        return replace(self, x=self.x[index.to(self.x.device)], y=pick(self.y), grey=pick(self.grey))


def binarize(x: torch.Tensor, mode: str, *, keep_grey: bool = False) -> tuple[Any, ...]:
    """Return (x_eval, grey): x_eval binarised as ``mode`` says; grey kept for dynamic draws."""
    if mode not in BINARIZE:
        raise UsageError(f"unknown binarization {mode!r}; valid: {', '.join(BINARIZE)}")
    if mode == "none":
        return x, None
    if ((x < 0) | (x > 1)).any():
        raise DataError("binarization needs data in [0, 1]")
    if mode == "fixed":
        return (x > 0.5).to(x.dtype), None
    gen = torch.Generator().manual_seed(EVAL_BINARIZE_SEED)
    return torch.bernoulli(x, generator=gen), (x if keep_grey else None)


def _split(name, x, y, image_shape, mode, train):
    x = torch.as_tensor(x, dtype=torch.float32).reshape(x.shape[0], -1)
    if not torch.isfinite(x).all():
        raise DataError(f"dataset {name!r} holds NaN or infinite values")
    y = None if y is None else torch.as_tensor(np.asarray(y)).long()
    x_eval, grey = binarize(x, mode, keep_grey=train)
    return DataSplit(name=name, x=x_eval, y=y, image_shape=tuple(image_shape), binarize=mode, grey=grey)


def load_digits_arrays(split_seed: int = 0, test_fraction: float = 0.2) -> tuple[Any, ...]:
    """scikit-learn's digits scaled to [0, 1]: (x_train, y_train, x_test, y_test) as numpy arrays."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(split_seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _cache_root():
    return Path(os.environ.get("PPLM_CACHE", Path.home() / ".cache" / "ppl-models"))


def torchvision_root(name: str, data_root: str | Path, download: bool = False) -> Any:
    """A root folder torchvision can read ``name`` from without downloading.

    Uses ``data_root`` as is when the raw files are there unpacked; unpacks the
    gzipped ones into a cache folder otherwise (the data folder is only read).
    """
    folder, _ = _TORCHVISION[name]
    if data_root is None:
        raise DataError(f"dataset {name!r} needs --data-root (a folder holding {folder}/raw/)")
    root = Path(data_root).expanduser()
    raw = root / folder / "raw"
    if all((raw / f).is_file() for f in _RAW_FILES):
        return root
    if all((raw / f"{f}.gz").is_file() for f in _RAW_FILES):
        key = hashlib.sha1(str(raw.resolve()).encode()).hexdigest()[:12]
        cache = _cache_root() / f"{folder}-{key}"
        cache_raw = cache / folder / "raw"
        cache_raw.mkdir(parents=True, exist_ok=True)
        for f in _RAW_FILES:
            target = cache_raw / f
            if not target.is_file():
                tmp = target.with_suffix(".tmp")
                with gzip.open(raw / f"{f}.gz", "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(tmp, target)
        return cache
    if download:
        return root
    missing = [f for f in _RAW_FILES if not (raw / f).is_file() and not (raw / f"{f}.gz").is_file()]
    raise DataError(
        f"{name} not found in {raw}: expected {', '.join(f + '[.gz]' for f in missing)} "
        "(pass --download to fetch them)"
    )


def _load_torchvision(name, data_root, download):
    import torchvision

    root = torchvision_root(name, data_root, download)
    cls = getattr(torchvision.datasets, _TORCHVISION[name][1])
    out = []
    for train in (True, False):
        ds = cls(root=str(root), train=train, download=download)
        out += [ds.data.numpy().astype(np.float32) / 255.0, ds.targets.numpy()]
    return out


def _check_x(path, key, x):
    """``x`` of a user's file: a real array of shape (N, D...) with N >= 1."""
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "biuf":
        kind = "complex" if x.dtype.kind == "c" else str(x.dtype)
        raise DataError(f"{path}: {key!r} must hold real numbers, got {kind} values")
    if x.ndim < 2:
        raise DataError(f"{path}: {key!r} must have shape (N, D) or (N, H, W) or (N, C, H, W), got shape "
                        f"{x.shape}" + ("; reshape a column of values to (N, 1)" if x.ndim == 1 else ""))
    if x.shape[0] == 0 or x[0].size == 0:
        raise DataError(f"{path}: {key!r} is empty (shape {x.shape})")


def _check_y(path, key, y, n, unlabelled=False):
    """Labels of a user's file: integers (or whole numbers), one per row of x; -1 marks an unlabelled row
    where ``unlabelled`` allows it."""
    if y is None:
        return None
    if y.dtype.kind not in "biuf" or y.ndim != 1:
        raise DataError(f"{path}: {key!r} must be a 1-D array of integer labels, got {y.dtype} of shape {y.shape}")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise DataError(f"{path}: {key!r} must hold integer labels, got non-integer values")
    if y.shape[0] != n:
        raise DataError(f"{path}: {key!r} has {y.shape[0]} labels for {n} rows of x")
    low = -1 if unlabelled else 0
    if y.size and y.min() < low:
        raise DataError(f"{path}: {key!r} holds negative labels (e.g. {int(y.min())}); labels are 0..K-1"
                        + (" (-1: unlabelled)" if unlabelled else ""))
    return y.astype(np.int64)


def _load_npz(path, unlabelled=False):
    """(x_train, y_train, x_test, y_test) of a user's ``.npz`` file, every array checked (rank, dtype, length,
    labels, matching widths); :class:`DataError` in one line otherwise. ``unlabelled``: the training labels
    may hold -1 (an unlabelled row; with a single ``y``, the test split's labels may too)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no data file at {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:
        raise DataError(f"cannot read {path} as .npz ({type(exc).__name__})") from None
    known = {"x", "y"} if "x" in arrays else {"x_train", "x_test", "y_train", "y_test"}
    unknown = sorted(set(arrays) - known)
    if unknown:
        raise DataError(f"{path} holds arrays this loader does not read ({', '.join(unknown)}); give 'x' (and 'y'), "
                        "or 'x_train' and 'x_test' (and 'y_train', 'y_test'), and nothing else")
    if "x_train" in arrays and "x_test" in arrays:
        x_tr, x_te = arrays["x_train"], arrays["x_test"]
        _check_x(path, "x_train", x_tr)
        _check_x(path, "x_test", x_te)
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise DataError(f"{path}: 'x_train' and 'x_test' hold points of different shapes "
                            f"({x_tr.shape[1:]} and {x_te.shape[1:]})")
        y_tr = _check_y(path, "y_train", arrays.get("y_train"), len(x_tr), unlabelled)
        return x_tr, y_tr, x_te, _check_y(path, "y_test", arrays.get("y_test"), len(x_te))
    if "x" not in arrays:
        raise DataError(f"{path} must hold 'x' (and optionally 'y'), or 'x_train' and 'x_test'")
    x = arrays["x"]
    _check_x(path, "x", x)
    y = _check_y(path, "y", arrays.get("y"), len(x), unlabelled)
    n_test = int(round(0.2 * len(x)))
    if n_test < 1 or n_test >= len(x):
        raise DataError(f"{path}: 'x' holds {len(x)} rows; the 80/20 train/test split needs at least 3")
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[:n_test], order[n_test:]
    return x[train], None if y is None else y[train], x[test], None if y is None else y[test]


def load_dataset(
    name: str = "digits", *, data_root: str | None = None, binarize: str = "none", download: bool = False,
    split_seed: int = 0, unlabelled: bool = False,
) -> tuple[DataSplit, DataSplit]:
    """Load a dataset by name (or .npz path): returns ``(train, test)`` :class:`DataSplit` on the CPU.

    ``unlabelled=True`` lets a ``.npz`` file's training labels hold -1 for unlabelled rows (semi-supervised
    models); otherwise negative labels are refused."""
    if binarize not in BINARIZE:
        raise UsageError(f"unknown binarization {binarize!r}; valid: {', '.join(BINARIZE)}")
    shape: tuple[int, ...]
    if name == "digits":
        x_tr, y_tr, x_te, y_te = load_digits_arrays(split_seed)
        shape = (1, 8, 8)
    elif name == "sprites":
        x_tr, y_tr, x_te, y_te, _, _ = load_sprites_arrays(split_seed)
        shape = (1, SPRITE_SIZE, SPRITE_SIZE)
    elif name in _TORCHVISION:
        x_tr, y_tr, x_te, y_te = _load_torchvision(name, data_root, download)
        shape = (1, 28, 28)
    elif str(name).endswith(".npz"):
        x_tr, y_tr, x_te, y_te = _load_npz(name, unlabelled)
        shape = x_tr.shape[1:] if x_tr.ndim > 2 else (int(np.prod(x_tr.shape[1:])),)
        if len(shape) == 2:
            shape = (1, *shape)
    else:
        raise UsageError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)} or a path to a .npz file")
    label = name if name in DATASETS else Path(name).stem
    return (
        _split(label, x_tr, y_tr, shape, binarize, train=True),
        _split(label, x_te, y_te, shape, binarize, train=False),
    )
