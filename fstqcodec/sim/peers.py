"""The strongest distributed-mean-estimation codes beside fstq, as real bytes (numpy only).

Scaled sign (signSGD with a scale; Bernstein et al. 2018, Karimireddy et al. 2019 for the scale and
error feedback): per tensor one float32 scale, the least-squares one ``mean |x|``, and one bit
per element. Error feedback is the client's business (:class:`fstqcodec.sim.methods` keeps it).

DRIVE / EDEN (Vargaftik et al., NeurIPS 2021 and ICML 2022): the flattened update is cut into
chunks of a power of two (4096, the last one the smallest power of two holding the rest, padded
with zeros), each chunk is rotated by a seeded random Hadamard transform ``H D`` (``D`` a random
sign diagonal; the seed is in the message, so no rotation is sent), and each rotated coordinate,
about Gaussian after the rotation, gets a ``b``-bit Lloyd-Max code for a unit Gaussian (b = 1: the
sign; DRIVE). One float32 scale per chunk: *unbiased* ``S = |y|**2 / <y, q>`` (EDEN's, which makes
``<yhat, y> = |y|**2``, so that averages over clients do not shrink) or *least squares*
``S = <y, q> / |q|**2`` (the smallest error of one message). Below one bit, a seeded random
``p`` of each chunk's rotated coordinates is sent at one bit and the rest are zero (EDEN's
shared-randomness subsampling; the unbiased scale is divided by ``p``).

Message layout (little-endian): magic ``b"PE"``, kind (1 = sign, 2 = eden), then per kind:

* sign: ``uint32`` tensor count, per tensor a ``float32`` scale, then every tensor's sign bits
  (1 = negative), packed LSB first, each tensor starting on a byte.
* eden: ``uint8`` bits ``b``, ``uint8`` scale kind (0 unbiased, 1 least squares), ``float32``
  fraction ``p``, ``uint64`` seed, ``uint64`` element count, per chunk a ``float32`` scale, then
  the codes of each chunk's kept coordinates, ``b`` bits each, packed LSB first.
"""

from __future__ import annotations

import functools
import math
import struct

import numpy as np

__all__ = ["sign_encode", "sign_decode", "eden_encode", "eden_decode", "lloyd_max_gaussian", "CHUNK", "EDEN_HEADER_SIZE"]

CHUNK = 4096
_MAGIC = b"PE"
_SIGN, _EDEN = 1, 2
_EDEN_HEAD = struct.Struct("<2sBBBfQQ")
EDEN_HEADER_SIZE = _EDEN_HEAD.size
_SCALE_KINDS = ("unbiased", "ls")


def _pack_bits(bits: np.ndarray) -> bytes:
    return np.packbits(bits.astype(np.uint8), bitorder="little").tobytes()


def _unpack_bits(data: memoryview, offset: int, count: int) -> np.ndarray:
    size = -(-count // 8)
    if offset + size > len(data):
        raise ValueError("peer message truncated")
    return np.unpackbits(np.frombuffer(data, np.uint8, size, offset), bitorder="little")[:count]


def sign_encode(tensors: list[np.ndarray]) -> bytes:
    """Scaled sign of each tensor: ``mean |x|`` as float32 and one bit per element."""
    flats = [np.asarray(t, dtype=np.float32).ravel() for t in tensors]
    scales = np.array([np.abs(f).mean() if f.size else 0.0 for f in flats], dtype="<f4")
    parts = [_MAGIC, bytes([_SIGN]), struct.pack("<I", len(flats)), scales.tobytes()]
    parts.extend(_pack_bits(np.signbit(f)) for f in flats)
    return b"".join(parts)


def sign_decode(data: bytes, sizes: list[int]) -> list[np.ndarray]:
    """The flat tensors of a :func:`sign_encode` message, given their element counts.

    Raises
    ------
    ValueError
        Not a sign message, a different tensor count, or truncated or trailing bytes.
    """
    view = memoryview(data)
    if len(view) < 7 or bytes(view[:2]) != _MAGIC or view[2] != _SIGN:
        raise ValueError("not a scaled-sign message")
    (count,) = struct.unpack_from("<I", view, 3)
    if count != len(sizes) or len(view) < 7 + 4 * count:
        raise ValueError(f"scaled-sign message for {count} tensors, expected {len(sizes)}")
    scales = np.frombuffer(view, "<f4", count, 7)
    offset, out = 7 + 4 * count, []
    for scale, size in zip(scales, sizes):
        negative = _unpack_bits(view, offset, size)
        out.append(np.where(negative == 1, -scale, scale).astype(np.float32))
        offset += -(-size // 8)
    if offset != len(view):
        raise ValueError("trailing bytes after a scaled-sign message")
    return out


@functools.lru_cache(maxsize=None)
def lloyd_max_gaussian(bits: int) -> np.ndarray:
    """The ``2**bits`` Lloyd-Max levels of a unit Gaussian (minimum-MSE scalar quantizer)."""
    grid = np.linspace(-8.0, 8.0, 1 << 16)
    pdf = np.exp(-0.5 * grid * grid)
    levels = np.linspace(-2.0, 2.0, 1 << bits) if bits > 1 else np.array([-0.8, 0.8])
    for _ in range(500):
        edges = (levels[1:] + levels[:-1]) / 2
        cell = np.searchsorted(edges, grid)
        mass = np.bincount(cell, pdf, len(levels))
        levels = np.bincount(cell, pdf * grid, len(levels)) / mass
    return levels


def _chunk_sizes(size: int) -> list[int]:
    full, rest = divmod(size, CHUNK)
    sizes = [CHUNK] * full
    if rest:
        sizes.append(1 << max(0, (rest - 1).bit_length()))
    return sizes


def _hadamard(rows: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform of each row (length a power of two); self-inverse."""
    count, n = rows.shape
    out, h = rows.astype(np.float64), 1
    while h < n:
        pairs = out.reshape(count, n // (2 * h), 2, h)
        out = np.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), axis=2)
        h *= 2
    return out.reshape(count, n) / math.sqrt(n)


def _chunk_randomness(seed: int, sizes: list[int], fraction: float):
    """Per chunk: the random signs of ``D`` and the kept coordinates (sorted), from ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        signs = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        keep = np.arange(n) if fraction >= 1 else np.sort(rng.permutation(n)[: max(1, int(round(fraction * n)))])
        out.append((signs, keep))
    return out


def eden_encode(flat: np.ndarray, *, bits: int = 1, fraction: float = 1.0, scale: str = "unbiased",
                seed: int = 0) -> bytes:
    """DRIVE (``bits=1``) / EDEN (``bits`` 2-4) of a flat vector; ``fraction < 1``: sub-bit.

    Raises
    ------
    ValueError
        ``bits`` outside 1..8, ``fraction`` outside (0, 1], or an unknown ``scale``.
    """
    if not 1 <= bits <= 8 or not 0 < fraction <= 1 or scale not in _SCALE_KINDS:
        raise ValueError(f"eden: bits 1..8, fraction in (0, 1], scale in {_SCALE_KINDS}")
    flat = np.asarray(flat, dtype=np.float64).ravel()
    sizes = _chunk_sizes(flat.size)
    levels = lloyd_max_gaussian(bits)
    edges = (levels[1:] + levels[:-1]) / 2
    scales, codes, start = [], [], 0
    for n, (signs, keep) in zip(sizes, _chunk_randomness(seed, sizes, fraction)):
        chunk = np.zeros(n)
        piece = flat[start:start + n]
        chunk[: piece.size] = piece
        start += n
        y = _hadamard((chunk * signs)[None, :])[0][keep]
        rms = math.sqrt(float(y @ y) / max(1, y.size))
        code = np.searchsorted(edges, y / rms) if rms > 0 else np.zeros(y.size, np.intp)
        q = levels[code]
        inner = float(y @ q)
        if inner <= 0:
            s = 0.0
        elif scale == "unbiased":
            s = float(y @ y) / inner / fraction
        else:
            s = inner / float(q @ q)
        scales.append(s)
        codes.append(code)
    head = _EDEN_HEAD.pack(_MAGIC, _EDEN, bits, _SCALE_KINDS.index(scale), fraction, seed, flat.size)
    all_codes = np.concatenate(codes).astype(np.uint8) if codes else np.zeros(0, np.uint8)
    bit_planes = ((all_codes[:, None] >> np.arange(bits)) & 1).reshape(-1)
    return head + np.array(scales, dtype="<f4").tobytes() + _pack_bits(bit_planes)


def eden_decode(data: bytes) -> np.ndarray:
    """The flat vector of an :func:`eden_encode` message.

    Raises
    ------
    ValueError
        Not an eden message, bad parameters, or truncated or trailing bytes.
    """
    view = memoryview(data)
    if len(view) < _EDEN_HEAD.size:
        raise ValueError("eden message truncated")
    magic, kind, bits, scale_kind, fraction, seed, size = _EDEN_HEAD.unpack_from(view)
    if magic != _MAGIC or kind != _EDEN or not 1 <= bits <= 8 or scale_kind > 1 or not 0 < fraction <= 1:
        raise ValueError("not an eden message")
    if size > 1 << 32:
        raise ValueError(f"eden message claims {size} elements")
    sizes = _chunk_sizes(size)
    randomness = _chunk_randomness(seed, sizes, fraction)
    offset = _EDEN_HEAD.size
    if offset + 4 * len(sizes) > len(view):
        raise ValueError("eden message truncated")
    scales = np.frombuffer(view, "<f4", len(sizes), offset).astype(np.float64)
    offset += 4 * len(sizes)
    kept = sum(len(keep) for _, keep in randomness)
    planes = _unpack_bits(view, offset, kept * bits).reshape(kept, bits)
    if offset + -(-kept * bits // 8) != len(view):
        raise ValueError("trailing bytes after an eden message")
    codes = (planes.astype(np.int64) << np.arange(bits)).sum(axis=1)
    levels = lloyd_max_gaussian(bits)
    out, used = [], 0
    for n, s, (signs, keep) in zip(sizes, scales, randomness):
        y = np.zeros(n)
        y[keep] = s * levels[codes[used:used + len(keep)]]
        used += len(keep)
        out.append(_hadamard(y[None, :])[0] * signs)
    flat = np.concatenate(out)[:size] if out else np.zeros(0)
    return flat.astype(np.float32)
