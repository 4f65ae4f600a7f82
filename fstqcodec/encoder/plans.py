"""Plans: what to send per block (dropped, quantized with a scale and codes, raw).

:func:`lossless_plan` and :func:`fixed_plan` need no allocation; :func:`rd_plan` quantizes as the
Fisher-weighted allocation (``policy.allocation``) says for a target cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..policy.allocation import DROP, QUANTIZE, RAW_EXACT, SIGN, SIGN_SHARED, BlockStats, allocate
from .. import _threads
from ..stages import rans as _rans
from ..stages.codebooks import resolve_codebook
from ..stages.scales import from_bf16_bits, to_bf16_bits
from .source import Input

__all__ = ["Plan", "lossless_plan", "fixed_plan", "rd_plan", "absmax_rows", "dtype_max_rows"]

#: Steps are snapped to a half-octave grid before bfloat16 rounding. Few distinct scale values
#: compress to a few bits per block, and a step up to 19% off its target costs less than those
#: bits (measured with benchmarks/rd_bound.py: finer grids lose 0.05-0.12 dB).
_STEP_GRID_PER_OCTAVE = 2
#: Quantized blocks are grouped into classes by the half-octave of their spread (std / step):
#: blocks of a class share a code distribution, so a class is the unit of context grouping.
_CLASSES_PER_OCTAVE = 2
#: Rows quantized per chunk: bounds the temporaries to a few MiB whatever the input size.
_CHUNK_ELEMENTS = 1 << 19


@dataclass
class Plan:
    """What to send per block.

    Invariants (``assemble`` relies on them; the plan builders below establish them):

    - ``mode`` has one entry per block: ``DROP``, ``QUANTIZE`` or ``RAW_EXACT`` (raw at the
      tensor's own dtype), as ``policy.allocation`` names them.
    - ``quantized_rows`` lists, ascending, exactly the blocks whose mode is ``QUANTIZE``; each of
      them has a row in ``scale_bits`` (the bfloat16 bit pattern of a positive finite scale),
      ``codes`` (``block_size`` codes, padding past a tensor's end at the code of 0) and
      ``row_class`` (its class, an index into the ``class_*`` arrays).
    - Without a ``codebook``, codes are signed grid codes in [-128, 127] (value ``code * scale``);
      with one (2**k increasing float32 levels), codes are level indices stored as the uint8 bit
      patterns of the int8 array (value ``codebook[index] * scale``).
    - Every code of a row fits its class's ``class_width`` bits (2..8): signed codes lie in
      [-2**(w-1), 2**(w-1) - 1], level indices below 2**w. The one exception is the *sign* class
      of :func:`rd_plan` (width 1, always class 0 when present): codes -1 (x < 0) and 0, decoded
      through its context's two centroids (``class_sums`` is then set), so a sign block is
      ``+-centroid * scale`` with the block's mean |x| as its scale.
    - ``class_hist[c]`` counts class ``c``'s codes, padding excluded: at ``code + 128`` for signed
      codes, at the level index with a codebook. Every code that occurs has a non-zero count.
    - ``class_sums`` (sums of ``x / scale`` per code, same indexing) and ``class_sampled`` (the
      counts behind them) are both None (no centroid codebooks) or both set.
    - ``force_packed``: a fixed-rate plan; its codes go packed, one context per width.
    - ``pending``: where set, only some rows hold their codes yet (the rows the code statistics
      sample, and those :meth:`complete` was asked for); :meth:`complete` fills the rest, each
      row with the codes it would have had at once.
    - ``memo``: what ``assemble`` derived from the plan (its contexts, its stored side sections),
      kept for the next ``assemble`` of the same plan (the size loop sizes a plan, then builds it).
    - ``grid_centroids``: whether grid contexts may decode through their bins' centroids (where
      that pays). False keeps every grid code at its own level, as unbiased rounding needs; sign
      contexts always decode through their two centroids.
    """

    mode: np.ndarray
    quantized_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    scale_bits: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint16))
    codes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int8))
    codebook: np.ndarray | None = None
    row_class: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    class_width: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    class_hist: np.ndarray = field(default_factory=lambda: np.zeros((0, 256), dtype=np.int64))
    class_sums: np.ndarray | None = None
    class_sampled: np.ndarray | None = None
    force_packed: bool = False
    grid_centroids: bool = True
    pending: "Callable[[np.ndarray], None] | None" = None
    memo: dict = field(default_factory=dict, repr=False)

    def complete(self, positions: np.ndarray | None = None) -> None:
        """Fill the codes a lazy plan left for later (see ``pending``): of the quantized rows at
        ``positions`` (indices into ``quantized_rows``), or of all of them."""
        if self.pending is None:
            return
        filled = self.memo["filled"]
        chosen = np.ones(len(filled), dtype=bool) if positions is None else np.zeros(len(filled), dtype=bool)
        if positions is not None:
            chosen[positions] = True
        chosen &= ~filled
        if chosen.any():
            self.pending(chosen)
        filled |= chosen
        if positions is None:
            self.pending = None

    def __post_init__(self) -> None:
        # The cheap structural invariants; a violation is a bug in a plan builder.
        rows = len(self.quantized_rows)
        assert len(self.scale_bits) == len(self.codes) == len(self.row_class) == rows
        assert len(self.class_width) == len(self.class_hist)
        assert (self.class_sums is None) == (self.class_sampled is None)

    @classmethod
    def dropped(cls, num_blocks: int) -> "Plan":
        """Every block dropped: the smallest message for the tensors."""
        return cls(mode=np.zeros(num_blocks, dtype=np.int8))


def lossless_plan(source: Input) -> Plan:
    """Every block raw at its tensor's dtype; all-zero blocks (not -0.0) as dropped blocks."""
    mode = np.full(len(source.counts), RAW_EXACT, dtype=np.int8)
    if len(source.counts) and all(s.dtype != "float64" for s in source.specs):
        # float32 bit patterns: -0.0 is not all-zero bits, so it stays raw and round-trips.
        zero_rows = ~np.any(source.matrix.view(np.uint32), axis=1)
        mode[zero_rows] = DROP
    return Plan(mode=mode)


def _round(values: np.ndarray, rounding: str, rng) -> np.ndarray:
    if rounding == "nearest":
        return np.rint(values)
    # Unbiased stochastic rounding: E[floor(v + U)] = v for U ~ U[0, 1).
    return np.floor(values + rng.random(values.shape, dtype=np.float32))


def _without_padding(hist: np.ndarray, source: Input, rows: np.ndarray, zero_symbol: int) -> np.ndarray:
    """A one-class histogram less the padding of ``rows`` (padding is always ``zero_symbol``)."""
    if not source.aligned:
        padding = source.block_size - source.counts[rows]
        hist[0, zero_symbol] -= int(padding.sum())
    return hist


def fixed_plan(source: Input, *, bits: int | None, codebook, rounding: str, rng) -> Plan:
    """Absmax scaling with a fixed width (uniform grid) or a fixed codebook, packed codes."""
    absmax = absmax_rows(source.matrix)
    rows = np.flatnonzero(absmax > 0)
    mode = np.zeros(len(source.counts), dtype=np.int8)
    mode[rows] = QUANTIZE
    block = source.matrix[rows]
    levels = None
    if codebook is not None:
        levels = resolve_codebook(codebook)
        top = float(np.max(np.abs(levels)))
        scale_bits = _scales_within_range(absmax[rows], top, dtype_max_rows(source, rows))
        normalized = block / from_bf16_bits(scale_bits)[:, None]
        midpoints = (levels[1:] + levels[:-1]) / 2
        # Level indices 0..255 as uint8 bit patterns in the int8 code array (Plan's invariant).
        codes = np.searchsorted(midpoints, normalized).astype(np.uint8).view(np.int8)
        width = int(round(math.log2(len(levels))))
        zero_symbol = int(np.searchsorted(midpoints, 0.0))
        hist_codes = codes.view(np.uint8)  # level indices, histogram without the +128 offset
    else:
        top = (1 << (bits - 1)) - 1
        scale_bits = _scales_within_range(absmax[rows], top, dtype_max_rows(source, rows))
        codes = np.clip(_round(block / from_bf16_bits(scale_bits)[:, None], rounding, rng), -top, top).astype(np.int8)
        width = bits
        zero_symbol = 128
        hist_codes = codes.astype(np.int64) + 128
    hist = np.bincount(hist_codes.reshape(-1), minlength=256)[None, :].astype(np.int64)
    return Plan(
        mode=mode,
        quantized_rows=rows,
        scale_bits=scale_bits,
        codes=codes,
        codebook=levels,
        row_class=np.zeros(len(rows), dtype=np.int64),
        class_width=np.array([width], dtype=np.int64),
        class_hist=_without_padding(hist, source, rows, zero_symbol),
        force_packed=True,
    )


#: Largest finite magnitude per tensor dtype. A reconstructed value above it would decode to inf
#: (which decoders reject), so the encoder never writes a code whose value exceeds it.
_DTYPE_MAX = {
    "float16": 65504.0,
    "bfloat16": float(np.array(0x7F7F0000, np.uint32).view(np.float32)),
    "float32": float(np.finfo(np.float32).max),
    "float64": float(np.finfo(np.float32).max),  # lossy coding works in float32
}


def dtype_max_rows(source: "Input", rows: np.ndarray) -> np.ndarray:
    per_tensor = np.array([_DTYPE_MAX[s.dtype] for s in source.specs], dtype=np.float64)
    if len(per_tensor) and np.all(per_tensor == per_tensor[0]):
        return np.full(len(rows), per_tensor[0])  # one dtype (the usual case): no gather
    return per_tensor[source.block_tensor[rows]] if len(per_tensor) else np.zeros(0)


def _scales_within_range(values: np.ndarray, top_level: float, dtype_max: np.ndarray) -> np.ndarray:
    """bfloat16 absmax scales (``values / top_level`` rounded up, so nothing clips), rounded down
    instead where the top level times the rounded-up scale would exceed the dtype's range."""
    bits = to_bf16_bits(values / top_level, mode="up")
    over = top_level * from_bf16_bits(bits).astype(np.float64) > dtype_max
    if over.any():
        bits[over] = to_bf16_bits((values[over] / top_level).astype(np.float32), mode="down")
    return bits


def absmax_rows(matrix: np.ndarray) -> np.ndarray:
    """Largest |x| per row. The integer max over the sign-cleared float32 bits orders finite
    floats as their magnitudes do, and avoids numpy's slow NaN-aware float reductions."""
    if not len(matrix):
        return np.zeros(0, np.float32)
    bits = matrix.view(np.uint32) & np.uint32(0x7FFFFFFF)
    return bits.max(axis=1).view(np.float32)


def _signed_width(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Smallest width w >= 2 with -2**(w-1) <= low and high <= 2**(w-1) - 1."""
    need = np.maximum(np.maximum(-low, high + 1), 1).astype(np.float64)
    return np.maximum(2, np.ceil(np.log2(need)).astype(np.int64) + 1)


def rd_plan(source: Input, stats: BlockStats, target_bits: float, *, rounding: str, rng, evaluator=None) -> Plan:
    """Quantize as the Fisher-weighted allocation says for a model cost of ``target_bits``
    (``evaluator``: from ``policy.allocation.evaluator(stats)``, reused across calls)."""
    allocation = allocate(stats, target_bits, evaluator=evaluator)
    mode = allocation.mode.astype(np.int8, copy=True)
    sign_rows = np.flatnonzero((allocation.mode == SIGN) | (allocation.mode == SIGN_SHARED))
    mode[sign_rows] = QUANTIZE
    grid = _grid_rows(source, stats, allocation, mode, rounding)
    if grid is None and not len(sign_rows):
        return Plan(mode=mode)
    parts = [] if grid is None else [grid]
    if len(sign_rows):
        shared = allocation.mode[sign_rows] == SIGN_SHARED
        parts.insert(0, _sign_rows(np.where(shared, stats.tensor_mean_abs[sign_rows], stats.mean_abs[sign_rows]), sign_rows))
    # The quantized rows in block order, and where each part's rows go (the parts are disjoint
    # and each ascending): per-row arrays and codes are written in place, never permuted.
    kind = np.zeros(len(mode), dtype=np.int8)
    for number, part in enumerate(parts, 1):
        kind[part["rows"]] = number
    rows = np.flatnonzero(kind)
    kinds = kind[rows]
    positions = [np.flatnonzero(kinds == number) for number in range(1, len(parts) + 1)]
    scale_bits = np.empty(len(rows), dtype=np.uint16)
    row_class, largest = np.empty(len(rows), dtype=np.int64), np.empty(len(rows), dtype=np.int64)
    codes = np.empty((len(rows), source.block_size), dtype=np.int8)
    first_class = 0
    for part, where in zip(parts, positions):
        scale_bits[where] = part["scale_bits"]
        row_class[where] = part["row_class"] + first_class
        largest[where] = part["largest"]
        first_class += len(part["class_width"])
    class_width = np.concatenate([p["class_width"] for p in parts])
    scales = from_bf16_bits(scale_bits)
    sample = _statistics_sample(len(rows), source.block_size)

    def fill_codes(chosen: np.ndarray) -> None:
        """Codes of the quantized rows that the mask ``chosen`` (over them) selects."""
        for part, where in zip(parts, positions):
            keep = np.flatnonzero(chosen[where])  # once, not once per array indexed
            if part is grid:
                subset = {k: part[k][keep] for k in ("rows", "scales", "offset", "largest", "capped")}
                _quantize_rows(source, subset, rounding, rng, codes, where[keep])
            else:
                _sign_codes(source, part["rows"][keep], codes, where[keep])

    # The code statistics read the sampled rows only: with deterministic rounding the other rows
    # are quantized when the message is built (Plan.pending), so a plan the size loop rejects
    # costs no pass over every value. Stochastic rounding draws in row order: all rows at once.
    lazy = rounding != "stochastic"
    filled = np.zeros(len(rows), dtype=bool)
    filled[sample if lazy else slice(None)] = True
    fill_codes(filled)
    hist, sums, sampled = _class_statistics(
        source, rows, codes, row_class, scales, largest, with_centroids=rounding == "nearest"
    )
    plan = Plan(
        mode=mode, quantized_rows=rows, scale_bits=scale_bits, codes=codes, row_class=row_class,
        class_width=class_width, class_hist=hist, class_sums=sums, class_sampled=sampled,
        pending=fill_codes if lazy else None,
    )
    plan.memo["filled"] = filled
    return plan


#: A sign block's scale (its mean |x|) is snapped to this grid per octave before bfloat16: a few
#: distinct values compress well, and a scale up to 4.4% off adds under 0.2% to the error.
_SIGN_SCALE_GRID_PER_OCTAVE = 8


def _sign_rows(mean_abs: np.ndarray, rows: np.ndarray) -> dict:
    """The sign blocks' rows, scale bits, classes, largest codes and class widths; their scales
    are ``mean_abs`` (snapped)."""
    snapped = np.exp2(np.round(np.log2(mean_abs) * _SIGN_SCALE_GRID_PER_OCTAVE) / _SIGN_SCALE_GRID_PER_OCTAVE)
    scale_bits = to_bf16_bits(snapped.astype(np.float32), mode="nearest")
    ones = np.ones(len(rows), dtype=np.int64)
    return {"rows": rows, "scale_bits": scale_bits, "row_class": 0 * ones, "largest": ones,
            "class_width": np.array([1], dtype=np.int64)}


def _sign_codes(source: Input, rows: np.ndarray, codes: np.ndarray, where: np.ndarray) -> None:
    """Codes of sign blocks ``rows`` into ``codes[where]``: -1 where x < 0, else 0."""
    native = getattr(_rans._speedups, "sign_codes", None)
    if native is not None:
        rows, where = np.ascontiguousarray(rows, dtype=np.int64), np.ascontiguousarray(where, dtype=np.int64)
        _threads.map_ranges(len(rows), lambda lo, hi: native(source.matrix, source.block_size, rows[lo:hi], codes, where[lo:hi]))
        return
    chunk = max(1, _CHUNK_ELEMENTS // source.block_size)
    for lo in range(0, len(rows), chunk):
        codes[where[lo : lo + chunk]] = np.negative(np.less(source.matrix[rows[lo : lo + chunk]], 0).view(np.int8))


def _grid_rows(source: Input, stats: BlockStats, allocation, mode: np.ndarray, rounding: str):
    """Like :func:`_sign_rows` for the blocks the allocation puts on a uniform grid, with their
    scales, rounding offsets and which rows the dtype's range caps (None if none is left once
    blocks whose codes are all zero are dropped, which marks them in ``mode``)."""
    rows = np.flatnonzero(allocation.mode == QUANTIZE)
    if not len(rows):
        return None
    scale_bits, scales = _grid_steps(allocation.step[rows], stats.absmax[rows])
    spread = np.sqrt(stats.mean_square[rows]) / scales
    keys = np.round(_CLASSES_PER_OCTAVE * np.log2(np.maximum(spread, 1e-30))).astype(np.int64)
    offset = (np.float32(0.5) - allocation.deadzone[rows].astype(np.float32))
    largest, capped = _largest_codes(source, rows, stats.absmax[rows], scales, offset, rounding)
    # A block whose codes are all zero is cheaper as a dropped block, and decodes the same.
    keep = largest > 0
    mode[rows[~keep]] = DROP
    rows, scale_bits, scales, keys, offset, largest, capped = (
        rows[keep], scale_bits[keep], scales[keep], keys[keep], offset[keep], largest[keep], capped[keep]
    )
    if not len(rows):
        return None
    class_keys, row_class = _dense_classes(keys)
    class_width = np.full(len(class_keys), 2, dtype=np.int64)
    np.maximum.at(class_width, row_class, _signed_width(-largest, np.minimum(largest, 127)))
    return {"rows": rows, "scale_bits": scale_bits, "scales": scales, "offset": offset, "row_class": row_class.astype(np.int64),
            "largest": largest, "capped": capped, "class_width": class_width}


def _dense_classes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)`` for keys in a small range (half-octaves of
    spread), by counting instead of sorting."""
    low = int(keys.min())
    present = np.bincount(keys - low) > 0
    index = np.cumsum(present) - 1
    return np.flatnonzero(present) + low, index[keys - low]


def _grid_steps(step: np.ndarray, absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The allocation's steps snapped to the half-octave grid, as bfloat16 (bits, values)."""
    step = np.exp2(np.round(np.log2(step) * _STEP_GRID_PER_OCTAVE) / _STEP_GRID_PER_OCTAVE)
    scale_bits = to_bf16_bits(step.astype(np.float32), mode="nearest")
    scales = from_bf16_bits(scale_bits)
    # Never let a code leave the 8-bit grid [-128, 127]: widen the step where it would.
    floor_step = absmax / 127.49
    too_small = scales < floor_step
    if too_small.any():
        scale_bits[too_small] = to_bf16_bits(floor_step[too_small].astype(np.float32), mode="up")
        scales = from_bf16_bits(scale_bits)
    return scale_bits, scales


def _largest_codes(source: Input, rows, absmax, scales, offset, rounding: str) -> tuple[np.ndarray, np.ndarray]:
    """Largest |code| per row, and which rows the dtype's range caps below what rounding gives."""
    # The largest |code| of a row follows from its absmax: rounding is monotone, and the
    # row's largest |x / step| is absmax / step computed with the same float32 operations.
    top = (absmax.astype(np.float32) / scales).astype(np.float32)
    if rounding == "nearest":
        largest = np.minimum(np.floor(top + offset), 127).astype(np.int64)
    else:
        # floor(v + U) reaches floor(|v|) + 1 at most; on the negative side that can be -128.
        largest = np.minimum(np.floor(top) + 1, 128).astype(np.int64)
    # Grid values beyond the dtype's range would decode to inf: cap the codes of such rows.
    cap = np.minimum(np.floor(dtype_max_rows(source, rows) / scales.astype(np.float64)), 128).astype(np.int64)
    return np.minimum(largest, cap), largest > cap


def _quantize_rows(source: Input, grid: dict, rounding: str, rng, codes: np.ndarray, where: np.ndarray) -> None:
    """Signed grid codes of the grid rows (nearest, dead-zone or stochastic rounding) into
    ``codes[where]``, in chunks; rows the dtype's range caps are clipped to their largest code."""
    rows, scales, offset = grid["rows"], grid["scales"], grid["offset"]
    uniform_offset = bool(np.all(offset == np.float32(0.5)))
    native = getattr(_rans._speedups, "quantize_rows", None)
    if native is not None and rounding != "stochastic":
        rows, where = np.ascontiguousarray(rows, dtype=np.int64), np.ascontiguousarray(where, dtype=np.int64)
        scales, offset = np.ascontiguousarray(scales, dtype=np.float32), np.ascontiguousarray(offset, dtype=np.float32)
        _threads.map_ranges(len(rows), lambda lo, hi: native(
            source.matrix, source.block_size, rows[lo:hi], scales[lo:hi], offset[lo:hi], uniform_offset, codes, where[lo:hi]))
    else:
        chunk = max(1, _CHUNK_ELEMENTS // source.block_size)
        for lo in range(0, len(rows), chunk):
            hi = min(len(rows), lo + chunk)
            normalized = source.matrix[rows[lo:hi]] / scales[lo:hi, None]
            if rounding == "stochastic":
                block = np.clip(_round(normalized, rounding, rng), -128, 127)
            elif uniform_offset:
                block = np.rint(normalized)  # |x / step| <= 127.49: no clipping needed
            else:
                # Dead-zone rounding: values just above a half step go to the smaller, cheaper code.
                block = np.copysign(np.floor(np.abs(normalized) + offset[lo:hi, None]), normalized)
            codes[where[lo:hi]] = block
    capped = grid["capped"]
    if capped.any():
        limit = grid["largest"][capped][:, None]
        codes[where[capped]] = np.clip(codes[where[capped]], -limit, limit)


#: Code histograms and centroid sums are taken over a fixed stride of rows holding about this
#: many elements (all rows for smaller inputs): the statistics of a million codes are as good as
#: those of all of them, and counting costs a pass over every code otherwise.
_STATISTICS_ELEMENTS = 1 << 20


def _statistics_stride(rows: int, block_size: int) -> int:
    return max(1, -(-rows * block_size // _STATISTICS_ELEMENTS))


def _statistics_sample(rows: int, block_size: int) -> np.ndarray:
    """Positions (among the quantized rows) of the rows the code statistics read."""
    return np.arange(0, rows, _statistics_stride(rows, block_size))


def _class_statistics(source: Input, rows, codes, row_class, scales, largest, *, with_centroids: bool):
    """Per-class histograms of codes (offset 128) and, optionally, sums of x / step per code
    with the counts behind them (else None, None).

    Every symbol within a class's code range gets a count of at least one, so a symbol the
    sample missed still gets a non-zero frequency in its context's table.
    """
    class_count = int(row_class.max()) + 1
    sample = _statistics_sample(len(rows), source.block_size)
    stride = _statistics_stride(len(rows), source.block_size)
    native = getattr(_rans._speedups, "class_statistics", None)
    if native is not None:
        counts = np.zeros(class_count * 256, dtype=np.int64)
        sums = np.zeros(class_count * 256, dtype=np.float64) if with_centroids else None
        native(source.matrix, source.block_size, np.ascontiguousarray(rows[sample], dtype=np.int64),
               np.ascontiguousarray(scales[sample], dtype=np.float32), np.ascontiguousarray(codes[sample]),
               np.ascontiguousarray(row_class[sample], dtype=np.int64), source.counts[rows[sample]].astype(np.int64), counts, sums)
        hist = counts.reshape(class_count, 256).astype(np.float64) * stride
        if sums is not None:
            sums = sums.reshape(class_count, 256)
        return _class_tables(hist, sums, stride, row_class, largest, class_count)
    index = (np.repeat(row_class[sample] * 256 + 128, source.block_size) + codes[sample].reshape(-1)).astype(np.intp)
    valid = None
    if not source.aligned:
        valid = (np.arange(source.block_size)[None, :] < source.counts[rows[sample]][:, None]).reshape(-1)
        index = index[valid]
    hist = np.bincount(index, minlength=class_count * 256).reshape(class_count, 256).astype(np.float64) * stride
    sums = None
    if with_centroids:
        normalized = (source.matrix[rows[sample]] / scales[sample, None]).reshape(-1)
        if valid is not None:
            normalized = normalized[valid]
        sums = np.bincount(index, weights=normalized, minlength=class_count * 256).reshape(class_count, 256)
    return _class_tables(hist, sums, stride, row_class, largest, class_count)


def _class_tables(hist, sums, stride: int, row_class, largest, class_count: int) -> tuple:
    """(histograms with every in-range symbol counted, centroid sums scaled by the stride or
    None, the sampled counts or None) from the sampled counts ``hist`` and sums ``sums``."""
    class_largest = np.zeros(class_count, dtype=np.int64)
    np.maximum.at(class_largest, row_class, largest)
    symbol = np.arange(256) - 128
    in_range = np.abs(symbol)[None, :] <= class_largest[:, None]
    class_hist = np.where(in_range, np.maximum(hist, 1.0), 0.0)
    if sums is None:
        return class_hist, None, None
    return class_hist, sums * stride, hist
