"""Errors a user can cause. The CLI prints their message (no traceback) and exits non-zero."""


class PocketLMError(Exception):
    """Base class: the message says what is wrong and what to do about it."""


class CheckpointError(PocketLMError):
    """A model directory or weight file is missing, truncated, or does not match its config."""


class UnsupportedModelError(PocketLMError):
    """A model of an architecture or format pocketlm cannot handle."""


class ConfigError(PocketLMError):
    """A configuration value or recipe key is wrong."""


class ContextLengthError(PocketLMError):
    """A prompt does not fit the model's context window."""


class ModelNotFoundError(PocketLMError):
    """A model name or path that cannot be resolved."""
