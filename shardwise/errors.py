"""Errors a user can cause. Each message says what went wrong and what to do about it.

The CLI prints these without a traceback and exits with code 2 (bad input) or 1 (failure).
"""

from __future__ import annotations

__all__ = [
    "ShardwiseError",
    "UserInputError",
    "ClusterSpecError",
    "UnsupportedOpError",
    "TraceError",
    "PlanError",
    "ConstraintError",
    "PlanFileError",
    "DoesNotFitError",
    "ShapeMismatchError",
    "DeviceUnavailableError",
    "RuntimeFault",
    "CheckpointError",
    "SolverError",
]


class ShardwiseError(Exception):
    """Base class of every error shardwise raises on purpose."""

    exit_code = 1


class UserInputError(ShardwiseError):
    """Bad input: a file, an argument or a model that shardwise cannot accept as given."""

    exit_code = 2


class ClusterSpecError(UserInputError):
    """A cluster spec (preset name or YAML file) is malformed or contradictory."""


class UnsupportedOpError(UserInputError):
    """The model uses an op that the op registry does not know and that cannot run replicated."""


class TraceError(UserInputError):
    """torch.export could not trace the model with the given example inputs."""


class PlanError(ShardwiseError):
    """No valid plan could be made (for example: the constraints contradict the cluster)."""


class ConstraintError(PlanError, UserInputError):
    """A constraint names an unknown choice, a value outside what is allowed, or more devices than the cluster."""

    exit_code = 2


class PlanFileError(UserInputError):
    """A plan file is unreadable, of another schema version, or made for another model or cluster."""


class DoesNotFitError(UserInputError):
    """The model cannot fit on the cluster under any plan shardwise can make."""


class ShapeMismatchError(UserInputError):
    """Inputs whose shapes or dtypes the plan does not cover."""


class DeviceUnavailableError(UserInputError):
    """The plan needs devices (or processes) this machine cannot provide."""


class RuntimeFault(ShardwiseError):
    """A worker process died, hung or raised while running a plan."""


class CheckpointError(UserInputError):
    """A checkpoint is missing, corrupt, truncated or does not match the model."""


class SolverError(ShardwiseError):
    """A solver failed in a way that left no usable solution."""
