"""The project's user-facing errors.

A :class:`DDKDError` is a problem with what the user asked for or gave us (a flag, a file,
a dataset). The CLI prints its message as one line and exits with code 2; library callers
can catch it. Its message names the problem and the fix.
"""


class DDKDError(Exception):
    """An error caused by user input: the message says what is wrong and how to fix it."""


class ConfigError(DDKDError):
    """An invalid configuration value, recipe or override.

    ``key``: the setting the message is about (``experts.epochs``), when it is about one; the
    command line uses it to name the flag instead when the value came from a flag.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class DataError(DDKDError):
    """A dataset that is missing, unknown or malformed."""


class FileFormatError(DDKDError):
    """A file that is not of the expected ddkd format, version or shape."""


class TrainingError(DDKDError):
    """Training diverged (NaN or infinite loss); the message says where and what to try."""


class DiskFullError(DDKDError):
    """A write failed because the disk (or the user's quota) is full. What was written before is
    kept; the CLI adds how to continue (``--resume``)."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path
