"""Deep generative models as Pyro model/guide pairs."""

from ._version import __version__
from .data import DataSplit, load_dataset
from .gmm import GMM, em
from .multimodal import MultimodalVAE
from .multimodal_data import load_multimodal
from .ppca import PPCA
from .vade import VaDE
from .vae import VAE

__all__ = ["__version__", "GMM", "PPCA", "VAE", "DataSplit", "MultimodalVAE", "VaDE", "em", "load_dataset", "load_multimodal"]
