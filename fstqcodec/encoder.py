"""The encoder: from named tensors and a policy's choices to a message (not normative).

Pipeline: :class:`Input` flattens the tensors into one padded (blocks x block_size) matrix;
a *plan* says per block what to send (dropped, quantized with a scale and codes, raw); the
assembler groups quantized blocks into contexts (shared code tables), picks each context's coder,
and frames the sections. :func:`encode_to_budget` runs the Fisher-weighted allocation and
corrects its target from the real message size until the message fills the budget.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping

import numpy as np

from .errors import BudgetError, EncodeError
from .limits import DEFAULT_LIMITS
from .policy.allocation import DROP, QUANTIZE, RAW16, RAW_EXACT, BlockStats, allocate
from .stages import bitpack, rans
from .stages.codebooks import resolve_codebook
from .stages.scales import from_bf16_bits, round_bf16, to_bf16_bits
from .wire.container import ENCODING_NONE, ENCODING_ZSTD, write_container, zstd_compress
from .wire.header import DTYPES, RAW_FORMATS, Context, Layout, Schema, TensorSpec, build_header

__all__ = ["Input", "lossless_plan", "fixed_plan", "encode_to_budget", "assemble"]

_NUMPY_DTYPES = {np.dtype("float32"): "float32", np.dtype("float16"): "float16", np.dtype("float64"): "float64"}
_EXACT_FORMAT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64"}
_RAW_NUMPY = {"f16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "f32": np.dtype("<f4"), "f64": np.dtype("<f8")}

#: The size loop accepts a message in [LOW_WATER * budget, budget] ...
LOW_WATER = 0.96
#: ... and aims a little below the budget, so that the first try usually lands inside.
_AIM = 0.985
_MAX_SIZE_ITERATIONS = 8
#: A section is stored zstd-encoded only if that makes it at least this much smaller.
_ZSTD_MIN_GAIN = 0.98
#: Steps are snapped to a half-octave grid before bfloat16 rounding. Few distinct scale values
#: compress to a few bits per block, and a step up to 19% off its target costs less than those
#: bits (measured with benchmarks/rd_bound.py: finer grids lose 0.05-0.12 dB).
_STEP_GRID_PER_OCTAVE = 2
#: Quantized blocks are grouped into classes by the half-octave of their spread (std / step):
#: blocks of a class share a code distribution, so a class is the unit of context grouping.
_CLASSES_PER_OCTAVE = 2
#: Contexts of at most this width and at least this many elements carry their bins' centroids as
#: an explicit codebook (2**width float32 levels): at low rates a bin's centroid sits well inside
#: it, and decoding to it instead of the bin's middle cuts the error for a few bytes.
_CENTROID_MAX_WIDTH = 4
_CENTROID_MIN_ELEMENTS = 512
#: Rows quantized per chunk: bounds the temporaries to a few MiB whatever the input size.
_CHUNK_ELEMENTS = 1 << 19


# ---------------------------------------------------------------------------------------------
# Input


def _check_name(name) -> None:
    """Names a default decoder accepts: non-empty str, valid UTF-8, at most max_name_length bytes."""
    if not isinstance(name, str) or not name:
        raise EncodeError(f"tensor names must be non-empty strings, got {name!r}")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise EncodeError(f"tensor name {name!r} is not valid UTF-8 (it holds a surrogate)", tensor=name) from None
    if len(encoded) > DEFAULT_LIMITS.max_name_length:
        raise EncodeError(
            f"tensor name of {len(encoded)} UTF-8 bytes; decoders refuse more than {DEFAULT_LIMITS.max_name_length} by default",
            tensor=name,
        )


def _as_array(name: str, value):
    """(dtype name, numpy array) for one input tensor."""
    if hasattr(value, "detach") and hasattr(value, "dtype"):
        # A torch tensor: convert without importing torch (the adapter module does the rest).
        tensor = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            return "bfloat16", tensor.float().numpy()
        value = tensor.numpy()
    array = np.asarray(value)
    if array.dtype.kind == "f" and not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    dtype_name = _NUMPY_DTYPES.get(array.dtype)
    if dtype_name is None:
        raise EncodeError(
            f"tensor {name!r} has dtype {array.dtype}; supported: float16, float32, float64 (and torch bfloat16)",
            tensor=name,
        )
    return dtype_name, array


class Input:
    """The tensors to encode, flattened into one padded (blocks x block_size) float32 matrix.

    Raises
    ------
    EncodeError
        Bad names, unsupported dtypes, non-finite values (unless ``nonfinite="zero"``).
    """

    def __init__(self, tensors, block_size: int, nonfinite: str):
        if not isinstance(tensors, Mapping):
            raise TypeError(f"tensors must be a mapping of names to arrays, got {type(tensors).__name__}")
        try:
            block_size = operator.index(block_size) if not isinstance(block_size, bool) else None
        except TypeError:
            block_size = None
        if block_size is None or not 1 <= block_size <= 65536:
            raise ValueError("block_size must be an int in [1, 65536]")
        if nonfinite not in ("error", "zero"):
            raise ValueError(f"nonfinite must be 'error' or 'zero', got {nonfinite!r}")
        self.block_size = block_size
        self.specs: list[TensorSpec] = []
        self.arrays: list[np.ndarray] = []  # flat, at their own dtype (bfloat16 as float32 values)
        for name, value in tensors.items():
            _check_name(name)
            dtype_name, array = _as_array(name, value)
            if array.ndim > DEFAULT_LIMITS.max_ndim:
                raise EncodeError(
                    f"tensor {name!r} has {array.ndim} dimensions; decoders refuse more than {DEFAULT_LIMITS.max_ndim} by default",
                    tensor=name,
                )
            shape = tuple(int(d) for d in array.shape)
            array = np.ascontiguousarray(array).reshape(-1)
            finite = np.isfinite(array)
            if not finite.all():
                if nonfinite == "error":
                    bad = int(array.size - np.count_nonzero(finite))
                    raise EncodeError(
                        f"tensor {name!r} holds {bad} non-finite values (NaN or inf); "
                        "pass nonfinite='zero' to replace them with zeros",
                        tensor=name,
                    )
                array = np.where(finite, array, 0).astype(array.dtype)
            self.specs.append(TensorSpec(name, dtype_name, shape, block_size))
            self.arrays.append(array)
        if len(self.specs) > DEFAULT_LIMITS.max_tensors:
            raise EncodeError(f"{len(self.specs)} tensors; decoders refuse more than {DEFAULT_LIMITS.max_tensors} by default")
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
        self.first_block = np.concatenate([[0], np.cumsum([s.num_blocks for s in self.specs])]).astype(np.int64)
        self.aligned = all(s.size % block_size == 0 for s in self.specs)
        flats = [a.astype(np.float32, copy=False) for a in self.arrays]
        if not self.aligned:
            flats = [np.pad(f, (0, (-len(f)) % block_size)) for f in flats]
        if not flats:
            flat = np.zeros(0, np.float32)
        elif len(flats) == 1:
            flat = flats[0]
        else:
            flat = np.concatenate(flats)
        self.matrix = flat.reshape(-1, block_size)

    def check_quantizable(self) -> None:
        """Lossy coding works in float32: refuse float64 values beyond its range.

        Raises
        ------
        EncodeError
            Naming the first tensor with such values.
        """
        for spec, array in zip(self.specs, self.arrays):
            if spec.dtype == "float64" and array.size and float(np.max(np.abs(array))) > float(np.finfo(np.float32).max):
                raise EncodeError(
                    f"tensor {spec.name!r} holds values beyond the float32 range, which lossy coding cannot "
                    "represent; encode it losslessly (budget=None)",
                    tensor=spec.name,
                )

    def flatten_rows(self, matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Row-wise ``matrix`` (one row per block in ``rows``) as a flat array, padding removed."""
        if self.aligned:
            return matrix.reshape(-1)
        counts = self.counts[rows]
        if np.all(counts == self.block_size):
            return matrix.reshape(-1)
        mask = np.arange(self.block_size)[None, :] < counts[:, None]
        return matrix[mask]

    def raw_values(self, rows: np.ndarray, fmt: str) -> np.ndarray:
        """Elements of blocks ``rows`` (ascending) in raw format ``fmt``, exactly where the format
        can hold them."""
        if fmt != "f64":
            # float32, float16 and bfloat16 values sit exactly in the float32 matrix.
            values = self.flatten_rows(self.matrix[rows], rows)
            if fmt == "bf16":
                return (round_bf16(values).view(np.uint32) >> np.uint32(16)).astype("<u2")
            return values.astype(_RAW_NUMPY[fmt])
        # float64: from the original arrays, one contiguous run of blocks per tensor.
        pieces = []
        tensor_of_row = self.block_tensor[rows]
        for t in np.unique(tensor_of_row):
            mine = rows[tensor_of_row == t] - self.first_block[t]
            flat = self.arrays[t]
            if len(mine) == int(self.first_block[t + 1] - self.first_block[t]):
                pieces.append(flat)
                continue
            starts = mine * self.block_size
            lengths = np.minimum(self.block_size, len(flat) - starts)
            offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
            pieces.append(flat[offsets + np.arange(int(lengths.sum()))])
        return np.concatenate(pieces).astype("<f8") if pieces else np.zeros(0, "<f8")


# ---------------------------------------------------------------------------------------------
# Plans


class Plan:
    """What to send per block.

    Quantized blocks (``quantized_rows``, ascending) carry a bfloat16 scale and a row of codes:
    signed grid codes in [-128, 127] for the uniform grid, or level indices with a fixed
    ``codebook``. Each quantized block belongs to a class (``row_class``); the per-class code
    histograms (offset by 128) and sums of ``x / step`` per code feed context grouping and
    centroid codebooks.
    """

    def __init__(self, num_blocks: int):
        self.mode = np.zeros(num_blocks, dtype=np.int8)  # DROP / QUANTIZE / RAW16 / RAW_EXACT
        self.quantized_rows = np.zeros(0, dtype=np.int64)
        self.scale_bits = np.zeros(0, dtype=np.uint16)
        self.codes = np.zeros((0, 0), dtype=np.int8)
        self.codebook: np.ndarray | None = None
        self.row_class = np.zeros(0, dtype=np.int64)
        self.class_width = np.zeros(0, dtype=np.int64)
        self.class_hist = np.zeros((0, 256), dtype=np.int64)
        self.class_sums: np.ndarray | None = None  # None: no centroid codebooks
        self.class_sampled: np.ndarray | None = None  # counts behind class_sums
        self.force_packed = False


def lossless_plan(source: Input) -> Plan:
    """Every block raw at its tensor's dtype; all-zero blocks (not -0.0) as dropped blocks."""
    plan = Plan(len(source.counts))
    plan.mode[:] = RAW_EXACT
    if len(source.counts) and all(s.dtype != "float64" for s in source.specs):
        # float32 bit patterns: -0.0 is not all-zero bits, so it stays raw and round-trips.
        zero_rows = ~np.any(source.matrix.view(np.uint32), axis=1)
        plan.mode[zero_rows] = DROP
    return plan


def _round(values: np.ndarray, rounding: str, rng) -> np.ndarray:
    if rounding == "nearest":
        return np.rint(values)
    # Unbiased stochastic rounding: E[floor(v + U)] = v for U ~ U[0, 1).
    return np.floor(values + rng.random(values.shape, dtype=np.float32))


def _padding_per_row(source: Input, rows: np.ndarray) -> np.ndarray:
    return source.block_size - source.counts[rows]


def _finish_histograms(plan: Plan, source: Input, zero_symbol: int):
    """Remove padding (always code ``zero_symbol``) from the class histograms."""
    if source.aligned:
        return
    padding = _padding_per_row(source, plan.quantized_rows)
    if padding.any():
        np.subtract.at(plan.class_hist[:, zero_symbol], plan.row_class, padding)


def fixed_plan(source: Input, *, bits: int | None, codebook, rounding: str, rng) -> Plan:
    """Absmax scaling with a fixed width (uniform grid) or a fixed codebook, packed codes."""
    plan = Plan(len(source.counts))
    absmax = _absmax_rows(source.matrix)
    rows = np.flatnonzero(absmax > 0)
    plan.mode[rows] = QUANTIZE
    plan.quantized_rows = rows
    plan.force_packed = True
    block = source.matrix[rows]
    if codebook is not None:
        levels = resolve_codebook(codebook)
        top = float(np.max(np.abs(levels)))
        scale_bits = _scales_within_range(absmax[rows], top, _dtype_max_rows(source, rows))
        normalized = block / from_bf16_bits(scale_bits)[:, None]
        midpoints = (levels[1:] + levels[:-1]) / 2
        codes = np.searchsorted(midpoints, normalized).astype(np.int8)
        plan.codebook = levels
        width = int(round(math.log2(len(levels))))
        zero_symbol = int(np.searchsorted(midpoints, 0.0))
        hist_codes = codes.astype(np.int64)  # level indices, histogram without the +128 offset
    else:
        top = (1 << (bits - 1)) - 1
        scale_bits = _scales_within_range(absmax[rows], top, _dtype_max_rows(source, rows))
        codes = np.clip(_round(block / from_bf16_bits(scale_bits)[:, None], rounding, rng), -top, top).astype(np.int8)
        width = bits
        zero_symbol = 128
        hist_codes = codes.astype(np.int64) + 128
    plan.scale_bits = scale_bits
    plan.codes = codes
    plan.row_class = np.zeros(len(rows), dtype=np.int64)
    plan.class_width = np.array([width], dtype=np.int64)
    plan.class_hist = np.bincount(hist_codes.reshape(-1), minlength=256)[None, :].astype(np.int64)
    _finish_histograms(plan, source, zero_symbol)
    return plan


#: Largest finite magnitude per tensor dtype. A reconstructed value above it would decode to inf
#: (which decoders reject), so the encoder never writes a code whose value exceeds it.
_DTYPE_MAX = {
    "float16": 65504.0,
    "bfloat16": float(np.array(0x7F7F0000, np.uint32).view(np.float32)),
    "float32": float(np.finfo(np.float32).max),
    "float64": float(np.finfo(np.float32).max),  # lossy coding works in float32
}


def _dtype_max_rows(source: "Input", rows: np.ndarray) -> np.ndarray:
    per_tensor = np.array([_DTYPE_MAX[s.dtype] for s in source.specs], dtype=np.float64)
    return per_tensor[source.block_tensor[rows]] if len(per_tensor) else np.zeros(0)


def _scales_within_range(values: np.ndarray, top_level: float, dtype_max: np.ndarray) -> np.ndarray:
    """bfloat16 absmax scales (``values / top_level`` rounded up, so nothing clips), rounded down
    instead where the top level times the rounded-up scale would exceed the dtype's range."""
    bits = to_bf16_bits(values / top_level, mode="up")
    over = top_level * from_bf16_bits(bits).astype(np.float64) > dtype_max
    if over.any():
        bits[over] = to_bf16_bits((values[over] / top_level).astype(np.float32), mode="down")
    return bits


def _absmax_rows(matrix: np.ndarray) -> np.ndarray:
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


def _value_scale(absmax: np.ndarray) -> float:
    """A power of two that brings the largest |x| near 1, where squares cannot overflow or
    underflow in float32 (they do beyond about 1e19 and below about 1e-19). Multiplying by a
    power of two is exact, and only ratios matter to the allocation."""
    top = float(absmax.max()) if len(absmax) else 0.0
    if top == 0.0 or 2.0**-40 < top < 2.0**40:
        return 1.0
    return 2.0 ** -math.frexp(top)[1]


def block_stats(source: Input, weights: dict) -> BlockStats:
    """Per-block statistics for the allocation (in float64; the sums in float32 on values
    rescaled by a power of two when their magnitude is extreme)."""
    matrix = source.matrix
    n = source.counts
    absmax = _absmax_rows(matrix).astype(np.float64)
    scale = _value_scale(absmax)
    work = matrix if scale == 1.0 else matrix * np.float32(scale)
    unscale = 1.0 / (scale * scale)
    sum_squares = np.einsum("ij,ij->i", work, work).astype(np.float64) * unscale if len(n) else np.zeros(0)
    mean_square = sum_squares / np.maximum(n, 1)
    if all(np.ndim(weights[name]) == 0 for name in source.names):
        weight = np.array([weights[s.name] for s in source.specs], dtype=np.float64)[source.block_tensor]
        energy = weight * sum_squares
    else:
        weight = np.empty(len(n), dtype=np.float64)
        energy = np.empty(len(n), dtype=np.float64)
        for t, spec in enumerate(source.specs):
            lo, hi = int(source.first_block[t]), int(source.first_block[t + 1])
            w = weights[spec.name]
            if np.ndim(w) == 0:
                weight[lo:hi] = w
                energy[lo:hi] = w * sum_squares[lo:hi]
                continue
            # Weights arrive normalised to a maximum of 1 (policy.fisher), so float32 holds them.
            w = np.pad(np.asarray(w, dtype=np.float32).reshape(-1), (0, (-spec.size) % source.block_size))
            w = w.reshape(-1, source.block_size)
            weight[lo:hi] = w.sum(axis=1, dtype=np.float64) / np.maximum(n[lo:hi], 1)
            energy[lo:hi] = np.einsum("ij,ij,ij->i", w, work[lo:hi], work[lo:hi]).astype(np.float64) * unscale
    raw_bits = np.array([16 if s.dtype == "bfloat16" else 8 * DTYPES[s.dtype].itemsize for s in source.specs], dtype=np.int64)
    return BlockStats(count=n, weight=weight, mean_square=mean_square, weighted_energy=energy, absmax=absmax, raw_bits=raw_bits[source.block_tensor])


def rd_plan(source: Input, stats: BlockStats, target_bits: float, *, rounding: str, rng) -> Plan:
    """Quantize as the Fisher-weighted allocation says for a model cost of ``target_bits``."""
    allocation = allocate(stats, target_bits)
    plan = Plan(len(source.counts))
    plan.mode[:] = allocation.mode
    rows = np.flatnonzero(allocation.mode == QUANTIZE)
    if not len(rows):
        return plan
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
    spread = np.sqrt(stats.mean_square[rows]) / scales
    keys = np.round(_CLASSES_PER_OCTAVE * np.log2(np.maximum(spread, 1e-30))).astype(np.int64)
    offset = (np.float32(0.5) - allocation.deadzone[rows].astype(np.float32))
    # The largest |code| of a row follows from its absmax: rounding is monotone, and the
    # row's largest |x / step| is absmax / step computed with the same float32 operations.
    top = (stats.absmax[rows].astype(np.float32) / scales).astype(np.float32)
    if rounding == "nearest":
        largest = np.minimum(np.floor(top + offset), 127).astype(np.int64)
    else:
        # floor(v + U) reaches floor(|v|) + 1 at most; on the negative side that can be -128.
        largest = np.minimum(np.floor(top) + 1, 128).astype(np.int64)
    # Grid values beyond the dtype's range would decode to inf: cap the codes of such rows.
    cap = np.minimum(np.floor(_dtype_max_rows(source, rows) / scales.astype(np.float64)), 128).astype(np.int64)
    capped = largest > cap
    largest = np.minimum(largest, cap)
    # A block whose codes are all zero is cheaper as a dropped block, and decodes the same.
    keep = largest > 0
    plan.mode[rows[~keep]] = DROP
    rows, scale_bits, scales, keys, offset, largest, capped = (
        rows[keep], scale_bits[keep], scales[keep], keys[keep], offset[keep], largest[keep], capped[keep]
    )
    if not len(rows):
        return plan
    class_keys, row_class = np.unique(keys, return_inverse=True)
    class_count = len(class_keys)
    codes = np.empty((len(rows), source.block_size), dtype=np.int8)
    uniform_offset = bool(np.all(offset == np.float32(0.5)))
    chunk = max(1, _CHUNK_ELEMENTS // source.block_size)
    for lo in range(0, len(rows), chunk):
        hi = min(len(rows), lo + chunk)
        normalized = source.matrix[rows[lo:hi]] / scales[lo:hi, None]
        if rounding == "stochastic":
            codes[lo:hi] = np.clip(_round(normalized, rounding, rng), -128, 127)
        elif uniform_offset:
            codes[lo:hi] = np.rint(normalized)  # |x / step| <= 127.49: no clipping needed
        else:
            # Dead-zone rounding: values just above a half step go to the smaller, cheaper code.
            codes[lo:hi] = np.copysign(np.floor(np.abs(normalized) + offset[lo:hi, None]), normalized)
    if capped.any():
        limit = largest[capped][:, None]
        codes[capped] = np.clip(codes[capped], -limit, limit)
    plan.quantized_rows = rows
    plan.codes = codes
    plan.scale_bits = scale_bits
    plan.row_class = row_class
    plan.class_width = np.full(class_count, 2, dtype=np.int64)
    np.maximum.at(plan.class_width, row_class, _signed_width(-largest, np.minimum(largest, 127)))
    _class_statistics(plan, source, scales, largest, with_centroids=rounding == "nearest")
    return plan


#: Code histograms and centroid sums are taken over a fixed stride of rows holding about this
#: many elements (all rows for smaller inputs): the statistics of a million codes are as good as
#: those of all of them, and counting costs a pass over every code otherwise.
_STATISTICS_ELEMENTS = 1 << 20


def _class_statistics(plan: Plan, source: Input, scales: np.ndarray, largest: np.ndarray, *, with_centroids: bool):
    """Per-class histograms of codes (offset 128) and, optionally, sums of x / step per code.

    Every symbol within a class's code range gets a count of at least one, so a symbol the
    sample missed still gets a non-zero frequency in its context's table.
    """
    rows = plan.quantized_rows
    class_count = len(plan.class_width)
    stride = max(1, -(-len(rows) * source.block_size // _STATISTICS_ELEMENTS))
    sample = np.arange(0, len(rows), stride)
    sample_codes = plan.codes[sample]
    index = (np.repeat(plan.row_class[sample] * 256 + 128, source.block_size) + sample_codes.reshape(-1)).astype(np.intp)
    valid = None
    if not source.aligned:
        valid = (np.arange(source.block_size)[None, :] < source.counts[rows[sample]][:, None]).reshape(-1)
        index = index[valid]
    hist = np.bincount(index, minlength=class_count * 256).reshape(class_count, 256).astype(np.float64) * stride
    class_largest = np.zeros(class_count, dtype=np.int64)
    np.maximum.at(class_largest, plan.row_class, largest)
    symbol = np.arange(256) - 128
    in_range = np.abs(symbol)[None, :] <= class_largest[:, None]
    plan.class_hist = np.where(in_range, np.maximum(hist, 1.0), 0.0)
    if with_centroids:
        normalized = (source.matrix[rows[sample]] / scales[sample, None]).reshape(-1)
        if valid is not None:
            normalized = normalized[valid]
        sums = np.bincount(index, weights=normalized, minlength=class_count * 256).reshape(class_count, 256)
        plan.class_sums = sums * stride
        plan.class_sampled = hist


# ---------------------------------------------------------------------------------------------
# Contexts and coders


def _msgpack_int_bytes(values: np.ndarray) -> int:
    return int(np.sum(np.where(values < 128, 1, np.where(values < 256, 2, 3))))


def _context_choice(counts: np.ndarray, width: int) -> tuple[float, dict]:
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


def _window(hist: np.ndarray, width: int) -> np.ndarray:
    """Signed-code histogram (offset 128) as symbol counts for a context of ``width`` bits."""
    offset = 128 - (1 << (width - 1))
    return hist[offset : offset + (1 << width)]


def _group_classes(plan: Plan) -> tuple[np.ndarray, list]:
    """Merge neighbouring classes into contexts where a shared table is cheaper.

    Returns (group index per class, list of (width, symbol counts, coder choice, classes)).
    """
    class_count = len(plan.class_width)
    if plan.codebook is not None or plan.force_packed:
        # Fixed-rate plans: one context per width, codes packed.
        groups = {}
        for c in range(class_count):
            groups.setdefault(int(plan.class_width[c]), []).append(c)
        members = list(groups.values())
    else:
        members = [[c] for c in range(class_count)]
    hists = [plan.class_hist[m].sum(axis=0) for m in members]
    widths = [int(plan.class_width[m].max()) for m in members]

    def symbols(hist, width):
        return hist[: 1 << width] if plan.codebook is not None else _window(hist, width)

    if not (plan.codebook is not None or plan.force_packed):
        costs = [_context_choice(symbols(h, w), w)[0] for h, w in zip(hists, widths)]
        # Greedy merge of neighbours (classes are ordered by spread) while it saves bits.
        while len(members) > 1:
            best_gain, best_index, best_state = 0.0, -1, None
            for i in range(len(members) - 1):
                hist = hists[i] + hists[i + 1]
                width = max(widths[i], widths[i + 1])
                cost = _context_choice(symbols(hist, width), width)[0]
                gain = costs[i] + costs[i + 1] - cost
                if gain > best_gain:
                    best_gain, best_index, best_state = gain, i, (hist, width, cost)
            if best_index < 0:
                break
            hist, width, cost = best_state
            members[best_index : best_index + 2] = [members[best_index] + members[best_index + 1]]
            hists[best_index : best_index + 2] = [hist]
            widths[best_index : best_index + 2] = [width]
            costs[best_index : best_index + 2] = [cost]
    group_of_class = np.empty(class_count, dtype=np.int64)
    contexts = []
    for g, m in enumerate(members):
        group_of_class[m] = g
        counts = symbols(hists[g], widths[g])
        choice = {"kind": "packed"} if plan.force_packed else _context_choice(counts, widths[g])[1]
        contexts.append((widths[g], counts, choice, m))
    return group_of_class, contexts


def _centroid_levels(plan: Plan, classes: list, width: int) -> np.ndarray:
    """Mean of x / step per symbol over ``classes`` (the grid value where a symbol is unused)."""
    counts = _window(plan.class_sampled[classes].sum(axis=0), width)
    sums = _window(plan.class_sums[classes].sum(axis=0), width)
    grid = np.arange(1 << width, dtype=np.float64) - (1 << (width - 1))
    levels = np.where(counts > 0, sums / np.maximum(counts, 1), grid)
    return levels.astype(np.float32)


def _maybe_zstd(payload: bytes, kind: str) -> tuple[list, bytes]:
    """A section table entry and the stored bytes, zstd-encoded when that is clearly smaller."""
    if len(payload) >= 64:
        compressed = zstd_compress(payload)
        if len(compressed) < len(payload) * _ZSTD_MIN_GAIN:
            return [kind, len(compressed), ENCODING_ZSTD, len(payload)], compressed
    return [kind, len(payload), ENCODING_NONE, len(payload)], payload


def assemble(source: Input, plan: Plan, *, meta: dict | None, compress_header: bool, schema: Schema | None = None) -> bytes:
    """Turn a plan into a message."""
    contexts: list[Context] = []
    context_of_block = np.zeros(len(plan.mode), dtype=np.uint8)
    streams: list[bytes] = []
    codebooks: list[np.ndarray] = []

    if np.any(plan.mode == DROP):
        context_of_block[plan.mode == DROP] = len(contexts)
        contexts.append(Context("zero"))
        streams.append(b"")

    raw_rows: dict[str, list] = {}
    for mode in (RAW16, RAW_EXACT):
        for row in np.flatnonzero(plan.mode == mode):
            dtype = source.specs[int(source.block_tensor[row])].dtype
            raw_rows.setdefault("f16" if mode == RAW16 else _EXACT_FORMAT[dtype], []).append(row)
    for fmt in sorted(raw_rows, key=list(RAW_FORMATS).index):
        rows = np.sort(np.asarray(raw_rows[fmt], dtype=np.int64))
        context_of_block[rows] = len(contexts)
        contexts.append(Context("raw", width=8 * RAW_FORMATS[fmt], raw_format=fmt))
        streams.append(source.raw_values(rows, fmt).tobytes())

    rows_q = plan.quantized_rows
    if len(rows_q):
        group_of_class, groups = _group_classes(plan)
        context_of_row = group_of_class[plan.row_class]
        base = len(contexts)
        if plan.codebook is not None:
            codebooks.append(plan.codebook)
        for g, (width, counts, choice, classes) in enumerate(groups):
            members = np.flatnonzero(context_of_row == g)
            rows = rows_q[members]
            flat = source.flatten_rows(plan.codes[members], rows)
            if plan.codebook is not None:
                codebook_index = 0
                symbols = flat.view(np.uint8)
            else:
                codebook_index = None
                symbols = (flat.astype(np.int16) + (1 << (width - 1))).astype(np.uint8)
                if plan.class_sums is not None and width <= _CENTROID_MAX_WIDTH and len(symbols) >= _CENTROID_MIN_ELEMENTS:
                    codebook_index = len(codebooks)
                    codebooks.append(_centroid_levels(plan, classes, width))
            if choice["kind"] == "rans":
                first, last = choice["first"], choice["last"]
                stream = rans.encode(symbols, choice["freqs"], choice["prob_bits"], choice["lanes"])
                contexts.append(
                    Context(
                        "rans",
                        width=width,
                        codebook=codebook_index,
                        lanes=choice["lanes"],
                        prob_bits=choice["prob_bits"],
                        first_symbol=first,
                        freqs=tuple(int(f) for f in choice["freqs"][first : last + 1]),
                    )
                )
            else:
                stream = bitpack.pack(symbols, width)
                contexts.append(Context("packed", width=width, codebook=codebook_index))
            streams.append(stream)
            context_of_block[rows] = base + g

    if len(contexts) > 256:
        raise EncodeError(f"{len(contexts)} contexts exceed the format's 256")
    section_table, body_parts = [], []
    for kind, payload in (("blocks", context_of_block.tobytes()), ("scales", plan.scale_bits.astype("<u2").tobytes())):
        entry, stored = _maybe_zstd(payload, kind)
        section_table.append(entry)
        body_parts.append(stored)
    for context, stream in zip(contexts, streams):
        if context.kind == "rans":  # rANS output is incompressible: do not spend time on zstd
            entry, stored = ["codes", len(stream), ENCODING_NONE, len(stream)], stream
        else:
            entry, stored = _maybe_zstd(stream, "codes")
        section_table.append(entry)
        body_parts.append(stored)
    layout = Layout(tensors=source.specs, contexts=contexts, codebooks=codebooks, meta=meta or {})
    header = build_header(layout, section_table, schema=schema)
    return write_container(header, b"".join(body_parts), compress_header=compress_header)


# ---------------------------------------------------------------------------------------------
# Budget


def encode_to_budget(source: Input, weights: dict, limit: int, *, rounding: str, seed: int, **options) -> bytes:
    """The best message the allocation finds within ``limit`` bytes.

    Raises
    ------
    BudgetError
        If even the smallest message (every block dropped) exceeds ``limit``.
    """
    smallest = assemble(source, Plan(len(source.counts)), **options)
    if len(smallest) > limit:
        raise BudgetError(
            f"budget of {limit} bytes is below the smallest message for these tensors ({len(smallest)} bytes: "
            "header, names and block table); raise the budget or send fewer tensors",
            budget=limit,
            minimum=len(smallest),
        )
    if limit >= source.raw_bytes // 2:
        lossless = assemble(source, lossless_plan(source), **options)
        if len(lossless) <= limit:
            return lossless
    source.check_quantizable()
    stats = block_stats(source, weights)
    fixed_bits = 8.0 * len(smallest)
    target = max(8.0 * limit * _AIM - fixed_bits, 0.0)
    best, best_size = smallest, len(smallest)
    fits, overshoots = 0.0, math.inf  # bracket on the model target
    for _ in range(_MAX_SIZE_ITERATIONS):
        plan = rd_plan(source, stats, target, rounding=rounding, rng=np.random.default_rng(seed))
        message = assemble(source, plan, **options)
        size = len(message)
        if size <= limit:
            if size > best_size:
                best, best_size = message, size
            if size >= LOW_WATER * limit:
                break
            fits = max(fits, target)
        else:
            overshoots = min(overshoots, target)
        # Scale the target by how far the real size is from the aim, kept inside the bracket.
        proposal = target * (8.0 * limit * _AIM - fixed_bits) / max(8.0 * size - fixed_bits, 1.0)
        if not fits < proposal < overshoots:
            proposal = 0.5 * (fits + overshoots) if math.isfinite(overshoots) else 2 * max(target, 1.0)
        target = proposal
    return best
