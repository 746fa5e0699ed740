"""What :func:`inference.fit` does besides stepping: callbacks of the training loop.

A callback is an object with any of these methods (each optional), called by
:class:`inference.train.Trainer` in this order:

* ``setup(trainer)``: before anything else (``Checkpoint`` resumes here);
* ``on_fit_start(trainer)``: the loop is about to run epochs ``trainer.epoch + 1 ...``;
* ``on_steps(trainer, steps, loss_sum, points)``: after each host read of the
  losses (every ``sync_every`` steps): how many steps were read, the sum of
  their losses and the number of datapoints seen so far in the epoch;
* ``on_epoch_end(trainer, record)``: after each epoch, with its history record
  (``epoch``, ``train_loss``, ``lr``, ``seconds``, and ``val_elbo`` /
  ``eval_seconds`` when there is validation data); setting
  ``trainer.should_stop = True`` ends training after this epoch;
* ``on_fit_end(trainer)``: after the last epoch, also when stopped early;
* ``state_dict()`` / ``load_state_dict(state)``: what a checkpoint keeps of the
  callback, so resuming is exact.

Callbacks run in increasing ``order`` (a class attribute, default 0): the
progress bar first, then the user's callbacks, :class:`EarlyStopping`,
:class:`TensorBoard` and, last, :class:`Checkpoint`, so that a checkpoint
holds every other callback's state after the epoch. A plain function
``f(record)`` is accepted as a callback and called at each epoch's end.
"""

from __future__ import annotations

import io
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from .checkpoint import FILENAME, atomic_write, dump_checkpoint, load_checkpoint
from .errors import CheckpointError, DivergenceError, UsageError

if TYPE_CHECKING:  # the trainer imports this module; the name is needed by the annotations only
    from .train import Trainer


def _check_folder(path, what):
    """Refuse, before training, a folder path that names an existing file."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a folder")


class Callback:
    """Base class with every hook a no-op (see the module docstring)."""

    order = 0

    def setup(self, trainer: Trainer) -> None:
        pass

    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_steps(self, trainer: Trainer, steps: int, loss_sum: float, points: int) -> None:
        pass

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        pass

    def on_fit_end(self, trainer: Trainer) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class LambdaCallback(Callback):
    """``fn(record)`` called at the end of every epoch (observes; cannot stop training)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.fn(record)


def as_callback(obj: Any) -> Callback:
    """A :class:`Callback` from a callback object or a plain function of the epoch record."""
    if isinstance(obj, Callback):
        return obj
    if isinstance(obj, type):
        raise UsageError(f"callbacks take instances: pass {obj.__name__}(...), not the class")
    if callable(obj):
        return LambdaCallback(obj)
    raise UsageError(f"a callback is a Callback or a function of the epoch record, got {type(obj).__name__}")


class ProgressBar(Callback):
    """A tqdm bar over the run's steps on stderr, with the epoch and its running loss per datapoint."""

    order = -100

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None  # the tqdm bar, made by on_fit_start
        self._postfix_time = -math.inf

    def on_fit_start(self, trainer: Trainer) -> None:
        left = max(trainer.epochs - trainer.epoch, 0)
        self.bar = tqdm(
            total=left * trainer.steps_per_epoch,
            disable=not (self.enabled and trainer.is_writer),
            desc=f"fit {trainer.pair.name} [{trainer.spec}]",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def on_steps(self, trainer: Trainer, steps: int, loss_sum: float, points: int) -> None:
        if self.bar.disable:
            return
        self.bar.update(steps)
        now = time.monotonic()
        if now - self._postfix_time >= self.bar.mininterval:
            # formatting the postfix costs about as much as a small model's optimiser step: only as often as
            # tqdm may redraw the bar (its ``mininterval``), never on every step
            self._postfix_time = now
            self.bar.set_postfix({"epoch": trainer.epoch + 1, "loss": f"{loss_sum / max(points, 1):.3f}"},
                                 refresh=False)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        post = {"epoch": record["epoch"], "loss": f"{record['train_loss']:.3f}"}
        if "val_elbo" in record:
            post["val_elbo"] = f"{record['val_elbo']:.3f}"
        self.bar.set_postfix(post, refresh=False)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()


class EarlyStopping(Callback):
    """Stop when the validation ELBO has not improved for ``patience`` epochs; restore the best epoch.

    An epoch improves when its ``val_elbo`` exceeds the best so far by more than
    ``min_delta`` nats per datapoint. After ``patience`` epochs in a row without
    improvement training stops; at the end (stopped or not) the module's and the
    param store's state of the best epoch are restored, and
    ``trainer.best_epoch`` says which epoch that was. Needs validation data
    (``fit(validation=...)``).

    :raises inference.errors.UsageError: for a patience that is not a positive integer,
        or when the run has no validation data.
    """

    order = 10

    def __init__(self, patience: int, *, min_delta: float = 0.0, monitor: str = "val_elbo") -> None:
        if not (isinstance(patience, int) and not isinstance(patience, bool) and patience >= 1):
            raise UsageError(f"patience must be a positive integer, got {patience!r}")
        if not (isinstance(min_delta, (int, float)) and min_delta >= 0):
            raise UsageError(f"min_delta must be a non-negative number, got {min_delta!r}")
        self.patience, self.min_delta, self.monitor = patience, float(min_delta), monitor
        self.best_state: dict[str, Any] | None
        self.best, self.best_epoch, self.wait, self.best_state = -math.inf, None, 0, None

    def setup(self, trainer: Trainer) -> None:
        if trainer.validation is None:
            raise UsageError("early stopping watches the validation ELBO, and there is no validation data "
                             "(fit(validation=FRACTION or data); pplm --validation FRACTION)")

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        value = record[self.monitor]
        if value > self.best + self.min_delta:
            self.best, self.best_epoch, self.wait = value, record["epoch"], 0
            self.best_state = trainer.parameters_state()
        else:
            self.wait += 1
            if self.wait >= self.patience:
                trainer.should_stop = True
                record["stopped"] = True

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.best_state is not None:
            trainer.load_parameters_state(self.best_state)
            trainer.best_epoch = self.best_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait, "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]
        self.best_state = state["best_state"]


class TensorBoard(Callback):
    """Write each epoch's scalars (``train/loss``, ``val/elbo``, ``lr``, ``time/epoch_seconds``) to TensorBoard.

    Uses ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard``
    package: ``pip install ppl-models[tensorboard]``), one event file under
    ``log_dir``, the epoch as the global step. View with ``tensorboard --logdir LOG_DIR``.
    """

    order = 20
    TAGS = {"train_loss": "train/loss", "val_elbo": "val/elbo", "lr": "lr", "seconds": "time/epoch_seconds"}

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.writer: Any = None  # the SummaryWriter, made by on_fit_start

    def setup(self, trainer: Trainer) -> None:
        _check_folder(self.log_dir, "the TensorBoard folder")

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.is_writer:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("TensorBoard logging needs the tensorboard package (pip install tensorboard)") from None
        # a resumed run continues its curves: events past the resumed epoch are dropped
        self.writer = SummaryWriter(str(self.log_dir), purge_step=trainer.epoch + 1 if trainer.epoch else None)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, tag in self.TAGS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], record["epoch"])
        self.writer.flush()

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()


class Checkpoint(Callback):
    """An atomic checkpoint in ``directory`` after every epoch; ``resume=True`` continues from it.

    The checkpoint (:mod:`inference.checkpoint`) holds the module, Pyro's param
    store, the optimiser and LR scheduler, every RNG state, the history, the
    other callbacks' states (e.g. early stopping's best epoch) and the run's
    settings; on CPU with the same seed a resumed run equals an uninterrupted
    one exactly. Resuming refuses a checkpoint trained with another objective,
    batch size, seed or validation split. An epoch's checkpoint is kept in
    memory and written only once it is known good: at the next read of the
    losses (its parameters and its next loss finite) or, after the last epoch,
    when its parameters are finite; a divergence (non-finite loss or parameters)
    drops it, so the one on disk is always the last good one (an interruption
    between an epoch's end and that read leaves the previous epoch's). When early stopping restored the best
    epoch's parameters, the final checkpoint holds them (and says so), so a
    finished run is reloaded as it was returned.

    Data-parallel (:mod:`inference.distributed`), rank 0 alone writes; the
    checkpoint holds every rank's RNG state, every rank resumes from rank 0's
    reading of it, and a checkpoint of another world size is refused.
    """

    order = 100
    MATCH = ("elbo", "batch_size", "seed", "validation")

    def __init__(self, directory: str | Path, *, resume: bool = False) -> None:
        self.path = Path(directory) / FILENAME
        self.resume = resume
        self.pending: bytes | None = None

    def setup(self, trainer: Trainer) -> None:
        _check_folder(self.path.parent, "checkpoint_dir")
        trainer.checkpoint_path = self.path
        if trainer.parallel is not None:
            state = trainer.parallel.broadcast_object(self._read(trainer) if trainer.is_writer else None)
            if isinstance(state, Exception):
                raise state
        else:
            state = self._read(trainer)
        if state is None:
            return
        ranks = state["settings"].get("world_size", 1)
        if ranks != trainer.world_size:
            raise CheckpointError(f"cannot resume: the checkpoint was trained on {ranks} process(es) and this run "
                                  f"has {trainer.world_size}; resume with the same world size")
        for key in self.MATCH:
            stored, now = state["settings"].get(key), trainer.settings.get(key)
            if stored != now:
                raise CheckpointError(f"cannot resume: the checkpoint was trained with {key}={stored!r}, not {now!r}")
        trainer.load_state_dict(state)

    def _read(self, trainer):
        """The checkpoint to resume from (None: nothing to resume); an error is returned, to be raised on every rank."""
        if not (self.resume and self.path.exists()):
            return None
        try:
            return load_checkpoint(self.path, expect_model=trainer.pair.name, map_location=trainer.device)
        except CheckpointError as exc:
            if trainer.parallel is None:
                raise
            return exc

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        # kept in memory until the next read of the losses shows its parameters finite and its next loss finite
        self._hold(trainer)

    def on_steps(self, trainer: Trainer, steps: int, loss_sum: float, points: int) -> None:
        self._write_pending()

    def on_fit_end(self, trainer: Trainer) -> None:
        if trainer.best_epoch is not None and trainer.history and trainer.best_epoch != trainer.history[-1]["epoch"]:
            self._hold(trainer)
        if self.pending is not None and not trainer.parameters_finite():
            self.pending = None
            kept = f"; the last good checkpoint {self.path} is kept" if self.path.exists() else ""
            raise DivergenceError(f"training diverged: the parameters after epoch {trainer.epoch} are not finite{kept}")
        self._write_pending()

    def _hold(self, trainer):
        """Keep the trainer's state as the pending checkpoint (rank 0's bytes; b"" on the others, which write nothing)."""
        state = trainer.state_dict()  # on every rank: it gathers the ranks' RNG states
        self.pending = _serialise(state) if trainer.is_writer else b""

    def _write_pending(self):
        if self.pending is not None:
            data, self.pending = self.pending, None
            if data:
                atomic_write(self.path, lambda f: f.write(data))


def _serialise(state):
    buffer = io.BytesIO()
    dump_checkpoint(buffer, state)
    return buffer.getvalue()


__all__ = [
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "LambdaCallback",
    "ProgressBar",
    "TensorBoard",
    "as_callback",
]
