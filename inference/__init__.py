"""Inference utilities for any Pyro model/guide pair: ELBOs by spec, one SVI loop, evaluation."""

from .batching import check_finite
from .checkpoint import load_checkpoint, save_checkpoint
from .elbo import ELBO_SPECS, make_elbo
from .errors import CheckpointError, NonFiniteLossError, UsageError
from .evaluate import Evaluation, evaluate, trace_log_weights
from .train import FitResult, fit, resolve_device

__all__ = [
    "ELBO_SPECS",
    "CheckpointError",
    "Evaluation",
    "FitResult",
    "NonFiniteLossError",
    "UsageError",
    "check_finite",
    "evaluate",
    "fit",
    "load_checkpoint",
    "make_elbo",
    "resolve_device",
    "save_checkpoint",
    "trace_log_weights",
]
