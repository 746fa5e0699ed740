"""Figures a person would rather look at than read: training curves, image grids, latent projections.

Matplotlib runs on the Agg backend, so nothing needs a display.
"""
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402

from .checkpoint import atomic_write  # noqa: E402
from .errors import UsageError  # noqa: E402
from .metrics import PRESENT, cluster_accuracy  # noqa: E402


def _save(fig, path):
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_history(history: list[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Training objective and test ELBO (nats per datapoint) against epoch."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in history]
    ax.plot(epochs, [-r["train_loss"] for r in history], label="train objective (-loss)")
    test = [(r["epoch"], r["test_elbo"]) for r in history if r.get("test_elbo") is not None]
    if test:
        ax.plot(*zip(*test), label="test ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per datapoint")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def image_grid(images: Any, image_shape: tuple[int, ...], nrow: int = 10, padding: int = 1) -> np.ndarray:
    """(N, D) images in [0, 1] -> one (H', W', C) numpy array laid out by torchvision's make_grid."""
    from torchvision.utils import make_grid

    images = torch.as_tensor(images).detach().float().cpu().clamp(0, 1)
    grid = make_grid(images.reshape(-1, *image_shape), nrow=nrow, padding=padding, pad_value=1.0)
    return grid.permute(1, 2, 0).numpy()


def save_image_grid(images: Any, image_shape: tuple[int, ...], path: str | Path, nrow: int = 10,
                    title: str | None = None, row_labels: Any = None) -> Path:
    """Save a grid of (N, D) images as a PNG, upscaled without smoothing so small images stay legible."""
    grid = image_grid(images, image_shape, nrow=nrow)
    h, w = grid.shape[:2]
    scale = max(1.0, 400 / max(h, w))
    fig, ax = plt.subplots(figsize=(w * scale / 100 + 0.6, h * scale / 100 + 0.6))
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    if row_labels:
        rows = len(row_labels)
        ax.set_yticks([(i + 0.5) * h / rows for i in range(rows)], row_labels)
    else:
        ax.set_yticks([])
    if title:
        ax.set_title(title)
    return _save(fig, path)


def generation_grid(module: Any, data: Any, given: Any, targets: Any, path: str | Path, *, image_shapes: Any,
                    n: int = 10, title: str | None = None, seed: int = 0) -> Path:
    """A PNG grid: the first ``n`` tuples' given image modalities, then each image target generated from them.

    ``module.generate(batch, targets) -> {target: tensor}`` does the cross-modal
    generation (a multimodal model, see :mod:`inference.metrics`); ``data`` is a
    dict {modality: tensor} (with a presence mask: the first ``n`` tuples that have every given
    modality); ``image_shapes`` maps each modality to its image
    shape (C, H, W), or None for a label. One row per image modality (given rows
    first); label modalities are written as their (predicted) classes in the
    title. Seeded by ``seed``. Returns the path.

    :raises UsageError: no image modality, or image modalities of different shapes.
    """
    given = [given] if isinstance(given, str) else list(given)
    targets = [targets] if isinstance(targets, str) else list(targets)
    shapes = {m: image_shapes[m] for m in [*given, *targets] if image_shapes[m]}
    if not shapes:
        raise UsageError("a generation grid needs at least one image modality among the given and targets")
    pyro.set_rng_seed(seed)
    dev = next(module.parameters()).device
    mask = data.get(PRESENT)
    if mask is not None:  # the first n tuples that have every given modality
        cols = [list(module.names).index(m) for m in given]
        rows = mask[:, cols].all(1).nonzero().squeeze(-1)[:n].cpu()
        data = {m: data[m][rows.to(data[m].device)] for m in given}
    batch = {m: data[m][:n].to(dev) for m in given}
    out = module.generate(batch, targets)
    shape = next(iter(shapes.values()))
    dim = int(torch.tensor(shape).prod())
    rows, row_labels, text = [], [], []
    for m, x, kind in [*((m, batch[m], "given") for m in given), *((t, out[t], "generated") for t in targets)]:
        if image_shapes[m] is None:  # a label: written in the title
            classes = x if x.dim() == 1 else x.argmax(-1)
            text.append(f"{kind} {m}: " + " ".join(str(int(c)) for c in classes))
        elif x.shape[-1] != dim:
            raise UsageError(f"modality {m!r} has another image shape than the first image modality; grid them separately")
        else:
            rows.append(x.float().cpu())
            row_labels.append(f"{kind} {m}")
    full_title = "\n".join(filter(None, [title, *text]))
    return save_image_grid(torch.cat(rows), shape, path, nrow=rows[0].shape[0], title=full_title or None,
                           row_labels=row_labels)


def save_latent_projection(z: torch.Tensor, clusters: Any, path: str | Path, labels: Any = None,
                           title: str | None = None) -> Path:
    """Scatter the first two principal components of the codes ``z`` (N, L), coloured by ``clusters`` (N,).

    Codes with L <= 2 are drawn as they are (padded with zeros to 2-D). With
    ``labels`` (N,) the title also gives the clustering accuracy against them
    (:func:`inference.metrics.cluster_accuracy`, Hungarian matching). Returns the path.
    """
    from sklearn.decomposition import PCA

    codes = z.detach().cpu().double().numpy()
    clusters = np.asarray(clusters.detach().cpu() if hasattr(clusters, "detach") else clusters)
    xy = (PCA(n_components=2).fit_transform(codes) if codes.shape[1] > 2
          else np.pad(codes, ((0, 0), (0, 2 - codes.shape[1]))))
    fig, ax = plt.subplots(figsize=(6, 5))
    k = int(clusters.max()) + 1
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    for c in range(k):
        sel = clusters == c
        if sel.any():
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=cmap(c % cmap.N), label=str(c), alpha=0.7, linewidths=0)
    ax.set_xlabel("PC 1 of the latent means")
    ax.set_ylabel("PC 2")
    ax.legend(title="cluster", markerscale=3, fontsize=7, loc="best", ncol=2 if k > 10 else 1)
    if labels is not None:
        title = (title or "") + f" (ACC {cluster_accuracy(labels, clusters):.3f})"
    if title:
        ax.set_title(title)
    return _save(fig, path)


# ---- latent-space figures (inference.latent) -------------------------------------------
def save_labelled_grid(images: Any, image_shape: tuple[int, ...], path: str | Path, *, row_labels: Any = None,
                       col_labels: Any = None, title: str | None = None, xlabel: str | None = None,
                       ylabel: str | None = None) -> Path:
    """Save a (R, C, D) array of images as an R x C grid with a label per row and per column; returns the path."""
    images = torch.as_tensor(images)
    rows, cols = images.shape[:2]
    grid = image_grid(images.reshape(rows * cols, -1), image_shape, nrow=cols)
    h, w = grid.shape[:2]
    scale = max(1.0, 500 / max(h, w))
    fig, ax = plt.subplots(figsize=(w * scale / 100 + 1.5, h * scale / 100 + 1.0))
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([(i + 0.5) * h / rows for i in range(rows)], row_labels or [""] * rows, fontsize=8)
    ax.set_xticks([(j + 0.5) * w / cols for j in range(cols)], col_labels or [""] * cols, fontsize=7)
    ax.tick_params(length=0)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_activity(act: Any, path: str | Path, *, threshold: float = 1e-2, title: str | None = None) -> Path:
    """Bar chart of the activity A_l (Burda et al. 2015) of every latent dimension, largest first, log scale."""
    act = np.asarray(torch.as_tensor(act).detach().cpu(), dtype=np.float64)
    order = np.argsort(-act)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * len(act) + 2), 3.6))
    colors = ["C0" if a > threshold else "0.6" for a in act[order]]
    ax.bar(range(len(act)), np.maximum(act[order], 1e-8), color=colors)
    ax.axhline(threshold, color="C3", ls="--", lw=1, label=f"active above {threshold:g}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(act)), [f"z{j + 1}" for j in order], rotation=90, fontsize=7)
    ax.set_xlabel("latent dimension (ordered by activity)")
    ax.set_ylabel("activity Var_x(E_q[z_l | x])")
    ax.legend(fontsize=8)
    ax.set_title(title or f"{int((act > threshold).sum())} of {len(act)} latent dimensions active")
    return _save(fig, path)


def plot_latent_map(coords: Any, path: str | Path, *, labels: Any = None,
                    axis_names: tuple[Any, ...] = ("dimension 1", "dimension 2"), title: str | None = None) -> Path:
    """Scatter 2-D coordinates of codes (N, 2), coloured by integer ``labels`` (N,) when given; returns the path."""
    coords = np.asarray(coords)
    fig, ax = plt.subplots(figsize=(6.2, 5.2))
    if labels is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=5, alpha=0.6, linewidths=0)
    else:
        labels = np.asarray(torch.as_tensor(labels).cpu())[: len(coords)]
        values = np.unique(labels)
        cmap = plt.get_cmap("tab10" if len(values) <= 10 else "tab20")
        for i, v in enumerate(values):
            sel = labels == v
            ax.scatter(coords[sel, 0], coords[sel, 1], s=5, alpha=0.7, linewidths=0, color=cmap(i % cmap.N), label=str(v))
        ax.legend(title="label", markerscale=3, fontsize=7, loc="best", ncol=2 if len(values) > 10 else 1)
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
