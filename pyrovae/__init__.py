"""pyrovae: the variational autoencoder of the design notes as a Pyro program.

The few names a user needs::

    from pyrovae import TrainConfig, train, load_run, load_dataset, estimate_log_px, evaluate

Everything else lives in its module (``pyrovae.model``, ``pyrovae.priors``, ...).
"""

from .config import TrainConfig
from .data import Dataset, load_dataset
from .marginal import estimate_log_px
from .metrics import evaluate
from .model import VAE, build_model
from .runs import load_run
from .training import train

__all__ = ["TrainConfig", "train", "load_run", "load_dataset", "Dataset", "VAE", "build_model", "estimate_log_px",
           "evaluate"]
__version__ = "0.1.0"
