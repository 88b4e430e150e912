"""Errors the public API raises (besides ValueError for bad arguments)."""


class CheckpointError(Exception):
    """A checkpoint is unreadable, incomplete or in a layout ftjax does not support.

    The message names the file and the tensor or config key at fault.
    """
