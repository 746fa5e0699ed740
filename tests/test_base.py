"""The models' shared config mechanism: run folders written before the typed configs still load."""

import dataclasses
import inspect
import json

import pytest
import torch

from inference.errors import UsageError
from ppl_models.base import ModelConfig
from ppl_models.gmm import GMM, GMMConfig
from ppl_models.multimodal import MultimodalVAE, MultimodalVAEConfig
from ppl_models.ppca import PPCA, PPCAConfig
from ppl_models.vade import VaDE, VaDEConfig
from ppl_models.vae import VAE, VAEConfig

# the "module" entry of config.json as the version before the typed configs wrote it, one per model (copied verbatim)
OLD_CONFIGS = {
    VAE: '{"x_dim": 64, "latent_dim": 16, "hidden": [32], "likelihood": "normal:0.1", "beta": 1.0, "arch": "conv", '
         '"image_shape": [1, 8, 8], "activation": "relu"}',
    PPCA: '{"x_dim": 5, "latent_dim": 2, "guide": "full", "sigma": null, "min_sigma": 0.001}',
    GMM: '{"x_dim": 3, "n_components": 2, "covariance": "full", "min_scale": 0.001, "mean_prior_scale": 2.0, '
         '"weight_concentration": null}',
    VaDE: '{"x_dim": 64, "latent_dim": 4, "hidden": [32], "likelihood": "bernoulli", "arch": "mlp", '
          '"image_shape": null, "activation": "relu", "n_clusters": 3, "min_scale": 0.001}',
    MultimodalVAE: '{"modalities": [{"name": "top", "dim": 32, "likelihood": "cbernoulli", "image_shape": [1, 4, 8]}, '
                   '{"name": "label", "dim": 10, "likelihood": "categorical", "image_shape": null}], "latent_dim": 4, '
                   '"hidden": [16], "rule": "code", "rho": 0.2, "prior_expert": false, "objective": "subset", '
                   '"subset_weights": "uniform", "subset_entropy": 1.0, "beta": 1.0, "private_dim": 0, "arch": "mlp", '
                   '"activation": "relu"}',
}
CONFIG_CLASSES = {VAE: VAEConfig, PPCA: PPCAConfig, GMM: GMMConfig, VaDE: VaDEConfig, MultimodalVAE: MultimodalVAEConfig}


@pytest.mark.parametrize("cls", list(OLD_CONFIGS), ids=lambda c: c.__name__)
def test_old_config_rebuilds_the_same_model(cls):
    old = json.loads(OLD_CONFIGS[cls])
    torch.manual_seed(0)
    module = cls.from_config(old)
    assert isinstance(module.cfg, CONFIG_CLASSES[cls])
    assert module.config == old  # same keys, same values: a new run folder reads as an old one
    assert json.loads(json.dumps(module.config)) == module.config  # JSON-ready
    again = cls.from_config(module.config)  # from what this version writes, then from the typed object
    again.load_state_dict(module.state_dict())  # same parameters, same shapes
    assert cls.from_config(module.cfg).config == old


@pytest.mark.parametrize("cls", list(CONFIG_CLASSES), ids=lambda c: c.__name__)
def test_config_fields_are_constructor_arguments(cls):
    fields = [f.name for f in dataclasses.fields(CONFIG_CLASSES[cls])]
    assert issubclass(CONFIG_CLASSES[cls], ModelConfig)
    assert set(fields) <= set(inspect.signature(cls).parameters)


def test_missing_keys_take_the_constructor_defaults():
    m = VAE.from_config({"x_dim": 10})
    assert m.config == {"x_dim": 10, "latent_dim": 16, "hidden": [256], "likelihood": "bernoulli", "beta": 1.0,
                        "arch": "mlp", "image_shape": None, "activation": "relu"}


def test_vade_config_has_its_own_keys_and_no_beta():
    config = VaDE(8, n_clusters=2, latent_dim=2, hidden=(4,)).config
    assert set(config) == {f.name for f in dataclasses.fields(VaDEConfig)} and "beta" not in config


def test_unknown_key_is_a_usage_error():
    with pytest.raises(UsageError, match="VAE takes no argument 'n_clusters'"):
        VAE.from_config({"x_dim": 10, "n_clusters": 3})
