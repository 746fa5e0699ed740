"""Deep generative models as Pyro model/guide pairs."""

from .data import DataSplit, load_dataset
from .vae import VAE

__version__ = "0.1.0"
__all__ = ["VAE", "DataSplit", "load_dataset"]
