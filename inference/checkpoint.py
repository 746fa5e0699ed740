"""Checkpoints written atomically, and the RNG state that makes resuming exact.

A checkpoint is one ``torch.save`` file holding the module's state dict, Pyro's
param store, the optimiser's state, every RNG state (Python, NumPy, torch CPU and
CUDA), the history so far and the epoch it was written after. It is written to a
temporary file in the same folder, flushed to disk, then renamed over the old one
(``os.replace`` is atomic on POSIX), so a crash while saving never leaves a
half-written or missing checkpoint. Files are created with the user's umask
(as ``open`` would), not ``mkstemp``'s private mode 0600.

Loading never runs code from the file: :func:`load_checkpoint` reads with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain Python
values, plus an allow-list (:data:`SAFE_GLOBALS`): the constraint objects of
Pyro's param store, and NumPy's array reconstruction for the RNG state of
checkpoints of format 1 (format 2 stores NumPy's state as a tensor). A file
holding anything else is refused with :class:`~inference.errors.CheckpointError`.
"""
import contextlib
import inspect
import os
import pickle
import random
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyro.distributions.constraints as pyro_constraints
import torch
import torch.distributions.constraints as torch_constraints

from .errors import CheckpointError

FORMAT = "ppl-models/checkpoint/2"
READABLE = ("ppl-models/checkpoint/1", FORMAT)
FILENAME = "checkpoint.pt"


def _constraint_classes():
    return sorted(
        {o for m in (torch_constraints, pyro_constraints) for o in vars(m).values()
         if inspect.isclass(o) and issubclass(o, torch_constraints.Constraint)},
        key=lambda c: f"{c.__module__}.{c.__qualname__}",
    )


# what a checkpoint may hold besides tensors and plain values: the param store's constraints, and (format 1
# only) NumPy's RNG state array
SAFE_GLOBALS = [
    *_constraint_classes(),
    np._core.multiarray._reconstruct,  # type: ignore[attr-defined]  # NumPy 2 names it _core
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with _sigint_deferred():
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a Ctrl-C that arrives while a file is written until the write is done, then raise it.

    An interrupt inside ``torch.save`` surfaces as a RuntimeError of its writer instead of a
    KeyboardInterrupt; deferring it keeps the file whole and the interrupt an interrupt. Only the
    main thread can install signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def get_rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain values (loadable with ``weights_only=True``)."""
    # numpy's stub types get_state() as the dict form too, which only legacy=False returns
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),  # type: ignore[attr-defined]
                  "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        keys = numpy_state["keys"].cpu().numpy().astype(np.uint32)
        numpy_state = (numpy_state["kind"], keys, numpy_state["pos"], numpy_state["has_gauss"],
                       numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def dump_checkpoint(file: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` (a dict) with the format tag added to ``file`` (an open binary file)."""
    torch.save(dict(state, format=FORMAT), file)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (a dict) with the format tag added."""
    atomic_write(path, lambda f: dump_checkpoint(f, state))


def load_checkpoint(path: str | Path, *, expect_model: Any = None,
                    map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Read with ``torch.load(weights_only=True)`` and the allow-list
    :data:`SAFE_GLOBALS`, so no code in the file runs. Raises
    :class:`CheckpointError` when the file is missing, unreadable, holds Python
    objects outside the allow-list, is not a ppl-models checkpoint, or (with
    ``expect_model``) was written for another model.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):  # weights_only's refusal of a class or function outside the allow-list
            raise CheckpointError(f"checkpoint {path} holds Python objects other than tensors and plain values; "
                                  "refused (loading it could run code)") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable (UnpicklingError)") from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") not in READABLE:
        raise CheckpointError(f"{path} is not a ppl-models checkpoint")
    if expect_model is not None and state.get("model") != expect_model:
        raise CheckpointError(f"checkpoint {path} holds a {state.get('model')!r} model, not {expect_model!r}")
    return state
