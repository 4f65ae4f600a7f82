"""Messages in files: ``save_file`` / ``load_file`` (like safetensors'), written atomically."""

from __future__ import annotations

import os
import secrets

from .codec import encode, open as open_message
from .config import EncodeConfig
from .decoder import resolve_limits
from .limits import Limits
from .message import Message

__all__ = ["save_file", "load_file", "write_atomic"]


def write_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file is either complete or untouched.

    The bytes go to a new temporary file in the same directory, are flushed to disk, and the
    temporary file is renamed over ``path`` (``os.replace``, atomic on POSIX and Windows). The
    temporary file is created with mode 0o666, which the process umask narrows, so the result has
    the mode any new file of the user would have (not ``tempfile``'s 0o600). On any failure the
    temporary file is removed and ``path`` is left as it was.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write (replaced if it exists).
    data : bytes-like

    Raises
    ------
    OSError
        If the directory does not exist or cannot be written; the error names ``path``.
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    temporary, descriptor = _create_temporary(directory, name, path)
    try:
        stream = os.fdopen(descriptor, "wb")
    except BaseException:
        os.close(descriptor)
        os.unlink(temporary)
        raise
    try:
        with stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    _sync_directory(directory)


def _create_temporary(directory: str, name: str, path: str) -> tuple[str, int]:
    """A new file beside ``path`` (O_EXCL, so never someone else's), and its descriptor."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temporary = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            return temporary, os.open(temporary, flags, 0o666)
        except FileExistsError:
            continue
        except OSError as error:
            # Name the file the caller asked for, not the temporary one.
            raise type(error)(error.errno, error.strerror, path) from None


def _sync_directory(directory: str) -> None:
    """Make the rename durable where the platform allows syncing a directory (POSIX)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # e.g. a directory we may write but not read: the file itself is complete
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename has happened
    finally:
        os.close(descriptor)


def save_file(tensors, path, *, fisher=None, config: EncodeConfig | None = None, meta: dict | None = None,
              schema=None, **options) -> int:
    """Encode ``tensors`` and write the message to ``path`` atomically.

    Parameters
    ----------
    tensors : Mapping[str, array-like]
        As for :func:`fstqcodec.encode`.
    path : str or os.PathLike
        The file to write; replaced if it exists, left untouched if anything fails.
    fisher, config, meta, schema, **options
        As for :func:`fstqcodec.encode` (``config`` or the keyword options, not both).

    Returns
    -------
    int
        The number of bytes written.

    Raises
    ------
    EncodeError, BudgetError
        As :func:`fstqcodec.encode`; nothing is written.
    TypeError, ValueError
        Misuse of the arguments; nothing is written.
    OSError
        If the file cannot be written (see :func:`write_atomic`).
    """
    message = encode(tensors, fisher=fisher, config=config, meta=meta, schema=schema, **options)
    write_atomic(path, message)
    return len(message)


def load_file(path, *, limits: Limits | None = None, schemas=None) -> Message:
    """Read and decode the message in ``path`` (see :func:`fstqcodec.open`).

    Parameters
    ----------
    path : str or os.PathLike
    limits : Limits, optional
        Bounds on what the message may declare; at most ``limits.max_message_size + 1`` bytes
        of the file are read.
    schemas : Schema or iterable of Schema, optional

    Returns
    -------
    Message
        The tensors (a mapping of names to arrays) with their declared dtypes, shapes and ``meta``.

    Raises
    ------
    OSError
        If the file cannot be read.
    DecodeError
        If its bytes are not a valid message within ``limits``.
    """
    limits = resolve_limits(limits)
    with open(path, "rb") as stream:
        # A valid message is at most max_message_size bytes: reading one byte more is enough
        # for the decoder to report a longer file (trailing data or an over-limit length)
        # without reading all of it.
        data = stream.read(limits.max_message_size + 1)
    return open_message(data, limits=limits, schemas=schemas)
