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

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from inference.errors import UsageError

from .data import BINARIZE, DataError, _load_torchvision, binarize, load_digits_arrays
from .multimodal import modality

MULTIMODAL_DATASETS = ("digits-label", "digits-halves", "mnist-label", "polymnist")


@dataclass
class MultimodalSplit:
    """One split: ``x`` a dict {modality: tensor (N, ...)}, ``y`` the classes, ``modalities`` their specs.

    ``data`` is the fixed view for evaluation; ``epoch()`` the view to train on
    (a fresh Bernoulli draw of the image modalities under dynamic binarisation).
    """

    name: str
    x: dict
    y: torch.Tensor
    modalities: list
    binarize: str = "none"
    grey: dict = field(default_factory=dict)
    sources: dict = None  # PolyMNIST-like: {view: indices of its MNIST images in the source split}

    @property
    def data(self):
        return self.x

    def epoch(self):
        if self.binarize != "dynamic" or not self.grey:
            return self.x
        return {k: torch.bernoulli(self.grey[k]) if k in self.grey else v for k, v in self.x.items()}

    def __len__(self):
        return self.y.shape[0]

    @property
    def names(self):
        return [m["name"] for m in self.modalities]

    def subset(self, names):
        """The dict restricted to ``names`` (the other modalities absent)."""
        return {k: self.x[k] for k in names}

    def to(self, device):
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return replace(self, x=move(self.x), y=self.y.to(device), grey=move(self.grey))

    def rows(self, index):
        """The tuples ``index`` (an index tensor) of this split, as a split of the same kind."""
        pick = lambda d: {k: v[index.to(v.device)] for k, v in d.items()}  # noqa: E731
        sources = None if self.sources is None else {k: v[index.cpu().numpy()] for k, v in self.sources.items()}
        return replace(self, x=pick(self.x), y=self.y[index.to(self.y.device)], grey=pick(self.grey), sources=sources)


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


def texture(rng, size=96, components=4):
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


def polymnist_views(images, labels, views, rng, textures):
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


def load_multimodal(name, *, data_root=None, views=3, binarize="none", seed=0, max_train=None, max_test=None,
                    download=False):
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
