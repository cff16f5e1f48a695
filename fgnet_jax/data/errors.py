"""Exceptions raised by the data package.

All derive from ``ValueError`` so callers that only know "bad input" can catch them as such;
their messages are single lines meant to be printed without a traceback.
"""

from __future__ import annotations

# How to go on without the bad images: the end of every CorruptImageError message.
SKIP_HINT = ("pass on_corrupt='skip' (python -m experiments.cub_200: --config.on_corrupt=skip) "
             "to leave bad images out and list them")


class DatasetNotFoundError(ValueError):
    """A dataset's source files (or prepared TFDS files) are missing.

    The message is one line naming the expected file, where to put it and where to get it.
    """


class CorruptImageError(ValueError):
    """An image that cannot be used (missing, empty, not an image, truncated, a format TensorFlow
    cannot decode).

    The message is one line: the file, what is wrong in words, and :data:`SKIP_HINT`.
    ``file`` and ``problem`` hold the first two (for logs of skipped images).
    """

    def __init__(self, file: str, problem: str):
        self.file = file
        self.problem = problem
        super().__init__(f"bad image {file}: {problem}; {SKIP_HINT}")

    def __reduce__(self):  # picklable although __init__ takes two arguments
        return type(self), (self.file, self.problem)


class DatasetFormatError(ValueError):
    """Source files exist but do not follow the dataset's documented format, or cannot train a
    model as they are (empty classes, files changed since the dataset was prepared); the message
    names the file, class or entry and the fix."""
