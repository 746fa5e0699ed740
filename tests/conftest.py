"""Shared test set-up: Pyro validation on, a clean param store and fixed seeds for every test."""

import pyro
import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA")])]


@pytest.fixture(autouse=True)
def pyro_state():
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="session")
def digits():
    from ppl_models.data import load_dataset

    return load_dataset("digits", binarize="dynamic")


def interrupt_on_call(module, call):
    """Make ``module.model`` raise KeyboardInterrupt on its ``call``-th call (a kill in the middle of training)."""
    calls, original = {"n": 0}, module.model

    def flaky_model(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    module.model = flaky_model
    return module


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module on one torch thread (tiny tensors; threads only add overhead), then restore."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
