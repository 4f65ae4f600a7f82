"""Static-model interleaved rANS (spec section 6.5, coder ``rans``).

Why rANS and not only zstd: at the rates this codec works at (often below 1 bit per code), a
byte-oriented Huffman stage spends at least one bit per byte-symbol, far above the entropy of the
codes; rANS reaches the entropy of the code distribution to within a fraction of a percent.

Parameters of a stream: ``prob_bits`` P (1..16; frequencies sum to M = 2**P), a frequency per
symbol, and ``lanes`` N. Symbol ``i`` is coded in lane ``i % N``; "step" ``t`` covers symbols
``t*N .. t*N + N - 1`` (the last step may be partial). The state of a lane is a 32-bit integer in
[L, 2**32) with L = 2**16, renormalised 16 bits at a time, so each symbol emits or consumes at
most one 16-bit word. The stream is: N initial decoder states (uint32 LE), then the words
(uint16 LE) in the order the decoder consumes them (by step, then by lane). Every lane ends in
state L, which the decoder checks.

The loops below run over steps, with numpy operations across lanes, so the Python overhead is
paid once per step, not once per symbol.
"""

from __future__ import annotations

import numpy as np

import os

from ..errors import BadFormatError, TrailingDataError

__all__ = ["RANS_L", "MAX_STEPS", "normalize_frequencies", "encode", "encode_rows", "decode", "estimate_bits", "choose_lanes", "min_lanes", "ACCELERATED"]

# The C accelerator (fstqcodec/_speedups.c) produces the same bytes as the numpy code below, which
# stays the reference and the fallback. FSTQ_PURE_PYTHON=1 forces the fallback.
try:
    if os.environ.get("FSTQ_PURE_PYTHON"):
        raise ImportError("disabled by FSTQ_PURE_PYTHON")
    from .. import _speedups
except ImportError:
    _speedups = None

#: True when the C accelerator is in use.
ACCELERATED = _speedups is not None

RANS_L = 1 << 16
_WORD_MASK = np.uint64(0xFFFF)


#: A stream may take at most this many steps (symbols per lane): ``lanes >= ceil(count / MAX_STEPS)``.
#: It bounds the work of decoders that loop over steps, such as the numpy fallback here.
MAX_STEPS = 65536


def min_lanes(count: int) -> int:
    """The fewest lanes a stream of ``count`` symbols may use."""
    return max(1, -(-count // MAX_STEPS))


def choose_lanes(count: int) -> int:
    """Lanes the encoder uses for ``count`` symbols: enough for speed, few enough that the
    4 bytes of state per lane stay a small fraction of the stream (about 1 per 2048 symbols)."""
    return int(min(65536, max(min_lanes(count), min(4096, count // 2048))))


def normalize_frequencies(counts: np.ndarray, prob_bits: int) -> np.ndarray:
    """Scale symbol ``counts`` to frequencies summing to ``2**prob_bits``.

    Every symbol with a non-zero count gets a frequency of at least 1, so it stays codable.
    Deterministic: the same counts always give the same table.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    target = 1 << prob_bits
    present = counts > 0
    if total == 0:
        raise ValueError("cannot build a frequency table from no symbols")
    if int(present.sum()) > target:
        raise ValueError(f"{int(present.sum())} distinct symbols do not fit in prob_bits={prob_bits}")
    freqs = np.where(present, np.maximum(1, np.floor(counts * (target / total) + 0.5)), 0).astype(np.int64)
    diff = target - int(freqs.sum())
    order = np.argsort(-counts, kind="stable")
    # Give or take the rounding difference from the most frequent symbols first: their code
    # lengths change the least per unit of frequency.
    index = 0
    while diff != 0:
        symbol = order[index % len(order)]
        if diff > 0:
            freqs[symbol] += diff
            diff = 0
        elif freqs[symbol] > 1:
            take = min(-diff, int(freqs[symbol]) - 1)
            freqs[symbol] -= take
            diff += take
        index += 1
    return freqs


def estimate_bits(counts: np.ndarray, freqs: np.ndarray, prob_bits: int) -> float:
    """Bits the symbols with ``counts`` cost under table ``freqs`` (the cross-entropy)."""
    used = counts > 0
    return float(np.sum(counts[used] * (prob_bits - np.log2(freqs[used]))))


def encode(symbols: np.ndarray, freqs: np.ndarray, prob_bits: int, lanes: int) -> bytes:
    """Encode ``symbols`` (each with a non-zero frequency) into an interleaved rANS stream."""
    if _speedups is not None and len(freqs) <= 256:
        table = np.ascontiguousarray(freqs, dtype="<u4")
        return _speedups.rans_encode(np.ascontiguousarray(symbols, dtype=np.uint8), table, prob_bits, lanes)
    return encode_numpy(symbols, freqs, prob_bits, lanes)


def encode_rows(matrix: np.ndarray, rows: np.ndarray, offset: int, freqs: np.ndarray, prob_bits: int, lanes: int) -> bytes:
    """:func:`encode` of the symbols ``matrix[rows] + offset`` (modulo 256; ``matrix`` of uint8 or
    int8 rows), without gathering them first where the C accelerator runs."""
    if _speedups is not None and len(freqs) <= 256:
        table = np.ascontiguousarray(freqs, dtype="<u4")
        matrix = np.ascontiguousarray(matrix)
        return _speedups.rans_encode(matrix, table, prob_bits, lanes, np.ascontiguousarray(rows, dtype=np.int64),
                                     matrix.shape[1], int(offset) & 0xFF)
    symbols = matrix[rows].reshape(-1).view(np.uint8)
    symbols += np.uint8(int(offset) & 0xFF)  # in place: the gather above made a copy
    return encode_numpy(symbols, freqs, prob_bits, lanes)


def encode_numpy(symbols: np.ndarray, freqs: np.ndarray, prob_bits: int, lanes: int) -> bytes:
    """The numpy implementation of :func:`encode` (the reference; vectorised across lanes)."""
    symbols = np.asarray(symbols).ravel()
    count = len(symbols)
    freqs = np.asarray(freqs, dtype=np.int64)
    cumulative = np.concatenate([[0], np.cumsum(freqs)[:-1]]).astype(np.uint64)
    freq_table = freqs.astype(np.uint64)
    steps = -(-count // lanes)
    state = np.full(lanes, RANS_L, dtype=np.uint64)
    shift = np.uint64(prob_bits)
    # A state at or above x_max[s] would overflow 32 bits when encoding s: emit 16 bits first.
    x_max_table = freq_table << np.uint64(32 - prob_bits)
    freq_float_table = freqs.astype(np.float64)
    words_by_step: list = [None] * steps
    for step in range(steps - 1, -1, -1):
        lo = step * lanes
        hi = min(count, lo + lanes)
        width = hi - lo
        sym = symbols[lo:hi]
        x = state[:width]
        emit = x >= x_max_table[sym]
        if emit.any():
            words_by_step[step] = (x[emit] & _WORD_MASK).astype(np.uint16)
            x[emit] >>= np.uint64(16)
        f = freq_table[sym]
        # floor(x / f) through float64 is exact here: x < 2**32, f <= 2**16, so the quotient's
        # fractional part is at least 2**-16 away from 1, far above float64's rounding error.
        quotient = np.floor(x / freq_float_table[sym]).astype(np.uint64)
        x[:] = (quotient << shift) + (x - quotient * f) + cumulative[sym]
    parts = [state.astype("<u4").tobytes()]
    parts.extend(w.astype("<u2").tobytes() for w in words_by_step if w is not None)
    return b"".join(parts)


def decode(data, count: int, freqs: np.ndarray, prob_bits: int, lanes: int) -> np.ndarray:
    """Decode ``count`` symbols from an interleaved rANS stream (untrusted ``data``).

    Returns ``uint8`` symbols for alphabets up to 256 entries, else ``uint16``.

    Raises
    ------
    BadFormatError
        If the stream is shorter than its states, runs out of words, holds a state out of range,
        or does not end in the initial state in every lane.
    TrailingDataError
        If words are left over after the last symbol.
    """
    if _speedups is not None and len(freqs) <= 256:
        table = np.ascontiguousarray(freqs, dtype="<u4")
        try:
            out = _speedups.rans_decode(data, count, table, prob_bits, lanes)
        except ValueError as exc:
            code, message, extra = exc.args if len(exc.args) == 3 else ("format", str(exc), 0)
            if code == "trailing":
                raise TrailingDataError(message, extra=extra) from None
            raise BadFormatError(message) from None
        return np.frombuffer(out, dtype=np.uint8)
    return decode_numpy(data, count, freqs, prob_bits, lanes)


def decode_numpy(data, count: int, freqs: np.ndarray, prob_bits: int, lanes: int) -> np.ndarray:
    """The numpy implementation of :func:`decode` (the reference)."""
    raw = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    state_bytes = 4 * lanes
    if len(raw) < state_bytes or (len(raw) - state_bytes) % 2:
        raise BadFormatError(
            f"rANS stream of {len(raw)} bytes cannot hold {lanes} 4-byte states followed by 2-byte words"
        )
    state = np.frombuffer(raw[:state_bytes], dtype="<u4").astype(np.uint64)
    if state.size and (state.min() < RANS_L):
        raise BadFormatError(f"rANS initial state below {RANS_L}")
    words = np.frombuffer(raw[state_bytes:], dtype="<u2").astype(np.uint64)
    freqs = np.asarray(freqs, dtype=np.int64)
    alphabet = len(freqs)
    cumulative = np.concatenate([[0], np.cumsum(freqs)[:-1]]).astype(np.uint64)
    slot_to_symbol = np.repeat(np.arange(alphabet, dtype=np.uint16 if alphabet > 256 else np.uint8), freqs)
    freq_table = freqs.astype(np.uint64)
    out = np.empty(count, dtype=slot_to_symbol.dtype)
    shift = np.uint64(prob_bits)
    mask = np.uint64((1 << prob_bits) - 1)
    position = 0
    total_words = len(words)
    steps = -(-count // lanes) if count else 0
    for step in range(steps):
        lo = step * lanes
        hi = min(count, lo + lanes)
        x = state[: hi - lo]
        slot = x & mask
        sym = slot_to_symbol[slot]
        out[lo:hi] = sym
        x[:] = freq_table[sym] * (x >> shift) + slot - cumulative[sym]
        need = x < RANS_L
        needed = int(np.count_nonzero(need))
        if needed:
            if position + needed > total_words:
                raise BadFormatError("rANS stream runs out of words before its last symbol")
            x[need] = (x[need] << np.uint64(16)) | words[position : position + needed]
            position += needed
    if position != total_words:
        raise TrailingDataError(
            f"rANS stream holds {total_words - position} words after its last symbol", extra=2 * (total_words - position)
        )
    if np.any(state != RANS_L):
        raise BadFormatError("rANS stream does not end in the initial state (corrupt stream)")
    return out
