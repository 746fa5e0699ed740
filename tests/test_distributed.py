"""Data-parallel training on torch.distributed (gloo, CPU), and the streaming data path.

Two ranks are spawned once for the module (a file rendezvous in a temporary folder) and run every
check below; the parent waits for each answer at most ``TIMEOUT`` seconds, then kills them.

* 2 ranks x batch B equal 1 rank x batch 2B: the GMM with enumerated assignments (its loss is exact:
  no Monte Carlo noise) to 1e-9 after 20 steps in float64, ragged last batches included (one rank
  gets no rows); also a mixture held in Pyro's param store with a parameter that only batches holding
  row 0 touch (no gradient in most steps: None on every rank keeps Adam from moving it, a gradient on
  one rank is summed with zeros). A DistributedDataParallel wrapper would sync neither.
* VAE and multimodal VAE (a modality missing in half the rows): parameters bit-identical on both
  ranks, the ranks' noise different, the test ELBO within 4 standard errors of one process at 2B.
* Resume at W = 2 after epoch 1 equals the uninterrupted run bit for bit; another world size is refused.
* A NaN injected on rank 1 only stops both ranks with the same error; the last good checkpoint stays.
* ``torchrun --nproc-per-node=2 -m ppl_models.cli train vae`` writes one run folder.
* The streaming path gives the same parameters as the device-resident one.
"""

import datetime
import math
import multiprocessing
import os
import queue
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as tdist
from pyro.ops.indexing import Vindex

from inference import distributed as parallel
from inference import evaluate, fit
from inference.callbacks import Callback
from inference.checkpoint import FILENAME, load_checkpoint
from inference.errors import CheckpointError, UsageError

pytestmark = pytest.mark.skipif(not (tdist.is_available() and tdist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
WORLD = 2
TIMEOUT = 120.0  # seconds one check may take on a loaded 2-core machine
ROOT = Path(__file__).resolve().parents[1]


# ---- the worker pool ---------------------------------------------------------------------------
def _worker(rank, rendezvous, tasks, results):
    torch.set_num_threads(1)
    for category, module in ((UserWarning, "pyro.util"), (UserWarning, "pyro.infer"), (RuntimeWarning, "pyro")):
        warnings.filterwarnings("error", category=category, module=module)
    tdist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD,
                             timeout=datetime.timedelta(seconds=TIMEOUT))
    while (item := tasks.get()) is not None:
        name, kwargs = item
        pyro.clear_param_store()
        pyro.enable_validation(True)
        pyro.set_rng_seed(0)
        try:
            results.put((rank, "ok", globals()[name](rank, **kwargs)))
        except Exception as exc:
            results.put((rank, "error", f"{type(exc).__name__}: {exc}"))
    results.close()
    results.join_thread()
    os._exit(0)  # the process group goes with the process (destroying it waits on the other rank)


class Pool:
    """``WORLD`` spawned ranks in one gloo group; :meth:`run` runs a task of this module on each."""

    def __init__(self, folder):
        ctx = multiprocessing.get_context("spawn")
        self.tasks = [ctx.Queue() for _ in range(WORLD)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, str(folder / "rendezvous"), self.tasks[r], self.results),
                                  daemon=True) for r in range(WORLD)]
        for p in self.procs:
            p.start()

    def run(self, name, **kwargs):
        """Every rank's answer, in rank order: ``("ok", value)`` or ``("error", "Type: message")``."""
        for q in self.tasks:
            q.put((name, kwargs))
        answers = {}
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=TIMEOUT)
        while len(answers) < WORLD:
            left = (deadline - datetime.datetime.now()).total_seconds()
            try:
                rank, status, value = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if left > 0 and not dead:
                    continue
                self.close(force=True)
                why = f"ranks {dead} died" if dead else f"no answer in {TIMEOUT} s"
                pytest.fail(f"{name}: ranks {sorted(set(range(WORLD)) - set(answers))} did not answer ({why})")
            answers[rank] = (status, value)
        return [answers[r] for r in range(WORLD)]

    def values(self, name, **kwargs):
        answers = self.run(name, **kwargs)
        errors = [v for s, v in answers if s != "ok"]
        assert not errors, errors
        return [v for _, v in answers]

    def close(self, force=False):
        if not force:
            for q in self.tasks:
                q.put(None)
        for p in self.procs:
            p.join(timeout=0 if force else 20)
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    ranks = Pool(tmp_path_factory.mktemp("ranks"))
    yield ranks
    ranks.close()


# ---- pairs -------------------------------------------------------------------------------------
def mixture_data(n=97, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    centres = torch.tensor([[-3.0, 0.0], [3.0, 1.0], [0.0, 4.0]], dtype=dtype)
    return centres[torch.randint(0, 3, (n,), generator=g)] + torch.randn(n, 2, generator=g, dtype=dtype)


class StoreMixture:
    """A 3-component mixture held in Pyro's param store (assignments enumerated); ``pull`` enters the
    loss only for batches holding row 0 (``first``), so in most steps it has no gradient at all."""

    max_plate_nesting = 1

    def model(self, x, first):
        means = pyro.param("means", lambda: torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=x.dtype))
        scales = pyro.param("scales", lambda: torch.ones(3, 2, dtype=x.dtype), constraint=dist.constraints.positive)
        weights = pyro.param("weights", lambda: torch.ones(3, dtype=x.dtype) / 3, constraint=dist.constraints.simplex)
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(Vindex(means)[c], Vindex(scales)[c]).to_event(1), obs=x)
            if bool(first.any()):
                pull = pyro.param("pull", lambda: torch.zeros((), dtype=x.dtype))
                pyro.factor("pull_term", -((pull - 2.0) ** 2) * first)

    def guide(self, x, first):
        pass


class Regression:
    """y = w x + noise with a global latent w; with ``scaled`` a ``num_data`` hook scales minibatches to N."""

    max_plate_nesting = 1

    def __init__(self, scaled):
        if scaled:
            self.num_data = None

    def model(self, x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        n, total = x.shape[0], getattr(self, "num_data", None)
        plate = pyro.plate("data", total, subsample=torch.arange(n)) if total and total != n else pyro.plate("data", n)
        with plate:
            pyro.sample("y", dist.Normal(w * x, 0.5), obs=y)

    def guide(self, x, y):
        loc = pyro.param("w_loc", lambda: torch.tensor(0.0))
        scale = pyro.param("w_scale", lambda: torch.tensor(1.0), constraint=dist.constraints.positive)
        pyro.sample("w", dist.Normal(loc, scale))


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def _store_values():
    store = pyro.get_param_store()
    return {k: store[k].detach().clone() for k in sorted(store.keys())}


# ---- tasks (run on every rank) --------------------------------------------------------------------
def task_gmm(rank, batch, epochs, store):
    """Max |difference| of the parameters after ``epochs`` epochs: 2 ranks x ``batch`` vs rank 0 alone x 2 batch."""
    from ppl_models.gmm import GMM

    x = mixture_data()
    one = tdist.new_group([0])  # a one-rank group: the reference run, on rank 0

    def run(group, size):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        if store:
            pair, data = StoreMixture(), (x, (torch.arange(len(x)) == 0).to(x.dtype))
        else:
            pair, data = GMM(2, 3, "diag").double().initialize(x, seed=0), x
            if rank == 1:  # another start on rank 1: training starts from rank 0's parameters, broadcast
                with torch.no_grad():
                    for p in pair.parameters():
                        p.add_(1.0)
        fit(pair, data, epochs=epochs, elbo="enum", batch_size=size, lr=0.05, progress=False, distributed=group)
        return _store_values() if store else {k: v.detach().clone() for k, v in pair.state_dict().items()}

    ref = run(one, WORLD * batch) if rank == 0 else None
    got = run(True, batch)
    if rank != 0:
        return None
    keys = sorted(ref)
    return {"diff": max(float((ref[k] - got[k]).abs().max()) for k in keys), "keys": keys,
            "pull": float(got["pull"]) if "pull" in got else None}


def _models_task(rank, kind, epochs):
    from ppl_models.data import load_dataset
    from ppl_models.multimodal import MultimodalVAE
    from ppl_models.multimodal_data import load_multimodal, with_missing
    from ppl_models.vae import VAE

    if kind == "vae":
        train, test = load_dataset("digits", binarize="dynamic")
        build = lambda: VAE(train.dim, latent_dim=4, hidden=(64,), likelihood="bernoulli")  # noqa: E731
    else:
        train, test = load_multimodal("digits-label", binarize="dynamic")
        train = with_missing(train, "label", 0.5, seed=1)
        build = lambda: MultimodalVAE(train.modalities, latent_dim=4, hidden=(64,))  # noqa: E731
    pyro.set_rng_seed(0)
    module = build()
    fit(module, train, epochs=epochs, batch_size=32, lr=3e-3, progress=False, distributed=True)
    flat = _flat(module.parameters())
    both = [torch.empty_like(flat) for _ in range(WORLD)]
    tdist.all_gather(both, flat)
    noise = torch.randn(4)
    noises = [torch.empty(4) for _ in range(WORLD)]
    tdist.all_gather(noises, noise)
    if rank != 0:
        return None
    pyro.set_rng_seed(11)
    got = evaluate(module, test.data, particles=1)
    pyro.set_rng_seed(0)
    alone = build()
    fit(alone, train, epochs=epochs, batch_size=64, lr=3e-3, progress=False, distributed=False)
    pyro.set_rng_seed(11)
    ref = evaluate(alone, test.data, particles=1)
    return {"rank_diff": float((both[0] - both[1]).abs().max()), "noise_diff": float((noises[0] - noises[1]).abs().max()),
            "elbo": got.elbo, "se": got.elbo_se, "ref_elbo": ref.elbo, "ref_se": ref.elbo_se}


def task_models(rank, epochs):
    return {kind: _models_task(rank, kind, epochs) for kind in ("vae", "mvae")}


def task_resume(rank, folder):
    from ppl_models.data import load_dataset
    from ppl_models.vae import VAE

    train, _ = load_dataset("digits", binarize="dynamic")

    def run(epochs, where, resume=False):
        pyro.set_rng_seed(0)
        module = VAE(train.dim, latent_dim=4, hidden=(32,), likelihood="bernoulli")
        fit(module, train, epochs=epochs, batch_size=50, lr=3e-3, progress=False, checkpoint_dir=where,
            resume=resume, distributed=True, validation=0.1)
        return _flat(module.parameters())

    whole = run(2, Path(folder) / "whole")
    run(1, Path(folder) / "parts")
    resumed = run(2, Path(folder) / "parts", resume=True)
    return bool(torch.equal(whole, resumed)), float((whole - resumed).abs().max())


def task_global(rank):
    """At W = 2 with a global batch of all 20 points: IWAE with a global latent warns (each rank bounds its
    half), trace is refused (each rank would count the global latent's terms once)."""
    from inference import Trainer

    x = torch.linspace(-1, 1, 20)
    data = (x, 1.5 * x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(Regression(scaled=False), data, elbo="iwae:2", batch_size=10, lr=0.01, distributed=True)
    try:
        Trainer(Regression(scaled=False), data, batch_size=10, lr=0.01, distributed=True)
        refused = None
    except UsageError as exc:
        refused = str(exc)
    return [str(w.message) for w in caught if "whole-batch" in str(w.message)], refused


class Poison(Callback):
    """On rank 1 only, in the second epoch's second read: the training data become NaN."""

    def on_steps(self, trainer, steps, loss_sum, points):
        if trainer.parallel.rank == 1 and trainer.epoch == 1 and points >= 2 * 32:
            trainer.train_data[0].fill_(math.nan)


def task_nan(rank, folder):
    x = mixture_data(200, torch.float32)
    pair = StoreMixture()
    data = (x, (torch.arange(len(x)) == 0).to(x.dtype))
    fit(pair, data, epochs=3, elbo="enum", batch_size=32, lr=0.05, progress=False, distributed=True,
        checkpoint_dir=folder, callbacks=[Poison()])


# ---- tests ---------------------------------------------------------------------------------------
def test_two_ranks_of_b_equal_one_rank_of_2b_for_the_exact_gmm_loss(pool):
    """97 points, batch 16 per rank: 4 global batches of 32 a epoch (the last holds 1 row: rank 1 gets none),
    5 epochs = 20 Adam steps in float64. Only summation order differs: 1e-9."""
    out = pool.values("task_gmm", batch=16, epochs=5, store=False)[0]
    print("gmm", out)
    assert out["diff"] < 1e-9, out


def test_param_store_parameters_and_a_parameter_without_gradient_are_reduced_as_in_one_process(pool):
    """``pull`` gets a gradient only in steps whose batch holds row 0 (one per epoch, on one rank): the other
    rank adds zeros; in the other steps no rank has one and Adam must not move it (as in one process)."""
    out = pool.values("task_gmm", batch=16, epochs=5, store=True)[0]
    print("store mixture", out)
    assert out["keys"] == ["means", "pull", "scales", "weights"]
    assert out["diff"] < 1e-9, out
    assert out["pull"] != 0.0


def test_vae_and_multimodal_vae_ranks_agree_and_match_one_process(pool):
    """Parameters identical on both ranks (difference exactly 0), the ranks' noise different, and the test
    ELBO (360 digits, one particle each, same evaluation seed) within 4 standard errors of one process
    trained at batch 2B for the same number of steps."""
    outs = pool.values("task_models", epochs=4)[0]
    print(outs)
    for kind, out in outs.items():
        assert out["rank_diff"] == 0.0, (kind, out)
        assert out["noise_diff"] > 0.0, (kind, out)
        assert abs(out["elbo"] - out["ref_elbo"]) < 4 * math.hypot(out["se"], out["ref_se"]), (kind, out)


def test_resume_at_two_ranks_is_exact_and_another_world_size_is_refused(pool, tmp_path):
    for equal, diff in pool.values("task_resume", folder=str(tmp_path)):
        assert equal, diff
    state = load_checkpoint(tmp_path / "parts" / FILENAME)
    assert state["settings"]["world_size"] == WORLD and len(state["rank_rng"]) == WORLD
    assert not torch.equal(state["rank_rng"][0]["torch"], state["rank_rng"][1]["torch"])
    from ppl_models.data import load_dataset
    from ppl_models.vae import VAE

    train, _ = load_dataset("digits", binarize="dynamic")
    module = VAE(train.dim, latent_dim=4, hidden=(32,), likelihood="bernoulli")
    with pytest.raises(CheckpointError, match="trained on 2 process\\(es\\) and this run has 1") as info:
        fit(module, train, epochs=3, batch_size=50, lr=3e-3, progress=False, validation=0.1,
            checkpoint_dir=tmp_path / "parts", resume=True, distributed=False)
    assert "\n" not in str(info.value)


def test_a_nan_on_one_rank_stops_both_and_keeps_the_last_good_checkpoint(pool, tmp_path):
    answers = pool.run("task_nan", folder=str(tmp_path))
    assert [s for s, _ in answers] == ["error", "error"], answers
    assert answers[0][1] == answers[1][1], answers
    assert answers[0][1].startswith("DivergenceError: training diverged at epoch 2"), answers
    assert "the last good checkpoint" in answers[0][1]
    assert load_checkpoint(tmp_path / FILENAME)["epoch"] == 1


def test_a_global_latent_warns_under_iwae_and_is_refused_unscaled(pool):
    for warned, refused in pool.values("task_global"):
        assert len(warned) == 1 and "iwae:2 with the global latent 'w' is a whole-batch bound" in warned[0], warned
        assert refused is not None and "global latent" in refused and "\n" not in refused, refused


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_writes_one_run_folder(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
           "-m", "ppl_models.cli", "train", "vae", "--epochs", "1", "--out", str(out), "--particles", "10",
           "--hidden", "32", "--quiet"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run written to") == 1, done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["checkpoint.pt", "config.json", "history.csv", "loss.png", "metrics.json",
                            "reconstructions.png", "samples.png"]), names
    state = load_checkpoint(out / FILENAME)
    assert state["settings"]["world_size"] == 2 and len(state["rank_rng"]) == 2


def task_bench(rank, setting):
    from benchmarks import distributed as bench

    one = tdist.new_group([0])
    return bench._measure(rank, one, {}, "cpu", setting=setting, batch_size=32, points=128, data_root=None, seed=0)


def test_the_benchmark_rows_are_consistent(pool):
    """benchmarks/distributed.py's measurements on 128 digits, run by this pool's ranks: samples/s is the rows
    over the timed epoch's seconds, the efficiency samples/s over W times W=1's, the batches as named."""
    from benchmarks import distributed as bench

    samples = {s: [pool.values("task_bench", setting=s)[0]] for s in bench.SETTINGS}
    rows = {r["setting"]: r for r in bench.summarise(samples)}
    for setting, runs in samples.items():
        assert rows[setting]["samples_per_s"] == pytest.approx(runs[0]["rows"] / runs[0]["seconds"])
        assert runs[0]["rows"] == 128
    assert rows["W=2"]["efficiency"] == pytest.approx(rows["W=2"]["samples_per_s"] / (2 * rows["W=1"]["samples_per_s"]))
    assert rows["fit"]["efficiency"] is None and rows["W=1"]["efficiency"] == 1.0
    assert rows["W=2"]["global_batch"] == 64 and rows["W=2 (B/2)"]["global_batch"] == 32
    assert pool.values("task_bench", setting="allreduce")[0] > 0


# ---- one process ---------------------------------------------------------------------------------
def test_shards_partition_each_global_batch():
    for n in (0, 1, 5, 32):
        parts = [parallel.shard(n, 3, r) for r in range(3)]
        assert [len(range(n)[p]) for p in parts] == [len(t) for t in torch.tensor_split(torch.arange(n), 3)]
        assert sum(p.stop - p.start for p in parts) == n and parts[0].start == 0 and parts[-1].stop == n
    a, b = (torch.randperm(50, generator=parallel.epoch_generator(7, 3)) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, torch.randperm(50, generator=parallel.epoch_generator(7, 4)))


def test_distributed_without_a_process_group_is_one_line(monkeypatch):
    for name in parallel.ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UsageError, match="torchrun") as info:
        fit(StoreMixture(), (mixture_data(8), torch.zeros(8)), epochs=1, elbo="enum", batch_size=4, lr=0.1,
            progress=False, distributed=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["digits", "tensors"])
def test_streaming_gives_the_same_parameters_as_the_device_resident_path(kind, digits, device):
    """Same seed, same batches (one permutation drawn on the device), same per-batch draws (dynamic
    binarisation, on the device after the copy): identical parameters. On CUDA the streamed rows come
    from pinned host memory by non-blocking copies."""
    from ppl_models.vae import VAE

    results = []
    for stream in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        if kind == "digits":
            pair, data = VAE(digits[0].dim, latent_dim=3, hidden=(16,), likelihood="bernoulli"), digits[0]
            fit(pair, data, epochs=2, batch_size=100, lr=3e-3, progress=False, stream=stream, device=device)
            results.append(_flat(pair.parameters()).cpu())
        else:
            x = mixture_data(90)
            fit(StoreMixture(), (x, (torch.arange(90) == 0).double()), epochs=2, elbo="enum", batch_size=16,
                lr=0.05, progress=False, stream=stream, device=device)
            results.append(_flat(_store_values().values()).cpu())
    assert torch.equal(*results)
