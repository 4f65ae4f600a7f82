"""encode / decode / inspect: the codec, tying the policy to the stages and the wire format."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .errors import BadFormatError, BudgetError, EncodeError
from .limits import DEFAULT_LIMITS, Limits
from .policy.allocation import DROP, QUANTIZE, RAW16, RAW_EXACT, BlockStats, allocate
from .policy.budget import Budget
from .policy.fisher import normalize_fisher
from .stages import bitpack, rans
from .stages.codebooks import resolve_codebook
from .stages.scales import from_bf16_bits, round_bf16, to_bf16_bits
from .wire.container import (
    CHECKSUM_SIZE,
    ENCODING_NONE,
    ENCODING_ZSTD,
    PREAMBLE,
    VERSION_MAJOR,
    VERSION_MINOR,
    decode_section,
    read_container,
    write_container,
    zstd_compress,
)
from .wire.header import DTYPES, RAW_FORMATS, Context, Layout, TensorSpec, build_header, parse_header

__all__ = ["encode", "decode", "inspect"]

#: The tensor dtypes encode accepts from numpy, and the raw format that stores each exactly.
_NUMPY_DTYPES = {np.dtype("float32"): "float32", np.dtype("float16"): "float16", np.dtype("float64"): "float64"}
_EXACT_FORMAT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64"}
_RAW_NUMPY = {"f16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "f32": np.dtype("<f4"), "f64": np.dtype("<f8")}

DEFAULT_BLOCK_SIZE = 64
#: The size loop stops once a message lands in [LOW_WATER * budget, budget].
LOW_WATER = 0.97
_MAX_SIZE_ITERATIONS = 10
#: Sizes of the codes sections are tried with zstd and kept encoded only if this much smaller.
_ZSTD_MIN_GAIN = 0.98


# ---------------------------------------------------------------------------------------------
# Input preparation


class _Input:
    """The tensors to encode, flattened into one padded (blocks x block_size) float32 matrix."""

    def __init__(self, tensors, block_size: int, nonfinite: str):
        if not isinstance(tensors, Mapping):
            raise TypeError(f"tensors must be a mapping of names to arrays, got {type(tensors).__name__}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= 65536:
            raise ValueError(f"block_size must be an int in [1, 65536], got {block_size!r}")
        if nonfinite not in ("error", "zero"):
            raise ValueError(f"nonfinite must be 'error' or 'zero', got {nonfinite!r}")
        self.block_size = block_size
        self.specs: list[TensorSpec] = []
        self.arrays: list[np.ndarray] = []  # flat, at their own dtype (bfloat16 as float32 values)
        for name, value in tensors.items():
            if not isinstance(name, str) or not name:
                raise EncodeError(f"tensor names must be non-empty strings, got {name!r}")
            dtype_name, array = _as_array(name, value)
            array = np.ascontiguousarray(array).reshape(-1)
            if not np.all(np.isfinite(array)):
                if nonfinite == "error":
                    bad = int(np.count_nonzero(~np.isfinite(array)))
                    raise EncodeError(
                        f"tensor {name!r} holds {bad} non-finite values (NaN or inf); "
                        "pass nonfinite='zero' to replace them with zeros",
                        tensor=name,
                    )
                array = np.where(np.isfinite(array), array, 0).astype(array.dtype)
            self.specs.append(TensorSpec(name, dtype_name, tuple(int(d) for d in np.shape(value)), block_size))
            self.arrays.append(array)
        self.names = [s.name for s in self.specs]
        self.elements = sum(s.size for s in self.specs)
        self.raw_bytes = sum(s.size * (2 if s.dtype == "bfloat16" else DTYPES[s.dtype].itemsize) for s in self.specs)
        counts = []
        for spec in self.specs:
            full, tail = divmod(spec.size, block_size)
            counts.append(np.full(full, block_size, dtype=np.int64))
            if tail:
                counts.append(np.array([tail], dtype=np.int64))
        self.counts = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        self.block_tensor = np.repeat(np.arange(len(self.specs)), [s.num_blocks for s in self.specs])
        self.aligned = all(s.size % block_size == 0 for s in self.specs)
        flats = [a.astype(np.float32, copy=False) for a in self.arrays]
        if self.aligned:
            flat = np.concatenate(flats) if len(flats) > 1 else (flats[0] if flats else np.zeros(0, np.float32))
            self.matrix = flat.reshape(-1, block_size)
        else:
            padded = [np.pad(f, (0, (-len(f)) % block_size)) for f in flats]
            self.matrix = np.concatenate(padded).reshape(-1, block_size) if padded else np.zeros((0, block_size), np.float32)

    def block_values(self, rows: np.ndarray, matrix: np.ndarray | None = None) -> np.ndarray:
        """The elements of blocks ``rows`` (ascending), padding removed, as one flat array."""
        matrix = self.matrix if matrix is None else matrix
        selected = matrix[rows]
        if self.aligned or np.all(self.counts[rows] == self.block_size):
            return selected.reshape(-1)
        mask = np.arange(self.block_size)[None, :] < self.counts[rows][:, None]
        return selected[mask]

    def raw_values(self, rows: np.ndarray, tensor_dtypes: list) -> np.ndarray:
        """Elements of blocks ``rows`` at their tensor's own dtype (for exact raw sections)."""
        starts = np.concatenate([[0], np.cumsum([s.num_blocks for s in self.specs])])
        pieces = []
        for row in rows:
            t = int(self.block_tensor[row])
            offset = (int(row) - int(starts[t])) * self.block_size
            pieces.append(self.arrays[t][offset : offset + int(self.counts[row])])
        return np.concatenate(pieces) if pieces else np.zeros(0)


def _as_array(name: str, value):
    """(dtype name, numpy array) for one input tensor."""
    if hasattr(value, "detach") and hasattr(value, "dtype"):
        # A torch tensor: convert without importing torch (the adapter module does the rest).
        dtype_text = str(value.dtype)
        tensor = value.detach().cpu()
        if dtype_text == "torch.bfloat16":
            return "bfloat16", tensor.float().numpy()
        value = tensor.numpy()
    array = np.asarray(value)
    dtype_name = _NUMPY_DTYPES.get(array.dtype)
    if dtype_name is None:
        raise EncodeError(
            f"tensor {name!r} has dtype {array.dtype}; supported: float16, float32, float64 (and torch bfloat16)",
            tensor=name,
        )
    return dtype_name, array


# ---------------------------------------------------------------------------------------------
# Message assembly


class _Plan:
    """Per-block choices the assembler turns into bytes."""

    def __init__(self, num_blocks: int):
        self.mode = np.zeros(num_blocks, dtype=np.int8)  # DROP / QUANTIZE / RAW16 / RAW_EXACT
        self.quantized_rows = np.zeros(0, dtype=np.int64)
        self.scale_bits = np.zeros(0, dtype=np.uint16)  # bfloat16 bits, one per quantized row
        self.codes = np.zeros((0, 0), dtype=np.int16)  # signed codes (uniform) or level indices
        self.codebook: np.ndarray | None = None  # explicit levels, or None for the uniform grid
        self.width: np.ndarray = np.zeros(0, dtype=np.int8)  # per quantized row, for codebooks fixed
        self.context_key: np.ndarray = np.zeros(0, dtype=np.int64)  # grouping of quantized rows
        self.force_packed = False
        self.normalized: np.ndarray | None = None  # x / step of quantized rows, for centroids


def _signed_width(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Smallest width w >= 2 with -2**(w-1) <= low and high <= 2**(w-1) - 1."""
    need = np.maximum(np.maximum(-low, high + 1), 1).astype(np.float64)
    return np.maximum(2, np.ceil(np.log2(need)).astype(np.int64) + 1)


def _msgpack_int_bytes(values: np.ndarray) -> int:
    return int(np.sum(np.where(values < 128, 1, np.where(values < 256, 2, 3))))


def _context_cost(counts: np.ndarray, width: int) -> tuple[float, dict]:
    """Bits for coding a histogram ``counts`` (over symbols 0..2**width-1), best of rANS and packed."""
    total = int(counts.sum())
    packed_bits = float(total * width)
    present = np.flatnonzero(counts)
    if total == 0 or len(present) == 0:
        return packed_bits, {"kind": "packed"}
    prob_bits = int(min(14, max(4, math.ceil(math.log2(total + 1)), math.ceil(math.log2(len(present))) + 1)))
    freqs = rans.normalize_frequencies(counts, prob_bits)
    first, last = int(present[0]), int(present[-1])
    table_bytes = _msgpack_int_bytes(freqs[first : last + 1]) + 12
    lanes = rans.choose_lanes(total)
    rans_bits = rans.estimate_bits(counts, freqs, prob_bits) + 8 * table_bytes + 16 * lanes + 16
    if rans_bits < packed_bits:
        return rans_bits, {"kind": "rans", "prob_bits": prob_bits, "freqs": freqs, "first": first, "last": last, "lanes": lanes}
    return packed_bits, {"kind": "packed"}


def _group_contexts(keys: np.ndarray, widths: np.ndarray, codes: np.ndarray, row_counts: np.ndarray, aligned: bool, block_size: int):
    """Merge the quantized blocks' classes into contexts where a shared table is cheaper.

    Returns (context index per quantized row, list of (width, histogram, choice)).
    """
    unique_keys, class_of_row = np.unique(keys, return_inverse=True)
    class_count = len(unique_keys)
    # Histogram of signed codes (offset by 128) per class, padding excluded.
    if aligned or np.all(row_counts == block_size):
        element_class = np.repeat(class_of_row, block_size)
        flat_codes = codes.reshape(-1)
    else:
        mask = np.arange(block_size)[None, :] < row_counts[:, None]
        element_class = np.broadcast_to(class_of_row[:, None], codes.shape)[mask]
        flat_codes = codes[mask]
    histograms = np.bincount(element_class * 256 + (flat_codes.astype(np.int64) + 128), minlength=class_count * 256)
    histograms = histograms.reshape(class_count, 256)
    class_width = np.zeros(class_count, dtype=np.int64)
    np.maximum.at(class_width, class_of_row, widths)

    def shifted(hist, width):
        offset = 128 - (1 << (width - 1))
        return hist[offset : offset + (1 << width)]

    groups = [[i] for i in range(class_count)]
    group_hist = [histograms[i].copy() for i in range(class_count)]
    group_width = [int(class_width[i]) for i in range(class_count)]
    group_cost = [_context_cost(shifted(group_hist[i], group_width[i]), group_width[i])[0] for i in range(class_count)]
    # Greedy merge of neighbours (classes are ordered by spread) while it saves bits.
    while len(groups) > 1:
        best_gain, best_index, best_state = 0.0, -1, None
        for i in range(len(groups) - 1):
            hist = group_hist[i] + group_hist[i + 1]
            width = max(group_width[i], group_width[i + 1])
            cost = _context_cost(shifted(hist, width), width)[0]
            gain = group_cost[i] + group_cost[i + 1] - cost
            if gain > best_gain:
                best_gain, best_index, best_state = gain, i, (hist, width, cost)
        if best_index < 0:
            break
        hist, width, cost = best_state
        groups[best_index : best_index + 2] = [groups[best_index] + groups[best_index + 1]]
        group_hist[best_index : best_index + 2] = [hist]
        group_width[best_index : best_index + 2] = [width]
        group_cost[best_index : best_index + 2] = [cost]
    class_to_group = np.empty(class_count, dtype=np.int64)
    for g, members in enumerate(groups):
        class_to_group[members] = g
    contexts = []
    for g in range(len(groups)):
        width = group_width[g]
        hist = shifted(group_hist[g], width)
        contexts.append((width, hist, _context_cost(hist, width)[1]))
    return class_to_group[class_of_row], contexts


#: Contexts of at most this width and at least this many elements carry their bins' centroids as
#: an explicit codebook (2**width float32 levels): at low rates the centroid of a bin sits well
#: inside it, and decoding to it instead of the bin's middle cuts the error for a few bytes.
_CENTROID_MAX_WIDTH = 4
_CENTROID_MIN_ELEMENTS = 512


def _flatten_rows(matrix: np.ndarray, row_counts: np.ndarray, source: "_Input") -> np.ndarray:
    if source.aligned or np.all(row_counts == source.block_size):
        return matrix.reshape(-1)
    mask = np.arange(source.block_size)[None, :] < row_counts[:, None]
    return matrix[mask]


def _centroids(symbols: np.ndarray, normalized: np.ndarray, width: int) -> np.ndarray:
    """Mean of x / step per symbol (the grid value where a symbol is unused)."""
    size = 1 << width
    grid = np.arange(size, dtype=np.float64) - (1 << (width - 1))
    counts = np.bincount(symbols, minlength=size)
    sums = np.bincount(symbols, weights=normalized, minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        levels = np.where(counts > 0, sums / np.maximum(counts, 1), grid)
    return levels.astype(np.float32)


def _maybe_zstd(payload: bytes, kind: str) -> list:
    """A section table entry and the stored bytes, zstd-encoded when that is smaller."""
    if len(payload) >= 64:
        compressed = zstd_compress(payload)
        if len(compressed) < len(payload) * _ZSTD_MIN_GAIN:
            return [kind, len(compressed), ENCODING_ZSTD, len(payload)], compressed
    return [kind, len(payload), ENCODING_NONE, len(payload)], payload


def _assemble(source: _Input, plan: _Plan, *, meta: dict | None, compress_header: bool) -> bytes:
    """Turn a plan into a message."""
    contexts: list[Context] = []
    context_of_block = np.zeros(len(plan.mode), dtype=np.int64)
    streams: list[bytes] = []
    codebooks = []

    if np.any(plan.mode == DROP):
        context_of_block[plan.mode == DROP] = len(contexts)
        contexts.append(Context("zero"))
        streams.append(b"")

    raw_groups = {}
    for mode in (RAW16, RAW_EXACT):
        rows = np.flatnonzero(plan.mode == mode)
        for row in rows:
            t = int(source.block_tensor[row])
            fmt = "f16" if mode == RAW16 else _EXACT_FORMAT[source.specs[t].dtype]
            raw_groups.setdefault(fmt, []).append(row)
    for fmt in sorted(raw_groups, key=list(RAW_FORMATS).index):
        rows = np.asarray(raw_groups[fmt], dtype=np.int64)
        rows.sort()
        context_of_block[rows] = len(contexts)
        contexts.append(Context("raw", width=8 * RAW_FORMATS[fmt], raw_format=fmt))
        if fmt == "f16":
            values = source.block_values(rows).astype("<f2")
        elif fmt == "bf16":
            values = (round_bf16(source.block_values(rows)).view(np.uint32) >> np.uint32(16)).astype("<u2")
        else:
            values = source.raw_values(rows, []).astype(_RAW_NUMPY[fmt])
        streams.append(values.tobytes())

    quantized_rows = plan.quantized_rows
    if len(quantized_rows):
        row_counts = source.counts[quantized_rows]
        if plan.codebook is not None:
            codebooks.append(plan.codebook)
            width = int(round(math.log2(len(plan.codebook))))
            context_of_row = np.zeros(len(quantized_rows), dtype=np.int64)
            group_specs = [(width, None, {"kind": "packed"})]
        else:
            widths = plan.width.astype(np.int64)
            if plan.force_packed:
                unique_widths, context_of_row = np.unique(widths, return_inverse=True)
                group_specs = [(int(w), None, {"kind": "packed"}) for w in unique_widths]
            else:
                context_of_row, group_specs = _group_contexts(
                    plan.context_key, widths, plan.codes, row_counts, source.aligned, source.block_size
                )
        base = len(contexts)
        for g, (width, hist, choice) in enumerate(group_specs):
            members = np.flatnonzero(context_of_row == g)
            rows = quantized_rows[members]
            codes = plan.codes[members]
            if source.aligned or np.all(row_counts[members] == source.block_size):
                flat = codes.reshape(-1)
            else:
                mask = np.arange(source.block_size)[None, :] < row_counts[members][:, None]
                flat = codes[mask]
            codebook_index = 0 if plan.codebook is not None else None
            symbols = flat if plan.codebook is not None else flat + (1 << (width - 1))
            symbols = symbols.astype(np.uint8)
            if plan.codebook is None and plan.normalized is not None and width <= _CENTROID_MAX_WIDTH and len(symbols) >= _CENTROID_MIN_ELEMENTS:
                codebook_index = len(codebooks)
                codebooks.append(_centroids(symbols, _flatten_rows(plan.normalized[members], row_counts[members], source), width))
            if choice["kind"] == "rans":
                first, last = choice["first"], choice["last"]
                freqs = choice["freqs"]
                stream = rans.encode(symbols, freqs, choice["prob_bits"], choice["lanes"])
                contexts.append(
                    Context(
                        "rans",
                        width=width,
                        codebook=codebook_index,
                        lanes=choice["lanes"],
                        prob_bits=choice["prob_bits"],
                        first_symbol=first,
                        freqs=tuple(int(f) for f in freqs[first : last + 1]),
                    )
                )
            else:
                stream = bitpack.pack(symbols, width)
                contexts.append(Context("packed", width=width, codebook=codebook_index))
            streams.append(stream)
            context_of_block[rows] = base + g

    if len(contexts) > 256:
        raise EncodeError(f"{len(contexts)} contexts exceed the format's 256")
    section_table = []
    body_parts = []
    entry, stored = _maybe_zstd(context_of_block.astype(np.uint8).tobytes(), "blocks")
    section_table.append(entry)
    body_parts.append(stored)
    entry, stored = _maybe_zstd(plan.scale_bits.astype("<u2").tobytes(), "scales")
    section_table.append(entry)
    body_parts.append(stored)
    for context, stream in zip(contexts, streams):
        if context.kind == "rans":
            entry, stored = ["codes", len(stream), ENCODING_NONE, len(stream)], stream
        else:
            entry, stored = _maybe_zstd(stream, "codes")
        section_table.append(entry)
        body_parts.append(stored)
    layout = Layout(tensors=source.specs, contexts=contexts, codebooks=codebooks, meta=meta or {})
    header = build_header(layout, section_table)
    return write_container(header, b"".join(body_parts), compress_header=compress_header)


# ---------------------------------------------------------------------------------------------
# Plans


def _lossless_plan(source: _Input) -> _Plan:
    plan = _Plan(len(source.counts))
    plan.mode[:] = RAW_EXACT
    # All-zero blocks cost nothing as zero blocks and decode exactly (but -0.0 must stay -0.0).
    if len(source.counts):
        zero_rows = ~np.any(source.matrix.view(np.uint32) if source.matrix.dtype == np.float32 else source.matrix, axis=1)
        if all(s.dtype in ("float32", "float16", "bfloat16") for s in source.specs):
            plan.mode[zero_rows] = DROP
    return plan


def _fixed_plan(source: _Input, *, bits: int | None, codebook, rounding: str, rng) -> _Plan:
    """Absmax scaling with a fixed width (uniform grid) or a fixed codebook, packed codes."""
    plan = _Plan(len(source.counts))
    absmax = np.abs(source.matrix).max(axis=1) if len(source.counts) else np.zeros(0, np.float32)
    rows = np.flatnonzero(absmax > 0)
    plan.mode[rows] = QUANTIZE
    plan.quantized_rows = rows
    plan.force_packed = True
    block = source.matrix[rows]
    if codebook is not None:
        levels = resolve_codebook(codebook)
        top = float(np.max(np.abs(levels)))
        scale_bits = to_bf16_bits(absmax[rows] / top, mode="up")
        scales = from_bf16_bits(scale_bits)
        normalized = block / scales[:, None]
        midpoints = (levels[1:] + levels[:-1]) / 2
        codes = np.searchsorted(midpoints, normalized).astype(np.int16)
        plan.codebook = levels
        plan.width = np.full(len(rows), int(round(math.log2(len(levels)))), dtype=np.int8)
    else:
        top = (1 << (bits - 1)) - 1
        scale_bits = to_bf16_bits(absmax[rows] / top, mode="up")
        scales = from_bf16_bits(scale_bits)
        scaled = block / scales[:, None]
        codes = _round(scaled, rounding, rng)
        codes = np.clip(codes, -top, top).astype(np.int16)
        plan.width = np.full(len(rows), bits, dtype=np.int8)
    plan.scale_bits = scale_bits
    plan.codes = codes
    return plan


def _round(values: np.ndarray, rounding: str, rng) -> np.ndarray:
    if rounding == "nearest":
        return np.rint(values)
    # Unbiased stochastic rounding: E[floor(v + U)] = v for U ~ U[0, 1).
    return np.floor(values + rng.random(values.shape, dtype=np.float32))


def _block_stats(source: _Input, weights: dict) -> BlockStats:
    matrix = source.matrix
    n = source.counts
    sum_squares = np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64) if len(n) else np.zeros(0)
    mean_square = np.where(n > 0, sum_squares / np.maximum(n, 1), 0.0)
    per_tensor = all(np.ndim(weights[name]) == 0 for name in source.names)
    if per_tensor:
        weight = np.array([weights[s.name] for s in source.specs], dtype=np.float64)[source.block_tensor]
        energy = weight * sum_squares
    else:
        flat_weights = []
        for spec in source.specs:
            w = weights[spec.name]
            w = np.full(spec.size, w, dtype=np.float64) if np.ndim(w) == 0 else np.asarray(w, dtype=np.float64).reshape(-1)
            flat_weights.append(np.pad(w, (0, (-spec.size) % source.block_size)))
        w_matrix = np.concatenate(flat_weights).reshape(-1, source.block_size) if flat_weights else np.zeros((0, source.block_size))
        weight = w_matrix.sum(axis=1) / np.maximum(n, 1)
        energy = np.einsum("ij,ij,ij->i", w_matrix, matrix, matrix)
    absmax = np.abs(matrix).max(axis=1).astype(np.float64) if len(n) else np.zeros(0)
    raw_bits = np.array([16 if s.dtype == "bfloat16" else 8 * DTYPES[s.dtype].itemsize for s in source.specs], dtype=np.int64)[source.block_tensor]
    return BlockStats(count=n, weight=weight, mean_square=mean_square, weighted_energy=energy, absmax=absmax, raw_bits=raw_bits)


#: Steps are snapped to a 1/8-octave grid before bfloat16 rounding: a handful of distinct scale
#: values compress well, and a step off by at most 4.5% costs almost nothing in rate-distortion.
_STEP_GRID_PER_OCTAVE = 2
#: Quantized blocks are grouped into contexts by the half-octave of their spread (std / step).
_CLASSES_PER_OCTAVE = 2


def _rd_plan(source: _Input, stats: BlockStats, target_bits: float, *, rounding: str, rng) -> _Plan:
    allocation = allocate(stats, target_bits)
    plan = _Plan(len(source.counts))
    plan.mode[:] = allocation.mode
    rows = np.flatnonzero(allocation.mode == QUANTIZE)
    if len(rows):
        step = allocation.step[rows]
        step = np.exp2(np.round(np.log2(step) * _STEP_GRID_PER_OCTAVE) / _STEP_GRID_PER_OCTAVE)
        scale_bits = to_bf16_bits(step.astype(np.float32), mode="nearest")
        scales = from_bf16_bits(scale_bits)
        # Never let a code leave the 8-bit grid [-128, 127]: widen the step where it would.
        floor_step = stats.absmax[rows] / 127.49
        too_small = scales < floor_step
        if too_small.any():
            scale_bits[too_small] = to_bf16_bits(floor_step[too_small].astype(np.float32), mode="up")
            scales = from_bf16_bits(scale_bits)
        normalized = source.matrix[rows] / scales[:, None]
        if rounding == "nearest":
            # Dead-zone rounding: values just above a half step go to the cheaper, smaller code.
            deadzone = allocation.deadzone[rows].astype(np.float32)[:, None]
            codes = np.copysign(np.floor(np.abs(normalized) + (np.float32(0.5) - deadzone)), normalized)
        else:
            codes = _round(normalized, rounding, rng)
        codes = np.clip(codes, -128, 127).astype(np.int16)
        low = codes.min(axis=1)
        high = codes.max(axis=1)
        # A block whose codes are all zero is cheaper as a dropped block, with the same values.
        keep = (low != 0) | (high != 0)
        plan.mode[rows[~keep]] = DROP
        rows, codes, scale_bits, scales, low, high = rows[keep], codes[keep], scale_bits[keep], scales[keep], low[keep], high[keep]
        if rounding == "nearest":
            # Stochastic rounding must stay unbiased, so only nearest rounding gets centroids.
            plan.normalized = normalized[keep]
        plan.quantized_rows = rows
        plan.codes = codes
        plan.scale_bits = scale_bits
        plan.width = _signed_width(low.astype(np.int64), high.astype(np.int64)).astype(np.int8)
        spread = np.sqrt(stats.mean_square[rows]) / scales
        # Class = half-octave of the spread (std / step): blocks in a class share a code distribution.
        plan.context_key = np.round(_CLASSES_PER_OCTAVE * np.log2(np.maximum(spread, 1e-30))).astype(np.int64)
    return plan


# ---------------------------------------------------------------------------------------------
# Public API


def encode(
    tensors,
    *,
    fisher=None,
    budget=None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    bits: int | None = None,
    codebook=None,
    rounding: str = "nearest",
    seed: int = 0,
    nonfinite: str = "error",
    meta: dict | None = None,
    compress_header: bool = True,
) -> bytes:
    """Encode named tensors into one fstq message.

    Parameters
    ----------
    tensors : Mapping[str, array-like]
        Names to float16, float32 or float64 arrays (torch tensors too, including bfloat16).
    fisher : Mapping[str, array-like or float], optional
        Non-negative importance per element (same shapes) or per tensor (scalars). The encoder
        minimises ``sum_i F_i (x_i - xhat_i)**2``. None means uniform importance.
    budget : Budget or int, optional
        Size limit of the whole message (an int is a number of bytes). None means lossless.
    block_size : int
        Elements per block (1..65536); each block gets its own bit-width and scale.
    bits : int, optional
        Fixed-rate mode: every block on the uniform grid of this width (2..8) with an absmax
        scale, packed codes. Excludes ``budget`` and ``codebook``.
    codebook : str or array-like, optional
        Fixed-rate mode with explicit levels (``"nf4"`` or 2**k increasing values), absmax scale.
    rounding : {"nearest", "stochastic"}
        Stochastic rounding is unbiased and uses ``seed``.
    seed : int
        Seed of the random generator (stochastic rounding only). The same input, options and seed
        give the same bytes.
    nonfinite : {"error", "zero"}
        What to do with NaN and inf: refuse (default) or replace with 0.
    meta : dict, optional
        Small scalar metadata carried in the header (``str`` keys).
    compress_header : bool
        zstd-compress the header when that makes it smaller.

    Returns
    -------
    bytes

    Raises
    ------
    EncodeError
        Non-finite values, unsupported dtypes, Fisher weights that do not match.
    BudgetError
        The budget is below the smallest message for these tensors.
    TypeError, ValueError
        Misuse of the arguments.
    """
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    if bits is not None and (isinstance(bits, bool) or bits not in range(2, 9)):
        raise ValueError(f"bits must be an int from 2 to 8, got {bits!r}")
    if sum(x is not None for x in (budget, bits, codebook)) > 1:
        raise TypeError("give at most one of budget, bits, codebook")
    if meta is not None and not isinstance(meta, dict):
        raise TypeError("meta must be a dict")
    source = _Input(tensors, block_size, nonfinite)
    weights = normalize_fisher(fisher, source.names, {s.name: s.shape for s in source.specs})
    rng = np.random.default_rng(seed)
    if bits is not None or codebook is not None:
        plan = _fixed_plan(source, bits=bits, codebook=codebook, rounding=rounding, rng=rng)
        return _assemble(source, plan, meta=meta, compress_header=compress_header)
    if budget is None:
        return _assemble(source, _lossless_plan(source), meta=meta, compress_header=compress_header)
    if isinstance(budget, int) and not isinstance(budget, bool):
        budget = Budget(max_bytes=budget)
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a Budget or an int number of bytes, got {type(budget).__name__}")
    limit = budget.resolve(elements=source.elements, raw_bytes=source.raw_bytes)
    return _encode_to_budget(source, weights, limit, rounding=rounding, seed=seed, meta=meta, compress_header=compress_header)


def _encode_to_budget(source, weights, limit, *, rounding, seed, meta, compress_header) -> bytes:
    # The smallest message: every block dropped. If even that does not fit, nothing will.
    floor_plan = _Plan(len(source.counts))
    smallest = _assemble(source, floor_plan, meta=meta, compress_header=compress_header)
    if len(smallest) > limit:
        raise BudgetError(
            f"budget of {limit} bytes is below the smallest message for these tensors ({len(smallest)} bytes: "
            "header, names and block table); raise the budget or send fewer tensors",
            budget=limit,
            minimum=len(smallest),
        )
    if limit >= source.raw_bytes // 2:
        lossless = _assemble(source, _lossless_plan(source), meta=meta, compress_header=compress_header)
        if len(lossless) <= limit:
            return lossless
    stats = _block_stats(source, weights)
    fixed_bits = 8.0 * len(smallest)
    target = max(8.0 * limit - fixed_bits, 0.0)
    best, best_size = smallest, len(smallest)
    low_target, high_target = 0.0, math.inf  # bracket on the model target: fits / does not fit
    for _ in range(_MAX_SIZE_ITERATIONS):
        rng = np.random.default_rng(seed)
        message = _assemble(source, _rd_plan(source, stats, target, rounding=rounding, rng=rng), meta=meta, compress_header=compress_header)
        size = len(message)
        if size <= limit:
            if size > best_size:
                best, best_size = message, size
            if size >= LOW_WATER * limit:
                break
            low_target = max(low_target, target)
        else:
            high_target = min(high_target, target)
        # Scale the target by how far the real size is from the budget, kept inside the bracket.
        variable = max(8.0 * size - fixed_bits, 1.0)
        proposal = target * (8.0 * limit * (1 - (1 - LOW_WATER) / 3) - fixed_bits) / variable
        if not low_target < proposal < high_target:
            proposal = 0.5 * (low_target + high_target) if math.isfinite(high_target) else 2 * max(target, 1.0)
        target = proposal
    return best


def _resolve_limits(limits) -> Limits:
    if limits is None:
        return DEFAULT_LIMITS
    if not isinstance(limits, Limits):
        raise TypeError(f"limits must be a fstqcodec.Limits or None, got {type(limits).__name__}")
    return limits


def _open(data, limits):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
    container = read_container(data, limits)
    layout = parse_header(container.header, limits, body_offset=container.body_offset, body_length=container.body_length)
    return container, layout


def _block_table(layout: Layout):
    """Per block: element count and start offset in the concatenated output."""
    counts, starts = [], []
    offset = 0
    for spec in layout.tensors:
        nb = spec.num_blocks
        if nb:
            start = offset + np.arange(nb, dtype=np.int64) * spec.block_size
            count = np.full(nb, spec.block_size, dtype=np.int64)
            count[-1] = spec.size - (nb - 1) * spec.block_size
            starts.append(start)
            counts.append(count)
        offset += spec.size
    if not counts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(counts), np.concatenate(starts)


def _read_block_contexts(container, layout: Layout) -> np.ndarray:
    section = layout.sections[0]
    total_blocks = layout.total_blocks
    if section.decoded_length != total_blocks:
        raise BadFormatError(f"blocks section declares {section.decoded_length} bytes, the tensors have {total_blocks} blocks")
    ids = np.frombuffer(decode_section(container, section, "blocks section"), dtype=np.uint8)
    if len(ids) and int(ids.max()) >= len(layout.contexts):
        bad = int(np.argmax(ids >= len(layout.contexts)))
        raise BadFormatError(f"block #{bad} names context {int(ids[bad])}, the header has {len(layout.contexts)}")
    return ids


def decode(data, *, limits: Limits | None = None) -> dict:
    """Decode a message into ``name -> numpy array`` with the original names, shapes and dtypes.

    bfloat16 tensors come back as float32 arrays holding bfloat16 values (numpy has no bfloat16).

    Parameters
    ----------
    data : bytes-like
        An untrusted message.
    limits : Limits, optional
        Bounds on what the message may declare; None means :data:`fstqcodec.DEFAULT_LIMITS`.

    Returns
    -------
    dict[str, numpy.ndarray]

    Raises
    ------
    DecodeError
        A subclass naming what is wrong (truncated, bad format, unsupported version or feature,
        checksum mismatch, trailing data, limit exceeded). Nothing else, for any input bytes.
    TypeError
        If ``data`` is not bytes-like or ``limits`` is not a Limits.
    """
    limits = _resolve_limits(limits)
    container, layout = _open(data, limits)
    block_contexts = _read_block_contexts(container, layout)
    counts, starts = _block_table(layout)
    contexts = layout.contexts
    is_quantized = np.array([c.quantized for c in contexts], dtype=bool)
    quantized_block = is_quantized[block_contexts] if len(contexts) else np.zeros(0, bool)
    quantized_count = int(np.count_nonzero(quantized_block))
    scale_section = layout.sections[1]
    if scale_section.decoded_length != 2 * quantized_count:
        raise BadFormatError(
            f"scales section declares {scale_section.decoded_length} bytes, {quantized_count} quantized blocks need {2 * quantized_count}"
        )
    scale_bits = np.frombuffer(decode_section(container, scale_section, "scales section"), dtype="<u2")
    scales_all = np.zeros(len(block_contexts), dtype=np.float32)
    scales_all[quantized_block] = from_bf16_bits(scale_bits)
    wide = any(c.kind == "raw" and c.raw_format == "f64" for c in contexts)
    output = np.zeros(layout.total_elements, dtype=np.float64 if wide else np.float32)
    order = np.argsort(block_contexts, kind="stable")
    boundaries = np.searchsorted(block_contexts[order], np.arange(len(contexts) + 1))
    for index, context in enumerate(contexts):
        rows = order[boundaries[index] : boundaries[index + 1]]
        section = layout.sections[2 + index]
        element_count = int(counts[rows].sum())
        what = f"codes section of context #{index}"
        if context.kind == "zero":
            expected = 0
        elif context.kind == "raw":
            expected = element_count * RAW_FORMATS[context.raw_format]
        elif context.kind == "packed":
            expected = bitpack.packed_size(element_count, context.width)
        else:
            expected = None
            # A stream holds the lane states and at most one 16-bit word per symbol.
            bound = 4 * context.lanes + 2 * element_count
            if section.decoded_length > bound:
                raise BadFormatError(f"{what} declares {section.decoded_length} bytes, at most {bound} possible")
        if expected is not None and section.decoded_length != expected:
            raise BadFormatError(f"{what} declares {section.decoded_length} bytes, its {len(rows)} blocks need {expected}")
        if context.kind == "zero":
            continue
        payload = decode_section(container, section, what)
        if context.kind == "raw":
            values = np.frombuffer(payload, dtype=_RAW_NUMPY[context.raw_format])
            if context.raw_format == "bf16":
                values = (values.astype(np.uint32) << np.uint32(16)).view(np.float32)
        else:
            if context.kind == "packed":
                symbols = bitpack.unpack(payload, context.width, element_count)
            else:
                symbols = rans.decode(payload, element_count, context.full_frequencies(), context.prob_bits, context.lanes)
            if context.codebook is None:
                levels = np.arange(1 << context.width, dtype=np.float32) - np.float32(1 << (context.width - 1))
            else:
                levels = layout.codebooks[context.codebook]
            row_counts = counts[rows]
            values = levels[symbols] * np.repeat(scales_all[rows], row_counts)
        _scatter(output, values, starts[rows], counts[rows])
    result = {}
    offset = 0
    for spec in layout.tensors:
        flat = output[offset : offset + spec.size]
        offset += spec.size
        if spec.dtype == "bfloat16":
            array = round_bf16(flat.astype(np.float32))
        else:
            with np.errstate(over="ignore"):
                array = flat.astype(DTYPES[spec.dtype])
        if not np.all(np.isfinite(array)):
            raise BadFormatError(f"tensor {spec.name!r} decodes to non-finite values")
        result[spec.name] = array.reshape(spec.shape)
    return result


def _scatter(output: np.ndarray, values: np.ndarray, starts: np.ndarray, counts: np.ndarray):
    """Write ``values`` (the blocks' elements back to back) to their places in ``output``."""
    if not len(starts):
        return
    block = int(counts.max())
    if np.all(counts == block):
        if np.all(np.diff(starts) == block):
            output[int(starts[0]) : int(starts[0]) + len(values)] = values
            return
        positions = starts[:, None] + np.arange(block)[None, :]
        output[positions.reshape(-1)] = values
        return
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    positions = np.repeat(starts - offsets, counts) + np.arange(int(counts.sum()))
    output[positions] = values


def inspect(data, *, limits: Limits | None = None) -> dict:
    """Describe a message without decoding its codes: version, sizes, tensors, bit-widths.

    Returns
    -------
    dict
        ``version``, ``size``, ``header_size`` (stored), ``sections`` (kind, stored and decoded
        sizes), ``tensors`` (name, dtype, shape, block size, blocks), ``contexts``,
        ``width_histogram`` (blocks per bit-width: 0 dropped, 1-8 quantized, 16/32/64 raw),
        ``elements`` and ``bits_per_element`` over the whole message, and ``meta``.

    Raises
    ------
    DecodeError
        As :func:`decode` does for the parts it reads.
    """
    limits = _resolve_limits(limits)
    container, layout = _open(data, limits)
    block_contexts = _read_block_contexts(container, layout)
    per_context = np.bincount(block_contexts, minlength=len(layout.contexts)) if len(block_contexts) else np.zeros(len(layout.contexts), np.int64)
    histogram: dict[int, int] = {}
    for context, blocks in zip(layout.contexts, per_context):
        if blocks:
            histogram[context.width] = histogram.get(context.width, 0) + int(blocks)
    size = len(container.data)
    elements = layout.total_elements
    return {
        "version": f"{container.major}.{container.minor}",
        "size": size,
        "header_size": container.header_stored_length,
        "header_encoding": "zstd" if container.header_encoding == 1 else "none",
        "framing_size": PREAMBLE.size + CHECKSUM_SIZE,
        "sections": [
            {"kind": s.kind, "stored": s.stored_length, "encoding": s.encoding, "decoded": s.decoded_length}
            for s in layout.sections
        ],
        "tensors": [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "block_size": t.block_size, "blocks": t.num_blocks}
            for t in layout.tensors
        ],
        "contexts": [c.to_wire() for c in layout.contexts],
        "width_histogram": dict(sorted(histogram.items())),
        "elements": elements,
        "bits_per_element": (8.0 * size / elements) if elements else None,
        "meta": layout.meta,
    }


_ = (VERSION_MAJOR, VERSION_MINOR)
