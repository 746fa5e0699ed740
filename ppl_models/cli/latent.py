"""``pplm embed`` and ``pplm explore``: a trained run's latent codes as a file, and figures of its latent space.

Both work on runs whose model has one continuous code z per datapoint, an
``encode(x)`` giving q(z | x) and a ``decode(z)`` giving p(x | z) (the VAE with
any guide, VaDE). Codes are the posterior means and standard deviations of
q(z | x) (Monte Carlo, ``samples`` draws, for a flow guide), computed with
:mod:`inference.latent`; figures are drawn by :mod:`inference.plots`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from inference import resolve_device
from inference.checkpoint import atomic_write
from inference.errors import UsageError
from inference.latent import (
    ACTIVE_THRESHOLD,
    activity,
    encode_batches,
    lerp,
    manifold_grid,
    map_2d,
    slerp,
    traversal_codes,
)
from inference.plots import plot_activity, plot_latent_map, save_labelled_grid

from ..vae import VAE
from .runs import check_output_file, load_module, open_run

SPLITS = ("train", "test")
MAP_METHODS = ("pca", "tsne")
TSNE_POINTS = 3000


def _open(run_dir, split, device, command):
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; use {' or '.join(SPLITS)}")
    recipe, config, run = open_run(run_dir)
    dev = resolve_device(device)
    module = load_module(recipe, config, run_dir, dev)
    if not isinstance(module, VAE):
        raise UsageError(f"pplm {command}: the {config['model']} run has no single continuous code per datapoint "
                         f"(embed and explore work on vae and vade runs)")
    train, test = recipe.load_data(run)
    data = train if split == "train" else test
    return module, data.to(dev), train.image_shape


def embed_run(run_dir: str | Path, out_file: str | Path, *, split: str = "test", samples: int = 256,
              device: str | torch.device = "auto", seed: int = 0) -> Any:
    """Write the codes of a run's ``split`` to ``out_file`` (``.npz`` or ``.csv``); returns the path.

    ``.npz``: ``mean`` and ``sd`` (N, L) float32, ``index`` (N,) (row in the split) and ``y`` (N,) when
    the data have labels. ``.csv``: one row per datapoint, columns ``index``, ``label`` (when known),
    ``mean_1..mean_L``, ``sd_1..sd_L``. Raises UsageError for another suffix or a model without codes.
    """
    out_file = check_output_file(out_file)
    if out_file.suffix not in (".npz", ".csv"):
        raise UsageError(f"--out must end in .npz or .csv, got {out_file.name!r}")
    module, data, _ = _open(run_dir, split, device, "embed")
    pyro.set_rng_seed(seed)
    mean, sd = encode_batches(module.encode, data.data, samples=samples)
    arrays = {"mean": mean.float().cpu().numpy(), "sd": sd.float().cpu().numpy(), "index": np.arange(len(data))}
    if data.y is not None:
        arrays["y"] = data.y.cpu().numpy()
    if out_file.suffix == ".npz":
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write(out_file, lambda f: f.write(buf.getvalue()))
    else:
        latent = arrays["mean"].shape[1]
        header = ["index"] + (["label"] if "y" in arrays else [])
        header += [f"mean_{j + 1}" for j in range(latent)] + [f"sd_{j + 1}" for j in range(latent)]
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(header)
        for i in range(len(data)):
            label = [int(arrays["y"][i])] if "y" in arrays else []
            writer.writerow([i, *label, *(repr(float(v)) for v in arrays["mean"][i]),
                             *(repr(float(v)) for v in arrays["sd"][i])])
        atomic_write(out_file, lambda f: f.write(text.getvalue().encode()))
    return out_file


def read_codes(path: str | Path) -> Any:
    """The arrays :func:`embed_run` wrote (``mean``, ``sd``, ``index``, optional ``y``), from ``.npz`` or ``.csv``."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    with path.open() as f:
        rows = list(csv.reader(f))
    header, body = rows[0], np.array(rows[1:], dtype=np.float64)
    col = {name: i for i, name in enumerate(header)}
    means = [i for n, i in col.items() if n.startswith("mean_")]
    sds = [i for n, i in col.items() if n.startswith("sd_")]
    out = {"index": body[:, col["index"]].astype(np.int64), "mean": body[:, means].astype(np.float32),
           "sd": body[:, sds].astype(np.float32)}
    if "label" in col:
        out["y"] = body[:, col["label"]].astype(np.int64)
    return out


def _pairs(y, n, n_pairs):
    """Index pairs (a, b) of points: with labels, the first point of class c and of class c + C/2 (distinct
    labels, classes in order); without, (0, 1), (2, 3), ..."""
    if y is None:
        return [(2 * i, 2 * i + 1) for i in range(min(n_pairs, n // 2))]
    classes = sorted(set(y))
    first = {c: y.index(c) for c in classes}
    half = max(1, len(classes) // 2)
    pairs = [(first[classes[i]], first[classes[(i + half) % len(classes)]]) for i in range(len(classes))]
    return [(a, b) for a, b in pairs if a != b][:n_pairs]


@torch.no_grad()
def explore_run(run_dir: str | Path, out_dir: Path | None = None, *, split: str = "test", index: int = 0,
                method: str = "pca", samples: int = 256, device: str | torch.device = "auto", seed: int = 0,
                steps: int = 10, n_pairs: int = 4, traverse: int = 10) -> Any:
    """Figures of a run's latent space in ``out_dir`` (default ``RUN/explore``); returns the written paths.

    * ``activity.png``: the activity of every dimension (Burda et al. 2015);
    * ``traversals.png``: the code of datapoint ``index`` with one dimension at a time (the ``traverse``
      most active) set to values from -3 to 3 prior standard deviations, decoded (E[x | z]);
    * ``interpolations.png``: ``n_pairs`` pairs of points (different labels when known), linear and
      spherical paths between their codes in ``steps`` steps, decoded, the two inputs at the ends;
    * ``manifold.png`` (L = 2 only): E[x | z] on a 15 x 15 inverse-CDF grid of the prior;
    * ``latent-map.png``: the codes mapped to 2-D by ``method`` (``pca`` or ``tsne``), coloured by label;
    * ``explore.json``: the activities and the settings.
    """
    if method not in MAP_METHODS:
        raise UsageError(f"unknown map method {method!r}; use {' or '.join(MAP_METHODS)}")
    module, data, shape = _open(run_dir, split, device, "explore")
    if shape is None:
        raise UsageError("pplm explore draws images: this run's data have no image shape")
    x, y = data.data, data.y
    if not 0 <= index < x.shape[0]:
        raise UsageError(f"--index must lie in 0..{x.shape[0] - 1}, got {index}")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "explore"
    out.mkdir(parents=True, exist_ok=True)
    pyro.set_rng_seed(seed)
    means, _ = encode_batches(module.encode, x, samples=samples)
    latent = means.shape[1]
    act = activity(means)
    order = torch.argsort(act, descending=True).tolist()
    decode = lambda z: module.decode(z).mean  # noqa: E731
    written = [plot_activity(act, out / "activity.png",
                             title=f"Activity of the {latent} latent dimensions on the {split} set: "
                                   f"{int((act > ACTIVE_THRESHOLD).sum())} active")]

    dims = order[: min(traverse, latent)]
    values = torch.linspace(-3.0, 3.0, 11, dtype=means.dtype, device=means.device)
    z = means[index]
    images = decode(traversal_codes(z, dims, values))
    written.append(save_labelled_grid(
        images, shape, out / "traversals.png",
        row_labels=[f"z{d + 1} (A={act[d]:.2g}, own {z[d]:+.2f})" for d in dims],
        col_labels=[f"{v:+.1f}" for v in values.tolist()],
        xlabel="value given to the row's dimension (the others keep the datapoint's code)",
        title=f"Latent traversals around {split} point {index}"
              + (f" (label {int(y[index])})" if y is not None else "") + ", most active dimensions first"))

    pairs = _pairs(None if y is None else y.tolist(), x.shape[0], n_pairs)
    rows, labels = [], []
    for a, b in pairs:
        for name, path in (("linear", lerp(means[a], means[b], steps)), ("spherical", slerp(means[a], means[b], steps))):
            rows.append(torch.cat([x[a : a + 1], decode(path), x[b : b + 1]]))
            labels.append(f"{a}->{b} {name}" if y is None else f"{int(y[a])}->{int(y[b])} {name}")
    t = torch.linspace(0, 1, steps).tolist()
    written.append(save_labelled_grid(
        torch.stack(rows), shape, out / "interpolations.png", row_labels=labels,
        col_labels=["input"] + [f"t={v:.2f}" for v in t] + ["input"],
        xlabel="decoded codes along the path z(t) from one input's code (t=0) to the other's (t=1)",
        title=f"Interpolation between pairs of {split} points (linear and spherical paths)"))

    if latent == 2:
        n = 15
        codes, axis = manifold_grid(n, dtype=means.dtype)
        grid = decode(codes.to(means.device)).reshape(n, n, -1)
        written.append(save_labelled_grid(
            grid, shape, out / "manifold.png", col_labels=[f"{v:+.1f}" for v in axis.tolist()],
            row_labels=[f"{v:+.1f}" for v in axis.flip(0).tolist()], xlabel="z1 (prior quantiles 5%..95%)",
            ylabel="z2", title="The learned data manifold: E[x | z] over an inverse-CDF grid of the prior"))

    limit = TSNE_POINTS if method == "tsne" else None
    coords, axes = map_2d(means, method=method, seed=seed, max_points=limit)
    how = "as they are" if latent == 2 else ("by PCA" if method == "pca" else "by t-SNE")
    written.append(plot_latent_map(
        coords, out / "latent-map.png", labels=y, axis_names=axes,
        title=f"Posterior means of {len(coords)} {split} points, mapped to 2-D {how}"
              + (", coloured by label" if y is not None else "")))
    summary = {"split": split, "index": index, "map": method, "latent_dim": latent, "activity": act.tolist(),
               "active": int((act > ACTIVE_THRESHOLD).sum()), "pairs": pairs, "files": [p.name for p in written]}
    atomic_write(out / "explore.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))
    return written + [out / "explore.json"]
