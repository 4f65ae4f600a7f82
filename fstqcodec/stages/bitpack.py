"""Fixed-length bit packing, LSB first (spec section 6.3, coder ``packed``).

Code ``i`` of width ``w`` occupies bits ``i*w`` .. ``i*w + w - 1`` of the stream, where bit ``k``
of the stream is bit ``k % 8`` (least significant first) of byte ``k // 8``. Padding bits in the
last byte are zero.
"""

from __future__ import annotations

import numpy as np

from ..errors import BadFormatError

__all__ = ["packed_size", "pack", "pack_rows", "unpack"]


def packed_size(count: int, width: int) -> int:
    """Bytes that ``count`` codes of ``width`` bits take (Python ints: no overflow)."""
    return (count * width + 7) // 8


def pack(codes: np.ndarray, width: int) -> bytes:
    """Pack unsigned ``codes`` (each < 2**width, width 1..8) into bytes, LSB first."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8).ravel()
    if width == 8:
        return codes.tobytes()
    per_byte = 8 // width if 8 % width == 0 else 0
    if per_byte:
        # Widths 1, 2, 4: whole codes per byte, combined with shifts (fast path).
        pad = (-len(codes)) % per_byte
        if pad:
            codes = np.concatenate([codes, np.zeros(pad, np.uint8)])
        grouped = codes.reshape(-1, per_byte)
        out = np.zeros(len(grouped), np.uint8)
        for slot in range(per_byte):
            out |= grouped[:, slot] << np.uint8(slot * width)
        return out.tobytes()
    bits = np.unpackbits(codes[:, None], axis=1, count=width, bitorder="little")
    return np.packbits(bits.ravel(), bitorder="little").tobytes()


def pack_rows(matrix: np.ndarray, rows: np.ndarray, offset: int, width: int) -> bytes:
    """:func:`pack` of the symbols ``matrix[rows] + offset`` (modulo 256; rows of int8 or uint8
    codes), without gathering them first where the C accelerator runs."""
    from . import rans  # the accelerator's handle (and FSTQ_PURE_PYTHON) live there

    native = getattr(rans._speedups, "pack_rows", None)
    if native is not None and width in (1, 2, 4, 8):
        matrix = np.ascontiguousarray(matrix)
        return native(matrix, matrix.shape[1], np.ascontiguousarray(rows, dtype=np.int64), int(offset) & 0xFF, width)
    symbols = matrix[rows].reshape(-1).view(np.uint8)
    symbols += np.uint8(int(offset) & 0xFF)  # in place: the gather above made a copy
    return pack(symbols, width)


def unpack(data, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack`: ``count`` codes of ``width`` bits as ``uint8``.

    Raises
    ------
    BadFormatError
        If ``data`` is not exactly ``packed_size(count, width)`` bytes or a padding bit is set.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    expected = packed_size(count, width)
    if len(raw) != expected:
        raise BadFormatError(f"packed codes: {len(raw)} bytes, expected {expected} for {count} codes of {width} bits")
    if width == 8:
        return raw.copy()
    used_bits = count * width
    if used_bits % 8 and raw[-1] >> (used_bits % 8):
        raise BadFormatError("packed codes: padding bits in the last byte are not zero")
    per_byte = 8 // width if 8 % width == 0 else 0
    if per_byte:
        mask = np.uint8((1 << width) - 1)
        out = np.empty((len(raw), per_byte), np.uint8)
        for slot in range(per_byte):
            out[:, slot] = (raw >> np.uint8(slot * width)) & mask
        return out.ravel()[:count]
    bits = np.unpackbits(raw, bitorder="little", count=used_bits).reshape(count, width)
    weights = (1 << np.arange(width, dtype=np.uint8)).astype(np.uint8)
    return (bits * weights).sum(axis=1, dtype=np.uint8) if count else np.zeros(0, np.uint8)
