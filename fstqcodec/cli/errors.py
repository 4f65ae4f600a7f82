"""The one error class of the ``fstq`` command: a user mistake, reported as one line, exit status 2."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(Exception):
    """Something the user gave (an option, a file) is wrong; the message names it and says what.

    :func:`fstqcodec.cli.main` prints ``fstq <command>: <message>`` on stderr and exits with 2.
    """
