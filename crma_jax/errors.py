"""Errors that name the file, key or step at fault."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint could not be read: missing, corrupt, wrong shape or unsupported.

    The message always names the file (and the tensor key, where there is one).
    """
