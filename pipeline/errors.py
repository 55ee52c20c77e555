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
