"""Errors the public API raises (besides ValueError for bad arguments)."""


class CheckpointError(Exception):
    """A checkpoint is unreadable, incomplete or in a layout ftjax does not support.

    The message names the file and the tensor or config key at fault.
    """


class ModelConfigError(ValueError):
    """A `ModelConfig` field is out of range (the message names the field and the limit).

    Raised by `ModelConfig` itself; loaders report it as a `CheckpointError` naming
    the checkpoint.
    """
