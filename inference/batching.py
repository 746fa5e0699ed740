"""Batching over tensors that already live on the run's device.

A *data* object is a tensor whose first dimension indexes datapoints, a mapping
of names to such tensors (multimodal data: every value shares the first
dimension), a tuple of such tensors (a model's positional arguments), or an
object with ``.data`` (a fixed view, used for evaluation), ``.epoch()`` (a
fresh view per training epoch, e.g. dynamic binarisation) and ``.rows(index)``
(the same kind of object for a subset of the datapoints), such as
:class:`ppl_models.data.DataSplit`. Batches are formed by indexing device tensors
with device index tensors, so the hot path makes no host-to-device copies.
"""
from collections.abc import Mapping
from typing import Any

import torch

from .errors import UsageError


def fixed_view(data: Any) -> Any:
    """The fixed tensor (or mapping) behind ``data``, for evaluation."""
    return data.data if hasattr(data, "epoch") else data


def epoch_view(data: Any) -> Any:
    """The tensor (or mapping) to train on for one epoch."""
    return data.epoch() if hasattr(data, "epoch") else data


def _map(data, fn):
    """``fn`` applied to every tensor of a tensor, a mapping or a tuple/list of tensors (None kept)."""
    if isinstance(data, Mapping):
        return {k: (None if v is None else fn(v)) for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        return type(data)(None if v is None else fn(v) for v in data)
    return fn(data)


def _items(data, what="data"):
    """``(name, tensor)`` pairs of a tensor, a mapping or a tuple/list of tensors (None skipped)."""
    if isinstance(data, Mapping):
        return [(str(k), v) for k, v in data.items() if v is not None]
    if isinstance(data, (tuple, list)):
        return [(f"{what}[{i}]", v) for i, v in enumerate(data) if v is not None]
    return [(what, data)]


def values_per_point(data: Any) -> int:
    """Numbers per datapoint, summed over every tensor of ``data`` (at least 1): what sizes particle chunks."""
    return max(1, sum(v[0].numel() for _, v in _items(fixed_view(data)) if torch.is_tensor(v) and v.dim() > 0))


def length(data: Any) -> Any:
    """The number of datapoints: the common first dimension of every tensor in ``data``."""
    data = fixed_view(data)
    if not isinstance(data, (Mapping, tuple, list)):
        return data.shape[0]
    items = _items(data)
    if not items:
        kind = "modality" if isinstance(data, Mapping) else "tensor"
        raise UsageError(f"the data hold no {kind}: give at least one array of datapoints")
    sizes = {v.shape[0] if v.dim() else None for _, v in items}
    if len(sizes) != 1 or None in sizes:
        kind = "modalities" if isinstance(data, Mapping) else "the tensors of a batch"
        raise UsageError(f"{kind} disagree on the number of datapoints: {sorted(s for s in sizes if s is not None)}")
    return sizes.pop()


def take(data: Any, index: torch.Tensor) -> Any:
    """Rows ``index`` (a slice or an index tensor) of a tensor, or of every tensor in a mapping or tuple."""
    return _map(data, lambda v: v[index])


def subset(data: Any, index: torch.Tensor) -> Any:
    """The datapoints ``index`` (an index tensor) of ``data``, as data of the same kind.

    Data objects (with ``.epoch()``) provide ``rows(index)``; tensors and mappings are indexed.
    """
    if hasattr(data, "rows"):
        return data.rows(index)
    if hasattr(data, "epoch"):
        raise UsageError(f"{type(data).__name__} cannot be split: give it a rows(index) method")
    return take(data, index)


def to_device(data: Any, device: str | torch.device) -> Any:
    if hasattr(data, "to") and hasattr(data, "epoch"):
        return data.to(device)
    return _map(data, lambda v: v.to(device))


def data_device(data: Any) -> torch.device:
    return _items(fixed_view(data))[0][1].device


def check_finite(data: Any, what: str = "data") -> None:
    """Raise :class:`UsageError` if any floating-point value is NaN or infinite."""
    for name, value in _items(fixed_view(data), what):
        if value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise UsageError(f"{name} holds {bad} NaN or infinite values")


def _stop(n, batch_size, drop_last):
    """Points used by one pass: all of them, or without the ragged last batch (kept if it is the only one)."""
    return n - n % batch_size if drop_last and n >= batch_size else n


def num_batches(n: int, batch_size: int, *, drop_last: bool = False) -> int:
    """How many batches :func:`batch_indices` makes."""
    return -(-_stop(n, batch_size, drop_last) // batch_size)


def batch_indices(n: int, batch_size: int, *, shuffle: bool, device: str | torch.device,
                  drop_last: bool = False) -> list[Any]:
    """Index tensors for one pass over ``n`` points; shuffling draws from the device's RNG."""
    if shuffle:
        order = torch.randperm(n, device=device)
    else:
        order = torch.arange(n, device=device)
    return [order[i : i + batch_size] for i in range(0, _stop(n, batch_size, drop_last), batch_size)]
