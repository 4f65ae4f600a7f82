"""The message container: preamble, header, body of sections, checksum (spec sections 3-5).

This module knows bytes and lengths only. It frames a header map and a list of sections on
encode, and on decode it validates the framing in the order the spec's decoding procedure gives,
checking every declared length against the limits and against the bytes present before
allocating anything.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

import msgpack
import zstandard

from ..errors import (
    BadFormatError,
    ChecksumError,
    TrailingDataError,
    TruncatedError,
    UnsupportedVersionError,
)
from ..limits import Limits, check_limit
from . import msgpack_subset
from .zstd_frame import decompress_exact

__all__ = [
    "MAGIC",
    "VERSION_MAJOR",
    "VERSION_MINOR",
    "PREAMBLE",
    "CHECKSUM_SIZE",
    "Section",
    "Container",
    "write_container",
    "read_container",
    "decode_section",
    "zstd_compress",
]

#: First 8 bytes of every message. The high-bit byte catches 7-bit channels, ``\r\n`` and the lone
#: ``\n`` catch newline conversion in either direction, ``\x1a`` stops DOS ``type`` (as in PNG).
MAGIC = b"\x89FSQ\r\n\x1a\n"
VERSION_MAJOR = 1
#: The newest minor version this library reads and writes (1.1 added seeded masks). A message is
#: written with the lowest minor version that holds its features: 0 unless it carries masks.
VERSION_MINOR = 1

#: magic, major, minor, header encoding, reserved, header stored length, header length, body length
PREAMBLE = struct.Struct("<8sBBBBIIQ")
CHECKSUM_SIZE = 4

HEADER_RAW = 0
HEADER_ZSTD = 1

ENCODING_NONE = "none"
ENCODING_ZSTD = "zstd"
SECTION_ENCODINGS = (ENCODING_NONE, ENCODING_ZSTD)

# A fixed zstd level keeps the bytes deterministic for a given zstandard library version.
_ZSTD_LEVEL = 3


@dataclasses.dataclass(frozen=True)
class Section:
    """One section of the body as declared in the header.

    Attributes
    ----------
    kind : str
        ``"blocks"``, ``"scales"`` or ``"codes"``.
    offset : int
        Offset of its stored bytes from the start of the message.
    stored_length, decoded_length : int
        Sizes before and after its encoding is undone.
    encoding : str
        ``"none"`` or ``"zstd"``.
    """

    kind: str
    offset: int
    stored_length: int
    encoding: str
    decoded_length: int


@dataclasses.dataclass(frozen=True)
class Container:
    """A message whose framing, checksum and header have been validated."""

    major: int
    minor: int
    header: dict
    header_offset: int
    header_stored_length: int
    header_length: int
    header_encoding: int
    body_offset: int
    body_length: int
    data: memoryview


def zstd_compress(payload: bytes) -> bytes:
    """Compress with zstd as the encoder does: one frame, content size and no checksum flag."""
    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True, write_checksum=False)
    return compressor.compress(payload)


def write_container(header: dict, body, *, compress_header: bool, minor: int = 0) -> bytes:
    """Frame ``header`` and ``body`` into a message: preamble, header, body, CRC-32.

    ``body`` is bytes-like or a list of bytes-like parts (its sections, joined here once: a
    large message is copied once, not once per layer). The caller has already put the section
    table (stored lengths summing to the body's length) into ``header``; ``minor`` is the lowest
    minor version that holds the header's features.
    """
    body_parts = [memoryview(part).cast("B") for part in (body if isinstance(body, list) else [body])]
    body_length = sum(len(part) for part in body_parts)
    header_bytes = msgpack.packb(header, use_bin_type=True)
    stored_header = header_bytes
    encoding = HEADER_RAW
    if compress_header:
        candidate = zstd_compress(header_bytes)
        # Only use the zstd form when it is smaller: tiny headers grow under zstd.
        if len(candidate) < len(header_bytes):
            stored_header, encoding = candidate, HEADER_ZSTD
    preamble = PREAMBLE.pack(
        MAGIC, VERSION_MAJOR, minor, encoding, 0, len(stored_header), len(header_bytes), body_length
    )
    parts = [preamble, stored_header, *body_parts]
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return b"".join([*parts, struct.pack("<I", crc)])


def read_container(data, limits: Limits) -> Container:
    """Validate the framing of ``data`` (spec 5, steps 1-9) and return its parsed header.

    Raises
    ------
    TruncatedError, BadFormatError, UnsupportedVersionError, LimitExceededError,
    TrailingDataError, ChecksumError
        As the spec's decoding procedure names them.
    """
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    size = len(view)
    # 1. Magic. A short input that is a prefix of the magic is a truncated message.
    head = bytes(view[: len(MAGIC)])
    if head != MAGIC[: len(head)]:
        raise BadFormatError("not an fstq message (bad magic)", offset=0)
    if size < PREAMBLE.size:
        raise TruncatedError(f"message is {size} bytes, shorter than the {PREAMBLE.size}-byte preamble", offset=size)
    _, major, minor, header_encoding, reserved, header_stored, header_length, body_length = PREAMBLE.unpack_from(view, 0)
    # 2. Version before anything else, so a future major version is reported as such.
    if major != VERSION_MAJOR:
        raise UnsupportedVersionError(
            f"message has format version {major}.{minor}; this decoder reads major version {VERSION_MAJOR}",
            major=major,
            minor=minor,
            offset=8,
        )
    # 3. Preamble fields.
    if header_encoding not in (HEADER_RAW, HEADER_ZSTD):
        raise BadFormatError(f"unknown header encoding {header_encoding}", offset=10)
    if reserved != 0:
        raise BadFormatError(f"reserved preamble byte is {reserved}, must be 0", offset=11)
    if header_encoding == HEADER_RAW and header_stored != header_length:
        raise BadFormatError(
            f"raw header: stored length {header_stored} differs from header length {header_length}", offset=12
        )
    # 4. Limits on declared sizes, before any allocation.
    check_limit(limits, "max_header_size", header_length, "header length declared by the preamble")
    total = PREAMBLE.size + header_stored + body_length + CHECKSUM_SIZE
    check_limit(limits, "max_message_size", total, "message length declared by the preamble")
    # 5. Exact length: no truncation, no trailing bytes.
    if size < total:
        raise TruncatedError(f"message is {size} bytes, its preamble declares {total}", offset=size)
    if size > total:
        raise TrailingDataError(
            f"{size - total} bytes follow the end of the message", extra=size - total, offset=total
        )
    # 6. Checksum over everything before it.
    expected = struct.unpack_from("<I", view, total - CHECKSUM_SIZE)[0]
    actual = zlib.crc32(view[: total - CHECKSUM_SIZE])
    if expected != actual:
        raise ChecksumError(
            f"CRC-32 mismatch: message stores {expected:#010x}, contents give {actual:#010x}",
            expected=expected,
            actual=actual,
            offset=total - CHECKSUM_SIZE,
        )
    # 7. Header bytes, decompressed to exactly the declared length.
    header_offset = PREAMBLE.size
    stored = view[header_offset : header_offset + header_stored]
    if header_encoding == HEADER_ZSTD:
        header_bytes = decompress_exact(stored, header_length, "header", header_offset)
    else:
        header_bytes = bytes(stored)
    # 8. msgpack with every container length capped by the bytes present, no extension types.
    header = unpack_header(header_bytes, header_offset, limits)
    return Container(
        major=major,
        minor=minor,
        header=header,
        header_offset=header_offset,
        header_stored_length=header_stored,
        header_length=header_length,
        header_encoding=header_encoding,
        body_offset=header_offset + header_stored,
        body_length=body_length,
        data=view,
    )


class _HeaderBuilder:
    """msgpack hooks: build maps strictly (string keys, no repeats) and count containers."""

    def __init__(self, budget: int):
        self.budget = budget
        self.count = 0

    def _counted(self):
        self.count += 1
        if self.count > self.budget:
            raise _NotInSubset

    def list_hook(self, items):
        self._counted()
        return items

    def pairs_hook(self, pairs):
        self._counted()
        result = {}
        for key, value in pairs:
            if not isinstance(key, str) or key in result:
                raise _NotInSubset
            result[key] = value
        return result


class _NotInSubset(Exception):
    """The fast parse found a problem; :func:`msgpack_subset.scan` says which one comes first."""


def _refuse_ext(code, payload):
    raise _NotInSubset


def unpack_header(header_bytes: bytes, offset: int, limits: Limits) -> dict:
    """Unpack the header map under the msgpack subset of FORMAT.md 5.1 (step 8).

    Valid headers are parsed by msgpack-python with every length capped by the header's size;
    when that parse fails, or the map is nested too deeply, :func:`msgpack_subset.scan` walks the
    bytes in the spec's order and raises the error of the first rule broken.

    Raises
    ------
    BadFormatError, LimitExceededError, TrailingDataError
    """
    n = len(header_bytes)
    builder = _HeaderBuilder(msgpack_subset.container_budget(limits))
    try:
        header = msgpack.unpackb(
            header_bytes,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n // 2,
            max_ext_len=0,
            ext_hook=_refuse_ext,
            object_pairs_hook=builder.pairs_hook,
            list_hook=builder.list_hook,
        )
    except (_NotInSubset, ValueError, msgpack.UnpackException, RecursionError):
        # ValueError covers msgpack's ExtraData, FormatError, StackError, OutOfData and invalid UTF-8.
        header = None
    if not isinstance(header, dict) or msgpack_subset.too_deep(header):
        msgpack_subset.scan(header_bytes, limits)
        # Not reached: scan accepts exactly what the parse above accepts, depth aside.
        raise BadFormatError("header is not valid msgpack under FORMAT.md 5.1", offset=offset)
    return header


def decode_section(container: Container, section: Section, what: str) -> bytes | memoryview:
    """Return a section's decoded bytes; its decoded length was checked by the caller."""
    stored = container.data[section.offset : section.offset + section.stored_length]
    if section.encoding == ENCODING_ZSTD:
        return decompress_exact(stored, section.decoded_length, what, section.offset)
    return stored
