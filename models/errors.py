"""The one error the model code raises for a setting it cannot build.

``models`` knows nothing of the pipeline above it, so it cannot raise the pipeline's
``ConfigError``; the pipeline turns this into one where it builds the model
(``pipeline.train.build.build_model``) and where it validates a config
(``pipeline.train.validate``).
"""


class ModelConfigError(ValueError):
    """A ``model.*`` setting that cannot be built; the message names the field and the fix."""
