"""``pplm embed`` and ``pplm explore``: a trained run's latent codes as a file, and figures of its latent space.

Both work on runs whose model has one continuous code z per datapoint: the VAE
(any guide; q(z | x) from ``encode``, p(x | z) from ``decode``), VaDE, and the
multimodal VAE (mvae), whose code is the shared z under the joint posterior
q(z | X_P) of each datapoint's present modalities P, fused by the run's rule
(PoE, MoE, MoPoE, CoDE; :meth:`ppl_models.multimodal.MultimodalVAE.posterior`),
and whose every image modality is decoded from it. Codes are the posterior means
and standard deviations (closed form for a Gaussian or a Gaussian mixture,
Monte Carlo with ``samples`` draws for a flow guide), computed with
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

from ..multimodal import MultimodalVAE
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
    if not isinstance(module, (VAE, MultimodalVAE)):
        raise UsageError(f"pplm {command}: the {config['model']} run has no single continuous code per datapoint "
                         f"(embed and explore work on vae, vade and mvae runs)")
    train, test = recipe.load_data(run)
    return module, (train if split == "train" else test).to(dev)


def latent_codes(module: Any, data: Any, *, samples: int = 256) -> tuple[Any, ...]:
    """Posterior (mean, sd) of every datapoint's code, each (N, L).

    ``module``: a :class:`~ppl_models.vae.VAE` (q(z | x)) or a
    :class:`~ppl_models.multimodal.MultimodalVAE` (the fused q(z | X_P) of each
    datapoint's present modalities, the presence mask of ``data`` respected);
    ``data``: its split (``DataSplit`` / ``MultimodalSplit``).
    """
    if isinstance(module, MultimodalVAE):
        batch = data.data
        rows = lambda i: module.posterior({k: v[i] for k, v in batch.items()})  # noqa: E731
        return encode_batches(rows, torch.arange(len(data), device=next(iter(batch.values())).device),
                              samples=samples)
    return encode_batches(module.encode, data.data, samples=samples)


def image_views(module: Any, data: Any, image_shape: Any = None) -> list[tuple[Any, ...]]:
    """What explore draws a code as: ``[(name, decode, image_shape, inputs)]``, one per image modality.

    ``decode(z)`` maps codes (..., L) to E[x | z] (..., D); ``inputs`` the split's images (N, D). A VAE has
    one view (name None; ``image_shape`` the data's); a multimodal VAE one per modality with an image shape,
    its private latent w_m (if any) held at the prior mean 0 so that every image of a path shares it.
    """
    if not isinstance(module, MultimodalVAE):
        return [] if image_shape is None else [(None, lambda z: module.decode(z).mean, image_shape, data.data)]
    views = []
    for name in module.names:
        shape = module.image_shapes[name]
        if shape is None:
            continue
        private = module.private[name]
        def decode(z, name=name, private=private):
            w = z.new_zeros(z.shape[:-1] + (private,)) if private else None
            return module.decode(name, z, w).mean.reshape(z.shape[:-1] + (-1,))
        x = data.x[name].reshape(len(data), -1)
        if data.mask is not None:  # an absent entry (any value, NaN included) is drawn blank
            x = torch.where(data.mask[:, module.names.index(name), None], x, x.new_zeros(()))
        views.append((name, decode, tuple(shape), x))
    return views


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
    module, data = _open(run_dir, split, device, "embed")
    pyro.set_rng_seed(seed)
    mean, sd = latent_codes(module, data, samples=samples)
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

    For an mvae run the codes are those of the joint posterior (:func:`latent_codes`) and each image
    modality M gets its own ``traversals-M.png``, ``interpolations-M.png`` and ``manifold-M.png``, all
    decoded from the same codes (:func:`image_views`).
    """
    if method not in MAP_METHODS:
        raise UsageError(f"unknown map method {method!r}; use {' or '.join(MAP_METHODS)}")
    module, data = _open(run_dir, split, device, "explore")
    views = image_views(module, data, getattr(data, "image_shape", None))
    if not views:
        raise UsageError("pplm explore draws images: this run's data have no image shape")
    y, n_points = data.y, len(data)
    if not 0 <= index < n_points:
        raise UsageError(f"--index must lie in 0..{n_points - 1}, got {index}")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "explore"
    out.mkdir(parents=True, exist_ok=True)
    pyro.set_rng_seed(seed)
    means, _ = latent_codes(module, data, samples=samples)
    latent = means.shape[1]
    act = activity(means)
    order = torch.argsort(act, descending=True).tolist()
    written = [plot_activity(act, out / "activity.png",
                             title=f"Activity of the {latent} latent dimensions on the {split} set: "
                                   f"{int((act > ACTIVE_THRESHOLD).sum())} active")]
    dims = order[: min(traverse, latent)]
    values = torch.linspace(-3.0, 3.0, 11, dtype=means.dtype, device=means.device)
    z = means[index]
    pairs = _pairs(None if y is None else y.tolist(), n_points, n_pairs)
    t = torch.linspace(0, 1, steps).tolist()
    for view, decode, shape, x in views:
        suffix = "" if view is None else f"-{view}"
        of = "" if view is None else f" (modality {view!r})"
        images = decode(traversal_codes(z, dims, values))
        written.append(save_labelled_grid(
            images, shape, out / f"traversals{suffix}.png",
            row_labels=[f"z{d + 1} (A={act[d]:.2g}, own {z[d]:+.2f})" for d in dims],
            col_labels=[f"{v:+.1f}" for v in values.tolist()],
            xlabel="value given to the row's dimension (the others keep the datapoint's code)",
            title=f"Latent traversals around {split} point {index}"
                  + (f" (label {int(y[index])})" if y is not None else "") + f", most active dimensions first{of}"))

        rows, labels = [], []
        for a, b in pairs:
            for name, path in (("linear", lerp(means[a], means[b], steps)),
                               ("spherical", slerp(means[a], means[b], steps))):
                rows.append(torch.cat([x[a : a + 1], decode(path), x[b : b + 1]]))
                labels.append(f"{a}->{b} {name}" if y is None else f"{int(y[a])}->{int(y[b])} {name}")
        written.append(save_labelled_grid(
            torch.stack(rows), shape, out / f"interpolations{suffix}.png", row_labels=labels,
            col_labels=["input"] + [f"t={v:.2f}" for v in t] + ["input"],
            xlabel="decoded codes along the path z(t) from one input's code (t=0) to the other's (t=1)",
            title=f"Interpolation between pairs of {split} points (linear and spherical paths){of}"))

        if latent == 2:
            n = 15
            grid_codes, axis = manifold_grid(n, dtype=means.dtype)
            grid = decode(grid_codes.to(means.device)).reshape(n, n, -1)
            written.append(save_labelled_grid(
                grid, shape, out / f"manifold{suffix}.png", col_labels=[f"{v:+.1f}" for v in axis.tolist()],
                row_labels=[f"{v:+.1f}" for v in axis.flip(0).tolist()], xlabel="z1 (prior quantiles 5%..95%)",
                ylabel="z2", title=f"The learned data manifold: E[x | z] over an inverse-CDF grid of the prior{of}"))

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
