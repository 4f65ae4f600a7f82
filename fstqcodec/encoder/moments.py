"""Per-block moments of the values and of their Fisher weights, in one pass over the data.

The allocation needs, per block, ``sum x**2``, ``sum |x|`` and ``max |x|`` and, with per-element
weights ``w``, ``sum w``, ``sum w x**2`` and ``sum w |x|``. The C accelerator computes all of them
in one pass (values and weights read once, nothing allocated but the per-block results); the
numpy code below is the reference, in chunks of rows so that its temporaries stay small.

Both sum in float64 in the same fixed order, so they give the same bits: each block's terms are
padded with zeros to a power of two and summed by halving (``t[k] += t[k + half]`` until one term
is left). Products are formed as ``w * (x * x)`` with ``x`` the float32 value in float64 (exact),
``w`` the weight in float64 (its square root where the weights are ``sqrt(F)``), times a power of
two that keeps the products in range whatever the Fisher's scale (exact too).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import _threads
from ..policy.fisher import ElementWeights
from ..stages import rans as _rans
from .source import Input

__all__ = ["Moments", "block_moments", "tree_sum_rows"]

#: Rows of the numpy reference per chunk hold about this many elements.
_CHUNK_ELEMENTS = 1 << 16


@dataclasses.dataclass
class Moments:
    """Per-block sums (float64 arrays over all blocks). The weighted ones are None when no tensor
    has per-element weights, and hold sums over unnormalised weights: divide by ``norm[t]`` for
    tensor ``t``'s blocks (``ElementWeights.top`` times the power of two applied per element)."""

    sum_squares: np.ndarray
    sum_abs: np.ndarray
    absmax: np.ndarray
    weight_sum: np.ndarray | None = None
    weighted_energy: np.ndarray | None = None
    weighted_abs: np.ndarray | None = None


def tree_sum_rows(terms: np.ndarray) -> np.ndarray:
    """Row sums of a float64 matrix in the fixed order of this module (zero padding to a power of
    two, then halving)."""
    rows, width = terms.shape
    padded = 1 << max(0, (width - 1).bit_length())
    if padded != width:
        terms = np.pad(terms, ((0, 0), (0, padded - width)))
    while padded > 1:
        padded //= 2
        terms = terms[:, :padded] + terms[:, padded : 2 * padded]
    return terms[:, 0] if width else np.zeros(rows)


def weight_prescale(weights: ElementWeights) -> float:
    """The power of two that multiplies each weight before summing (largest weight near 1)."""
    return 2.0 ** -math.frexp(weights.top)[1] if weights.top > 0 else 1.0


def block_moments(source: Input, weights: dict) -> Moments:
    """The moments of every block of ``source``; the weighted ones for tensors whose weights are
    :class:`ElementWeights` (None if no tensor's are)."""
    rows = len(source.counts)
    elementwise = [t for t, name in enumerate(source.names) if isinstance(weights[name], ElementWeights)]
    out = np.zeros((6 if elementwise else 3, rows), dtype=np.float64)
    native = getattr(_rans._speedups, "block_moments", None)
    compute = _native_moments if native is not None else _numpy_moments
    if not elementwise:
        _threads.map_ranges(rows, lambda lo, hi: compute(source, lo, hi, None, out))
    else:
        def tensor(t):
            lo, hi = int(source.first_block[t]), int(source.first_block[t + 1])
            compute(source, lo, hi, weights[source.names[t]] if t in elementwise else None, out)

        _threads.map_items(tensor, range(len(source.specs)))
    moments = Moments(*out[:3])
    if elementwise:
        moments.weight_sum, moments.weighted_energy, moments.weighted_abs = out[3:]
    return moments


def _native_moments(source: Input, lo: int, hi: int, weights: ElementWeights | None, out: np.ndarray) -> None:
    native = _rans._speedups.block_moments
    if weights is None:
        native(source.matrix, source.block_size, lo, hi, None, 4, False, 1.0, out)
    else:
        values = weights.values
        native(source.matrix, source.block_size, lo, hi, values, values.itemsize, weights.root, weight_prescale(weights), out)


def _numpy_moments(source: Input, lo: int, hi: int, weights: ElementWeights | None, out: np.ndarray) -> None:
    block_size = source.block_size
    step = max(1, _CHUNK_ELEMENTS // block_size)
    flat_weights = None if weights is None else weights.values.reshape(-1)
    prescale = None if weights is None else weight_prescale(weights)
    for start in range(lo, hi, step):
        stop = min(hi, start + step)
        values = source.matrix[start:stop].astype(np.float64)
        squares, magnitudes = values * values, np.abs(values)
        out[0, start:stop] = tree_sum_rows(squares)
        out[1, start:stop] = tree_sum_rows(magnitudes)
        out[2, start:stop] = magnitudes.max(axis=1) if block_size else 0.0
        if flat_weights is None:
            continue
        # The tensor's weights for these rows, zero past its last element (the padding).
        first, last = (start - lo) * block_size, (stop - lo) * block_size
        w = np.zeros((stop - start) * block_size, dtype=np.float64)
        w[: max(0, min(last, len(flat_weights)) - first)] = flat_weights[first:last]
        if weights.root:
            w = np.sqrt(w)
        w = (w * prescale).reshape(stop - start, block_size)
        out[3, start:stop] = tree_sum_rows(w)
        out[4, start:stop] = tree_sum_rows(w * squares)
        out[5, start:stop] = tree_sum_rows(w * magnitudes)
