"""Every model and objective trains on the device of its data and its state reloads on the CPU.

Parametrised over the ``device`` fixture: the CUDA cases run where CUDA is
available (skipped elsewhere); the CPU cases check the same properties here.
For each model and ELBO (and the compiled path with the model's first ELBO;
``tests/test_speed_paths.py`` checks it for every ELBO), one short epoch with a checkpoint,
then: parameters, buffers, ``pyro.param`` values and samples live on the run's
device; the checkpoint loads with ``map_location="cpu"`` into a module built on
the CPU with bit-identical weights; and training resumes from it on the CPU.

Adding a model is one entry in ``MODELS``.
"""

from dataclasses import dataclass, field
from typing import Callable

import pyro
import pytest
import torch

from inference import StepLoss, fit, load_checkpoint, make_elbo, make_step_loss
from inference.checkpoint import FILENAME
from ppl_models.gmm import GMM
from ppl_models.multimodal import MultimodalVAE, modality
from ppl_models.ppca import PPCA
from ppl_models.vade import VaDE
from ppl_models.vae import VAE


def _on(module, *shape):
    """A tensor of zeros on the module's device: the inputs of score-only checks."""
    return torch.zeros(*shape, device=next(module.parameters()).device)


def _halves(split):
    """digits as a three-modality dict: top half, bottom half, label."""
    return {"top": split.x[:, :32], "bottom": split.x[:, 32:], "label": split.y}


def _mvae(rule):
    specs = [modality("top", 32, "cbernoulli", (1, 4, 8)), modality("bottom", 32, "cbernoulli", (1, 4, 8)),
             modality("label", 10, "categorical")]
    return lambda s: MultimodalVAE(specs, latent_dim=4, hidden=(32,), rule=rule, rho=0.3 if rule == "code" else 0.0)


@dataclass
class Case:
    build: Callable  # (training DataSplit) -> a fresh module on the CPU
    data: Callable = lambda split: split  # (training DataSplit) -> what fit trains on (tensor, dict or DataSplit)
    elbos: tuple = ("trace", "meanfield", "iwae:3")
    sample: Callable = lambda module: module.sample(4)  # -> tensor or dict of tensors
    fit_options: dict = field(default_factory=dict)


MODELS = {
    "vae-mlp": Case(lambda s: VAE(s.dim, latent_dim=4, hidden=(32,))),
    "vae-conv": Case(lambda s: VAE(s.dim, latent_dim=4, arch="conv", image_shape=s.image_shape)),
    "vade": Case(lambda s: VaDE(s.dim, n_clusters=3, latent_dim=4, hidden=(32,))),
    "gmm": Case(lambda s: GMM(s.dim, 3), data=lambda s: s.x, elbos=("enum",),
                sample=lambda m: m.log_marginal(_on(m, 2, m.config["x_dim"]))),
    "ppca": Case(lambda s: PPCA(s.dim, 3), data=lambda s: s.x.float(), elbos=("trace", "meanfield", "iwae:3"),
                 sample=lambda m: m.marginal().sample((4,))),
    "mvae-mopoe": Case(_mvae("mopoe"), data=_halves, elbos=("trace",)),
    "mvae-code": Case(_mvae("code"), data=_halves, elbos=("trace", "meanfield")),
}

CASES = [
    pytest.param(name, spec, compiled, id=f"{name}-{spec}{'-compiled' if compiled else ''}")
    for name, case in MODELS.items()
    for spec in case.elbos
    # the compiled path once per model (enumeration has none); aot_eager: the same flattened graph, cheap to build
    for compiled in ((False, "aot_eager") if spec == case.elbos[0] and spec != "enum" else (False,))
]


def _tensors(obj):
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    return [obj] if torch.is_tensor(obj) else []


def _same_device(t, device):
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


@pytest.fixture(scope="module")
def small_digits():
    from dataclasses import replace

    from ppl_models.data import load_dataset

    train, _ = load_dataset("digits", binarize="dynamic")
    cut = lambda t: None if t is None else t[:64]  # noqa: E731
    return replace(train, x=cut(train.x), y=cut(train.y), grey=cut(train.grey))


@pytest.mark.filterwarnings("ignore::inference.diagnostics.MonteCarloKLWarning")  # VaDE's mixture prior under meanfield
@pytest.mark.parametrize("name, spec, compiled", CASES)
def test_trains_on_device_and_reloads_on_cpu(name, spec, compiled, device, small_digits, tmp_path):
    case = MODELS[name]
    module = case.build(small_digits)
    data = case.data(small_digits)
    common = dict(elbo=spec, batch_size=32, lr=1e-3, progress=False, compile=compiled, checkpoint_dir=tmp_path,
                  seed=1)
    result = fit(module, data, epochs=1, device=device, **common, **case.fit_options)

    assert result.device == device and torch.isfinite(torch.tensor(result.history[-1]["train_loss"]))
    for t in list(module.parameters()) + list(module.buffers()):
        assert _same_device(t, device)
    for _, value in pyro.get_param_store().named_parameters():
        assert _same_device(value, device)
    samples = _tensors(case.sample(module))
    assert samples and all(_same_device(s, device) and torch.isfinite(s).all() for s in samples)

    # the checkpoint maps onto the CPU: every tensor there, the weights bit-identical
    state = load_checkpoint(tmp_path / FILENAME, map_location="cpu")
    assert all(t.device.type == "cpu" for t in state["module"].values())
    on_cpu = case.build(small_digits)
    on_cpu.load_state_dict(state["module"])
    for key, value in module.state_dict().items():
        assert torch.equal(on_cpu.state_dict()[key], value.cpu()), key

    # and training resumes from it on the CPU
    resumed = case.build(small_digits)
    again = fit(resumed, data, epochs=2, device="cpu", resume=True, **common, **case.fit_options)
    assert [r["epoch"] for r in again.history] == [1, 2]
    assert all(p.device.type == "cpu" for p in resumed.parameters())
    assert all(torch.isfinite(s).all() for s in _tensors(case.sample(resumed)))


def _no_host_sync():
    """torch's sync debug mode as a context: any op that waits on the GPU raises."""
    import contextlib

    @contextlib.contextmanager
    def mode():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)

    return mode()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("spec", ["trace", "meanfield", "iwae:3"])
def test_training_step_never_waits_on_the_gpu(spec, compiled, small_digits):
    """Loss, backward and Adam step issue no host synchronisation (Pyro's own Trace_ELBO reads .item() per site)."""
    device = torch.device("cuda")
    module = MODELS["vae-mlp"].build(small_digits).to(device)
    x = small_digits.x[:32].to(device)
    _, elbo = make_step_loss(spec, max_plate_nesting=1, compile=compiled)
    assert isinstance(elbo, StepLoss)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)

    def step():
        loss = elbo.differentiable_loss(module.model, module.guide, x)
        (loss / x.shape[0]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with pyro.validation_enabled(False):
        for _ in range(3):  # compiling and the two checked calls do read the device
            step()
        with _no_host_sync():
            for _ in range(3):
                step()
        if spec == "trace":  # the test has teeth: Pyro's loss reads every site's log-density sum
            with pytest.raises(RuntimeError), _no_host_sync():
                make_elbo("trace", max_plate_nesting=1).differentiable_loss(module.model, module.guide, x)
