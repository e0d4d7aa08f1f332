"""Typed errors with the exit codes the CLI documents.

Every message is one line that names the problem and the fix. The CLI maps each class to
its exit code; library callers catch `ModecError`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_INFEASIBLE = 4
EXIT_INTERNAL = 5


class ModecError(Exception):
    """Base class: a failure the user can act on."""

    exit_code: int = EXIT_INTERNAL


class UsageError(ModecError):
    """The command line itself is wrong (unknown option, missing argument)."""

    exit_code = EXIT_USAGE


class BadInputError(ModecError):
    """A model, data file or option value that modec cannot use as given."""

    exit_code = EXIT_BAD_INPUT


class DataError(BadInputError):
    """A calibration or evaluation data file does not match what the model expects."""


class ModelError(BadInputError):
    """A model file is missing, unreadable, not ONNX, or not a form modec handles."""


class InfeasibleBudgetError(ModecError):
    """The bit budget cannot be met with the candidate widths."""

    exit_code = EXIT_INFEASIBLE


class InternalError(ModecError):
    """A bug in modec: the message says which pass failed after which."""

    exit_code = EXIT_INTERNAL
