"""Training throughput: the library's ``fit`` against a hand-written PyTorch loop.

What is compared, per model, objective, batch size and device:

* ``hand``: a hand-written PyTorch training loop (it lives here only, as the
  reference): the same network (the model's own encoder/decoder modules), the
  same loss (the negative ELBO / IWAE bound summed over the batch, built from
  ``torch.distributions`` densities), the same optimiser (Adam, lr 1e-3, loss
  divided by the batch size), the same data on the device, the same batch
  order and random draws (it consumes the random state exactly as ``fit`` does),
  the loss accumulated on the device and read once per epoch;
* ``pyro-svi``: plain Pyro, ``SVI(...).step`` with ``pyro.optim.Adam`` on the
  same ELBO (networks registered with ``pyro.module``, loss scaled to per
  datapoint with ``poutine.scale`` for trace/meanfield; summed over the batch
  for IWAE, where a scale would change the bound), validation off;
* ``fit[eager]``: :class:`inference.Trainer` (what :func:`inference.fit` runs)
  with the eager loss, ``compile=False``: fit's path for short runs; Pyro
  validation on, which the step loss applies to the first calls of each batch
  shape only;
* ``fit[flat]``: the same with ``compile="flat"``: the flattened loss graph
  (make_fx) run as it is, without ``torch.compile`` (no code generation; its
  build, under a second, is ``compile_s``): fit's path for runs of a few
  seconds and more;
* ``fit[compiled]``: the same with ``compile=True``, the compiled loss of
  :mod:`inference.loss` (make_fx + ``torch.compile``, inductor): fit's path for
  runs long enough to repay the compilation. Its compilation (the flattening,
  the first call and its check) is timed apart: ``compile_s``, with a fresh
  inductor cache unless ``--warm-cache``;
* ``pythae`` (asked for with ``--impls``, when the package imports): pythae's
  ``BaseTrainer`` on its VAE with the same encoder/decoder weights (wrapped to
  its (mu, log_var) and sigmoid-output interface), same data, batch size,
  optimiser and learning rate; its loss is the analytic-KL ELBO, so it is
  listed under ``meanfield``; a fresh two-epoch run each round.

Each implementation is built and trained one warm-up epoch in turn (each from
the same seeded state, so the first-epoch losses of ``hand`` and each other
path are compared, ``loss_rel_diff``: with the same draws they agree to float
rounding); then all are timed in this one process, interleaved round by round
(order rotated every round), ``steps`` steps of ``batch_size`` points per
round, no ragged batch. The reported step time is the median over rounds;
``ratio`` is the median over rounds of (implementation / hand) measured in the
same round, so contention from other processes hits every path alike.

Distance to the hardware: the step's matmul (and convolution) FLOPs, forward
and backward, are counted by :class:`torch.utils.flop_counter.FlopCounterMode`
on the hand-written loss, and divided by this machine's measured matmul rate (a
2048 x 2048 ``torch.mm``) for a lower bound on the step time (``lower_ms``; it
ignores the elementwise ops, the optimiser and memory traffic). ``default``:
the path ``fit`` chooses by itself for the CLI's default run length: of eager
and the paths :func:`inference.loss.worth_compiling` admits at the measured
eager step time, the fastest measured here.

``--quick``: the two MLP VAEs, batch 32/128/1024 for trace and batch 128 for
the other objectives, 3 rounds of 10 steps: about 80 s on the 2-core CPU while
three others use it (limit: 5 minutes). Without ``--quick``: every model,
objective and batch size 32..1024 (long on a CPU; meant for a GPU). MNIST
models need ``--data-root`` (or ``$PPLM_DATA_ROOT``) and are skipped without it.
Adding a model is one entry in ``MODELS`` with its hand-written loss.

Models: the MLP VAE (digits, MNIST), the conv VAE (MNIST), VaDE (MNIST; its
mixture prior in the hand-written loss) and the multimodal VAE
(``mvae-mopoe-mnist-label``: MNIST image + label, MoPoE fusion, the default
subset objective, which trains q(z | X_S) for all three subsets at once). The
multimodal entry is measured for ``trace`` only: its hand-written loss is the
subset objective written out (mixture sampling included), and ``meanfield``
would give the same loss (no analytic KL for a mixture posterior) while the
IWAE bound of a subset-weighted plate is not an objective anyone trains.
"""

import argparse
import contextlib
import io
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import SVI
from torch.distributions import Bernoulli, Categorical, Normal, kl_divergence
from torch.utils.flop_counter import FlopCounterMode

from inference import Trainer, batching, make_elbo
from inference.loss import COMPILE_SECONDS, COMPILED_SAVING, FLAT, FLAT_SAVING, FLAT_SECONDS, worth_compiling
from ppl_models.data import load_dataset
from ppl_models.multimodal import MultimodalVAE
from ppl_models.multimodal_data import load_multimodal
from ppl_models.vade import VaDE
from ppl_models.vae import VAE

from .common import RESULTS, environment, markdown_table, write_results

LR = 1e-3


# ---- the hand-written reference losses ------------------------------------------------
def _log_prior(m, z):
    """log p(z) per point (event dims summed): the model's own prior if it has one (VaDE's mixture), else N(0, I)."""
    if hasattr(m, "prior"):
        return m.prior().log_prob(z)
    return Normal(torch.zeros_like(z), 1.0, validate_args=False).log_prob(z).sum(-1)


def vae_hand_loss(m, x, spec):
    """-ELBO (trace: sampled KL; meanfield: analytic KL) or -IWAE bound of a Bernoulli VAE/VaDE, summed over x."""
    loc, scale = m.encoder_head(m.encoder_body(x))
    q = Normal(loc, scale, validate_args=False)
    if spec in ("trace", "meanfield"):
        z = q.rsample()
        log_lik = Bernoulli(logits=m.decoder(z), validate_args=False).log_prob(x).sum()
        if spec == "trace":
            return -(log_lik + _log_prior(m, z).sum() - q.log_prob(z).sum())
        prior = Normal(torch.zeros_like(loc), 1.0, validate_args=False)
        return -(log_lik - kl_divergence(q, prior).sum())
    k = int(spec.split(":")[1])  # iwae:K
    z = q.rsample((k,))
    log_w = (Bernoulli(logits=m.decoder(z), validate_args=False).log_prob(x).sum(-1)
             + _log_prior(m, z) - q.log_prob(z).sum(-1))
    return -(torch.logsumexp(log_w, 0) - math.log(k)).sum()


def mopoe_hand_loss(m, batch, spec):
    """-(subset objective) of the MoPoE multimodal VAE on {image, label}, summed over the batch (trace only).

    Written out for two modalities, image (Bernoulli) and label (Categorical),
    no private latents, uniform subset weights, beta 1: the subsets
    S in ({image}, {label}, {image, label}) each get the MoPoE posterior, a
    uniform mixture over the non-empty subsets of S of their products of
    experts, with components c = (image expert, label expert,
    PoE(image, label)) and per-subset mixture weights; z_S is drawn by picking
    a component and reparameterising it, and the loss is
    -(1/3) sum_S sum_n [log p(image_n | z_S) + log p(label_n | z_S) + log N(z_S; 0, I) - log q(z_S | X_S)].
    The draws are consumed as the library does (component indices, then the
    normal noise), so the value equals the library's on the same random state.
    """
    if spec != "trace":
        raise ValueError(f"the hand-written MoPoE loss is written for trace only, not {spec!r}")
    image, label = batch["image"], batch["label"]
    loc_i, scale_i = m.heads["image"](m.encoders["image"](image))
    onehot = torch.nn.functional.one_hot(label, m.specs["label"]["dim"]).to(image.dtype)
    loc_l, scale_l = m.heads["label"](m.encoders["label"](onehot))
    prec_i, prec_l = scale_i.pow(-2), scale_l.pow(-2)
    prec = prec_i + prec_l
    locs = torch.stack([loc_i, loc_l, (loc_i * prec_i + loc_l * prec_l) / prec], -2)  # (B, 3 components, L)
    scales = torch.stack([scale_i, scale_l, prec.rsqrt()], -2)
    inf = math.inf
    log_w = torch.tensor([[0.0, -inf, -inf], [-inf, 0.0, -inf], [0.0, 0.0, 0.0]], device=image.device)
    log_w = (log_w - log_w.logsumexp(-1, keepdim=True))[:, None, :]  # (3 subsets, 1, 3 components)
    shape = (3, image.shape[0])
    k = Categorical(logits=log_w.expand(shape + (3,)), validate_args=False).sample()  # (3, B)
    pick = lambda t: t.expand(shape + t.shape[-2:]).gather(-2, k[..., None, None].expand(shape + (1, t.shape[-1])))  # noqa: E731
    loc, scale = pick(locs).squeeze(-2), pick(scales).squeeze(-2)
    z = loc + scale * torch.randn_like(loc)  # (3, B, L)
    log_q = torch.logsumexp(Normal(locs, scales, validate_args=False).log_prob(z[..., None, :]).sum(-1) + log_w, -1)
    log_p = (Bernoulli(logits=m.decoders["image"](z), validate_args=False).log_prob(image).sum(-1)
             + Categorical(logits=m.decoders["label"](z), validate_args=False).log_prob(label)
             + Normal(torch.zeros_like(z), 1.0, validate_args=False).log_prob(z).sum(-1))
    return -((log_p - log_q).sum(-1) / 3.0).sum()


def vae_pythae(m):
    """pythae's VAE around the same encoder/decoder modules (None when pythae does not import)."""
    try:
        from pythae.models import VAE as PVAE
        from pythae.models import VAEConfig
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn import BaseDecoder, BaseEncoder
    except Exception:
        return None

    class Enc(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.body, self.head = m.encoder_body, m.encoder_head

        def forward(self, x):
            loc, scale = self.head(self.body(x))
            return ModelOutput(embedding=loc, log_covariance=2.0 * scale.log())

    class Dec(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = m.decoder

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

    config = VAEConfig(input_dim=(m.config["x_dim"],), latent_dim=m.latent_dim, reconstruction_loss="bce")
    return PVAE(config, encoder=Enc(), decoder=Dec())


@dataclass
class BenchModel:
    """One benchmarked model: its data set, a builder and the hand-written loss of the same objective."""

    dataset: str
    build: Callable  # (DataSplit) -> module on the CPU
    hand_loss: Callable  # (module, x, elbo spec) -> loss summed over the batch
    elbos: tuple = ("trace", "meanfield", "iwae:5")
    pythae: Callable = None  # (module) -> pythae model sharing its networks, or None
    load: Callable = None  # (data_root) -> (train, test); default load_dataset(dataset, binarize="fixed")

    def load_data(self, data_root):
        if self.load is not None:
            return self.load(data_root)
        return load_dataset(self.dataset, data_root=data_root, binarize="fixed")


MODELS = {
    "vae-mlp-digits": BenchModel("digits", lambda s: VAE(s.dim), vae_hand_loss, pythae=vae_pythae),
    "vae-mlp-mnist": BenchModel("mnist", lambda s: VAE(s.dim, latent_dim=50, hidden=(400,)), vae_hand_loss,
                                pythae=vae_pythae),
    "vae-conv-mnist": BenchModel("mnist", lambda s: VAE(s.dim, arch="conv", image_shape=s.image_shape),
                                 vae_hand_loss),
    "vade-mlp-mnist": BenchModel("mnist", lambda s: VaDE(s.dim), vae_hand_loss, elbos=("trace", "iwae:5")),
    # image (fixed-binarised MNIST, Bernoulli) + label (Categorical), MoPoE, subset objective (the defaults)
    "mvae-mopoe-mnist-label": BenchModel(
        "mnist-label", lambda s: MultimodalVAE(s.modalities, rule="mopoe"), mopoe_hand_loss, elbos=("trace",),
        load=lambda root: load_multimodal("mnist-label", data_root=root, binarize="fixed")),
}

# the paths of the library's step; "hand" and "pyro-svi" are the references, "pythae" (optional) a peer
FIT_IMPLS = {
    "fit[eager]": dict(compile=False, validate=True),  # fit's path for short runs (validation on first calls)
    "fit[flat]": dict(compile=FLAT, validate=True),  # the flattened graph, no torch.compile (runs of seconds)
    "fit[compiled]": dict(compile=True, validate=True),  # fit's path for long runs (torch.compile)
}
IMPLS = ["hand", "pyro-svi", *FIT_IMPLS]
# the run whose length decides fit's default path in the table: the CLI recipe's default epochs over the
# training set less the CLI's default 10% validation split, at the benchmark's batch size
DEFAULT_RUN_EPOCHS, DEFAULT_VALIDATION = 200, 0.1


# ---- one persistent run per implementation: built, then one epoch at a time ------------------
def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class HandRun:
    """The hand-written loop: ``epoch()`` is one timed pass (loss accumulated on the device, read once)."""

    def __init__(self, bench, split, x, batch_size, spec, dev, seed):
        torch.manual_seed(0)
        self.bench, self.x, self.batch_size, self.spec, self.dev = bench, x, batch_size, spec, dev
        self.module = bench.build(split).to(dev)
        self.opt = torch.optim.Adam(self.module.parameters(), lr=LR)
        pyro.set_rng_seed(seed)
        with torch.no_grad():  # fit draws one batch's noise while collecting parameters: so do we
            bench.hand_loss(self.module, batching.take(x, slice(0, batch_size)), spec)

    def step(self, xb):
        loss = self.bench.hand_loss(self.module, xb, self.spec)
        (loss / batching.length(xb)).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def epoch(self):
        n, dev = batching.length(self.x), self.dev
        _sync(dev)
        t0 = time.perf_counter()
        order = torch.randperm(n, device=dev)
        total = torch.zeros((), device=dev)
        for i in range(0, n, self.batch_size):
            total += self.step(batching.take(self.x, order[i : i + self.batch_size])).detach()
        mean = float(total) / n  # the host read, once per epoch
        return time.perf_counter() - t0, mean


class FitRun:
    """:class:`inference.Trainer` (what ``fit`` builds), one ``run`` epoch at a time."""

    def __init__(self, bench, split, x, batch_size, spec, dev, seed, options):
        torch.manual_seed(0)
        pyro.clear_param_store()
        self.trainer = Trainer(bench.build(split), x, elbo=spec, batch_size=batch_size, lr=LR, device=dev,
                               seed=seed, **options)

    def epoch(self):
        t = self.trainer
        t.run(t.epoch + 1, progress=False)
        return t.history[-1]["seconds"], t.history[-1]["train_loss"]

    @property
    def compile_seconds(self):
        return sum(getattr(self.trainer.loss, "compile_seconds", {}).values())


class SVIRun:
    """Plain Pyro: ``SVI(model, guide, pyro.optim.Adam, elbo).step(batch)``, the networks registered with pyro.module."""

    def __init__(self, bench, split, x, batch_size, spec, dev, seed):
        torch.manual_seed(0)
        pyro.clear_param_store()  # pyro.module would otherwise take the previous run's trained "net" parameters
        module = bench.build(split).to(dev)
        self.x, self.batch_size, self.dev = x, batch_size, dev
        # the loss per datapoint, as fit and hand use; a scale inside the IWAE/Renyi log-sum-exp
        # would change the bound, so there the summed loss is used (Adam's step is invariant to
        # the scale of the loss up to its epsilon) and the reported value divided by B
        self.per_point = per_point = spec.split(":")[0] in ("trace", "meanfield")

        def scaled(fn, xb):
            pyro.module("net", module)
            with poutine.scale(scale=1.0 / batching.length(xb)) if per_point else contextlib.nullcontext():
                fn(xb)

        def model(xb):
            scaled(module.model, xb)

        def guide(xb):
            scaled(module.guide, xb)

        elbo = make_elbo(spec, max_plate_nesting=getattr(module, "max_plate_nesting", None))
        self.svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}), elbo)
        pyro.set_rng_seed(seed)
        with torch.no_grad():  # the same draws as fit and hand (see HandRun)
            bench.hand_loss(module, batching.take(x, slice(0, batch_size)), spec)

    def epoch(self):
        n = batching.length(self.x)
        with pyro.validation_enabled(False):
            _sync(self.dev)
            t0 = time.perf_counter()
            order = torch.randperm(n, device=self.dev)
            total = 0.0
            for i in range(0, n, self.batch_size):
                idx = order[i : i + self.batch_size]
                loss = self.svi.step(batching.take(self.x, idx))  # a host read per step: SVI returns a float
                total += loss * idx.shape[0] if self.per_point else loss
            return time.perf_counter() - t0, total / n


def run_pythae(bench, split, x, batch_size, spec, dev, seed):
    from pythae.data.datasets import BaseDataset
    from pythae.trainers import BaseTrainer, BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback

    torch.manual_seed(0)
    model = bench.pythae(bench.build(split))
    marks = []

    class Clock(TrainingCallback):
        def on_epoch_begin(self, training_config, **kw):
            _sync(dev)
            marks.append(time.perf_counter())

        def on_epoch_end(self, training_config, **kw):
            _sync(dev)
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = BaseTrainerConfig(output_dir=out, num_epochs=2, learning_rate=LR, per_device_train_batch_size=batch_size,
                                   optimizer_cls="Adam", no_cuda=dev.type != "cuda", seed=seed, steps_saving=None)
        trainer = BaseTrainer(model, train_dataset=BaseDataset(x.cpu(), torch.zeros(len(x))),
                              training_config=config, callbacks=[Clock()])
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.getLogger("pythae").setLevel(logging.ERROR)
            trainer.train()
    return marks[3] - marks[2], float("nan")


# ---- the benchmark ---------------------------------------------------------------------
def matmul_rate(dev, n=2048, reps=5):
    """This machine's measured matmul rate (FLOP/s): the fastest of ``reps`` ``torch.mm`` of two n x n float32 matrices."""
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    torch.mm(a, b)
    best = math.inf
    for _ in range(reps):
        _sync(dev)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def step_flops(bench, split, x, batch_size, spec, dev):
    """The matmul (and convolution) FLOPs of one training step, forward and backward, counted by
    :class:`torch.utils.flop_counter.FlopCounterMode` on the hand-written loss."""
    torch.manual_seed(0)
    module = bench.build(split).to(dev)
    with FlopCounterMode(display=False) as counter:
        bench.hand_loss(module, batching.take(x, slice(0, batch_size)), spec).backward()
    return counter.get_total_flops()


# fit's default paths as the benchmark's columns, with the backend each is built with
PATH_IMPLS = {"fit[flat]": FLAT, "fit[compiled]": "inductor"}


def default_path(step_s, full_n, batch_size, dev):
    """The path ``fit`` chooses by default for the CLI's default run (:data:`DEFAULT_RUN_EPOCHS` epochs of the full
    training set less the validation split) at these step times (``{impl: seconds}``, ``fit[eager]`` included):
    of eager and the paths :func:`inference.loss.worth_compiling` admits at the eager step time, the fastest (as
    :class:`inference.Trainer` decides, there from a few steps on the first batch)."""
    steps = DEFAULT_RUN_EPOCHS * max(int((1 - DEFAULT_VALIDATION) * full_n) // batch_size, 1)
    eager = step_s["fit[eager]"]
    admitted = {"fit[eager]": eager, **{impl: step_s[impl] for impl, backend in PATH_IMPLS.items()
                                        if impl in step_s and worth_compiling(eager, steps, dev.type, backend=backend)}}
    return min(admitted, key=admitted.get)


def measure(name, bench, split, spec, batch_size, dev, *, steps, rounds, seed, impls, log, backend="inductor",
            rate=None):
    n, size = steps * batch_size, batching.length(split.x)
    index = torch.arange(n) % size  # the first n points, cycling: the same fixed data for every implementation
    x = batching.to_device(batching.take(split.x, index), dev)
    names = [i for i in impls if i != "pythae" or (spec == "meanfield" and bench.pythae and bench.pythae(bench.build(split)))]
    # each run is built and trained one (warm-up) epoch in turn, from the same seeded state: its first-epoch
    # loss is compared with hand's (same draws), and the compiled path compiles here (timed separately)
    runs, first, compile_s, path = {}, {}, {}, {}
    for impl in names:
        if impl == "pythae":
            continue
        if impl == "hand":
            runs[impl] = HandRun(bench, split, x, batch_size, spec, dev, seed)
        elif impl == "pyro-svi":
            runs[impl] = SVIRun(bench, split, x, batch_size, spec, dev, seed)
        else:
            options = dict(FIT_IMPLS[impl])
            if options["compile"] is True:
                options["compile"] = backend
            runs[impl] = FitRun(bench, split, x, batch_size, spec, dev, seed, options)
        _, first[impl] = runs[impl].epoch()
        if impl in FIT_IMPLS:
            compile_s[impl] = runs[impl].compile_seconds or None  # None: nothing compiled (the eager path)
            path[impl] = runs[impl].trainer.loss_path
            fallbacks = getattr(runs[impl].trainer.loss, "fallbacks", {})
            if fallbacks:
                log(f"{name} {spec} {impl}: eager fallback: {list(fallbacks.values())}")
    flops = step_flops(bench, split, x, batch_size, spec, dev)
    times = {i: [] for i in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for impl in order:
            if impl == "pythae":
                t, loss = run_pythae(bench, split, x, batch_size, spec, dev, seed)
                first.setdefault(impl, loss)
            else:
                t, _ = runs[impl].epoch()
            times[impl].append(t)
    lower_ms = 1e3 * flops / rate if rate else None
    rows = []
    for impl in names:
        step = statistics.median(times[impl]) / steps
        ratios = [a / b for a, b in zip(times[impl], times["hand"])]
        rel = abs(first[impl] - first["hand"]) / abs(first["hand"]) if not math.isnan(first[impl]) else None
        row = {
            "model": name, "impl": impl, "elbo": spec, "device": str(dev), "batch_size": batch_size,
            "step_ms": 1e3 * step, "samples_per_s": batch_size / step, "ratio": statistics.median(ratios),
            "epoch_s": size / (batch_size / step),  # one pass over the full training set at this rate
            "loss_rel_diff": rel, "rounds": rounds, "steps": steps,
            "step_ms_rounds": [1e3 * t / steps for t in times[impl]],
            "path": path.get(impl, ""), "compile_s": compile_s.get(impl), "flops": flops,
            "lower_ms": lower_ms, "over_lower": 1e3 * step / lower_ms if lower_ms else None,
        }
        rows.append(row)
        log(f"{name:15s} {spec:10s} B={batch_size:5d} {impl:14s} {row['step_ms']:8.3f} ms/step  "
            f"ratio {row['ratio']:.3f}" + (f"  loss diff {rel:.1e}" if rel is not None else "")
            + (f"  compile {compile_s[impl]:.1f} s" if compile_s.get(impl) else ""))
    if "fit[eager]" in times:
        chosen = default_path({i: statistics.median(times[i]) / steps for i in times if i in FIT_IMPLS}, size,
                              batch_size, dev)
        for row in rows:
            row["default"] = chosen
        log(f"{name:15s} {spec:10s} B={batch_size:5d} fit's default for a {DEFAULT_RUN_EPOCHS}-epoch run: {chosen}")
    return rows


def summary(rows):
    """One row per model, objective and batch size: the ratios of each path, fit's default, compile seconds, bound."""
    out = []
    keys = list(dict.fromkeys((r["model"], r["elbo"], r["batch_size"]) for r in rows))
    for key in keys:
        group = {r["impl"]: r for r in rows if (r["model"], r["elbo"], r["batch_size"]) == key}
        hand = group["hand"]
        row = {"model": key[0], "elbo": key[1], "batch_size": key[2], "hand_ms": hand["step_ms"]}
        for impl in group:
            if impl != "hand":
                row[impl] = group[impl]["ratio"]
        if "default" in hand:
            row["default"] = hand["default"]
            row["default_ratio"] = group[hand["default"]]["ratio"] if hand["default"] in group else None
        for impl in PATH_IMPLS:
            if impl in group:
                row[f"{impl[4:-1]}_s"] = group[impl]["compile_s"]
        if hand.get("lower_ms"):
            row["lower_ms"] = hand["lower_ms"]
            row["hand/lower"] = hand["over_lower"]
            best = min(group.values(), key=lambda r: r["step_ms"])
            row["best/lower"] = best["over_lower"]
        out.append(row)
    return out


def figure(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    colour = {impl: f"C{k}" for k, impl in enumerate(impls)}
    styles = {"trace": ("-", "o"), "meanfield": (":", "s"), "iwae:5": ("--", "^")}
    fig, axes = plt.subplots(2, len(models), figsize=(4.8 * len(models), 7.5), squeeze=False)
    for j, model in enumerate(models):
        for impl in impls:
            for spec, (ls, marker) in styles.items():
                pts = sorted((r["batch_size"], r["ratio"], r["samples_per_s"]) for r in rows
                             if r["model"] == model and r["impl"] == impl and r["elbo"] == spec)
                if not pts:
                    continue
                b, ratio, sps = zip(*pts)
                kw = dict(ls=ls, marker=marker, color=colour[impl], label=f"{impl} [{spec}]")
                if impl != "hand":
                    axes[0, j].plot(b, ratio, **kw)
                axes[1, j].plot(b, sps, **kw)
        axes[0, j].axhline(1.05, color="k", lw=0.8, ls=":")
        axes[0, j].axhline(1.0, color="k", lw=0.5)
        axes[0, j].set(xscale="log", title=model, xlabel="batch size", ylabel="step time / hand-written (median)")
        axes[1, j].set(xscale="log", yscale="log", xlabel="batch size", ylabel="samples / s")
        axes[0, j].legend(fontsize=6)
        axes[1, j].legend(fontsize=6)
    fig.suptitle(f"training throughput on {rows[0]['device']} (dotted: 1.05 x hand-written)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two MLP models, batch 32/128/1024, fewer rounds (minutes on CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--elbos", nargs="+", default=None, help="default: each model's (trace, meanfield, iwae:5)")
    p.add_argument("--impls", nargs="+", default=None, choices=IMPLS + ["pythae"],
                   help=f"default: {' '.join(IMPLS)} (pythae only when asked for)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of fit[compiled] (tests: aot_eager)")
    p.add_argument("--warm-cache", action="store_true",
                   help="use inductor's on-disk cache (default: a fresh one, so compile_s is a first compilation)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed epoch")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    p.add_argument("--data-root", default=os.environ.get("PPLM_DATA_ROOT"), help="folder with MNIST/raw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--machine", default=None, help="a label for the machine, e.g. cpu-2core (JSON, markdown, file name)")
    p.add_argument("--name", default=None, help="output file stem (default throughput-<device>[-quick])")
    p.add_argument("--note", default="", help="a line for the markdown, e.g. how busy the machine was")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but CUDA is not available")
    torch.set_num_threads(args.threads or (1 if dev.type == "cpu" else torch.get_num_threads()))
    cache = None
    if not args.warm_cache:
        cache = tempfile.TemporaryDirectory(prefix="inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    quick = args.quick
    models = args.models or (["vae-mlp-digits", "vae-mlp-mnist"] if quick else list(MODELS))
    batch_sizes = args.batch_sizes or ([32, 128, 1024] if quick else [32, 64, 128, 256, 512, 1024])
    steps = args.steps or (10 if quick else 20)
    rounds = args.rounds or (3 if quick else 5)
    impls = args.impls or list(IMPLS)
    if "hand" not in impls:
        impls = ["hand"] + impls
    t_start = time.perf_counter()
    rate = matmul_rate(dev)
    print(f"matmul rate: {rate / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    rows, skipped = [], []
    for name in models:
        bench = MODELS[name]
        try:
            split, _ = bench.load_data(args.data_root)
        except Exception as exc:  # e.g. MNIST without --data-root
            skipped.append(f"{name}: {exc}")
            print(f"skipping {name}: {exc}")
            continue
        elbos = args.elbos or bench.elbos
        for spec in elbos:
            for b in batch_sizes:
                # quick mode: every implementation for trace; the other objectives against hand at batch 128
                if quick and spec != "trace" and b != 128:
                    continue
                rows += measure(name, bench, split, spec, b, dev, steps=steps, rounds=rounds, seed=args.seed,
                                impls=impls, log=print, backend=args.backend, rate=rate)
    seconds = time.perf_counter() - t_start
    if cache is not None:
        cache.cleanup()
    columns = ["model", "elbo", "batch_size", "impl", "step_ms", "samples_per_s", "ratio", "epoch_s", "compile_s",
               "over_lower", "loss_rel_diff"]
    shown = [dict(r, loss_rel_diff="" if r["loss_rel_diff"] is None else f"{r['loss_rel_diff']:.1e}",
                  compile_s="" if r["compile_s"] is None else r["compile_s"],
                  over_lower="" if r["over_lower"] is None else r["over_lower"]) for r in rows]
    table = markdown_table(shown, columns)
    summary_rows = summary(rows) if rows else []
    summary_columns = ["model", "elbo", "batch_size", "hand_ms", *[i for i in impls if i != "hand"], "default",
                       "default_ratio", *[f"{i[4:-1]}_s" for i in PATH_IMPLS if i in impls], "lower_ms", "hand/lower", "best/lower"]
    stem = args.name or f"throughput-{args.machine or dev.type}" + ("-quick" if quick else "")
    try:
        import pythae

        pythae_version = pythae.__version__ if hasattr(pythae, "__version__") else "installed"
    except Exception as exc:
        pythae_version = f"not available ({type(exc).__name__})"
    record = {
        "benchmark": "throughput",
        "machine": args.machine,
        "environment": environment(dev),
        "seed": args.seed,
        "settings": {
            "quick": quick, "models": models, "batch_sizes": batch_sizes, "steps_per_epoch": steps,
            "rounds": rounds, "lr": LR, "optimizer": "adam", "threads": torch.get_num_threads(),
            "impls": impls, "fit_options": FIT_IMPLS, "backend": args.backend, "warm_cache": args.warm_cache,
            "pythae": pythae_version, "data": "fixed binarisation", "default_run_epochs": DEFAULT_RUN_EPOCHS,
            "default_validation": DEFAULT_VALIDATION, "compile_seconds_estimate": COMPILE_SECONDS,
            "compiled_saving_estimate": COMPILED_SAVING, "flat_seconds_estimate": FLAT_SECONDS,
            "flat_saving_estimate": FLAT_SAVING,
        },
        "matmul_flops_per_s": rate,
        "note": args.note,
        "skipped": skipped,
        "seconds": seconds,
        "summary": summary_rows,
        "results": rows,
    }
    header = (f"# Training throughput on {args.machine or record['environment']['device_name']} ({dev}, "
              f"{torch.get_num_threads()} torch threads)\n\n"
              "Same network (the model's own modules), loss, optimiser (Adam, lr 1e-3), data on the device, batch "
              "order and random draws for every implementation. hand: hand-written PyTorch loop (torch.distributions "
              "densities, loss read once per epoch); pyro-svi: plain pyro.infer.SVI.step with pyro.optim.Adam, "
              "validation off; fit[eager]: the eager loss (fit(compile=False), Pyro validation on the first calls "
              "of each batch shape, as the CLI runs it); fit[flat]: the flattened loss graph (make_fx) run as it is, no "
              "torch.compile (fit(compile='flat')); fit[compiled]: the compiled loss "
              f"(fit(compile=True): make_fx + torch.compile, backend {args.backend}).\n\n"
              f"Each implementation is built and trained one warm-up epoch (fit[flat] flattens and fit[compiled] compiles "
              f"there: compile_s, in the summary flat_s and compiled_s, "
              f"{'a warm' if args.warm_cache else 'a fresh, empty'} inductor cache), then the implementations are timed "
              f"interleaved in this one process, {rounds} rounds of one {steps}-step epoch each, order rotated. "
              "step_ms: median over rounds; ratio: median of per-round (impl / hand). epoch_s: one pass over the "
              "model's full training set at that rate. loss_rel_diff: warm-up epoch training loss vs hand (same draws). "
              f"Lower bound (lower_ms): the step's matmul FLOPs, forward and backward (counted by torch's "
              f"FlopCounterMode on the hand-written loss), at this machine's measured matmul rate "
              f"({rate / 1e9:.1f} GFLOP/s, a 2048 x 2048 torch.mm, {torch.get_num_threads()} thread(s)); "
              "over_lower: step_ms / lower_ms. default: the path fit chooses by itself for the CLI's default run "
              f"({DEFAULT_RUN_EPOCHS} epochs of the full training set less a 10% validation split, at this batch "
              "size: of eager and the paths inference.loss.worth_compiling admits at the measured eager step time, the "
              "fastest measured; flat when steps x eager x 0.15 > 0.5 s, inductor when steps x eager x 0.2 > 40 s).\n\n"
              + (f"Machine: {args.note}\n\n" if args.note else "")
              + "## Summary (ratios to hand)\n\n" + markdown_table(summary_rows, summary_columns) + "\n\n"
              + "## All measurements\n\n")
    json_path, md_path = write_results(args.out, stem, record, header + table)
    if rows:
        figure(rows, Path(args.out) / f"{stem}.png")
    print(markdown_table(summary_rows, summary_columns))
    print(f"\n{len(rows)} measurements in {seconds:.0f} s; wrote {json_path}, {md_path} and {stem}.png")


if __name__ == "__main__":
    main()
