"""Deep generative models as Pyro model/guide pairs."""

from .data import DataSplit, load_dataset
from .multimodal import MultimodalVAE
from .multimodal_data import load_multimodal
from .vae import VAE

__version__ = "0.1.0"
__all__ = ["VAE", "DataSplit", "MultimodalVAE", "load_dataset", "load_multimodal"]
