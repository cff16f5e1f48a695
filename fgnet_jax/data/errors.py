"""Exceptions raised by the data package.

Both derive from ``ValueError`` so callers that only know "bad input" can catch them as such;
their messages are single lines meant to be printed without a traceback.
"""

from __future__ import annotations


class DatasetNotFoundError(ValueError):
    """A dataset's source files (or prepared TFDS files) are missing.

    The message is one line naming the expected file, where to put it and where to get it.
    """


class CorruptImageError(ValueError):
    """An image could not be decoded (truncated or corrupt file); the message names the file."""


class DatasetFormatError(ValueError):
    """Source files exist but do not follow the dataset's documented format (the message names
    the file and the offending line or entry)."""
