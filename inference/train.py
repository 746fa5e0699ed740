"""One training loop for every model/guide pair."""

import math
import sys
from contextlib import nullcontext
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import pyro.poutine as poutine
import torch
from tqdm.auto import tqdm

from . import batching
from .checkpoint import FILENAME, get_rng_state, load_checkpoint, model_name, save_checkpoint, set_rng_state
from .elbo import make_elbo
from .errors import NonFiniteLossError, UsageError
from .fast_elbo import FastELBO, supports

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def resolve_device(device="auto"):
    """``"auto"`` is CUDA when available, else CPU; asking for CUDA without one is a :class:`UsageError`."""
    if isinstance(device, torch.device):
        device = str(device)
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' asked for, but CUDA is not available here")
    return dev


def _positive(name, value, kind=float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)
    if not ok or (kind is int and int(value) != value):
        raise UsageError(f"{name} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")


@dataclass
class FitResult:
    """What :func:`fit` returns.

    ``history`` has one dict per epoch: ``epoch``, ``train_loss`` (the negative
    training objective per datapoint, averaged over the epoch's steps),
    ``test_elbo`` (per datapoint, one particle per point, when test data is
    given), ``seconds`` (training time of the epoch) and ``eval_seconds``.
    """

    history: list = field(default_factory=list)
    checkpoint: Path = None
    device: torch.device = None
    elbo: object = None
    train_seconds: float = 0.0


def collect_params(module, elbo, batch):
    """The tensors to optimise: ``module.parameters()`` plus any ``pyro.param`` the pair touches.

    Parameters kept in Pyro's param store (``pyro.param``) are created lazily, so
    they are found by running the objective once under a param-only trace.
    """
    with poutine.trace(param_only=True) as capture:
        elbo.differentiable_loss(module.model, module.guide, batch)
    params, seen = [], set()
    for p in list(module.parameters()) + [
        site["value"].unconstrained() for site in capture.trace.nodes.values()
    ]:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    if not params:
        raise UsageError(f"{model_name(module)} has no parameters to optimise")
    return params


def fit(
    module,
    train,
    *,
    elbo="trace",
    epochs,
    batch_size,
    lr,
    device="auto",
    seed=0,
    test=None,
    checkpoint_dir=None,
    resume=False,
    progress=True,
    optimizer="adam",
    clip_norm=None,
    drop_last=False,
    validate=None,
    jit=False,
    sync_every=None,
    callback=None,
):
    """Train ``module`` (anything with ``model(batch)`` and ``guide(batch)``) by SVI.

    Each step draws a minibatch B, computes the differentiable loss
    ``-ELBO(B) / |B|`` of the chosen objective (a spec for :func:`make_elbo` or a
    Pyro ELBO object) and takes a step of a plain torch optimiser over the
    module's parameters and any ``pyro.param`` it uses.

    * ``train``/``test``: a tensor, a mapping of tensors, or a
      :class:`ppl_models.data.DataSplit`; moved to ``device`` once.
    * ``device="auto"`` uses CUDA when available.
    * ``checkpoint_dir``: a checkpoint is written atomically after every epoch
      (module, param store, optimiser, RNG states, history). With
      ``resume=True`` training continues from it when it exists; on CPU with the
      same seed the result equals an uninterrupted run exactly.
    * A non-finite loss raises :class:`NonFiniteLossError` naming the epoch and
      step; the checkpoint on disk is the last good one and is never replaced by
      a non-finite state.
    * The losses stay on the device and are read in one transfer every
      ``sync_every`` steps (default: every step on CPU, where a read costs
      nothing, every 50 on CUDA), so GPU steps do not wait on the host. The loss
      of Trace_ELBO, TraceMeanField_ELBO and the IWAE/Renyi bounds is computed
      by :class:`inference.fast_elbo.FastELBO`, the same loss as Pyro's without
      its per-site ``.item()`` host reads.
    * ``jit=True`` (with an ELBO spec) compiles the loss with ``torch.jit.trace``
      (see :mod:`inference.fast_elbo`: checked against the eager loss and
      gradients, eager fallback with a warning where it cannot be traced).
      Each distinct batch shape gets its own graph, so the ragged last batch
      costs one more trace; ``drop_last=True`` drops it so every step has the
      same shape. The default keeps it.
    * ``validate``: switch Pyro's validation on/off for the run (None leaves
      it). Validation costs time on every eager step; with ``jit=True`` it runs
      on the first step of each batch shape only.
    * ``callback(record)`` is called after each epoch with its history record.
    """
    _positive("epochs", epochs, int)
    _positive("batch_size", batch_size, int)
    _positive("lr", lr)
    dev = resolve_device(device)
    spec = elbo if isinstance(elbo, str) else type(elbo).__name__
    if isinstance(elbo, str):
        elbo = make_elbo(elbo, max_plate_nesting=getattr(module, "max_plate_nesting", None), jit=jit)
    if batching.length(train) == 0:
        raise UsageError("the training data is empty")
    batching.check_finite(train, "training data")
    if test is not None:
        batching.check_finite(test, "test data")
    if hasattr(module, "check_data"):
        module.check_data(batching.fixed_view(train))
        if test is not None:
            module.check_data(batching.fixed_view(test))
    ckpt_path = Path(checkpoint_dir) / FILENAME if checkpoint_dir is not None else None
    state = None
    if resume and ckpt_path is not None and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, expect_model=model_name(module), map_location=dev)
        for key, now in (("elbo", spec), ("batch_size", batch_size), ("seed", seed)):
            if state["settings"].get(key) != now:
                raise UsageError(
                    f"cannot resume: the checkpoint was trained with {key}={state['settings'].get(key)!r}, not {now!r}"
                )

    module.to(dev)
    train = batching.to_device(train, dev)
    test = batching.to_device(test, dev) if test is not None else None
    n = batching.length(train)
    if hasattr(module, "num_data"):
        module.num_data = n
    if sync_every is None:
        sync_every = 1 if dev.type == "cpu" else 50

    with pyro.validation_enabled(validate) if validate is not None else nullcontext():
        pyro.set_rng_seed(seed)
        if state is not None:
            module.load_state_dict(state["module"])
            pyro.get_param_store().set_state(state["param_store"])
        module.train()
        first = batching.take(batching.fixed_view(train), slice(0, min(batch_size, n)))
        # parameters are found with the eager loss; the compiled one is built on the first step
        capture_elbo = elbo.elbo if isinstance(elbo, FastELBO) else elbo
        params = collect_params(module, capture_elbo, first)
        step_elbo = FastELBO(elbo) if supports(elbo) else elbo
        opt = OPTIMIZERS[optimizer](params, lr=lr) if isinstance(optimizer, str) else optimizer(params)
        history, start = [], 1
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
            history, start = list(state["history"]), state["epoch"] + 1
        settings = {"elbo": spec, "batch_size": batch_size, "seed": seed, "lr": lr, "epochs": epochs}
        steps_per_epoch = batching.num_batches(n, batch_size, drop_last=drop_last)
        bar = tqdm(
            total=(epochs - start + 1) * steps_per_epoch,
            disable=not progress,
            desc=f"fit {model_name(module)} [{spec}]",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
        )
        result = FitResult(history=history, checkpoint=ckpt_path, device=dev, elbo=elbo)
        try:
            for epoch in range(start, epochs + 1):
                t0 = time.perf_counter()
                record = _run_epoch(
                    module, step_elbo, opt, params, train, epoch, batch_size, dev, drop_last, clip_norm, sync_every, bar,
                    ckpt_path if ckpt_path is not None and ckpt_path.exists() else None,
                )
                record["seconds"] = time.perf_counter() - t0
                t1 = time.perf_counter()
                if test is not None:
                    from .evaluate import evaluate

                    record["test_elbo"] = evaluate(module, test, particles=1, batch_size=max(batch_size, 1000)).elbo
                    module.train()
                record["eval_seconds"] = time.perf_counter() - t1
                history.append(record)
                bar.set_postfix(_postfix(record), refresh=False)
                if ckpt_path is not None:
                    save_checkpoint(
                        ckpt_path,
                        {
                            "model": model_name(module),
                            "config": getattr(module, "config", None),
                            "module": module.state_dict(),
                            "param_store": pyro.get_param_store().get_state(),
                            "optimizer": opt.state_dict(),
                            "rng": get_rng_state(),
                            "epoch": epoch,
                            "history": history,
                            "settings": settings,
                        },
                    )
                if callback is not None:
                    callback(record)
        finally:
            bar.close()
            module.eval()
    result.train_seconds = sum(r["seconds"] for r in history)
    return result


def _postfix(record):
    out = {"epoch": record["epoch"], "loss": f"{record['train_loss']:.3f}"}
    if "test_elbo" in record:
        out["test_elbo"] = f"{record['test_elbo']:.3f}"
    return out


def _read(window):
    """Host copies of the losses in ``window``: one device-to-host transfer."""
    if len(window) == 1:
        return [float(window[0])]
    return torch.stack(window).tolist()


def _run_epoch(module, elbo, opt, params, train, epoch, batch_size, dev, drop_last, clip_norm, sync_every, bar, good):
    data = batching.epoch_view(train)
    batches = batching.batch_indices(batching.length(train), batch_size, shuffle=True, device=dev, drop_last=drop_last)
    model, guide, loss_of = module.model, module.guide, elbo.differentiable_loss
    last = len(batches)
    window = []  # detached losses of the steps since the last host read
    total = 0.0  # sum of the losses read so far, accumulated in float64 on the host
    seen = 0
    for step, idx in enumerate(batches, start=1):
        size = idx.shape[0]
        loss = loss_of(model, guide, batching.take(data, idx))
        window.append(loss.detach())
        if step % sync_every == 0 or step == last:
            # the only host read: the losses of the window, checked before this step's update
            values = _read(window)
            window = []
            for k, value in enumerate(values):
                if not math.isfinite(value):
                    kept = f"; the last good checkpoint {good} is kept" if good is not None else ""
                    bad = step - len(values) + 1 + k
                    raise NonFiniteLossError(f"non-finite loss at epoch {epoch}, step {bad}{kept}")
            total += math.fsum(values)
            bar.update(len(values))
            if step % (20 * sync_every) == 0 or step == last:
                bar.set_postfix({"epoch": epoch, "loss": f"{total / (seen + size):.3f}"}, refresh=False)
        (loss / size).backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += size
    return {"epoch": epoch, "train_loss": total / seen}
