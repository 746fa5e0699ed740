"""Batching over tensors that already live on the run's device.

A *data* object is a tensor whose first dimension indexes datapoints, a tuple of
such tensors (passed as positional arguments, e.g. ``(X, y)``), a mapping
of names to such tensors (multimodal data: every value shares the first
dimension), or an object with ``.data`` (a fixed view, used for evaluation) and
``.epoch()`` (a fresh view per training epoch, e.g. dynamic binarisation) such as
:class:`ppl_models.data.DataSplit`. Batches are formed by indexing device tensors
with device index tensors, so the hot path makes no host-to-device copies.
"""

from collections.abc import Mapping

import torch

from .errors import UsageError


def fixed_view(data):
    """The fixed tensor (or mapping) behind ``data``, for evaluation."""
    return data.data if hasattr(data, "epoch") else data


def epoch_view(data):
    """The tensor (or mapping) to train on for one epoch."""
    return data.epoch() if hasattr(data, "epoch") else data


def length(data):
    data = fixed_view(data)
    if isinstance(data, Mapping):
        sizes = {v.shape[0] for v in data.values() if v is not None}
        if len(sizes) != 1:
            raise UsageError(f"modalities disagree on the number of datapoints: {sorted(sizes)}")
        return sizes.pop()
    if isinstance(data, (tuple, list)):  # positional arguments, e.g. (X, y)
        sizes = {v.shape[0] for v in data if v is not None}
        if len(sizes) != 1:
            raise UsageError(f"the tensors of a tuple batch disagree on the number of datapoints: {sorted(sizes)}")
        return sizes.pop()
    return data.shape[0]


def take(data, index):
    """Rows ``index`` (a slice or an index tensor) of a tensor or of every tensor in a mapping."""
    if isinstance(data, Mapping):
        return {k: (None if v is None else v[index]) for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        return tuple(None if v is None else v[index] for v in data)
    return data[index]


def to_device(data, device):
    if hasattr(data, "to") and hasattr(data, "epoch"):
        return data.to(device)
    if isinstance(data, Mapping):
        return {k: (None if v is None else v.to(device)) for k, v in data.items()}
    return data.to(device)


def data_device(data):
    data = fixed_view(data)
    if isinstance(data, Mapping):
        return next(v.device for v in data.values() if v is not None)
    if isinstance(data, (tuple, list)):
        return next(v.device for v in data if v is not None)
    return data.device


def check_finite(data, what="data"):
    """Raise :class:`UsageError` if any floating-point value is NaN or infinite."""
    data = fixed_view(data)
    items = data.items() if isinstance(data, Mapping) else [(what, data)]
    for name, value in items:
        if value is not None and value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise UsageError(f"{name} holds {bad} NaN or infinite values")


def _stop(n, batch_size, drop_last):
    """Points used by one pass: all of them, or without the ragged last batch (kept if it is the only one)."""
    return n - n % batch_size if drop_last and n >= batch_size else n


def num_batches(n, batch_size, *, drop_last=False):
    """How many batches :func:`batch_indices` makes."""
    return -(-_stop(n, batch_size, drop_last) // batch_size)


def batch_indices(n, batch_size, *, shuffle, device, drop_last=False):
    """Index tensors for one pass over ``n`` points; shuffling draws from the device's RNG."""
    if shuffle:
        order = torch.randperm(n, device=device)
    else:
        order = torch.arange(n, device=device)
    return [order[i : i + batch_size] for i in range(0, _stop(n, batch_size, drop_last), batch_size)]
