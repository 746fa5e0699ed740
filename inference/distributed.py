r"""Data-parallel training on ``torch.distributed``: what :class:`inference.train.Trainer` does on W processes.

Launched as W processes (``torchrun --nproc-per-node=W``, or any launcher that
sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``), every
process (rank) holds the whole training data and the same parameters, and
:func:`inference.fit` runs the same steps on each, with these rules (the
synchronous data parallelism of Li et al. 2020, "PyTorch Distributed:
Experiences on Accelerating Data Parallel Training", written out explicitly
rather than by ``DistributedDataParallel``, whose hooks fire only when the
wrapped module's ``forward`` is called: a Pyro ``model``/``guide`` called
directly would skip them silently):

* **Batches.** Every step takes one *global* batch of ``G = W * batch_size``
  rows from a permutation of the N points that every rank draws alike (a CPU
  generator seeded with the run's seed and the epoch: :func:`epoch_generator`,
  no communication), and rank r trains on its part
  (``torch.tensor_split(batch, W)[r]``: parts differ by at most one row; a
  ragged last batch may leave a rank no rows). The union over ranks of a
  step's rows is the batch of one process with batch size ``G``.
* **Gradients.** With ``b_r`` of the ``G`` rows on rank r and ``P_r`` the
  points its loss ``L_r`` stands for (``b_r``, or the full N when the data
  plate scales the batch to the full data), rank r back-propagates
  ``c_r = L_r * (b_r / G) / P_r`` and the gradients of *every* optimised
  tensor (module parameters and ``pyro.param`` ones alike) are summed over
  ranks by one all-reduce after backward. For a plain minibatch this is the
  gradient of ``sum_r L_r / G``, the one-process loss per datapoint of the
  global batch; for a batch scaled to the full data, ``sum_r (b_r / G) L_r / N``
  is the one-process estimate from G rows (local terms ``N / G`` times their
  sum, global terms once). A tensor with no gradient on any rank keeps
  ``None`` (so the optimiser skips it, as in one process); one with a gradient
  on some ranks gets zeros on the others.
* **Losses.** The per-step contributions ``c_r`` are summed over ranks in the
  window's host read (one all-reduce per read), so every rank reports the same
  global loss per datapoint, and a non-finite loss on any rank is non-finite
  in that sum on every rank: all ranks stop at the same step with the same
  error (a rank whose model raised Pyro's support error contributes NaN and a
  flag in the same all-reduce, and keeps taking part in the collectives until
  that read, so no rank waits on another). The validation ELBO is the
  all-reduced sum over the ranks' shards of the validation data.
* **Noise.** Each rank's model noise (reparameterised draws, dynamic
  binarisation) comes from its own seed (:func:`rank_seed`), set when a fresh
  run starts.
* **Initialisation and checkpoints.** Parameters (module parameters and
  buffers, and the param store's unconstrained tensors) are broadcast from
  rank 0 once when training starts, so any initialisation run on rank 0 alone
  (VaDE's pretraining, the GMM's EM start) reaches every rank. Rank 0 alone
  writes checkpoints; they hold every rank's RNG state, so resuming at the same
  world size is exact, and resuming at another is refused.

IWAE and Renyi bounds of a pair with a global latent are whole-batch bounds:
they change with the rows each rank holds, so at W > 1 the objective differs
from one process's (:class:`~inference.train.Trainer` warns).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .batching import _stop
from .errors import UsageError

# how long a collective waits for the other ranks before failing (a backstop: the engine's collectives are
# matched on every rank by construction); PPLM_DIST_TIMEOUT (seconds) overrides it
TIMEOUT_S = 1800.0
ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env_world_size() -> int:
    """``WORLD_SIZE`` of the environment (1 when unset or empty)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def wanted(distributed: Any) -> bool:
    """Whether a run is data-parallel: ``distributed`` True or a process group, or None with ``WORLD_SIZE > 1``."""
    if distributed is None:
        return env_world_size() > 1
    return distributed is not False


def is_writer() -> bool:
    """True in a process that writes (rank 0 of an initialised process group, or a single process)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shutdown() -> None:
    """Leave the default process group, if one is initialised (at the end of a ``pplm train`` under torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA device given without an index, else ``device``."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return device


def timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("PPLM_DIST_TIMEOUT", TIMEOUT_S)))


def setup(distributed: Any, device: torch.device) -> "DataParallel":
    """Join the process group (initialising it from torchrun's environment if needed) and return its ranks' helper.

    ``distributed`` is True (the default group) or a ``torch.distributed.ProcessGroup``
    (e.g. ``new_group([0])``: a one-rank run inside a larger job). The backend is
    NCCL for a CUDA device and gloo otherwise; on CPU each rank keeps one
    intra-op thread (``torch.set_num_threads(1)``), so W ranks use W cores.

    :raises inference.errors.UsageError: without ``torch.distributed``, or without
        an initialised group and torchrun's environment variables.
    """
    if not dist.is_available():
        raise UsageError("distributed training needs torch.distributed, which this PyTorch build lacks")
    group = None if distributed is True or distributed is None else distributed
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise UsageError(f"distributed must be True, False, None or a torch.distributed process group, "
                         f"got {type(distributed).__name__}")
    if not dist.is_initialized():
        missing = [k for k in ENV if not os.environ.get(k)]
        if missing:
            raise UsageError(f"distributed training needs an initialised process group or torchrun's environment "
                             f"({', '.join(missing)} unset): launch with torchrun --nproc-per-node=N")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout())
    if device.type == "cpu":
        torch.set_num_threads(1)
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    return DataParallel(group, device)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, epoch)`` (NumPy's SeedSequence), drawn alike on every rank."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s model noise: NumPy's SeedSequence of ``(seed, rank)``, one 32-bit word."""
    return int(np.random.SeedSequence([seed, 1 + rank]).generate_state(1)[0])


def shard(n: int, world_size: int, rank: int) -> slice:
    """Rank ``rank``'s contiguous part of ``n`` rows (``torch.tensor_split``'s split: sizes differ by at most one)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class DataParallel:
    """The collectives of one data-parallel run on ``group`` (None: the default group); see the module docstring."""

    def __init__(self, group: Any, device: torch.device) -> None:
        self.group, self.device = group, device
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.src = dist.get_global_rank(group, 0) if group is not None else 0

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    # ---- batches ---------------------------------------------------------------------
    def batches(self, n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool, drop_last: bool,
                device: torch.device) -> list[tuple[torch.Tensor, int]]:
        """``(rows of this rank on device, rows of the global batch)`` for each step of epoch ``epoch``.

        Global batches of ``world_size * batch_size`` rows from :func:`epoch_generator`'s
        permutation (or in order without shuffling); ``drop_last`` drops a ragged
        last global batch (kept if it is the only one).
        """
        size = batch_size * self.world_size
        order = torch.randperm(n, generator=epoch_generator(seed, epoch)) if shuffle else torch.arange(n)
        order = order.to(device)  # one copy per epoch
        steps = []
        for i in range(0, _stop(n, size, drop_last), size):
            rows = order[i : i + size]
            steps.append((rows[shard(len(rows), self.world_size, self.rank)], len(rows)))
        return steps

    @staticmethod
    def contribution(loss: torch.Tensor, rows: int, global_rows: int, points: int) -> torch.Tensor:
        """``loss * (rows / global_rows) / points``: this rank's share of the step's loss per datapoint."""
        return loss * (rows / (global_rows * points))

    # ---- collectives -----------------------------------------------------------------
    def all_reduce_gradients(self, params: list[torch.Tensor]) -> None:
        """Sum the gradients of ``params`` over ranks in place (one all-reduce per dtype).

        Each rank sends every gradient (zeros where it has none) and a 0/1 mark
        per tensor; a tensor marked on no rank gets ``None`` back, one marked on
        some ranks the sum of theirs. One rank: nothing to do.
        """
        if self.world_size == 1:
            return
        groups: dict[Any, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault((p.dtype, p.device), []).append(i)
        for members in groups.values():
            parts = []
            for i in members:
                grad = params[i].grad
                parts.append(torch.zeros_like(params[i]) if grad is None else grad)
            marks = torch.tensor([float(params[i].grad is not None) for i in members],
                                 dtype=params[members[0]].dtype, device=params[members[0]].device)
            flat = torch.cat([t.reshape(-1) for t in parts] + [marks])
            dist.all_reduce(flat, group=self.group)
            # a rank that has every gradient knows every mark is >= 1: no host read of the marks
            local = all(params[i].grad is not None for i in members)
            seen = [1.0] * len(members) if local else flat[-len(members):].tolist()
            offset = 0
            for i, mark in zip(members, seen):
                p = params[i]
                size = p.numel()
                if mark:
                    if p.grad is None:
                        p.grad = torch.empty_like(p)
                    p.grad.copy_(flat[offset : offset + size].view_as(p))
                else:
                    p.grad = None
                offset += size

    def read(self, window: list[torch.Tensor], failed: int, largest: torch.Tensor) -> tuple[list[float], int, float]:
        """One host read: the window's contributions and ``failed`` summed over ranks, and this rank's ``largest``."""
        f64 = torch.float64
        local = torch.stack([*(w.to(f64) for w in window), torch.tensor(float(failed), dtype=f64, device=largest.device)])
        if self.world_size > 1:
            dist.all_reduce(local, group=self.group)  # float64 on every rank, whatever each rank's loss dtype
        *values, flag, big = torch.cat([local, largest.to(f64).reshape(1)]).tolist()
        return values, int(flag), big

    def sum(self, values: list[float]) -> list[float]:
        """``values`` (floats) summed over ranks, in float64."""
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        if self.world_size > 1:
            dist.all_reduce(t, group=self.group)
        return t.tolist()

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite ``tensors`` on every rank with rank 0's (in place)."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=self.src, group=self.group)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled)."""
        box = [obj]
        dist.broadcast_object_list(box, src=self.src, group=self.group, device=self._collective_device())
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (pickled)."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def _collective_device(self):
        return self.device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")


__all__ = ["DataParallel", "epoch_generator", "is_writer", "rank_seed", "setup", "shard", "shutdown", "wanted"]
