"""Errors a user can act on. The message names the key, file or line at fault and the fix."""


class LargemlError(Exception):
    """Base of the errors largeml reports to a user without a traceback."""


class ConfigError(LargemlError, ValueError):
    """A config value is missing, of the wrong kind, or out of range."""


class DataError(LargemlError, ValueError):
    """A data file is missing or malformed."""
