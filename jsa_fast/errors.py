"""The errors jsa-fast raises on purpose, for the library and the command lines alike.

The library raises them naming its arguments and what it saw; the command lines
(`jsa_fast.cli.command`) print any of them as one line and exit with `exit_code`. Each is
also a ValueError or RuntimeError, so that code catching those keeps working.
"""

from __future__ import annotations

import errno
import signal

__all__ = ["JsaFastError", "UsageError", "DataError", "RunError", "Interrupted", "is_disk_full"]


class JsaFastError(Exception):
    """An error reported in one line; `exit_code` is a command line's exit status for it."""

    exit_code = 2


class UsageError(JsaFastError, ValueError):
    """An argument, a combination of arguments or an output folder that cannot be used."""


class DataError(JsaFastError, ValueError):
    """A file or data set whose content cannot be used (named in the message)."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal: SIGINT (Ctrl-C) or SIGTERM (what schedulers send before a
    kill). A KeyboardInterrupt, so that whatever cleans up after Ctrl-C cleans up after it;
    `exit_code` is the shell's status for the signal (130, 143)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


class RunError(JsaFastError, RuntimeError):
    """A run that had to stop although its input was accepted: a non-finite loss, a full
    disk. Exit status 1."""

    exit_code = 1


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from or during, is ENOSPC / EDQUOT
    (torch.save reports a full disk as a RuntimeError raised during the OSError)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        current = current.__cause__ or current.__context__
    return False
