"""The error hierarchy of fstqcodec.

Every error a decoder may raise on untrusted bytes is a :class:`DecodeError` subclass, and each
subclass is named in ``spec/FORMAT.md`` (section "Errors"). A decoder that raises anything else on
bad input has a bug. ``TypeError`` is raised only for caller misuse (a wrong argument type).
"""

from __future__ import annotations

__all__ = [
    "FstqError",
    "EncodeError",
    "BudgetError",
    "DecodeError",
    "TruncatedError",
    "BadFormatError",
    "UnsupportedVersionError",
    "UnsupportedFeatureError",
    "ChecksumError",
    "TrailingDataError",
    "LimitExceededError",
    "UnknownSchemaError",
    "BadMaskError",
]


class FstqError(Exception):
    """Base class of every error fstqcodec raises on purpose."""


class EncodeError(FstqError, ValueError):
    """The input cannot be encoded as given (non-finite values, bad shapes, unknown dtype, ...).

    Attributes
    ----------
    tensor : str or None
        Name of the offending tensor, when one is to blame.
    """

    def __init__(self, message: str, *, tensor: str | None = None):
        super().__init__(message)
        self.tensor = tensor


class BudgetError(EncodeError):
    """The byte budget is smaller than the smallest valid message for these tensors.

    Attributes
    ----------
    budget : int
        The budget in bytes.
    minimum : int
        The size of the smallest message the encoder can write for these tensors.
    """

    def __init__(self, message: str, *, budget: int, minimum: int):
        super().__init__(message)
        self.budget = budget
        self.minimum = minimum


class DecodeError(FstqError, ValueError):
    """The bytes are not a valid fstq message (or exceed the caller's limits).

    Attributes
    ----------
    offset : int or None
        Byte offset in the message where the problem was found, when known.
    """

    def __init__(self, message: str, *, offset: int | None = None):
        super().__init__(message)
        self.offset = offset


class TruncatedError(DecodeError):
    """The message ends before a structure it declares (spec error ``truncated``)."""


class BadFormatError(DecodeError):
    """A structure is malformed: bad magic, invalid header, inconsistent sizes, invalid codes."""


class BadMaskError(BadFormatError):
    """A seeded mask's parameters are out of range (spec 5.9): tensor index, generator id, seed,
    keep probability outside (0, 1], unknown granularity or one that does not fit the tensor."""


class UnsupportedVersionError(DecodeError):
    """The message's major version is not one this decoder implements.

    Attributes
    ----------
    major, minor : int
        The version the message declares.
    """

    def __init__(self, message: str, *, major: int, minor: int, offset: int | None = None):
        super().__init__(message, offset=offset)
        self.major = major
        self.minor = minor


class UnsupportedFeatureError(DecodeError):
    """The header marks a field as must-understand and this decoder does not understand it.

    Attributes
    ----------
    feature : str
        The name of the field.
    """

    def __init__(self, message: str, *, feature: str):
        super().__init__(message)
        self.feature = feature


class ChecksumError(DecodeError):
    """The CRC-32 stored at the end of the message does not match its contents.

    Attributes
    ----------
    expected, actual : int
        The stored checksum and the one computed over the message.
    """

    def __init__(self, message: str, *, expected: int, actual: int, offset: int | None = None):
        super().__init__(message, offset=offset)
        self.expected = expected
        self.actual = actual


class TrailingDataError(DecodeError):
    """Bytes follow the end of the message, or a section holds more bytes than it uses.

    Attributes
    ----------
    extra : int
        How many bytes are left over.
    """

    def __init__(self, message: str, *, extra: int, offset: int | None = None):
        super().__init__(message, offset=offset)
        self.extra = extra


class LimitExceededError(DecodeError):
    """A declared size exceeds one of the decoder's limits (checked before allocating).

    Attributes
    ----------
    limit_name : str
        The name of the limit (a field of :class:`fstqcodec.Limits`).
    limit : int
        The limit's value.
    actual : int
        The declared value that exceeded it.
    """

    def __init__(self, message: str, *, limit_name: str, limit: int, actual: int):
        super().__init__(message)
        self.limit_name = limit_name
        self.limit = limit
        self.actual = actual


class UnknownSchemaError(DecodeError):
    """The message names its tensors by a schema digest the caller did not supply.

    Attributes
    ----------
    digest : bytes
        The schema digest the message carries.
    """

    def __init__(self, message: str, *, digest: bytes):
        super().__init__(message)
        self.digest = digest
