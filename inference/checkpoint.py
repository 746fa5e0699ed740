"""Checkpoints written atomically, and the RNG state that makes resuming exact.

A checkpoint is one ``torch.save`` file holding the module's state dict, Pyro's
param store, the optimiser's state, every RNG state (Python, NumPy, torch CPU and
CUDA), the history so far and the epoch it was written after. It is written to a
temporary file in the same folder, flushed to disk, then renamed over the old one
(``os.replace`` is atomic on POSIX), so a crash while saving never leaves a
half-written or missing checkpoint.
"""

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError

FORMAT = "ppl-models/checkpoint/1"
FILENAME = "checkpoint.pt"


def atomic_write(path, write):
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def get_rng_state():
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def model_name(module):
    return type(module).__name__


def save_checkpoint(path, state):
    """Atomically write ``state`` (a dict) with the format tag added."""
    state = dict(state, format=FORMAT)
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, *, expect_model=None, map_location="cpu"):
    """Load a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`CheckpointError` when the file is missing, unreadable, not a
    ppl-models checkpoint, or (with ``expect_model``) written for another model.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ppl-models checkpoint")
    if expect_model is not None and state.get("model") != expect_model:
        raise CheckpointError(f"checkpoint {path} holds a {state.get('model')!r} model, not {expect_model!r}")
    return state
