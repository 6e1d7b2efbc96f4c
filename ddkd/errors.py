"""The project's user-facing errors.

A :class:`DDKDError` is a problem with what the user asked for or gave us (a flag, a file,
a dataset). The CLI prints its message as one line and exits with code 2; library callers
can catch it. Its message names the problem and the fix.
"""


class DDKDError(Exception):
    """An error caused by user input: the message says what is wrong and how to fix it."""


class ConfigError(DDKDError):
    """An invalid configuration value, recipe or override."""


class DataError(DDKDError):
    """A dataset that is missing, unknown or malformed."""


class FileFormatError(DDKDError):
    """A file that is not of the expected ddkd format, version or shape."""


class TrainingError(DDKDError):
    """Training diverged (NaN or infinite loss); the message says where and what to try."""
