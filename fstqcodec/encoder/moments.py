"""Per-block sums of the values and of their Fisher weights (the allocation's statistics).

One pass per tensor reads the values and the caller's Fisher together and writes, per block, the
largest |x| and the sums of ``x**2``, ``|x|``, ``w``, ``w x**2`` and ``w |x|`` in float64 (no
overflow or underflow for any float32 value, so no rescaling). The weights are
``w = F**p * 2**-e + 0.0`` with ``2**e`` the power of two just above the largest weight ``top``
(exact scaling, and the ``+ 0.0`` makes -0.0 weights +0.0); the block sums are then divided by
``top * 2**-e``, which gives the weights ``F**p / top`` that the allocation expects.

Where the encoder's matrix is not built yet (:meth:`Input.matrix_rows_to_fill`), the pass reads
each tensor in place and copies its rows into the matrix as it goes, instead of a copy of every
tensor before it.

A float32 Fisher array at power 1 or 0.5 that :func:`fstqcodec.policy.fisher.normalize_fisher`
left unchecked (``defer=True``, a :class:`~fstqcodec.policy.fisher.DeferredWeights`) is checked
and its largest value taken in this same pass, instead of a pass of its own: its weights are then
summed unscaled (``w = F**p + 0.0``, no ``2**-e``) and the sums divided by ``top`` once every
tensor's largest value is known. That gives the same bits as scaling first: for float32 ``F`` and
``x`` no term or sum over- or underflows float64 either way, so scaling by a power of two is
exact, and ``(2**-e S) / (2**-e top)`` rounds as ``S / top`` does.

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
from ..policy.fisher import DeferredWeights, ElementWeights
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


def block_sums(source: Input, weights) -> BlockSums:
    """The sums of every block of ``source`` under ``weights`` (``name -> float | ElementWeights``
    from :func:`fstqcodec.policy.fisher.normalize_fisher`, or its :class:`DeferredWeights`).

    Raises
    ------
    EncodeError
        If a deferred Fisher array holds a negative or non-finite value (naming the first such
        tensor, as ``normalize_fisher`` would have).
    """
    blocks = len(source.counts)
    sums = BlockSums(*(np.empty(blocks) for _ in range(6)))
    # Where the tensors are not in one matrix yet, this pass reads them in place and copies them.
    fill = source.matrix_rows_to_fill()
    rows_of = (lambda t, lo, hi: (source.matrix[lo:hi], None)) if fill is None else (
        lambda t, lo, hi: (fill[0](t, lo, hi), fill[1][lo:hi]))
    unchecked = weights.unchecked if isinstance(weights, DeferredWeights) else {}
    first = [t for t, spec in enumerate(source.specs) if spec.name in unchecked]
    if unchecked:
        pieces = _pieces(source, first)
        found = _threads.map_items(lambda piece: _unchecked_piece(source, rows_of, unchecked, sums, *piece), pieces)
        maxima = {name: -math.inf for name in unchecked}  # a tensor of no elements has no pieces
        bad = set()
        for (t, _, _), (top, clean) in zip(pieces, found):
            name = source.specs[t].name
            maxima[name] = max(maxima[name], top)
            if not clean:
                bad.add(name)
        weights = weights.finish({name: None if name in bad else top for name, top in maxima.items()})
        _divide_by_top(source, weights, sums, first)
    elif isinstance(weights, DeferredWeights):
        weights = weights.finish({})
    rest = [t for t, spec in enumerate(source.specs) if spec.name not in unchecked]
    _threads.map_items(lambda piece: _piece(source, rows_of, weights, sums, *piece), _pieces(source, rest))
    if fill is not None:
        source.matrix_filled(fill[1])
    return sums


def _pieces(source: Input, tensors: list) -> list:
    """(tensor, first block, end block) slices of at most ``_SLICE_ROWS`` blocks of ``tensors``."""
    pieces = []
    for t in tensors:
        lo, hi = int(source.first_block[t]), int(source.first_block[t + 1])
        pieces.extend((t, start, min(hi, start + _SLICE_ROWS)) for start in range(lo, hi, _SLICE_ROWS))
    return pieces


def _unchecked_piece(source: Input, rows_of, unchecked: dict, sums: BlockSums, t: int, lo: int, hi: int) -> tuple:
    """The sums of blocks ``lo:hi`` of tensor ``t``, whose Fisher is unchecked, with the weights
    unscaled; returns (largest Fisher value, whether all are finite and >= 0)."""
    values, root = unchecked[source.specs[t].name]
    first = (lo - int(source.first_block[t])) * source.block_size
    rows, copy = rows_of(t, lo, hi)
    _, largest, clean = _moments(rows, values[first : first + (hi - lo) * source.block_size], root, 1.0, copy,
                                 _slices(sums, lo, hi, 6))
    return largest, clean


def _slices(sums: BlockSums, lo: int, hi: int, count: int) -> list:
    """Rows ``lo:hi`` of the first ``count`` arrays of ``sums``, which the pass writes in place."""
    arrays = (sums.absmax, sums.squares, sums.magnitudes, sums.weights, sums.weighted_squares, sums.weighted_magnitudes)
    return [a[lo:hi] for a in arrays[:count]]


def _divide_by_top(source: Input, weights: dict, sums: BlockSums, tensors: list) -> None:
    """The unscaled weight sums of ``tensors`` divided by the largest weight of all tensors."""
    top = next(w.top for w in weights.values() if isinstance(w, ElementWeights))
    top = top if top > 0 else 1.0
    if len(tensors) == len(source.specs):
        spans = [slice(None)]
    else:
        spans = [slice(int(source.first_block[t]), int(source.first_block[t + 1])) for t in tensors]
    for array in (sums.weights, sums.weighted_squares, sums.weighted_magnitudes):
        for span in spans:
            array[span] /= top


def _piece(source: Input, rows_of, weights: dict, sums: BlockSums, t: int, lo: int, hi: int) -> None:
    """The sums of blocks ``lo:hi`` (blocks of tensor ``t``) into ``sums``."""
    weight = weights[source.specs[t].name]
    first = (lo - int(source.first_block[t])) * source.block_size
    rows, copy = rows_of(t, lo, hi)
    if isinstance(weight, ElementWeights):
        values = weight.values.reshape(-1)[first : first + (hi - lo) * source.block_size]
        top = weight.top if weight.top > 0 else 1.0
        p2 = 2.0 ** -math.frexp(top)[1]
        parts = _moments(rows, values, weight.root, p2, copy, _slices(sums, lo, hi, 6))[0]
        norm = top * p2  # exact: the weights were scaled by p2 instead of divided by top
        for part in parts[3:]:
            part /= norm
    else:
        parts = _moments(rows, None, False, 1.0, copy, _slices(sums, lo, hi, 3))[0]
        w, n = float(weight), source.counts[lo:hi]
        sums.weights[lo:hi], sums.weighted_squares[lo:hi], sums.weighted_magnitudes[lo:hi] = w * n, w * parts[1], w * parts[2]


def _moments(rows: np.ndarray, fisher, root: bool, p2: float, copy: np.ndarray | None = None, outputs=None) -> tuple:
    """([absmax, sum x**2, sum |x|] per row, and [sum w, sum w x**2, sum w |x|] with ``fisher``
    (the first elements' weights before scaling; past them, the padding, w = 0); the largest
    Fisher value (-0.0 as +0.0), and whether every one is finite and >= 0 (None, None without).
    ``copy``: where given, the rows are copied into it too. ``outputs``: where given, the arrays
    (3, or 6 with ``fisher``) the sums are written into, and returned."""
    native = getattr(_rans._speedups, "block_moments", None)
    count = 0 if fisher is None else len(fisher)
    if outputs is None:
        outputs = [np.empty(len(rows)) for _ in range(6 if fisher is not None else 3)]
    if native is not None:
        itemsize = 4 if fisher is None else fisher.itemsize
        checks = native(rows, rows.shape[1], fisher, itemsize, count, root, p2, *outputs, *([None] * (6 - len(outputs))), copy)
        return (outputs, *(checks or (None, None)))
    from .plans import absmax_rows

    if copy is not None:
        copy[...] = rows

    x = rows.astype(np.float64)
    magnitudes = np.abs(x)
    squares = x * x
    out = [absmax_rows(rows).astype(np.float64), _lane_total(squares), _lane_total(magnitudes)]
    if fisher is None:
        for target, value in zip(outputs, out):
            target[...] = value
        return outputs, None, None
    w = np.zeros(x.size)
    f = fisher.astype(np.float64)
    w[:count] = (np.sqrt(f) if root else f) * p2 + 0.0
    w = w.reshape(x.shape)
    out += [_lane_total(w), _lane_total(w * squares), _lane_total(w * magnitudes)]
    for target, value in zip(outputs, out):
        target[...] = value
    clean = bool(np.all(np.isfinite(f)) and not np.any(f < 0))
    return outputs, (float(np.max(f)) + 0.0 if count else -math.inf), clean


def _lane_total(terms: np.ndarray) -> np.ndarray:
    """Per row the sum of ``terms`` (rows x block_size, float64, every term >= +0.0) in the C
    pass's order: lane k % 8 in order (cumsum adds strictly in order), then a fixed tree."""
    rows, width = terms.shape
    if width % 8:
        terms = np.pad(terms, ((0, 0), (0, -width % 8)))
    lanes = np.cumsum(terms.reshape(rows, -1, 8), axis=1)[:, -1, :]
    return ((lanes[:, 0] + lanes[:, 1]) + (lanes[:, 2] + lanes[:, 3])) + ((lanes[:, 4] + lanes[:, 5]) + (lanes[:, 6] + lanes[:, 7]))
