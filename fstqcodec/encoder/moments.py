"""Per-block sums of the values and of their Fisher weights (the allocation's statistics).

The sums are numpy's (float32 ``einsum`` for squares and weighted sums, float64 ``sum`` for
magnitudes): they decide the allocation, and the encoder's bytes are frozen (tests/
test_byte_identity.py), so their summation order must stay numpy's, which a C loop cannot promise
to reproduce. What changed is around them: the whole-matrix reductions run over slices of rows
(temporaries of a few MiB instead of a copy of the input; slices of 8192 rows keep every row in
one piece of numpy's 8192-element buffers, which leaves the results bit for bit the same), and
the per-element weights ``float32(F**p / top)`` come from one C pass over the caller's Fisher
(``normalized_weights``) instead of a float64 copy, a division pass and a cast.
"""

from __future__ import annotations

import math

import numpy as np

from .. import _threads
from ..policy.fisher import ElementWeights
from ..stages import rans as _rans
from .source import Input

__all__ = ["value_scale", "value_sums", "weighted_sums", "element_weights32", "absmax"]

#: Rows per slice of the whole-matrix reductions (a multiple of numpy's 8192-element buffer in
#: elements whatever the block size, so rows never straddle a buffer boundary).
_SLICE_ROWS = 8192


def value_scale(absmax: np.ndarray) -> float:
    """A power of two that brings the largest |x| near 1, where squares cannot overflow or
    underflow in float32 (they do beyond about 1e19 and below about 1e-19). Multiplying by a
    power of two is exact, and only ratios matter to the allocation."""
    top = float(absmax.max()) if len(absmax) else 0.0
    if top == 0.0 or 2.0**-40 < top < 2.0**40:
        return 1.0
    return 2.0 ** -math.frexp(top)[1]


def absmax(matrix: np.ndarray) -> np.ndarray:
    """Largest |x| per row as float64 (``plans.absmax_rows``, in one C pass where built)."""
    native = getattr(_rans._speedups, "row_absmax", None)
    if native is None or not len(matrix):
        from .plans import absmax_rows

        return absmax_rows(matrix).astype(np.float64)
    out = np.empty(len(matrix), dtype=np.float64)
    _threads.map_ranges(len(matrix), lambda lo, hi: native(matrix[lo:hi], matrix.shape[1], out[lo:hi]))
    return out


def _work(matrix: np.ndarray, lo: int, hi: int, scale: float) -> np.ndarray:
    rows = matrix[lo:hi]
    return rows if scale == 1.0 else rows * np.float32(scale)


def value_sums(matrix: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(sum x**2, sum |x|) per row, on the values times ``scale``, unscaled again."""
    rows = len(matrix)
    sum_squares, sum_abs = np.empty(rows), np.empty(rows)

    def rows_slice(lo, hi):
        for start in range(lo, hi, _SLICE_ROWS):
            stop = min(hi, start + _SLICE_ROWS)
            work = _work(matrix, start, stop, scale)
            sum_squares[start:stop] = np.einsum("ij,ij->i", work, work).astype(np.float64) * (1.0 / (scale * scale))
            sum_abs[start:stop] = np.abs(work).sum(axis=1, dtype=np.float64) / scale

    # Worker ranges start at multiples of the slice, as the single-thread slices do.
    slices = -(-rows // _SLICE_ROWS)
    _threads.map_ranges(slices, lambda lo, hi: rows_slice(lo * _SLICE_ROWS, min(rows, hi * _SLICE_ROWS)))
    return sum_squares, sum_abs


def element_weights32(weights: ElementWeights, padded_size: int) -> np.ndarray:
    """The tensor's weights ``float32(F**p / top)``, zero-padded to ``padded_size`` elements."""
    out = np.zeros(padded_size, dtype=np.float32)
    values = weights.values
    top = weights.top if weights.top > 0 else 1.0
    native = getattr(_rans._speedups, "normalized_weights", None)
    if native is not None:
        native(values, values.itemsize, weights.root, top, out)
        return out
    array = values.astype(np.float64).reshape(-1)
    if weights.root:
        array = np.power(array, 0.5)
    out[: len(array)] = array / top
    return out


def weighted_sums(source: Input, t: int, weights: ElementWeights, scale: float) -> tuple:
    """(sum w, sum w x**2, sum w |x|) per block of tensor ``t``."""
    lo, hi = int(source.first_block[t]), int(source.first_block[t + 1])
    w = element_weights32(weights, (hi - lo) * source.block_size).reshape(-1, source.block_size)
    weight_sum, energy, weighted_abs = np.empty(hi - lo), np.empty(hi - lo), np.empty(hi - lo)
    for start in range(0, hi - lo, _SLICE_ROWS):
        stop = min(hi - lo, start + _SLICE_ROWS)
        part, work = w[start:stop], _work(source.matrix, lo + start, lo + stop, scale)
        weight_sum[start:stop] = part.sum(axis=1, dtype=np.float64)
        energy[start:stop] = np.einsum("ij,ij,ij->i", part, work, work).astype(np.float64) / (scale * scale)
        weighted_abs[start:stop] = np.einsum("ij,ij->i", part, np.abs(work)).astype(np.float64) / scale
    return weight_sum, energy, weighted_abs
