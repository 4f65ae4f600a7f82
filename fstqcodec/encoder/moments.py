"""Per-block sums of the values and of their Fisher weights (the allocation's statistics).

One pass per tensor reads the values and the caller's Fisher together and writes, per block, the
largest |x| and the sums of ``x**2``, ``|x|``, ``w``, ``w x**2`` and ``w |x|`` in float64 (no
overflow or underflow for any float32 value, so no rescaling). The weights are
``w = F**p * 2**-e + 0.0`` with ``2**e`` the power of two just above the largest weight ``top``
(exact scaling, and the ``+ 0.0`` makes -0.0 weights +0.0); the block sums are then divided by
``top * 2**-e``, which gives the weights ``F**p / top`` that the allocation expects.

The order of every sum is fixed, so that the C pass (``_speedups.block_moments``) and the numpy
reference below give the same bits: element ``k`` of a block goes to lane ``k % 8``, each lane adds
its elements in order starting from +0.0 (every term is >= +0.0, so the start is exact), and the
lanes are combined as ``((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import _threads
from ..policy.fisher import ElementWeights
from ..stages import rans as _rans
from .source import Input

__all__ = ["BlockSums", "block_sums"]

#: Rows per piece of work: bounds the reference's temporaries and gives threads several pieces.
_SLICE_ROWS = 8192


@dataclasses.dataclass
class BlockSums:
    """Per block: largest |x|, sum x**2, sum |x|, and sum w, sum w x**2, sum w |x| (float64)."""

    absmax: np.ndarray
    squares: np.ndarray
    magnitudes: np.ndarray
    weights: np.ndarray
    weighted_squares: np.ndarray
    weighted_magnitudes: np.ndarray


def block_sums(source: Input, weights: dict) -> BlockSums:
    """The sums of every block of ``source`` under ``weights`` (``name -> float | ElementWeights``,
    from :func:`fstqcodec.policy.fisher.normalize_fisher`)."""
    blocks = len(source.counts)
    sums = BlockSums(*(np.empty(blocks) for _ in range(6)))
    pieces = []
    for t in range(len(source.specs)):
        lo, hi = int(source.first_block[t]), int(source.first_block[t + 1])
        pieces.extend((t, start, min(hi, start + _SLICE_ROWS)) for start in range(lo, hi, _SLICE_ROWS))
    _threads.map_items(lambda piece: _piece(source, weights, sums, *piece), pieces)
    return sums


def _piece(source: Input, weights: dict, sums: BlockSums, t: int, lo: int, hi: int) -> None:
    """The sums of blocks ``lo:hi`` (blocks of tensor ``t``) into ``sums``."""
    weight = weights[source.specs[t].name]
    first = (lo - int(source.first_block[t])) * source.block_size
    rows = source.matrix[lo:hi]
    if isinstance(weight, ElementWeights):
        values = weight.values.reshape(-1)[first : first + (hi - lo) * source.block_size]
        top = weight.top if weight.top > 0 else 1.0
        p2 = 2.0 ** -math.frexp(top)[1]
        parts = _moments(rows, values, weight.root, p2)
        norm = top * p2  # exact: the weights were scaled by p2 instead of divided by top
        sums.weights[lo:hi], sums.weighted_squares[lo:hi], sums.weighted_magnitudes[lo:hi] = (p / norm for p in parts[3:])
    else:
        parts = _moments(rows, None, False, 1.0)
        w, n = float(weight), source.counts[lo:hi]
        sums.weights[lo:hi], sums.weighted_squares[lo:hi], sums.weighted_magnitudes[lo:hi] = w * n, w * parts[1], w * parts[2]
    sums.absmax[lo:hi], sums.squares[lo:hi], sums.magnitudes[lo:hi] = parts[:3]


def _moments(rows: np.ndarray, fisher, root: bool, p2: float) -> list:
    """[absmax, sum x**2, sum |x|] per row, and [sum w, sum w x**2, sum w |x|] with ``fisher``
    (the first elements' weights before scaling; past them, the padding, w = 0)."""
    native = getattr(_rans._speedups, "block_moments", None)
    count = 0 if fisher is None else len(fisher)
    if native is not None:
        outputs = [np.empty(len(rows)) for _ in range(6 if fisher is not None else 3)]
        itemsize = 4 if fisher is None else fisher.itemsize
        native(rows, rows.shape[1], fisher, itemsize, count, root, p2, *outputs, *([None] * (6 - len(outputs))))
        return outputs
    from .plans import absmax_rows

    x = rows.astype(np.float64)
    magnitudes = np.abs(x)
    squares = x * x
    out = [absmax_rows(rows).astype(np.float64), _lane_total(squares), _lane_total(magnitudes)]
    if fisher is not None:
        w = np.zeros(x.size)
        f = fisher.astype(np.float64)
        w[:count] = (np.sqrt(f) if root else f) * p2 + 0.0
        w = w.reshape(x.shape)
        out += [_lane_total(w), _lane_total(w * squares), _lane_total(w * magnitudes)]
    return out


def _lane_total(terms: np.ndarray) -> np.ndarray:
    """Per row the sum of ``terms`` (rows x block_size, float64, every term >= +0.0) in the C
    pass's order: lane k % 8 in order (cumsum adds strictly in order), then a fixed tree."""
    rows, width = terms.shape
    if width % 8:
        terms = np.pad(terms, ((0, 0), (0, -width % 8)))
    lanes = np.cumsum(terms.reshape(rows, -1, 8), axis=1)[:, -1, :]
    return ((lanes[:, 0] + lanes[:, 1]) + (lanes[:, 2] + lanes[:, 3])) + ((lanes[:, 4] + lanes[:, 5]) + (lanes[:, 6] + lanes[:, 7]))
