"""fit(): learning, checkpoints, exact resume, the NaN guard and bad arguments."""

import copy
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn
from conftest import interrupt_on_call

from inference import evaluate, fit
from inference.checkpoint import load_checkpoint, save_checkpoint
from inference.errors import CheckpointError, NonFiniteLossError, UsageError
from ppl_models.vae import VAE


def small_vae(train):
    return VAE(train.dim, latent_dim=8, hidden=(64,))


def test_training_beats_the_best_model_without_latents(digits):
    """After 30 epochs on digits the VAE's test ELBO must beat the maximum-likelihood factorised
    Bernoulli model (independent pixels, the best model without a latent): a latent-variable lower
    bound can only exceed it by modelling dependencies between pixels. Paired over test points,
    the gain must exceed 5 standard errors; and the ELBO must have risen by > 15 nats from init
    (64 pixels at p = 1/2 cost 44 nats, the trained factorised model 27)."""
    train, test = digits
    vae = small_vae(train)
    before = evaluate(vae, test, particles=10).elbo
    result = fit(vae, train, validation=test, epochs=30, batch_size=64, lr=3e-3, seed=0, progress=False)
    after = evaluate(vae, test, particles=10)
    p = train.grey.mean(0).clamp(1e-4, 1 - 1e-4)
    x = test.data
    factorised = (x * p.log() + (1 - x) * (1 - p).log()).sum(1).double()
    gain = after.elbo_per_point - factorised
    assert gain.mean() > 5 * gain.std() / math.sqrt(gain.numel())
    assert after.elbo - before > 15
    assert [r["epoch"] for r in result.history] == list(range(1, 31))
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("elbo", ["trace", "iwae:3"])
def test_resume_after_interruption_equals_an_uninterrupted_run(digits, tmp_path, elbo):
    """Interrupt in the middle of epoch 3; resuming from the epoch-2 checkpoint must reproduce the
    uninterrupted run bit for bit (same seed, CPU), dynamic binarisation draws included."""
    train, _ = digits
    train = train.to("cpu")
    kwargs = dict(elbo=elbo, epochs=4, batch_size=128, lr=1e-3, seed=3, progress=False)

    torch.manual_seed(0)
    reference = small_vae(train)
    init = copy.deepcopy(reference.state_dict())
    fit(reference, train, checkpoint_dir=tmp_path / "a", **kwargs)

    interrupted = small_vae(train)
    interrupted.load_state_dict(init)
    interrupt_on_call(interrupted, 2 * 12 + 5)  # a few set-up calls, then 12 steps an epoch (1438 / 128): in epoch 3
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, train, checkpoint_dir=tmp_path / "b", **kwargs)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 2

    resumed = small_vae(train)
    result = fit(resumed, train, checkpoint_dir=tmp_path / "b", resume=True, **kwargs)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    for a, b in zip(_params(reference), _params(resumed)):
        assert torch.equal(a, b)


def test_resume_refuses_other_settings_and_other_models(digits, tmp_path):
    train, _ = digits
    fit(small_vae(train), train, epochs=1, batch_size=256, lr=1e-3, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(UsageError, match="batch_size=256"):
        fit(small_vae(train), train, epochs=2, batch_size=128, lr=1e-3, progress=False, checkpoint_dir=tmp_path, resume=True)

    class Other(VAE):
        pass

    with pytest.raises(CheckpointError, match="holds a 'VAE' model, not 'Other'"):
        fit(Other(train.dim, 8, (64,)), train, epochs=2, batch_size=256, lr=1e-3, progress=False,
            checkpoint_dir=tmp_path, resume=True)


def test_checkpoint_round_trip_and_corruption(tmp_path):
    state = {"model": "VAE", "module": {"w": torch.arange(5.0)}, "epoch": 3}
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt", expect_model="VAE")
    assert torch.equal(loaded["module"]["w"], torch.arange(5.0)) and loaded["epoch"] == 3
    assert list(tmp_path.iterdir()) == [tmp_path / "c.pt"], "no temporary file may be left behind"
    (tmp_path / "c.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "c.pt")
    torch.save({"something": "else"}, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="not a ppl-models checkpoint"):
        load_checkpoint(tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


class Exploding(nn.Module):
    """A Gaussian-mean model whose likelihood turns NaN once ``boom`` is set."""

    max_plate_nesting = 1

    def __init__(self):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(()))
        self.calls = 0
        self.boom_at = None

    def model(self, x):
        self.calls += 1
        scale = x.new_tensor(float("nan") if self.boom_at and self.calls >= self.boom_at else 1.0)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(self.loc, 1.0), obs=x)
            pyro.factor("boom", scale.log().expand(x.shape[0]) * 0 + (scale - 1))

    def guide(self, x):
        pass


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro warns too; our guard must raise
def test_non_finite_loss_names_epoch_and_step_and_keeps_the_checkpoint(tmp_path):
    x = torch.randn(40)
    module = Exploding()
    with pyro.validation_enabled(False):  # let the NaN through to our own guard
        fit(module, x, epochs=2, batch_size=10, lr=0.1, progress=False, checkpoint_dir=tmp_path)
        good = (tmp_path / "checkpoint.pt").read_bytes()
        setup = module.calls - 2 * 4  # calls before the first step (inspection, the objective's trial run)
        module.boom_at = module.calls + setup + 3  # step 3 of epoch 3
        with pytest.raises(NonFiniteLossError, match=r"epoch 3, step 3; the last good checkpoint .* is kept"):
            fit(module, x, epochs=4, batch_size=10, lr=0.1, progress=False, checkpoint_dir=tmp_path, resume=True)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    # on the CPU the guard reads every step, so no optimiser step ever saw the NaN
    assert torch.isfinite(module.loc).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(epochs=0), "epochs"),
        (dict(epochs=1.5), "epochs"),
        (dict(batch_size=-1), "batch_size"),
        (dict(lr=0.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(elbo="nope"), "unknown ELBO spec"),
        (dict(device="tpu"), "unknown device"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    args = dict(epochs=1, batch_size=8, lr=1e-3, progress=False)
    args.update(kwargs)
    with pytest.raises(UsageError, match=message):
        fit(VAE(4, 2, (4,)), torch.zeros(8, 4), **args)


def test_nan_data_is_refused():
    x = torch.zeros(8, 4)
    x[2, 1] = float("nan")
    with pytest.raises(UsageError, match="NaN"):
        fit(VAE(4, 2, (4,), likelihood="normal"), x, epochs=1, batch_size=4, lr=1e-3, progress=False)


def test_fit_on_device(device, digits):
    """Parameters and the checkpoint follow the requested device; the checkpoint reloads on the CPU."""
    train, test = digits
    vae = small_vae(train)
    result = fit(vae, train, validation=test, epochs=1, batch_size=256, lr=1e-3, device=device, progress=False)
    assert result.device.type == device.type
    assert all(p.device.type == device.type for p in vae.parameters())
    assert math.isfinite(result.history[0]["val_elbo"])


@pytest.mark.parametrize("when", ["after epoch 2", "after the last epoch"])
def test_a_checkpoint_is_written_only_when_its_parameters_are_finite(digits, tmp_path, when):
    """Parameters made non-finite at the end of epoch 2 (a diverged last update the losses of epoch 2 never saw):
    the run stops with DivergenceError at the next read (or at the end of training), and the checkpoint on disk
    is epoch 1's, finite, so resuming from it works."""
    from inference.callbacks import Callback
    from inference.errors import DivergenceError

    train, _ = digits
    epochs = 3 if when == "after epoch 2" else 2

    class Poison(Callback):
        order = 50  # before Checkpoint: its state of epoch 2 holds the NaN

        def on_epoch_end(self, trainer, record):
            if record["epoch"] == 2:
                with torch.no_grad():
                    next(vae.parameters())[0] = float("nan")

    vae = small_vae(train)
    with pytest.raises(DivergenceError, match="diverged"):
        fit(vae, train, epochs=epochs, batch_size=256, lr=1e-3, progress=False, checkpoint_dir=tmp_path,
            callbacks=[Poison()])
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["module"].values() if t.is_floating_point())


def test_a_parameter_the_loss_never_reads_turning_nan_mid_epoch_stops_the_epoch(tmp_path):
    """The parameters are checked on the first and last read of an epoch and every PARAM_CHECK_READS-th read,
    not on every read: a parameter that no loss reads (so no later loss shows it) made NaN after read 2 of a
    40-step epoch is found at read 16, so the run stops with DivergenceError and no checkpoint holds it."""
    from inference.callbacks import Callback
    from inference.errors import DivergenceError
    from inference.train import PARAM_CHECK_READS

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = nn.Parameter(torch.zeros(()))
            self.unused = nn.Parameter(torch.zeros(()))

        def model(self, x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("x", dist.Normal(self.loc, 1.0), obs=x)

        def guide(self, x):
            pass

    seen = []

    class Poison(Callback):
        def on_steps(self, trainer, steps, total, points):
            seen.append(points)
            if len(seen) == 2:
                with torch.no_grad():
                    pair.unused.fill_(float("nan"))

    pair = Pair()
    x = torch.randn(400)
    with pytest.raises(DivergenceError, match="non-finite parameters"):
        fit(pair, x, epochs=1, batch_size=10, lr=1e-2, progress=False, checkpoint_dir=tmp_path, callbacks=[Poison()])
    assert len(seen) == PARAM_CHECK_READS - 1  # stopped at read 16, before its callbacks
    assert not (tmp_path / "checkpoint.pt").exists()


def test_data_holding_no_modality_is_one_usage_error():
    with pytest.raises(UsageError, match="the data hold no modality"):
        fit(small_vae_for(8), {}, epochs=1, batch_size=4, lr=1e-3, progress=False)


def small_vae_for(dim):
    return VAE(dim, latent_dim=2, hidden=(4,))


def test_ctrl_c_during_a_checkpoint_write_waits_for_the_file_to_be_whole(tmp_path):
    """A SIGINT that arrives inside the write is held until the file is complete, then raised as a
    KeyboardInterrupt (inside torch.save it used to surface as a RuntimeError and could cut the file)."""
    import os
    import signal

    from inference.checkpoint import atomic_write

    def write(f):
        f.write(b"first half ")
        os.kill(os.getpid(), signal.SIGINT)
        f.write(b"second half")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "c.bin", write)
    assert (tmp_path / "c.bin").read_bytes() == b"first half second half"


def test_fit_without_batch_size_or_lr_names_fit():
    """batch_size and lr have no default: leaving them out is a TypeError that names fit, not the Trainer."""
    with pytest.raises(TypeError, match=r"^fit\(\) missing required keyword argument\(s\): batch_size, lr$"):
        fit(small_vae_for(8), torch.zeros(4, 8), epochs=1)
    with pytest.raises(TypeError, match=r"^fit\(\) missing required keyword argument\(s\): lr$"):
        fit(small_vae_for(8), torch.zeros(4, 8), epochs=1, batch_size=2)
