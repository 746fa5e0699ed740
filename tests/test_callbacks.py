"""The training engine's callbacks: validation split, early stopping, LR schedules, TensorBoard, stopping hooks."""

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn
from conftest import interrupt_on_call

from inference import Callback, Trainer, fit
from inference.checkpoint import load_checkpoint
from inference.errors import UsageError
from ppl_models.vae import VAE


class GaussianMean(nn.Module):
    """x_n ~ N(loc, 1) with no latent: the loss is exact (no Monte Carlo), so every number below is a closed form."""

    max_plate_nesting = 1

    def __init__(self):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(()))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(self.loc, 1.0), obs=x)

    def guide(self, x):
        pass


def _mean_log_normal(x, loc):
    return float(dist.Normal(loc, 1.0).log_prob(x).mean())


def test_validation_fraction_is_a_seeded_disjoint_split():
    x = torch.arange(100.0)
    a = Trainer(GaussianMean(), x, batch_size=10, lr=0.1, validation=0.2, seed=4, device="cpu")
    b = Trainer(GaussianMean(), x, batch_size=10, lr=0.1, validation=0.2, seed=4, device="cpu")
    c = Trainer(GaussianMean(), x, batch_size=10, lr=0.1, validation=0.2, seed=5, device="cpu")
    assert a.num_data == 80 and a.validation.shape == (20,)
    assert sorted(torch.cat([a.train_data, a.validation]).tolist()) == x.tolist()
    assert torch.equal(a.validation, b.validation) and not torch.equal(a.validation, c.validation)
    with pytest.raises(UsageError, match="validation fraction"):
        Trainer(GaussianMean(), x, batch_size=10, lr=0.1, validation=1.5, device="cpu")


def test_early_stopping_stops_at_the_patience_bound_and_restores_the_best_epoch(tmp_path):
    """Full-batch SGD on a Gaussian mean: loc_t = 2 (1 - 0.9^t) moves from 0 towards the training mean 2,
    so the validation ELBO (validation mean 1) rises until loc passes 1 (epoch 7: 1.043; epoch 6: 0.937)
    and falls after. With patience 3 training must stop after epoch 10 and restore epoch 7's loc."""
    train = torch.full((50,), 2.0)
    val = torch.full((10,), 1.0)
    module = GaussianMean()
    result = fit(module, train, validation=val, patience=3, epochs=100, batch_size=50, lr=0.1, optimizer="sgd",
                 progress=False, device="cpu", checkpoint_dir=tmp_path)
    locs = [2 * (1 - 0.9**t) for t in range(1, 11)]
    assert [r["epoch"] for r in result.history] == list(range(1, 11))
    for record, loc in zip(result.history, locs):
        assert record["val_elbo"] == pytest.approx(_mean_log_normal(val, torch.tensor(loc)), abs=1e-5)
    assert result.best_epoch == 7 and result.stopped_early
    assert float(module.loc.detach()) == pytest.approx(locs[6], abs=1e-6)
    assert result.history[-1].get("stopped") is True
    # the finished run's checkpoint holds the restored parameters; resuming it trains no further
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert float(state["module"]["loc"]) == pytest.approx(locs[6], abs=1e-6) and state["best_epoch"] == 7
    again = GaussianMean()
    resumed = fit(again, train, validation=val, patience=3, epochs=100, batch_size=50, lr=0.1, optimizer="sgd",
                  progress=False, device="cpu", checkpoint_dir=tmp_path, resume=True)
    assert len(resumed.history) == 10 and float(again.loc.detach()) == pytest.approx(locs[6], abs=1e-6)


def test_early_stopping_needs_validation_data():
    with pytest.raises(UsageError, match="validation"):
        fit(GaussianMean(), torch.zeros(10), patience=2, epochs=3, batch_size=5, lr=0.1, progress=False)


def test_a_callback_can_stop_training():
    class StopAfterTwo(Callback):
        def on_epoch_end(self, trainer, record):
            trainer.should_stop = record["epoch"] == 2

    result = fit(GaussianMean(), torch.zeros(10), callbacks=[StopAfterTwo()], epochs=9, batch_size=5, lr=0.1,
                 progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2] and result.stopped_early


@pytest.mark.parametrize("interval, expected", [
    ("epoch", [0.4, 0.4, 0.2, 0.2, 0.1]),          # StepLR(2, 0.5) after every epoch
    ("step", [0.4, 0.1, 0.025, 0.00625, 0.0015625]),  # after every step: 4 steps an epoch, halved every 2
])
def test_lr_follows_the_schedule(interval, expected):
    """The recorded learning rate is the one each epoch started with, and SGD moves loc by exactly lr * grad."""
    torch.manual_seed(0)
    module = GaussianMean()
    result = fit(module, torch.zeros(20), epochs=5, batch_size=5, lr=0.4, optimizer="sgd", progress=False,
                 scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
                 scheduler_interval=interval)
    assert [r["lr"] for r in result.history] == pytest.approx(expected, rel=1e-12)


def test_resume_with_a_scheduler_is_bit_identical(digits, tmp_path):
    """Interrupted in epoch 3 and resumed from the epoch-2 checkpoint, a run with a per-epoch scheduler
    (and a validation split) equals the uninterrupted run exactly on CPU: parameters, history and LRs."""
    train, _ = digits
    train = train.to("cpu")
    kwargs = dict(epochs=4, batch_size=128, lr=3e-3, seed=3, progress=False, validation=0.2, device="cpu",
                  scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7))

    torch.manual_seed(0)
    reference = VAE(train.dim, latent_dim=4, hidden=(32,))
    init = copy.deepcopy(reference.state_dict())
    calls, original = [0], reference.model

    def counted(x):
        calls[0] += 1
        return original(x)

    reference.model, at_epoch_end = counted, []
    expected = fit(reference, train, checkpoint_dir=tmp_path / "a", callbacks=[lambda r: at_epoch_end.append(calls[0])],
                   **kwargs)

    interrupted = VAE(train.dim, latent_dim=4, hidden=(32,))
    interrupted.load_state_dict(init)
    interrupt_on_call(interrupted, at_epoch_end[1] + 5)  # the same calls as the reference up to step 5 of epoch 3
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, train, checkpoint_dir=tmp_path / "b", **kwargs)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 2

    resumed = VAE(train.dim, latent_dim=4, hidden=(32,))
    got = fit(resumed, train, checkpoint_dir=tmp_path / "b", resume=True, **kwargs)
    assert [r["lr"] for r in got.history] == [r["lr"] for r in expected.history]
    assert [r["lr"] for r in got.history] == pytest.approx([3e-3 * 0.7**k for k in range(4)], rel=1e-12)
    assert [r["train_loss"] for r in got.history] == [r["train_loss"] for r in expected.history]
    assert [r["val_elbo"] for r in got.history] == [r["val_elbo"] for r in expected.history]
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_tensorboard_event_file_holds_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, val = torch.linspace(-1, 3, 40), torch.ones(8)
    result = fit(GaussianMean(), train, validation=val, epochs=3, batch_size=10, lr=0.1, progress=False,
                 tensorboard=tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/loss", "val/elbo", "lr", "time/epoch_seconds"} <= set(events.Tags()["scalars"])
    for tag, key in (("train/loss", "train_loss"), ("val/elbo", "val_elbo"), ("lr", "lr")):
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [1, 2, 3]
        # TensorBoard stores float32
        assert [e.value for e in logged] == pytest.approx([r[key] for r in result.history], rel=1e-6)


@pytest.mark.parametrize("options, message", [
    (dict(scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt), scheduler_interval="step"),
     "ReduceLROnPlateau steps on the validation ELBO once an epoch"),
    (dict(scheduler="not a function"), "scheduler must be a function of the optimiser"),
    (dict(callbacks=[Callback]), r"pass Callback\(...\), not the class"),
    (dict(resume=True), "resume=True needs the checkpoint_dir"),
    (dict(patience=2), "there is no validation data"),
])
def test_engine_misuse_is_one_usage_error(options, message):
    with pytest.raises(UsageError, match=message):
        fit(GaussianMean(), torch.zeros(10), epochs=2, batch_size=5, lr=0.1, progress=False, **options)


def test_a_file_where_a_folder_is_expected_is_refused_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    module = GaussianMean()
    for options in (dict(checkpoint_dir=blocker), dict(tensorboard=blocker)):
        with pytest.raises(UsageError, match="is a file, not a folder"):
            fit(module, torch.ones(10), epochs=2, batch_size=5, lr=0.1, progress=False, **options)
        assert float(module.loc.detach()) == 0.0  # no step was taken
