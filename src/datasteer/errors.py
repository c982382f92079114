"""Typed exceptions raised by datasteer.

The CLI turns a :class:`ConfigError` into one line on stderr and exit code 2; library
code raises these so that callers can tell a bad configuration from a failure at run time.
"""


class DatasteerError(Exception):
    """Base class of every error datasteer raises on purpose."""


class ConfigError(DatasteerError, ValueError):
    """A configuration value is unknown, ill-typed or impossible.

    The message names the key (as a dotted path) and says what is allowed.
    """


class SteeringStateError(DatasteerError, RuntimeError):
    """Steering state is inconsistent (e.g. a checkpoint from another run, or a plan that
    arrives after the data loader already drew the steps it was meant for)."""


class NonFiniteInputError(DatasteerError, ArithmeticError):
    """An algorithm had no finite number to decide from (every loss, reward or feature it
    was given was NaN or infinite). The driver then keeps the previous decision (the
    proportions or selection in force, weight 1) and logs a warning; it is not a crash."""


class TrainingDivergedError(SteeringStateError):
    """The training loss was non-finite for ``max_nonfinite_steps`` consecutive optimizer
    steps; the run was stopped (the message names the step and the checkpoint to go back to)."""
