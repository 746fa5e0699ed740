"""Inference utilities for any Pyro model/guide pair: ELBOs by spec, one SVI loop, evaluation."""

from .batching import check_finite
from .callbacks import Callback, Checkpoint, EarlyStopping, TensorBoard
from .checkpoint import load_checkpoint, save_checkpoint
from .diagnostics import MonteCarloKLWarning, NotABoundWarning, gradient_snr
from .elbo import ELBO_SPECS, make_elbo
from .errors import CheckpointError, NonFiniteLossError, UsageError
from .evaluate import Evaluation, evaluate, trace_log_weights
from .loss import StepLoss, make_step_loss
from .psis import khat_summary, psis_diagnostics, psis_khat
from .train import FitResult, Trainer, fit, resolve_device

__all__ = [
    "ELBO_SPECS",
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "StepLoss",
    "TensorBoard",
    "Trainer",
    "make_step_loss",
    "CheckpointError",
    "Evaluation",
    "FitResult",
    "MonteCarloKLWarning",
    "NotABoundWarning",
    "NonFiniteLossError",
    "UsageError",
    "check_finite",
    "evaluate",
    "fit",
    "gradient_snr",
    "khat_summary",
    "load_checkpoint",
    "make_elbo",
    "psis_diagnostics",
    "psis_khat",
    "resolve_device",
    "save_checkpoint",
    "trace_log_weights",
]
