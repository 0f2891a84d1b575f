"""quantkit's error types. The CLI turns these into one line on stderr.

QuantkitError       anything that went wrong for a reason we can explain (exit 1)
  UsageError        bad arguments or input named by the user (exit 2)
    RecipeError     a recipe file that does not validate
  FormatError       a packed format or artifact that is inconsistent
  CheckpointError   a model or artifact file that is missing, corrupt or truncated
  KernelUnavailable a native kernel was required but is not built
"""


class QuantkitError(Exception):
    """Base class: an error with a message meant for the user."""

    exit_code = 1


class UsageError(QuantkitError):
    exit_code = 2


class RecipeError(UsageError):
    pass


class FormatError(QuantkitError):
    pass


class CheckpointError(QuantkitError):
    pass


class KernelUnavailable(QuantkitError):
    pass
