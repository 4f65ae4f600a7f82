"""The decoder: validated container and header in, arrays out (spec section 5).

Runs on untrusted bytes: every declared size is checked against the limits and the bytes present
before anything is allocated, and every failure is a :class:`fstqcodec.DecodeError` subclass.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import _threads
from .errors import BadFormatError
from .limits import DEFAULT_LIMITS, Limits
from .stages import bitpack, rans
from .stages.scales import from_bf16_bits, round_bf16
from .wire.container import CHECKSUM_SIZE, PREAMBLE, decode_section, read_container
from .wire.header import DTYPES, RAW_FORMATS, Layout, Schema, TensorSpec, parse_header
from .wire.masks import visibility

__all__ = ["decode_message", "read_message", "inspect_message", "resolve_limits"]

_RAW_NUMPY = {"f16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "f32": np.dtype("<f4"), "f64": np.dtype("<f8")}


def resolve_limits(limits) -> Limits:
    if limits is None:
        return DEFAULT_LIMITS
    if not isinstance(limits, Limits):
        raise TypeError(f"limits must be a fstqcodec.Limits or None, got {type(limits).__name__}")
    return limits


def _check_schemas(schemas) -> tuple:
    """``schemas`` (None, a Schema or an iterable of them) as a tuple of Schema.

    Raises
    ------
    TypeError
        If anything but Schema objects is given.
    """
    if schemas is None:
        return ()
    if isinstance(schemas, Schema):
        return (schemas,)
    if isinstance(schemas, (str, bytes)):
        raise TypeError("schemas must be a fstqcodec.Schema or an iterable of them")
    schemas = tuple(schemas)
    for schema in schemas:
        if not isinstance(schema, Schema):
            raise TypeError(f"schemas must be fstqcodec.Schema objects, got {type(schema).__name__}")
    return schemas


def _open(data, limits, schemas=None):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
    schemas = _check_schemas(schemas)
    container = read_container(data, limits)
    layout = parse_header(container.header, limits, body_offset=container.body_offset, body_length=container.body_length, schemas=schemas)
    return container, layout


def _block_table(layout: Layout):
    """Per block: element count (int32) and start offset (int64) in the concatenated output."""
    counts, starts = [], []
    offset = 0
    for spec in layout.tensors:
        nb = spec.num_blocks
        if nb:
            start = offset + np.arange(nb, dtype=np.int64) * spec.block_size
            count = np.full(nb, spec.block_size, dtype=np.int32)
            count[-1] = spec.size - (nb - 1) * spec.block_size
            starts.append(start)
            counts.append(count)
        offset += spec.size
    if not counts:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
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


def visible_elements(layout: Layout) -> dict:
    """Tensor name -> boolean array of its shape, True where its masks keep the element, for the
    tensors that carry masks (spec 5.9)."""
    return {layout.tensors[index].name: visibility(layout.tensors[index].shape, masks) for index, masks in layout.masks.items()}


def _stored_layout(layout: Layout, visible: dict) -> Layout:
    """The layout the body is coded in: a masked tensor stands for its visible elements, in C
    order, as a 1-D tensor (its blocks cut those elements only)."""
    if not visible:
        return layout
    tensors = [
        TensorSpec(spec.name, spec.dtype, (int(np.count_nonzero(visible[spec.name])),), spec.block_size) if spec.name in visible else spec
        for spec in layout.tensors
    ]
    return dataclasses.replace(layout, tensors=tensors)


def _unmask(layout: Layout, visible: dict, stored: dict) -> dict:
    """Place the visible elements of masked tensors in their shapes; hidden elements are +0.0."""
    result = {}
    for spec in layout.tensors:
        values = stored[spec.name]
        if spec.name in visible:
            full = np.zeros(spec.shape, dtype=values.dtype)
            full[visible[spec.name]] = values
            values = full
        result[spec.name] = values
    return result


def read_message(data, limits: Limits | None = None, schemas=None) -> tuple:
    """Parse and decode a message once: ``(container, layout, name -> array)``."""
    limits = resolve_limits(limits)
    container, layout = _open(data, limits, schemas)
    visible = visible_elements(layout)
    # Overflow and invalid operations are checked for explicitly (non-finite results are a
    # BadFormatError); a caller's np.seterr must not turn them into FloatingPointError.
    with np.errstate(all="ignore"):
        stored = _decode_body(container, _stored_layout(layout, visible))
    return container, layout, _unmask(layout, visible, stored)


def decode_message(data, limits: Limits | None = None, schemas=None) -> dict:
    """Decode a message into ``name -> array`` (see :func:`fstqcodec.decode`)."""
    return read_message(data, limits, schemas)[2]


def _expected_section_length(context, element_count: int, declared: int, what: str):
    """The exact decoded length a context's section must have (None for rANS: bounded only)."""
    if context.kind == "zero":
        return 0
    if context.kind == "raw":
        return element_count * RAW_FORMATS[context.raw_format]
    if context.kind == "packed":
        return bitpack.packed_size(element_count, context.width)
    if context.lanes < rans.min_lanes(element_count):
        raise BadFormatError(
            f"{what}: {context.lanes} lanes for {element_count} symbols; at most {rans.MAX_STEPS} symbols per lane"
        )
    # A stream is the lane states and then whole 16-bit words, at most one per symbol; all of it
    # is decided here, before the section is decompressed (FORMAT.md step 19a).
    states, bound = 4 * context.lanes, 4 * context.lanes + 2 * element_count
    if declared < states or declared > bound or (declared - states) % 2:
        raise BadFormatError(f"{what} declares {declared} bytes, not {states} bytes of states and up to {element_count} words")
    return None


def _decode_body(container, layout: Layout) -> dict:
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
    del quantized_block, scale_bits
    wide = any(c.kind == "raw" and c.raw_format == "f64" for c in contexts)
    output = np.zeros(layout.total_elements, dtype=np.float64 if wide else np.float32)
    order = np.argsort(block_contexts, kind="stable")
    boundaries = np.searchsorted(block_contexts[order], np.arange(len(contexts) + 1))

    def decode_context(index):
        """Decode context ``index`` into its blocks of ``output`` (its own elements: contexts
        run on the worker threads when ``decode`` has them)."""
        context = contexts[index]
        rows = order[boundaries[index] : boundaries[index + 1]]
        section = layout.sections[2 + index]
        row_counts = counts[rows]
        element_count = int(row_counts.sum(dtype=np.int64))
        what = f"codes section of context #{index}"
        expected = _expected_section_length(context, element_count, section.decoded_length, what)
        if expected is not None and section.decoded_length != expected:
            raise BadFormatError(f"{what} declares {section.decoded_length} bytes, its {len(rows)} blocks need {expected}")
        # Every section is read, the zero context's (which must be empty) included, so that
        # nothing in the message goes unchecked.
        payload = decode_section(container, section, what)
        if context.kind == "zero":
            return
        if context.kind == "raw":
            values = np.frombuffer(payload, dtype=_RAW_NUMPY[context.raw_format])
            if context.raw_format == "bf16":
                values = (values.astype(np.uint32) << np.uint32(16)).view(np.float32)
            _scatter(output, values, starts[rows], row_counts)
            return
        if context.kind == "packed":
            symbols = bitpack.unpack(payload, context.width, element_count)
        else:
            symbols = rans.decode(payload, element_count, context.full_frequencies(), context.prob_bits, context.lanes)
        del payload
        if context.codebook is None:
            levels = np.arange(1 << context.width, dtype=np.float32) - np.float32(1 << (context.width - 1))
        else:
            levels = layout.codebooks[context.codebook]
        _dequantize_into(output, symbols, levels, scales_all[rows], starts[rows], row_counts)

    _threads.map_items(decode_context, range(len(contexts)))
    result = {}
    offset = 0
    for spec in layout.tensors:
        flat = output[offset : offset + spec.size]
        offset += spec.size
        if spec.dtype == "bfloat16":
            array = round_bf16(flat.astype(np.float32))
        else:
            array = flat.astype(DTYPES[spec.dtype], copy=False)
        if not np.isfinite(array).all():
            raise BadFormatError(f"tensor {spec.name!r} decodes to non-finite values")
        result[spec.name] = array.reshape(spec.shape)
    return result


#: Elements dequantized per step: bounds the temporaries (values, positions) to a few MiB.
_CHUNK_ELEMENTS = 1 << 20


def _dequantize_into(output, symbols, levels, scales, starts, counts):
    """output[block elements] = levels[symbol] * scale (binary32, one rounding), in chunks."""
    if not len(counts):
        return
    native = getattr(rans._speedups, "dequantize", None)
    if native is not None:
        symbols = np.ascontiguousarray(symbols, dtype=np.uint8)
        if not native(symbols, np.ascontiguousarray(levels, dtype=np.float32), np.ascontiguousarray(scales, dtype=np.float32),
                      np.ascontiguousarray(starts, dtype=np.int64), np.ascontiguousarray(counts, dtype=np.int64),
                      output, output.itemsize):
            raise BadFormatError(f"a code has no level in its context's codebook of {len(levels)}")
        return
    if int(counts.min()) == int(counts.max()):
        block = int(counts[0])
        rows_per_chunk = max(1, _CHUNK_ELEMENTS // block)
        grid = symbols.reshape(-1, block)
        for lo in range(0, len(counts), rows_per_chunk):
            hi = min(len(counts), lo + rows_per_chunk)
            values = levels[grid[lo:hi]] * scales[lo:hi, None]
            _scatter(output, values.reshape(-1), starts[lo:hi], counts[lo:hi])
        return
    element_starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, int(counts.max())))
    for lo in range(0, len(counts), rows_per_chunk):
        hi = min(len(counts), lo + rows_per_chunk)
        chunk_symbols = symbols[element_starts[lo] : element_starts[hi]]
        values = levels[chunk_symbols] * np.repeat(scales[lo:hi], counts[lo:hi])
        _scatter(output, values, starts[lo:hi], counts[lo:hi])


def _scatter(output: np.ndarray, values: np.ndarray, starts: np.ndarray, counts: np.ndarray):
    """Write ``values`` (the blocks' elements back to back) to their places in ``output``."""
    if not len(starts):
        return
    block = int(counts.max())
    if int(counts.min()) == block:
        if np.all(np.diff(starts) == block):  # consecutive blocks: one slice
            output[int(starts[0]) : int(starts[0]) + len(values)] = values
            return
        view = output[: (len(output) // block) * block].reshape(-1, block) if np.all(starts % block == 0) else None
        if view is not None and int(starts[-1]) + block <= len(output):
            view[starts // block] = values.reshape(-1, block)
            return
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // block)
    element_starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    for lo in range(0, len(starts), rows_per_chunk):
        hi = min(len(starts), lo + rows_per_chunk)
        chunk_counts = counts[lo:hi].astype(np.int64)
        offsets = element_starts[lo:hi] - element_starts[lo]
        positions = np.repeat(starts[lo:hi] - offsets, chunk_counts) + np.arange(int(chunk_counts.sum()))
        output[positions] = values[element_starts[lo] : element_starts[hi]]


def inspect_message(data, limits: Limits | None = None, schemas=None) -> dict:
    """Describe a message without decoding its codes (see :func:`fstqcodec.inspect`)."""
    limits = resolve_limits(limits)
    container, declared = _open(data, limits, schemas)
    layout = _stored_layout(declared, visible_elements(declared))
    block_contexts = _read_block_contexts(container, layout)
    per_context = np.bincount(block_contexts, minlength=len(layout.contexts)) if len(block_contexts) else np.zeros(len(layout.contexts), np.int64)
    histogram: dict[int, int] = {}
    for context, blocks in zip(layout.contexts, per_context):
        if blocks:
            histogram[context.width] = histogram.get(context.width, 0) + int(blocks)
    size = len(container.data)
    elements = declared.total_elements
    described = {
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
            {"name": t.name, "dtype": t.dtype, "shape": list(d.shape), "block_size": t.block_size, "blocks": t.num_blocks}
            for t, d in zip(layout.tensors, declared.tensors)
        ],
        "contexts": [c.to_wire() for c in layout.contexts],
        "width_histogram": dict(sorted(histogram.items())),
        "elements": elements,
        "bits_per_element": (8.0 * size / elements) if elements else None,
        "meta": layout.meta,
    }
    if declared.masks:
        described["masks"] = [mask.to_wire(index) for index, masks in sorted(declared.masks.items()) for mask in masks]
    return described
