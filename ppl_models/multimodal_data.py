r"""Multimodal datasets: dicts of modality tensors sharing the first dimension; nothing downloads.

=================  ============================================================  ===
name               modalities                                                     M
=================  ============================================================  ===
``digits-label``   ``image`` (scikit-learn 8x8 digit, 64 values), ``label``        2
``digits-halves``  ``top`` and ``bottom`` halves (4x8 each) of a digit, ``label``  3
``mnist-label``    ``image`` (MNIST 28x28), ``label``                              2
``polymnist``      ``m0`` .. ``m{V-1}``: V = 3..5 views (``views=``), 28x28 each  V
=================  ============================================================  ===

The ``label`` modality is the class as an integer (a categorical modality);
every split also keeps the class in ``y`` for metrics.

**Your own data** (:func:`load_multimodal_file`, ``pplm train mvae --dataset FILE.npz``):
a ``.npz`` file with one array ``x_<name>`` per modality (N rows; an image may
keep its (N, H, W) or (N, C, H, W) shape), optionally ``mask_<name>`` (N bools:
which rows have that modality), ``y`` (N integer classes, for metrics), and a
test set in ``x_<name>_test`` (``mask_<name>_test``, ``y_test``); without one a
seeded 80/20 split is drawn. Each modality is declared with its likelihood
(``bernoulli``, ``cbernoulli``, ``normal[:S]``, ``laplace[:S]``, ``categorical[:K]``)
and optionally an image shape (``8x8`` or ``CxHxW``), on the command line or in a
TOML spec file (:func:`read_spec`). A row of ``x_<name>`` that is all NaN marks
the modality absent in that row (as a False in ``mask_<name>``, turned into the
mask before any other check). Every array is checked (names, row counts, NaN
outside a mask, the likelihood's support, labels in 0..K-1, every row with a
modality) with one line on the first failure, before anything is written.
Absent entries are zero-filled: nothing reads them (:class:`ppl_models.multimodal.MultimodalVAE`).
``standardize=True`` rescales every normal/laplace modality to zero mean and unit
variance per feature with the training rows' statistics (kept in ``scaling``).

**PolyMNIST-like** (after Sutter, Daunhawer & Vogt 2021, who paste MNIST digits
onto crops of background photographs): tuple n has class y_n (the class of the
n-th MNIST image of the split); view v shows a *different* MNIST instance of
class y_n, chosen at random among that class, on a random 28x28 crop of view
v's own procedurally generated texture T_v (a mixture of oriented sinusoidal
gratings and smoothed noise whose frequencies and orientations are drawn per
view, scaled to [0, 0.4]). Digit pixels invert the background:
x = (1 - d) T + d (1 - T), with d the digit's grey level, so the strokes
(>= 0.6) stay visible on any part of the texture. Views 3 and
4 are also transformed (view 3 rotated by 90 degrees, view 4 mirrored), so
the views differ in more than texture. Everything is drawn from
``numpy.random.default_rng(seed)``: the same seed gives the same data.
"""
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import tomllib
import torch

from inference.errors import UsageError
from inference.metrics import PRESENT

from .data import BINARIZE, DataError, _load_torchvision, binarize, load_digits_arrays
from .likelihoods import LIKELIHOODS, make_likelihood
from .multimodal import modality

MULTIMODAL_DATASETS = ("digits-label", "digits-halves", "mnist-label", "polymnist")


@dataclass
class MultimodalSplit:
    """One split: ``x`` a dict {modality: tensor (N, ...)}, ``y`` the classes, ``modalities`` their specs.

    ``data`` is the fixed view for evaluation; ``epoch()`` the view to train on
    (a fresh Bernoulli draw of the image modalities under dynamic binarisation).
    With incomplete samples ``mask`` is the presence mask (N, M) bool (columns in
    ``modalities`` order) and both views carry it under the key
    :data:`inference.metrics.PRESENT`; ``y`` may be None (no classes given);
    ``scaling`` holds the standardisation {modality: (mean, std)} applied to it.
    """

    name: str
    x: dict
    y: torch.Tensor | None
    modalities: list
    binarize: str = "none"
    grey: dict = field(default_factory=dict)
    sources: dict | None = None  # PolyMNIST-like: {view: indices of its MNIST images in the source split}
    mask: torch.Tensor | None = None
    scaling: dict = field(default_factory=dict)

    def _with_mask(self, x):
        return x if self.mask is None else {**x, PRESENT: self.mask}

    @property
    def data(self) -> dict[str, torch.Tensor]:
        return self._with_mask(self.x)

    def epoch(self) -> dict[str, torch.Tensor]:
        if self.binarize != "dynamic" or not self.grey:
            return self.data
        return self._with_mask({k: torch.bernoulli(self.grey[k]) if k in self.grey else v for k, v in self.x.items()})

    def __len__(self):
        return next(iter(self.x.values())).shape[0]

    @property
    def names(self) -> list[Any]:
        return [m["name"] for m in self.modalities]

    def subset(self, names: Sequence[str]) -> dict[str, Any]:
        """The dict restricted to ``names`` (the other modalities absent)."""
        return {k: self.x[k] for k in names}

    def to(self, device: str | torch.device) -> "MultimodalSplit":
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        opt = lambda v: None if v is None else v.to(device)  # noqa: E731
        return replace(self, x=move(self.x), y=opt(self.y), grey=move(self.grey), mask=opt(self.mask))

    def rows(self, index: torch.Tensor) -> "MultimodalSplit":
        """The tuples ``index`` (an index tensor) of this split, as a split of the same kind."""
        pick = lambda d: {k: v[index.to(v.device)] for k, v in d.items()}  # noqa: E731
        opt = lambda v: None if v is None else v[index.to(v.device)]  # noqa: E731
        sources = None if self.sources is None else {k: v[index.cpu().numpy()] for k, v in self.sources.items()}
        return replace(self, x=pick(self.x), y=opt(self.y), grey=pick(self.grey), sources=sources,
                       mask=opt(self.mask))


def with_missing(split: Any, name: str, fraction: float, *, seed: int = 0) -> Any:
    """A copy of ``split`` in which modality ``name`` is absent from a seeded ``fraction`` of the rows.

    The rows are drawn (``numpy.random.default_rng(seed)``) among those that have ``name`` and another
    modality, so every row keeps one; their entries are zero-filled and the presence mask updated.

    :raises UsageError: an unknown modality, a fraction outside [0, 1), or too few rows to drop.
    """
    if name not in split.names:
        raise UsageError(f"unknown modality {name!r}; this data has {split.names}")
    if not 0 <= fraction < 1:
        raise UsageError(f"the missing fraction must lie in [0, 1), got {fraction}")
    if fraction == 0:
        return split
    i = split.names.index(name)
    mask = split.mask.clone() if split.mask is not None else torch.ones(len(split), len(split.names), dtype=torch.bool)
    others = torch.cat([mask[:, :i], mask[:, i + 1:]], 1).any(1)
    candidates = (others & mask[:, i]).nonzero().squeeze(-1)
    k = int(round(fraction * len(split)))
    if k > len(candidates):
        raise UsageError(f"only {len(candidates)} rows can lose {name!r}, fewer than {fraction:g} of {len(split)}")
    drop = candidates[torch.as_tensor(np.random.default_rng(seed).permutation(len(candidates))[:k])]
    mask[drop, i] = False
    keep = mask[:, i].to(split.x[name].device)
    zero = lambda v: torch.where(keep.reshape((-1,) + (1,) * (v.dim() - 1)), v, v.new_zeros(()))  # noqa: E731
    x = {**split.x, name: zero(split.x[name])}
    grey = {k: zero(v) if k == name else v for k, v in split.grey.items()}
    return replace(split, x=x, grey=grey, mask=mask.to(split.x[name].device))


def _split(name, images, labels, y, shapes, mode, train, label_classes=10):
    """Build a split from numpy images {name: (N, D) in [0, 1]}; labels=True adds the label modality."""
    x, grey, specs = {}, {}, []
    lik = "cbernoulli" if mode == "none" else "bernoulli"
    for key, arr in images.items():
        t = torch.as_tensor(arr, dtype=torch.float32).reshape(arr.shape[0], -1)
        x[key], g = binarize(t, mode, keep_grey=train)
        if g is not None:
            grey[key] = g
        specs.append(modality(key, t.shape[1], lik, shapes[key]))
    yt = torch.as_tensor(np.asarray(y)).long()
    if labels:
        x["label"] = yt.clone()
        specs.append(modality("label", label_classes, "categorical"))
    return MultimodalSplit(name=name, x=x, y=yt, modalities=specs, binarize=mode, grey=grey)


def texture(rng: np.random.Generator, size: int = 96, components: int = 4) -> np.ndarray:
    """A procedural texture in [0, 0.4]: oriented gratings of random frequency and phase plus smoothed noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    img = np.zeros((size, size))
    for _ in range(components):
        angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(2, 12), rng.uniform(0, 2 * np.pi)
        img += rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    noise = rng.standard_normal((size, size))
    k = np.fft.fftfreq(size)
    lowpass = np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / (2 * rng.uniform(0.02, 0.08) ** 2))
    smooth = np.real(np.fft.ifft2(np.fft.fft2(noise) * lowpass))
    img += smooth / max(smooth.std(), 1e-12)
    img = (img - img.min()) / (img.max() - img.min())
    return (0.4 * img).astype(np.float32)  # dark: inverted digit strokes (1 - T >= 0.6) stand out by >= 0.2


def polymnist_views(images: Any, labels: Any, views: Any, rng: np.random.Generator, textures: Any) -> tuple[Any, ...]:
    """V views per tuple: same class, different MNIST instance, each on a crop of its view's texture.

    Returns ({view: (N, 784) images}, {view: indices of the MNIST images used}).
    """
    n, side = len(labels), images.shape[-1]
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    out, sources = {}, {}
    for v in range(views):
        if v == 0:
            idx = np.arange(n)
        else:
            idx = np.empty(n, dtype=np.int64)
            for c in range(10):
                members = np.flatnonzero(labels == c)
                idx[members] = rng.choice(by_class[c], size=len(members))
        digits = images[idx]
        if v == 3:
            digits = np.rot90(digits, 1, axes=(1, 2))
        elif v == 4:
            digits = digits[:, :, ::-1]
        tex = textures[v]
        windows = np.lib.stride_tricks.sliding_window_view(tex, (side, side))
        oy, ox = rng.integers(0, windows.shape[0], n), rng.integers(0, windows.shape[1], n)
        back = windows[oy, ox]
        out[f"m{v}"] = ((1 - digits) * back + digits * (1 - back)).reshape(n, -1).astype(np.float32)
        sources[f"m{v}"] = idx
    return out, sources


def load_multimodal(name: str, *, data_root: str | Path | None = None, views: int = 3, binarize: str = "none",
                    seed: int = 0, max_train: int | None = None, max_test: int | None = None,
                    download: bool = False) -> Any:
    """Load a multimodal dataset (module docstring): returns ``(train, test)`` :class:`MultimodalSplit`.

    ``max_train``/``max_test`` keep the first that many tuples (a reduced budget);
    ``seed`` drives the PolyMNIST-like construction.
    """
    if binarize not in BINARIZE:
        raise UsageError(f"unknown binarization {binarize!r}; valid: {', '.join(BINARIZE)}")
    if name in ("digits-label", "digits-halves"):
        x_tr, y_tr, x_te, y_te = load_digits_arrays()
        parts = []
        for x in (x_tr, x_te):
            img = x.reshape(-1, 8, 8)
            parts.append({"image": x} if name == "digits-label" else
                         {"top": img[:, :4].reshape(-1, 32), "bottom": img[:, 4:].reshape(-1, 32)})
        shapes = {"image": (1, 8, 8), "top": (1, 4, 8), "bottom": (1, 4, 8)}
        labels = True
    elif name in ("mnist-label", "polymnist"):
        x_tr, y_tr, x_te, y_te = _load_torchvision("mnist", data_root, download)
        x_tr, y_tr = x_tr[:max_train], np.asarray(y_tr)[:max_train]
        x_te, y_te = x_te[:max_test], np.asarray(y_te)[:max_test]
        if name == "mnist-label":
            parts = [{"image": x_tr.reshape(len(x_tr), -1)}, {"image": x_te.reshape(len(x_te), -1)}]
            shapes, labels = {"image": (1, 28, 28)}, True
        else:
            if not 2 <= views <= 5:
                raise UsageError(f"polymnist has 2 to 5 views, got {views}")
            rng = np.random.default_rng(seed)
            textures = [texture(rng) for _ in range(views)]
            made = [polymnist_views(x, y, views, rng, textures) for x, y in ((x_tr, y_tr), (x_te, y_te))]
            parts, sources = [p for p, _ in made], [s for _, s in made]
            shapes, labels = {f"m{v}": (1, 28, 28) for v in range(views)}, False
    else:
        raise UsageError(f"unknown multimodal dataset {name!r}; valid: {', '.join(MULTIMODAL_DATASETS)}")
    if name.startswith("digits") and (max_train or max_test):
        parts = [{k: v[:m] for k, v in p.items()} for p, m in zip(parts, (max_train, max_test))]
        y_tr, y_te = y_tr[:max_train], y_te[:max_test]
    if len(y_tr) == 0 or len(y_te) == 0:
        raise DataError(f"{name}: a split is empty (max_train={max_train}, max_test={max_test})")
    splits = (
        _split(name, parts[0], labels, y_tr, shapes, binarize, train=True),
        _split(name, parts[1], labels, y_te, shapes, binarize, train=False),
    )
    if name == "polymnist":
        for split, src in zip(splits, sources):
            split.sources = src
    return splits


# ---- your own data from a .npz file ---------------------------------------------------------------
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*$")
SPEC_KEYS = ("file", "standardize", "weights", "modalities")


def parse_likelihood(spec: Any) -> tuple[Any, ...]:
    """(likelihood spec for :func:`ppl_models.likelihoods.make_likelihood`, number of classes or None).

    ``categorical:K`` gives ("categorical", K); a bare ``categorical`` takes K from the data.
    :raises DataError: an unknown likelihood.
    """
    name, _, arg = str(spec).strip().lower().partition(":")
    if name == "categorical":
        if arg and not (arg.isdigit() and int(arg) >= 2):
            raise DataError(f"categorical:K needs a whole number of classes K >= 2, got {spec!r}")
        return "categorical", int(arg) if arg else None
    try:
        make_likelihood(spec, 1)
    except UsageError:
        raise DataError(f"unknown likelihood {spec!r}; valid: {', '.join(LIKELIHOODS)}[:K]") from None
    return str(spec).strip().lower(), None


def parse_shape(text: str) -> tuple[int, ...]:
    """An image shape from ``HxW`` or ``CxHxW`` (a list of 2 or 3 ints), as (C, H, W)."""
    parts = str(text).lower().split("x") if isinstance(text, str) else list(text)
    try:
        dims = [int(p) for p in parts]
    except (TypeError, ValueError):
        dims = []
    if len(dims) not in (2, 3) or min(dims) < 1:
        raise DataError(f"an image shape is HxW or CxHxW with positive sizes, got {text!r}")
    return tuple(dims) if len(dims) == 3 else (1, *dims)


def parse_assignments(items: Any, what: str, parse: Any = str) -> Any:
    """{name: parse(value)} from ``name=value`` strings (``--modality top=bernoulli``); one line on failure."""
    out = {}
    for item in items or ():
        name, eq, value = str(item).partition("=")
        name = name.strip()
        if not eq or not _NAME.match(name) or not value.strip():
            raise DataError(f"{what} takes NAME=VALUE with NAME a modality name, got {item!r}")
        if name in out:
            raise DataError(f"{what}: modality {name!r} given twice")
        out[name] = parse(value.strip())
    return out


def parse_weights(text: str) -> Any:
    """``--weights``: ``auto`` or ``name=w,name=w`` -> "auto" or {name: w}, every w a positive number."""
    if text is None or text == "auto":
        return text

    def positive(v):
        try:
            w = float(v)
        except ValueError:
            w = -1.0
        if not 0 < w < float("inf"):
            raise DataError(f"--weights: a weight must be a positive number, got {v!r}")
        return w

    return parse_assignments([t for t in str(text).split(",") if t], "--weights", positive)


def read_spec(path: str | Path) -> dict[str, Any]:
    """A TOML spec of a multimodal data file, read with :mod:`tomllib`::

        file = "data.npz"          # relative to the spec's folder
        standardize = false        # optional
        weights = "auto"           # optional: "auto" or a table {name = weight}
        [modalities.top]
        likelihood = "bernoulli"
        shape = "4x8"              # optional (or [4, 8])

    Returns {"file": Path, "modalities": {name: likelihood}, "shapes": {name: shape}, "standardize": bool,
    "weights": None | "auto" | {name: w}} (the modalities in the file's order).

    :raises DataError: a missing or malformed file, an unknown key, or a modality without a likelihood.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no spec file at {path}")
    try:
        spec = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path.name} is not valid TOML ({str(exc).splitlines()[0]})") from None
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown or not isinstance(spec.get("file"), str) or not isinstance(spec.get("modalities"), dict):
        raise DataError(f"{path.name}: a spec holds file = \"...npz\" and [modalities.NAME] tables "
                        f"(keys {', '.join(SPEC_KEYS)}), got keys {sorted(spec)}")
    mods, shapes = {}, {}
    for name, table in spec["modalities"].items():
        if not isinstance(table, dict) or "likelihood" not in table or set(table) - {"likelihood", "shape"}:
            raise DataError(f"{path.name}: [modalities.{name}] needs likelihood = \"...\" (and optionally shape)")
        mods[name] = str(table["likelihood"])
        if "shape" in table:
            shapes[name] = parse_shape(table["shape"])
    standardize = spec.get("standardize", False)
    if not isinstance(standardize, bool):
        raise DataError(f"{path.name}: standardize must be true or false, got {standardize!r}")
    weights = spec.get("weights")
    if weights is not None and weights != "auto":
        if not isinstance(weights, dict):
            raise DataError(f"{path.name}: weights must be \"auto\" or a table {{name = weight}}")
        weights = parse_weights(",".join(f"{k}={v}" for k, v in weights.items()))
    return {"file": (path.parent / spec["file"]), "modalities": mods, "shapes": shapes, "standardize": standardize,
            "weights": weights}


def _read_npz(path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no data file at {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as exc:
        raise DataError(f"cannot read {path} as .npz ({type(exc).__name__})") from None


def check_arrays(arrays: Any, modalities: Any, shapes: Any = None, *, suffix: str = "",
                 where: str = "data") -> tuple[Any, ...]:
    """Check one set of a file's arrays and build its modality data; every failure is one line.

    ``arrays``: {array name: numpy array}; ``modalities``: {name: likelihood spec} (see
    :func:`parse_likelihood`); ``shapes``: {name: (C, H, W)}; ``suffix``: "" or "_test".
    Returns (x {name: float32 (N, D) or int64 (N,) numpy, absent rows zero-filled}, mask
    (N, M) bool numpy, y int64 (N,) numpy or None, {name: (dim, likelihood, image shape, classes)}).

    :raises DataError: a missing array, disagreeing row counts, NaN outside a mask (or a NaN row the
        mask marks present), values outside a likelihood's support, labels out of range, an image shape
        that does not match, a malformed mask, or a row with no modality present.
    """
    shapes = shapes or {}
    x, masks, info = {}, [], {}
    rows = {}
    for name, spec in modalities.items():
        key = f"x_{name}{suffix}"
        if key not in arrays:
            raise DataError(f"{where}: no array {key!r} for modality {name!r} (arrays: {', '.join(sorted(arrays))})")
        lik, classes = parse_likelihood(spec)
        arr = np.asarray(arrays[key])
        if arr.ndim == 0 or arr.dtype.kind not in "biuf":
            raise DataError(f"{where}: {key} must be a numeric array with one row per sample, got {arr.dtype} "
                            f"{arr.shape}")
        rows[key] = arr.shape[0]
        flat = arr.reshape(arr.shape[0], -1).astype(np.float64)
        nan_rows = np.isnan(flat).all(1) if flat.shape[1] else np.zeros(len(flat), bool)
        mkey = f"mask_{name}{suffix}"
        if mkey in arrays:
            m = np.asarray(arrays[mkey])
            if m.ndim != 1 or not (m.dtype == bool or (m.dtype.kind in "iuf" and np.isin(m, (0, 1)).all())):
                raise DataError(f"{where}: {mkey} must be one bool (or 0/1) per row, got {m.dtype} {m.shape}")
            rows[mkey] = m.shape[0]
            if m.shape[0] != arr.shape[0]:
                raise DataError(f"{where}: {mkey} has {m.shape[0]} rows but {key} has {arr.shape[0]}")
            m = m.astype(bool)
            if (m & nan_rows).any():
                raise DataError(f"{where}: {key} row {int(np.flatnonzero(m & nan_rows)[0])} is all NaN but {mkey} "
                                "marks it present")
        else:
            m = np.asarray(~nan_rows)
        bad = ~np.isfinite(flat[m])
        if bad.any():
            row = int(np.flatnonzero(m)[np.flatnonzero(bad.any(1))[0]])
            raise DataError(f"{where}: {key} row {row} holds NaN or infinite values but the modality is present "
                            "there (mark absent rows with mask_<name> or make the whole row NaN)")
        present = flat[m]
        if lik == "categorical":
            if arr.ndim != 1:
                raise DataError(f"{where}: {key} holds labels, one integer per row, got shape {arr.shape}")
            if present.size and (present != np.round(present)).any():
                raise DataError(f"{where}: {key} must hold integer labels")
            k = classes if classes is not None else int(present.max()) + 1 if present.size else 2
            if present.size and (present.min() < 0 or present.max() >= k):
                raise DataError(f"{where}: {key} holds labels outside 0..{k - 1} "
                                f"(found {int(present.min())}..{int(present.max())})")
            info[name] = (k, "categorical", None, classes)
            x[name] = np.where(m, flat[:, 0] if flat.shape[1] else 0, 0).astype(np.int64)
        else:
            if lik == "bernoulli" and not np.isin(present, (0, 1)).all():
                raise DataError(f"{where}: {key} must be binary (0 or 1) for the bernoulli likelihood "
                                "(use cbernoulli for values in [0, 1])")
            if lik == "cbernoulli" and present.size and (present.min() < 0 or present.max() > 1):
                raise DataError(f"{where}: {key} must lie in [0, 1] for the cbernoulli likelihood")
            dim = flat.shape[1]
            shape = shapes.get(name)
            if shape is None and arr.ndim in (3, 4):
                shape = tuple(arr.shape[1:]) if arr.ndim == 4 else (1, *arr.shape[1:])
            if shape is not None and int(np.prod(shape)) != dim:
                raise DataError(f"{where}: image shape {'x'.join(map(str, shape))} of {name!r} does not match "
                                f"its {dim} values per row")
            info[name] = (dim, lik, shape, None)
            x[name] = np.where(m[:, None], np.nan_to_num(flat), 0.0).astype(np.float32)
        masks.append(m)
    ykey = f"y{suffix}"
    y = None
    if ykey in arrays:
        y = np.asarray(arrays[ykey])
        rows[ykey] = y.shape[0] if y.ndim else -1
        if y.ndim != 1 or y.dtype.kind not in "biuf" or (y.dtype.kind == "f" and (
                not np.isfinite(y).all() or (y != np.round(y)).any())):
            raise DataError(f"{where}: {ykey} must hold one integer class per row, got {y.dtype} {y.shape}")
        y = y.astype(np.int64)
        if y.size and y.min() < 0:
            raise DataError(f"{where}: {ykey} holds negative classes (e.g. {int(y.min())}); classes are 0..K-1")
    if len(set(rows.values())) > 1:
        raise DataError(f"{where}: the arrays disagree on the number of rows: "
                        + ", ".join(f"{k} {v}" for k, v in rows.items()))
    mask = np.stack(masks, 1)
    if len(mask) == 0:
        raise DataError(f"{where}: the arrays hold no rows")
    empty = ~mask.any(1)
    if empty.any():
        raise DataError(f"{where}: row {int(np.flatnonzero(empty)[0])} has no modality present "
                        f"({int(empty.sum())} such rows); drop them")
    return x, mask, y, info


def _merge_info(train, test, path):
    """One spec per modality from the train and test sets (a bare categorical takes the larger K)."""
    out = {}
    for name, (dim, lik, shape, classes) in train.items():
        if test is not None:
            tdim = test[name][0]
            if lik == "categorical" and classes is None:
                dim = max(dim, tdim)
            elif tdim != dim:
                raise DataError(f"{path.name}: x_{name} has {dim} values per row but x_{name}_test has {tdim}")
        out[name] = modality(name, dim, lik, shape)
    return out


def load_multimodal_file(path: str | Path, modalities: Any, *, shapes: Any = None, standardize: bool = False,
                         seed: int = 0, test_fraction: float = 0.2, max_train: int | None = None,
                         max_test: int | None = None) -> Any:
    """Your own multimodal data (module docstring): returns ``(train, test)`` :class:`MultimodalSplit`.

    ``modalities``: {name: likelihood spec}, in the order the model takes them; every ``x_<name>``
    of the file must be declared. ``shapes``: {name: "HxW", "CxHxW" or (C, H, W)}. Without
    ``x_<name>_test`` arrays, ``test_fraction`` of the rows (a ``numpy`` permutation from ``seed``)
    form the test set. ``standardize``: rescale normal/laplace modalities per feature to the training
    rows' mean 0 and standard deviation 1 (a constant feature keeps scale 1); the statistics are kept
    in each split's ``scaling``. The masks are None when every sample of the file is complete.

    :raises DataError: (one line, nothing else done) see :func:`check_arrays`, plus an undeclared
        ``x_<name>`` array, a test set given for only some modalities, or an empty split.
    """
    path = Path(path)
    if not modalities:
        raise DataError(f"{path.name}: declare each modality with its likelihood (--modality NAME=LIKELIHOOD)")
    for name in modalities:
        if not _NAME.match(str(name)):
            raise DataError(f"modality names are letters, digits and _ (starting with a letter), got {name!r}")
    shapes = {k: parse_shape(v) for k, v in (shapes or {}).items()}
    unknown = [k for k in shapes if k not in modalities]
    if unknown:
        raise DataError(f"--shape for undeclared modalities {unknown}; declared: {list(modalities)}")
    arrays = _read_npz(path)
    declared = {f"x_{n}{s}" for n in modalities for s in ("", "_test")}
    stray = sorted(k for k in arrays if k.startswith("x_") and k not in declared)
    if stray:
        raise DataError(f"{path.name} holds {', '.join(stray)} but no modality declares it "
                        f"(declared: {', '.join(modalities)})")
    tests = [f"x_{n}_test" in arrays for n in modalities]
    if any(tests) and not all(tests):
        missing = [f"x_{n}_test" for n, t in zip(modalities, tests) if not t]
        raise DataError(f"{path.name}: a test set needs x_<name>_test for every modality; missing {', '.join(missing)}")
    x, mask, y, info = check_arrays(arrays, modalities, shapes, where=path.name)
    if all(tests):
        xt, mt, yt, tinfo = check_arrays(arrays, modalities, shapes, suffix="_test", where=path.name)
        if (y is None) != (yt is None):
            raise DataError(f"{path.name}: give classes for both sets (y and y_test) or for neither")
    else:
        if not 0 < test_fraction < 1:
            raise DataError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        order = np.random.default_rng(seed).permutation(len(mask))
        n_test = int(round(test_fraction * len(order)))
        te, tr = order[:n_test], order[n_test:]
        pick = lambda idx: ({k: v[idx] for k, v in x.items()}, mask[idx], None if y is None else y[idx])  # noqa: E731
        (xt, mt, yt), (x, mask, y) = pick(te), pick(tr)
        tinfo = None
    specs = _merge_info(info, tinfo, path)
    train_part, test_part = [x, mask, y], [xt, mt, yt]
    for part, limit in ((train_part, max_train), (test_part, max_test)):
        if limit:
            part[0] = {k: v[:limit] for k, v in part[0].items()}
            part[1], part[2] = part[1][:limit], None if part[2] is None else part[2][:limit]
    if len(train_part[1]) == 0 or len(test_part[1]) == 0:
        raise DataError(f"{path.name}: a split is empty ({len(train_part[1])} train / {len(test_part[1])} test rows)")
    for part in (train_part, test_part):
        if not part[1].any(1).all():
            raise DataError(f"{path.name}: a row has no modality present")
    scaling = {}
    if standardize:
        for i, (name, spec) in enumerate(specs.items()):
            if spec["likelihood"].split(":")[0] in ("normal", "laplace"):
                present = train_part[0][name][train_part[1][:, i]]
                if len(present) == 0:
                    raise DataError(f"{path.name}: modality {name!r} has no training row to standardise with")
                mean, std = present.mean(0), present.std(0)
                std = np.where(std > 1e-8, std, 1.0)
                scaling[name] = (mean.astype(np.float32), std.astype(np.float32))
    complete = train_part[1].all() and test_part[1].all()
    return tuple(_file_split(path.stem, part[0], part[1], part[2], list(specs.values()), scaling, complete)
                 for part in (train_part, test_part))


def _file_split(name, x, mask, y, specs, scaling, complete):
    out = {}
    for i, m in enumerate(specs):
        v = x[m["name"]]
        if m["name"] in scaling:
            mean, std = scaling[m["name"]]
            v = np.where(mask[:, i][:, None], (v - mean) / std, 0.0).astype(np.float32)
        out[m["name"]] = torch.as_tensor(v)
    return MultimodalSplit(name=name, x=out, y=None if y is None else torch.as_tensor(y), modalities=specs,
                           mask=None if complete else torch.as_tensor(mask),
                           scaling={k: (torch.as_tensor(a), torch.as_tensor(b)) for k, (a, b) in scaling.items()})


def impute_file(module: Any, path: str | Path, out: Any, modalities: Any, *, shapes: Any = None, scaling: Any = None,
                batch_size: int = 1000) -> Any:
    """Fill a file's absent entries by cross-modal generation (:meth:`MultimodalVAE.impute`) and write ``out``.

    ``path``'s arrays (``x_<name>``, optional ``mask_<name>``; a ``_test`` set is filled too) are
    checked as for training; ``scaling`` (a training split's) is applied before and undone after,
    so the filled values are in the file's units. ``out`` (a ``.npz``) receives every array of the
    input with the ``x_<name>[_test]`` filled and ``mask_<name>[_test]`` the original presence.
    Returns the number of entries filled.
    """
    arrays = _read_npz(path)
    scaling = scaling or {}
    result, filled = dict(arrays), 0
    suffixes = [""] + (["_test"] if all(f"x_{n}_test" in arrays for n in modalities) else [])
    dev = next(module.parameters()).device
    for suffix in suffixes:
        x, mask, _, info = check_arrays(arrays, modalities, {k: parse_shape(v) for k, v in (shapes or {}).items()},
                                        suffix=suffix, where=Path(path).name)
        names = list(modalities)
        if names != module.names:
            raise DataError(f"the run's modalities are {module.names}, the file's {names}")
        data = {}
        for i, n in enumerate(names):
            v = torch.as_tensor(x[n])
            if n in scaling:
                mean, std = (torch.as_tensor(a) for a in scaling[n])
                v = torch.where(torch.as_tensor(mask[:, i])[:, None], (v - mean) / std, 0.0)
            data[n] = v
        data[PRESENT] = torch.as_tensor(mask)
        module.check_data(data)
        parts: dict[str, list[Any]] = {n: [] for n in names}
        for s in range(0, len(mask), batch_size):
            batch = {k: v[s:s + batch_size].to(dev) for k, v in data.items()}
            for n, v in module.impute(batch).items():
                parts[n].append(v.cpu())
        for i, n in enumerate(names):
            v = torch.cat(parts[n])
            if n in scaling:
                mean, std = (torch.as_tensor(a) for a in scaling[n])
                v = v * std + mean
            original = np.asarray(arrays[f"x_{n}{suffix}"])
            arr = np.array(original, dtype=original.dtype if original.dtype.kind in "iuf" else np.float32)
            arr[~mask[:, i]] = v.numpy().reshape((len(v),) + original.shape[1:])[~mask[:, i]]  # present: as given
            result[f"x_{n}{suffix}"] = arr
            result[f"mask_{n}{suffix}"] = mask[:, i]
        filled += int((~mask).sum())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, **result)
    tmp.replace(out)
    return filled
