"""Exceptions that mean "the input was wrong", as opposed to a bug.

The command line turns these (and only these) into one line on stderr and a
non-zero exit; anything else is a bug and keeps its traceback.
"""


class UsageError(ValueError):
    """Bad input from a user: an unknown name, a bad value, bad data."""


class CheckpointError(UsageError):
    """A checkpoint that is missing, corrupt, or belongs to another model."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


class DivergenceError(NonFiniteLossError):
    """Training diverged: non-finite parameters or network outputs, or a loss that grew by orders of magnitude."""


__all__ = ["UsageError", "CheckpointError", "NonFiniteLossError", "DivergenceError"]
