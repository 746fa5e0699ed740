"""Batching over tensors that already live on the run's device.

A *data* object is a tensor whose first dimension indexes datapoints, a mapping
of names to such tensors (multimodal data: every value shares the first
dimension), a tuple of such tensors (a model's positional arguments), or an
object with ``.data`` (a fixed view, used for evaluation), ``.epoch()`` (a
fresh view per training epoch, e.g. dynamic binarisation) and ``.rows(index)``
(the same kind of object for a subset of the datapoints), such as
:class:`ppl_models.data.DataSplit`. A training batch is the object's rows
``rows(index).epoch()``, so a fresh view (dynamic binarisation) is drawn per
batch, for the batch's rows only.

Two ways to feed the device. *Resident* (the default when the data fit): the
data are moved to the device once and batches are formed by indexing device
tensors with device index tensors, so the hot path makes no host-to-device
copies. *Streaming* (:func:`should_stream`: data larger than
:data:`STREAM_FRACTION` of the free CUDA memory, or asked for): the data stay
in host memory and each batch's rows are gathered on the host into page-locked
(pinned) memory and copied with ``non_blocking=True`` (tensors, mappings and
tuples; a data object's rows are copied by its own ``to(device)``), so the copy
overlaps the device's work (PyTorch's caching host allocator keeps a pinned block until the
copy that reads it has finished). Both draw the same index permutation (on the
device) and the same per-batch noise (on the device, after the copy), so they
give the same batches and results.
"""
from collections.abc import Mapping
from typing import Any

import torch

from .errors import UsageError

# streaming is chosen when the training data exceed this fraction of the device's free memory
STREAM_FRACTION = 0.5


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


def _require_tensor(name, value):
    if not torch.is_tensor(value):
        raise UsageError(f"{name} is a {type(value).__name__}, not a torch tensor: pass torch.as_tensor(...)")


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
    for name, v in items:
        _require_tensor(name, v)
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


def nbytes(data: Any) -> int:
    """Bytes held by the tensors of ``data`` (a data object: its fixed view, plus its ``grey`` levels if any)."""
    total = sum(v.numel() * v.element_size() for _, v in _items(fixed_view(data)) if torch.is_tensor(v))
    extra = getattr(data, "grey", None)
    return total + (extra.numel() * extra.element_size() if torch.is_tensor(extra) else 0)


def should_stream(data: Any, device: torch.device) -> bool:
    """Stream batches from the host: on CUDA, when ``data`` exceed :data:`STREAM_FRACTION` of the free memory."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes(data) > STREAM_FRACTION * free


def to_host(data: Any, device: torch.device) -> Any:
    """``data`` in host memory, page-locked (pinned) when ``device`` is CUDA so copies from it can be non-blocking."""
    data = to_device(data, "cpu")
    if device.type != "cuda":
        return data
    if hasattr(data, "epoch"):
        return data  # a data object's own tensors: copied per batch by its rows() and to()
    return _map(data, lambda v: v.pin_memory())


def per_batch(data: Any) -> bool:
    """Whether training batches can be drawn per step by :func:`batch` (tensors, or a data object with ``rows``)."""
    return not hasattr(data, "epoch") or hasattr(data, "rows")


def batch(data: Any, index: torch.Tensor, device: torch.device | None = None) -> Any:
    """The training rows ``index`` of ``data``: a data object's ``rows(index).epoch()`` (a fresh draw of these
    rows), a tensor's (or mapping's, tuple's) indexed rows.

    With ``device`` (streaming), ``data`` live on the host and ``index`` is a host
    tensor: the rows are gathered into pinned memory and copied to ``device``
    without blocking; a data object's draw happens on ``device`` after the copy.
    """
    if device is None:
        return epoch_view(data.rows(index)) if hasattr(data, "epoch") else take(data, index)
    if hasattr(data, "epoch"):
        return epoch_view(to_device(data.rows(index), device))

    def copy(v):
        rows = torch.empty((index.shape[0], *v.shape[1:]), dtype=v.dtype, pin_memory=device.type == "cuda")
        torch.index_select(v, 0, index, out=rows)
        return rows.to(device, non_blocking=True)

    return _map(data, copy)


def data_device(data: Any) -> torch.device:
    return _items(fixed_view(data))[0][1].device


def check_finite(data: Any, what: str = "data") -> None:
    """Raise :class:`UsageError` if a value is not a tensor, or any floating-point value is NaN or infinite."""
    for name, value in _items(fixed_view(data), what):
        _require_tensor(name, value)
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
                  drop_last: bool = False, host: bool = False) -> list[Any]:
    """Index tensors for one pass over ``n`` points; shuffling draws from the device's RNG.

    ``host=True`` (streaming) returns them in host memory (the permutation is
    still drawn on the device, then copied once), so both paths batch alike."""
    if shuffle:
        order = torch.randperm(n, device=device)
    else:
        order = torch.arange(n, device=device)
    if host:
        order = order.cpu()
    return [order[i : i + batch_size] for i in range(0, _stop(n, batch_size, drop_last), batch_size)]
