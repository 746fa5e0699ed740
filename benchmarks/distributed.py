"""Data-parallel throughput: samples/s of ``fit`` on W = 1 and W = 2 processes (torch.distributed).

The MNIST MLP VAE (784-400-50, Bernoulli likelihood, dynamically binarised
MNIST, Adam, trace ELBO, Pyro validation off) trained by :func:`inference.fit`
on the first ``--points`` training images, in these settings:

* ``fit``: one plain process (no process group), batch B;
* ``W=1``: ``fit(distributed=group)`` on a one-rank group, batch B: the cost of
  the data-parallel machinery itself (one all-reduce of the gradients and one
  of the losses per step, on one rank);
* ``W=2``: two ranks, B rows each (global batch 2B: weak scaling, what
  data parallelism is for);
* ``W=2 (B/2)``: two ranks, B/2 rows each (the global batch of ``fit``: strong scaling).

On CPU each rank has one intra-op thread (gloo over loopback); on CUDA each rank
its own GPU (NCCL; needs as many GPUs as ranks). Two ranks are spawned once and
reused; the settings are interleaved round by round (order rotated), each a
fresh 2-epoch run whose second epoch is timed (the first warms up), and the
median over rounds is reported. ``samples_per_s`` counts the rows trained per
second over all ranks; ``efficiency`` is ``samples_per_s / (W * samples_per_s of
W=1 at the same per-rank batch)`` (1.0 is perfect scaling);
``comm_ms_per_step`` is the time a rank spends in the gradient all-reduce and
the loss read per step (the rest of a step is the same computation as one
process's).

What a 2-core machine shared with other jobs can and cannot show: two ranks
can at most run on its two cores at once, and every other running process
takes a share of them, so W = 2's samples/s and efficiency measure the
machine's load as much as the engine (the record keeps the load average).
What it does show is the overhead per step of the data-parallel path (``W=1``
against ``fit``, and ``comm_ms_per_step``), which is what limits scaling when
each rank has its own core or GPU. It cannot show scaling beyond two
processes, NCCL on several GPUs, or several machines.
"""

import argparse
import datetime
import multiprocessing
import os
import queue
import statistics
import tempfile
import time
from pathlib import Path

import pyro
import torch
import torch.distributed as tdist

from inference import distributed as parallel
from inference import fit
from ppl_models.data import load_dataset
from ppl_models.vae import VAE

from .common import RESULTS, environment, markdown_table, write_results

WORLD = 2
LR = 1e-3
SETTINGS = ("fit", "W=1", "W=2", "W=2 (B/2)")
_COMM = {"seconds": 0.0}


def _timed(method):
    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            _COMM["seconds"] += time.perf_counter() - t0
    return wrapper


def _worker(rank, rendezvous, device, tasks, results):
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    tdist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{rendezvous}", rank=rank,
                             world_size=WORLD, timeout=datetime.timedelta(seconds=600))
    one = tdist.new_group([0])
    parallel.DataParallel.all_reduce_gradients = _timed(parallel.DataParallel.all_reduce_gradients)
    parallel.DataParallel.read = _timed(parallel.DataParallel.read)
    cache = {}
    while (item := tasks.get()) is not None:
        try:
            results.put((rank, "ok", _measure(rank, one, cache, device, **item)))
        except Exception as exc:
            results.put((rank, "error", f"{type(exc).__name__}: {exc}"))
    tdist.destroy_process_group()


def _data(cache, data_root, points):
    if "train" not in cache:
        train, _ = load_dataset(data_root and "mnist" or "digits", data_root=data_root, binarize="dynamic")
        cache["train"] = train.rows(torch.arange(min(points, len(train))))
    return cache["train"]


def _allreduce_ms(device, numel, repeats=20):
    """Milliseconds of one all-reduce of ``numel`` float32 values between the two ranks (median of
    ``repeats``, each after a barrier, so that waiting for the other rank is not counted)."""
    flat = torch.zeros(numel, device=device)
    times = []
    for _ in range(repeats):
        tdist.barrier()
        t0 = time.perf_counter()
        tdist.all_reduce(flat)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def _measure(rank, one, cache, device, setting, batch_size, points, data_root, seed):
    """Seconds of the second epoch and the communication seconds per step, on this rank (None: idle rank)."""
    if setting == "allreduce":
        return _allreduce_ms(device, sum(p.numel() for p in VAE(784, latent_dim=50, hidden=(400,)).parameters()))
    if setting in ("fit", "W=1") and rank != 0:
        return None
    train = _data(cache, data_root, points)
    group = {"fit": False, "W=1": one, "W=2": True, "W=2 (B/2)": True}[setting]
    size = batch_size // 2 if setting == "W=2 (B/2)" else batch_size
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    module = VAE(train.dim, latent_dim=50, hidden=(400,))

    def reset(record):
        if record["epoch"] == 1:
            _COMM.update(seconds=0.0)

    result = fit(module, train, epochs=2, batch_size=size, lr=LR, validate=False, progress=False, device=device,
                 distributed=group, callbacks=[reset])
    world = WORLD if setting.startswith("W=2") else 1
    steps = -(-len(train) // (size * world))
    return {"threads": torch.get_num_threads(), "seconds": result.history[1]["seconds"], "comm_ms_per_step": 1000 * _COMM["seconds"] / steps,
            "steps": steps, "rows": len(train), "batch_per_rank": size, "loss": result.history[1]["train_loss"]}


class Ranks:
    """Two spawned ranks in one process group, answering :func:`_measure` requests."""

    def __init__(self, folder, device, timeout):
        ctx = multiprocessing.get_context("spawn")
        self.timeout = timeout
        self.tasks = [ctx.Queue() for _ in range(WORLD)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, str(Path(folder) / "rendezvous"), device, self.tasks[r],
                                                        self.results), daemon=True) for r in range(WORLD)]
        for p in self.procs:
            p.start()

    def run(self, **task):
        for q in self.tasks:
            q.put(task)
        answers = {}
        while len(answers) < WORLD:
            try:
                rank, status, value = self.results.get(timeout=self.timeout)
            except queue.Empty:
                raise RuntimeError(f"{task['setting']}: no answer from the ranks in {self.timeout} s") from None
            if status != "ok":
                raise RuntimeError(f"{task['setting']} on rank {rank}: {value}")
            answers[rank] = value
        return answers[0]

    def close(self):
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def summarise(samples):
    """The table's rows from each setting's measurements (lists of :func:`_measure` results, one per round)."""
    rows = []
    for setting in SETTINGS:
        runs = samples[setting]
        world = 2 if setting.startswith("W=2") else 1
        rows.append({
            "setting": setting, "world_size": world, "batch_per_rank": runs[0]["batch_per_rank"],
            "global_batch": runs[0]["batch_per_rank"] * world,
            "samples_per_s": statistics.median(o["rows"] / o["seconds"] for o in runs),
            "step_ms": statistics.median(1000 * o["seconds"] / o["steps"] for o in runs),
            "comm_ms_per_step": statistics.median(o["comm_ms_per_step"] for o in runs),
            "epoch2_loss": statistics.median(o["loss"] for o in runs),
        })
    base = {r["batch_per_rank"]: r["samples_per_s"] for r in rows if r["setting"] == "W=1"}
    for r in rows:
        one = base.get(r["batch_per_rank"]) if r["setting"] in ("W=1", "W=2") else None
        r["efficiency"] = r["samples_per_s"] / (r["world_size"] * one) if one else None
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda needs one GPU per rank")
    p.add_argument("--data-root", default=os.environ.get("PPLM_DATA_ROOT"),
                   help="folder with MNIST/raw (without it: the 8x8 digits, for a smoke run)")
    p.add_argument("--points", type=int, default=12800, help="training images used (the first ones)")
    p.add_argument("--batch-size", type=int, default=128, help="B: rows per rank and step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one measurement may take")
    p.add_argument("--name", default=None, help="output file stem")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < WORLD:
        raise SystemExit(f"--device cuda needs {WORLD} GPUs, found {torch.cuda.device_count()}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    samples = {s: [] for s in SETTINGS}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        ranks = Ranks(folder, args.device, args.timeout)
        try:
            allreduce = [ranks.run(setting="allreduce", batch_size=0, points=0, data_root=None, seed=0)
                         for _ in range(args.rounds)]
            for r in range(args.rounds):
                order = SETTINGS[r % len(SETTINGS):] + SETTINGS[: r % len(SETTINGS)]
                for setting in order:
                    out = ranks.run(setting=setting, batch_size=args.batch_size, points=args.points,
                                    data_root=args.data_root, seed=args.seed)
                    samples[setting].append(out)
                    print(f"round {r + 1} {setting}: {out['rows'] / out['seconds']:.0f} samples/s, "
                          f"comm {out['comm_ms_per_step']:.2f} ms/step")
        finally:
            ranks.close()
    rows = summarise(samples)
    stem = args.name or f"distributed-{'mnist' if args.data_root else 'digits'}-vae-mlp-{args.device}"
    env = environment(args.device)
    record = {"benchmark": "distributed", "environment": env, "load_average_at_start": load,
              "settings": vars(args), "seconds": time.perf_counter() - t0, "results": rows,
              "allreduce_ms": statistics.median(allreduce),
              "rounds": {s: samples[s] for s in SETTINGS}}
    shown = [dict(r, efficiency="" if r["efficiency"] is None else f"{r['efficiency']:.2f}") for r in rows]
    table = markdown_table(shown, ["setting", "world_size", "batch_per_rank", "global_batch", "samples_per_s",
                                   "step_ms", "comm_ms_per_step", "efficiency", "epoch2_loss"], floatfmt="{:.2f}")
    table = (f"Data-parallel throughput, MLP VAE on {args.points} "
             f"{'MNIST' if args.data_root else 'digits'} images, {args.device}, one thread per rank, "
             f"median of {args.rounds} interleaved rounds; load average {load:.1f} at the start. "
             f"torch {torch.__version__}. One all-reduce of the VAE's gradients (after a barrier, so without waiting "
             f"for the other rank): {statistics.median(allreduce):.2f} ms; comm_ms_per_step also counts waiting "
             "for the slower rank.\n\n" + table + "\n\n" + __doc__.split("\n\n")[-1].replace("\n", " "))
    paths = write_results(args.out, stem, record, table)
    print(table)
    print("written:", *paths)
    return record


if __name__ == "__main__":
    main()
