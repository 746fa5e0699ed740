"""The compiled loss path (torch.compile) and how ``fit`` chooses it by default.

* The rule :func:`inference.loss.worth_compiling` (exact arithmetic), per path.
* ``fit``'s default: eager for a short run; the paths the rule admits are built
  and timed on the first batch and the fastest is kept; the
  choice recorded in each history record and the checkpoint; a resumed run keeps
  the recorded choice and equals the uninterrupted run bit for bit (CPU, same
  seed: the compiled loss draws from the same generator as the eager one).
* Pyro's validation runs on the first calls of each signature only.
* No deprecated PyTorch API on any training path: torch's ``FutureWarning`` and
  ``DeprecationWarning`` are errors while ``fit`` runs the eager, the
  ``aot_eager`` and the inductor path (the one inductor compilation of the test
  suite, on a tiny network).

Most tests use the ``aot_eager`` backend (the same flattened graph, no code
generation): it is cheap, and what it checks (flattening, keying, checks,
recording) does not depend on the backend.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.util import is_validation_enabled
from torch.fx.experimental.proxy_tensor import make_fx

import inference.loss as loss_module
import inference.train as train_module
from inference import Trainer, fit
from inference.checkpoint import FILENAME, load_checkpoint
from inference.loss import (
    COMPILE_SECONDS,
    COMPILED_SAVING,
    FLAT,
    FLAT_SAVING,
    FLAT_SECONDS,
    MIN_COMPILE_STEPS,
    StepLoss,
    make_step_loss,
    worth_compiling,
)
from ppl_models.vae import VAE

RTOL = 1e-5  # as tests/test_speed_paths.py: same float32 ops on the same draws


def _vae(seed=0):
    torch.manual_seed(seed)
    return VAE(64, latent_dim=4, hidden=(16,))


def _params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_worth_compiling_is_the_stated_rule():
    c = COMPILE_SECONDS["cpu"]
    steps = 10 * MIN_COMPILE_STEPS
    needed = c / (steps * COMPILED_SAVING)  # the eager step time at which compiling just repays
    assert not worth_compiling(needed * 0.99, steps, "cpu")
    assert worth_compiling(needed * 1.01, steps, "cpu")
    # below MIN_COMPILE_STEPS nothing is compiled, however slow the step
    assert not worth_compiling(1e6, MIN_COMPILE_STEPS - 1, "cpu")
    # an unlisted device type uses 60 s
    assert worth_compiling(60.0 / (steps * COMPILED_SAVING) * 1.01, steps, "mps")
    assert not worth_compiling(60.0 / (steps * COMPILED_SAVING) * 0.99, steps, "mps")
    # the flat path: its own (small) cost and saving, the same on every device type
    needed = FLAT_SECONDS / (steps * FLAT_SAVING)
    for device in ("cpu", "cuda", "mps"):
        assert not worth_compiling(needed * 0.99, steps, device, backend=FLAT)
        assert worth_compiling(needed * 1.01, steps, device, backend=FLAT)
    assert not worth_compiling(1e6, MIN_COMPILE_STEPS - 1, "cpu", backend=FLAT)
    # a run that repays flattening but not inductor's compilation
    t = 2 * needed
    assert worth_compiling(t, steps, "cpu", backend=FLAT) and not worth_compiling(t, steps, "cpu")


def _cheap_compiler(monkeypatch, worth, faster=True, path="aot_eager"):
    """fit's automatic choice with a cheap backend, a forced verdict of the rule, and step times (seconds:
    eager 1.0, compiled 0.5 or 2.0) in place of the measured ones."""
    monkeypatch.setattr(train_module, "DEFAULT_PATHS", (path,))
    monkeypatch.setattr(train_module, "MIN_COMPILE_STEPS", 1)
    monkeypatch.setattr(train_module, "worth_compiling", lambda t, steps, device, backend: worth)
    monkeypatch.setattr(train_module.Trainer, "_step_seconds",
                        lambda self, loss, calls=3: 1.0 if self.loss.backend is None else (0.5 if faster else 2.0))


def test_default_is_eager_for_a_short_run(digits):
    """A run of a few steps is not worth a compilation: no step is measured, nothing compiled."""
    result = fit(_vae(), digits[0].x[:128], epochs=2, batch_size=32, lr=1e-3, device="cpu", progress=False)
    assert [r["loss_path"] for r in result.history] == ["eager", "eager"]
    assert isinstance(result.loss, StepLoss) and not result.loss.compiled


@pytest.mark.parametrize("worth, path", [(True, "aot_eager"), (False, "eager")])
def test_default_follows_the_rule_and_records_it(worth, path, digits, tmp_path, monkeypatch):
    _cheap_compiler(monkeypatch, worth)
    result = fit(_vae(), digits[0].x[:100], epochs=2, batch_size=32, lr=1e-3, device="cpu", progress=False,
                 checkpoint_dir=tmp_path)
    assert [r["loss_path"] for r in result.history] == [path, path]
    assert len(result.loss.compiled) == (1 if worth else 0)  # the full batch; the ragged one (4 rows) stays eager
    state = load_checkpoint(tmp_path / FILENAME)
    assert state["settings"]["loss_path"] == path and state["history"][-1]["loss_path"] == path


def test_default_keeps_eager_when_the_compiled_step_is_not_faster(digits, monkeypatch):
    _cheap_compiler(monkeypatch, True, faster=False)
    trainer = Trainer(_vae(), digits[0].x[:64], batch_size=32, lr=1e-3, device="cpu")
    trainer.run(1, progress=False)
    assert trainer.history[0]["loss_path"] == "eager" and trainer.loss.backend is None
    assert trainer.settings["step_seconds"] == {"eager": 1.0, "aot_eager": 2.0}


def test_the_probe_compiles_and_times_both_steps_without_changing_training(digits, monkeypatch):
    """The real probe (no step times patched): it compiles on the first batch and times both steps, and the run
    that follows equals an eager run (the probe restores the random state and drops its gradients)."""
    x = digits[0].x[:64]
    monkeypatch.setattr(train_module, "DEFAULT_PATHS", ("aot_eager",))
    monkeypatch.setattr(train_module, "MIN_COMPILE_STEPS", 1)
    monkeypatch.setattr(train_module, "worth_compiling", lambda t, steps, device, backend: True)
    probed = Trainer(_vae(), x, batch_size=32, lr=1e-2, device="cpu", seed=2)
    probed.run(2, progress=False)
    seconds = probed.settings["step_seconds"]
    assert set(seconds) == {"eager", "aot_eager"} and min(seconds.values()) > 0
    assert len(probed.loss.compiled) == 1 and not probed.loss.fallbacks
    assert probed.history[0]["loss_path"] == ("aot_eager" if seconds["aot_eager"] < seconds["eager"] else "eager")
    eager = Trainer(_vae(), x, batch_size=32, lr=1e-2, device="cpu", seed=2, compile=False)
    eager.run(2, progress=False)
    for a, b in zip(eager.history, probed.history):
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=RTOL)


@pytest.mark.parametrize("eager_seconds, times, chosen", [
    # flattening repays over 16 steps (16 * 1.0 * 0.15 > 0.5 s), a 40 s compilation does not: only flat is tried
    (1.0, {FLAT: 0.5, "aot_eager": 0.1}, FLAT),
    # both repay (16 * 100 * 0.2 > 40 s): both are built and timed, the fastest kept
    (100.0, {FLAT: 50.0, "aot_eager": 40.0}, "aot_eager"),
    (100.0, {FLAT: 50.0, "aot_eager": 60.0}, FLAT),
    # neither step is faster than eager: eager
    (100.0, {FLAT: 100.0, "aot_eager": 120.0}, "eager"),
])
def test_default_tries_the_paths_each_run_repays_and_keeps_the_fastest(eager_seconds, times, chosen, digits,
                                                                        monkeypatch):
    """The cost-aware rule per path (the real worth_compiling; step times stated instead of measured), each
    admitted path really built on the first batch (flat, and aot_eager standing for inductor)."""
    monkeypatch.setattr(train_module, "DEFAULT_PATHS", (FLAT, "aot_eager"))
    monkeypatch.setattr(train_module, "MIN_COMPILE_STEPS", 1)
    monkeypatch.setattr(loss_module, "MIN_COMPILE_STEPS", 1)
    measure = train_module.Trainer._step_seconds

    def stated(self, loss, calls=3):
        measure(self, loss, calls)  # builds and checks the candidate's graph, as the probe does
        return eager_seconds if self.loss.backend is None else times[self.loss.backend]

    monkeypatch.setattr(train_module.Trainer, "_step_seconds", stated)
    trainer = Trainer(_vae(), digits[0].x[:256], batch_size=32, lr=1e-3, device="cpu")
    trainer.run(2, progress=False)  # 2 epochs of 8 steps
    tried = [b for b in (FLAT, "aot_eager") if b == FLAT or eager_seconds == 100.0]
    assert trainer.settings["step_seconds"] == {"eager": eager_seconds, **{b: times[b] for b in tried}}
    assert [r["loss_path"] for r in trainer.history] == [chosen, chosen]
    assert {key[0] for key in trainer.loss.compiled} == set(tried) and not trainer.loss.fallbacks
    assert trainer.loss.backend == (None if chosen == "eager" else chosen)


def test_a_path_that_falls_back_is_not_kept(digits, monkeypatch):
    """A candidate whose graph cannot be built warns (naming the reason) and is not chosen, however fast."""
    monkeypatch.setattr(train_module, "DEFAULT_PATHS", (FLAT,))
    monkeypatch.setattr(train_module, "MIN_COMPILE_STEPS", 1)
    monkeypatch.setattr(train_module, "worth_compiling", lambda t, steps, device, backend: True)
    measure = train_module.Trainer._step_seconds
    monkeypatch.setattr(train_module.Trainer, "_step_seconds",
                        lambda self, loss, calls=3: (measure(self, loss, calls),
                                                     1.0 if self.loss.backend is None else 0.1)[1])

    def broken(*args, **kwargs):
        raise RuntimeError("no graph today")

    monkeypatch.setattr(loss_module, "make_fx", lambda f: broken)
    trainer = Trainer(_vae(), digits[0].x[:64], batch_size=32, lr=1e-3, device="cpu")
    with pytest.warns(UserWarning, match="make_fx failed .*no graph today"):
        trainer.run(1, progress=False)
    assert trainer.history[0]["loss_path"] == "eager" and trainer.settings["step_seconds"] == {"eager": 1.0}


def test_compile_false_and_jit_alias(digits, monkeypatch):
    _cheap_compiler(monkeypatch, True)
    x = digits[0].x[:64]
    result = fit(_vae(), x, epochs=1, batch_size=32, lr=1e-3, device="cpu", progress=False, compile=False)
    assert result.history[0]["loss_path"] == "eager" and not result.loss.compiled
    with pytest.warns(FutureWarning, match="jit= is deprecated"):
        result = fit(_vae(), x, epochs=1, batch_size=32, lr=1e-3, device="cpu", progress=False, jit=False)
    assert result.history[0]["loss_path"] == "eager"


@pytest.mark.parametrize("path", ["aot_eager", FLAT])
def test_resume_keeps_the_recorded_path_and_is_exact(path, digits, tmp_path, monkeypatch):
    """Uninterrupted (compiled by the rule) == 1 epoch + resume, even when the rule now says eager."""
    x = digits[0].x[:96]
    common = dict(batch_size=32, lr=1e-2, device="cpu", progress=False, seed=3)
    _cheap_compiler(monkeypatch, True, path=path)
    full = _vae()
    whole = fit(full, x, epochs=3, checkpoint_dir=tmp_path / "a", **common)
    part = _vae()
    fit(part, x, epochs=1, checkpoint_dir=tmp_path / "b", **common)
    _cheap_compiler(monkeypatch, False)  # a fresh choice would now be eager
    pyro.clear_param_store()
    resumed_module = _vae()
    resumed = fit(resumed_module, x, epochs=3, checkpoint_dir=tmp_path / "b", resume=True, **common)
    assert [r["loss_path"] for r in resumed.history] == [path] * 3
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]
    assert torch.equal(_params(resumed_module), _params(full))


def test_validation_runs_on_the_first_calls_of_each_signature():
    seen = []

    def model(x):
        seen.append(is_validation_enabled())
        loc = pyro.param("loc", torch.zeros(()))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(x):
        pass

    loss = StepLoss(make_step_loss("trace")[0])
    for rows in (5, 5, 5, 5, 7, 7, 7, 5):
        loss.differentiable_loss(model, guide, torch.zeros(rows))
    assert seen == [True, True, False, False, True, True, False, False]
    with pyro.validation_enabled(False):  # never switched on by the wrapper
        loss.differentiable_loss(model, guide, torch.zeros(9))
    assert seen[-1] is False


def test_no_deprecated_torch_api_on_any_training_path(digits):
    """Every path, inductor included, trains with torch's FutureWarning/DeprecationWarning as errors, and the
    inductor graph (fallback_random: the same draws) gives the eager run's losses and parameters."""
    x = digits[0].x[:64]
    runs = {}
    for compile in (False, FLAT, "aot_eager", True, None):
        torch.manual_seed(0)
        module = VAE(64)  # the default network: its compiled backward donates buffers (no retain_graph allowed)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            result = fit(module, x, epochs=2, batch_size=32, lr=1e-2, device="cpu", progress=False, seed=1,
                         compile=compile)
        assert not getattr(result.loss, "fallbacks", None)
        runs[compile] = (result, _params(module))
    assert runs[True][0].history[0]["loss_path"] == "inductor" and len(runs[True][0].loss.compiled) == 1
    assert runs[None][0].history[0]["loss_path"] == "eager"
    (eager, p_eager) = runs[False]
    assert runs[FLAT][0].history[0]["loss_path"] == FLAT and len(runs[FLAT][0].loss.compiled) == 1
    for compile in (FLAT, "aot_eager", True):
        result, p = runs[compile]
        for a, b in zip(eager.history, result.history):
            assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=RTOL)
        # 4 Adam steps: float differences of a few ulps stay tiny relative to the weights' scale
        assert torch.allclose(p_eager, p, rtol=1e-4, atol=1e-5)


def _ops(graph):
    return [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]


def test_simplify_drops_identities_and_folds_constants_exactly():
    """The flattened graph's clean-up leaves values and gradients bit-identical, removes the identity ops
    (expand to the same shape, + 0, * 1, / 1) and computes the constant-only ops once."""
    scale = torch.tensor([0.5, 2.0, 3.0])

    def f(a, x):
        prior = torch.log(scale.expand(3) ** 2) * 2  # constants only: folded
        value = (a * x + torch.zeros_like(x)).expand(3) * 1.0 / 1.0 - 0
        return ((value - prior) ** 2).sum() + 0.0

    a, x = torch.randn(3, requires_grad=True), torch.randn(3)
    graph = make_fx(f)(a, x)
    before = graph(a, x)
    (grad_before,) = torch.autograd.grad(before, a)
    loss_module._simplify(graph)
    after = graph(a, x)
    (grad_after,) = torch.autograd.grad(after, a)
    assert torch.equal(before, after) and torch.equal(grad_before, grad_after)
    assert torch.equal(after, f(a, x))
    ops = _ops(graph)
    assert not {"aten.expand.default", "aten.zeros_like.default", "aten.log.default", "aten.div.Tensor"} & set(ops)
    # left: a * x, and + zeros (zeros_like, folded, is a constant operand, not an identity)
    assert ops.count("aten.mul.Tensor") == 1 and ops.count("aten.add.Tensor") == 1


def test_simplify_keeps_values_that_are_written_in_place():
    """A constant-derived value that an in-place op writes into is computed each call, not shared between calls."""
    c = torch.ones(3)

    def f(a):
        buffer = c * 2
        buffer.add_(a)
        return buffer.sum()

    a = torch.ones(3)
    graph = make_fx(f)(a)
    loss_module._simplify(graph)
    assert [float(graph(a)) for _ in range(3)] == [9.0, 9.0, 9.0]


def test_the_probe_times_the_paths_in_turn_and_keeps_each_fastest(digits, monkeypatch):
    """After the candidate is built, eager and it are timed taking turns (PROBE_ROUNDS rounds), and each path's
    fastest step is its time: a burst of outside load on one round (here eager's first and flat's last) does
    not decide the choice."""
    monkeypatch.setattr(train_module, "DEFAULT_PATHS", (FLAT,))
    monkeypatch.setattr(train_module, "MIN_COMPILE_STEPS", 1)
    monkeypatch.setattr(train_module, "worth_compiling", lambda t, steps, device, backend: True)
    measure = train_module.Trainer._step_seconds
    timed = {None: iter([3.0, 9.0, 2.0, 2.5]), FLAT: iter([1.0, 1.5, 1.2, 8.0])}  # first: the probe's own calls
    order = []

    def stated(self, loss, calls=3):
        measure(self, loss, calls)
        order.append((self.loss.backend, calls))
        return next(timed[self.loss.backend])

    monkeypatch.setattr(train_module.Trainer, "_step_seconds", stated)
    trainer = Trainer(_vae(), digits[0].x[:64], batch_size=32, lr=1e-3, device="cpu")
    trainer.run(1, progress=False)
    rounds = train_module.PROBE_ROUNDS
    assert order == [(None, 3), (FLAT, 3)] + [(None, 1), (FLAT, 1)] * rounds
    assert trainer.settings["step_seconds"] == {"eager": 2.0, FLAT: 1.2}
    assert trainer.history[0]["loss_path"] == FLAT
