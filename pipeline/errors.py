"""The errors a user fixes, not a retry: every one ends a run with exit status 2 and a message
that names the file, the field and the fix. The bottom layer: any module may raise them, and
importing them costs nothing (no pycocotools, PIL or DeepSpeed behind them).
"""

from models.errors import ModelConfigError


class ConfigError(ValueError):
    """A config problem a user must fix; the message names the file and field."""


class LaunchError(ConfigError):
    """The launcher's variables do not describe one job; retrying cannot help (exit status 2)."""


class DataError(ValueError):
    """Bad dataset input; the message names the file, the field and the fix."""


class CheckpointError(DataError):
    """A checkpoint that cannot be resumed; the message names the file and the way out."""


class ReshardError(DataError):
    """A checkpoint that cannot be converted for, or loaded on, another number of ranks."""


def as_config_error(err: ModelConfigError) -> ConfigError:
    """The model code's error as the pipeline's (``models`` cannot import this module)."""
    return ConfigError(str(err))


EXIT_FAILED, EXIT_CONFIG, EXIT_DIVERGED = 1, 2, 3


def exit_status(err: BaseException) -> int:
    """The status a command exits with for ``err``: 2 for what a user must fix, 3 diverged, an error's own
    ``exit_status`` (preempted: 4), else 1 (a retry may get past it)."""
    if isinstance(err, (ConfigError, DataError)):
        return EXIT_CONFIG
    if isinstance(err, FloatingPointError):
        return EXIT_DIVERGED
    return getattr(err, "exit_status", EXIT_FAILED)
