"""One zstd frame of an exact declared length (FORMAT.md section 11).

The frame's structure (frame header, block headers, checksum field, trailing bytes) is walked
here, in byte order, so that whether a defect is "truncated", "bad format" or "trailing data" is
decided by the spec's rules and not by the path libzstd happens to take (its streaming and
one-shot decoders check block sizes differently). libzstd then regenerates the content of a frame
already known to be complete, and any error it reports is a BadFormatError.
"""

from __future__ import annotations

import zstandard

from ..errors import BadFormatError, TrailingDataError, TruncatedError
from ..stages import rans as _rans  # holds the optional C accelerator (None when not built or disabled)

__all__ = ["FRAME_MAGIC", "MAX_WINDOW_SIZE", "frame_length", "decompress_exact"]

FRAME_MAGIC = b"\x28\xb5\x2f\xfd"
#: Largest Window_Size of a frame that is not single-segment (FORMAT.md 11, rule 2).
MAX_WINDOW_SIZE = 8 << 20
_MAX_BLOCK_SIZE = 128 << 10
_DICTIONARY_ID_SIZES = (0, 1, 2, 4)
_BLOCK_RLE, _BLOCK_RESERVED = 1, 3


def _field(stored, pos: int, size: int, what: str, offset: int) -> int:
    if pos + size > len(stored):
        raise TruncatedError(f"{what}: zstd frame ends inside its frame header", offset=offset + len(stored))
    return int.from_bytes(stored[pos : pos + size], "little")


def _frame_header(stored, declared: int, what: str, offset: int):
    """Check the frame header; return (its length, Block_Maximum_Size, checksum flag)."""
    if len(stored) < 4 or bytes(stored[:4]) != FRAME_MAGIC:
        # Also refuses skippable frames, whose magic differs.
        raise BadFormatError(f"{what}: not a zstd frame (bad or missing frame magic)", offset=offset)
    descriptor = _field(stored, 4, 1, what, offset)
    content_size_flag, single_segment = descriptor >> 6, (descriptor >> 5) & 1
    if (descriptor >> 3) & 1:
        raise BadFormatError(f"{what}: zstd frame header sets its reserved bit", offset=offset + 4)
    if content_size_flag == 0 and not single_segment:
        raise BadFormatError(f"{what}: zstd frame does not declare its content size", offset=offset + 4)
    pos, window = 5, None
    if not single_segment:
        descriptor_byte = _field(stored, pos, 1, what, offset)
        base = 1 << (10 + (descriptor_byte >> 3))
        window = base + (base >> 3) * (descriptor_byte & 7)
        if window > MAX_WINDOW_SIZE:
            raise BadFormatError(f"{what}: zstd window of {window} bytes exceeds {MAX_WINDOW_SIZE}", offset=offset + pos)
        pos += 1
    dictionary_size = _DICTIONARY_ID_SIZES[descriptor & 3]
    if _field(stored, pos, dictionary_size, what, offset):
        raise BadFormatError(f"{what}: zstd frame names a dictionary", offset=offset + pos)
    pos += dictionary_size
    content_size_bytes = (single_segment, 2, 4, 8)[content_size_flag]
    content_size = _field(stored, pos, content_size_bytes, what, offset) + (256 if content_size_bytes == 2 else 0)
    if content_size != declared:
        raise BadFormatError(
            f"{what}: zstd frame declares content size {content_size}, header declares {declared}", offset=offset + pos
        )
    pos += content_size_bytes
    window = content_size if single_segment else window
    return pos, min(window, _MAX_BLOCK_SIZE), (descriptor >> 2) & 1


def frame_length(stored, declared: int, what: str, offset: int) -> int:
    """Walk the frame's structure (FORMAT.md 11, pass 1); return its length, equal to ``len(stored)``.

    Uses the C accelerator when it is built: a frame of empty blocks costs 3 bytes per block.

    Raises
    ------
    BadFormatError, TruncatedError, TrailingDataError
        The first structural defect in byte order.
    """
    native = getattr(_rans._speedups, "zstd_walk", None)
    if native is None:
        return frame_length_python(stored, declared, what, offset)
    try:
        return native(stored, declared)
    except ValueError as exc:
        code, message, extra = exc.args
        if code == "trailing":
            raise TrailingDataError(f"{what}: {extra} bytes follow its zstd frame", extra=extra, offset=offset + len(stored) - extra) from None
        error = TruncatedError if code == "truncated" else BadFormatError
        raise error(f"{what}: {message}", offset=offset + extra) from None


def frame_length_python(stored, declared: int, what: str, offset: int) -> int:
    """The Python implementation of :func:`frame_length` (the reference)."""
    pos, block_max, has_checksum = _frame_header(stored, declared, what, offset)
    size = len(stored)
    while True:
        if pos + 3 > size:
            raise TruncatedError(f"{what}: zstd frame ends inside a block header", offset=offset + size)
        header = int.from_bytes(stored[pos : pos + 3], "little")
        block_type, block_size = (header >> 1) & 3, header >> 3
        if block_type == _BLOCK_RESERVED:
            raise BadFormatError(f"{what}: zstd block of the reserved type 3", offset=offset + pos)
        if block_size > block_max:
            raise BadFormatError(f"{what}: zstd block of {block_size} bytes, more than {block_max}", offset=offset + pos)
        pos += 3 + (1 if block_type == _BLOCK_RLE else block_size)
        if pos > size:
            raise TruncatedError(f"{what}: zstd frame ends inside a block", offset=offset + size)
        if header & 1:
            break
    if has_checksum:
        pos += 4
        if pos > size:
            raise TruncatedError(f"{what}: zstd frame ends inside its content checksum", offset=offset + size)
    if pos < size:
        raise TrailingDataError(f"{what}: {size - pos} bytes follow its zstd frame", extra=size - pos, offset=offset + pos)
    return pos


def decompress_exact(stored, declared: int, what: str, offset: int) -> bytes:
    """The ``declared`` bytes one zstd frame holds (FORMAT.md 11); ``declared`` is already bounded.

    Raises
    ------
    BadFormatError, TruncatedError, TrailingDataError
        A structural defect (:func:`frame_length`), then content that does not regenerate exactly
        ``declared`` bytes or fails its checksum (BadFormatError).
    """
    frame_length(stored, declared, what, offset)
    # The frame is complete and declares ``declared`` bytes: libzstd writes no more than that, so
    # one call into an output of exactly that size (no copy of the input, no chunks to join).
    # Single-segment frames have a window of their content size, which may exceed libzstd's
    # default limit; multi-segment windows were bounded to 8 MiB above.
    decompressor = zstandard.ZstdDecompressor(max_window_size=1 << 31)
    try:
        out = decompressor.decompress(stored, max_output_size=declared)
    except zstandard.ZstdError as exc:
        raise BadFormatError(f"{what}: invalid zstd data ({exc})", offset=offset) from None
    if len(out) != declared:
        raise BadFormatError(f"{what}: zstd data decodes to {len(out)} bytes, header declares {declared}", offset=offset)
    return out
