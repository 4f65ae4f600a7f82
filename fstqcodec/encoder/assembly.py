"""Assembly: a plan in, a message out (contexts, code streams, sections, header, container)."""

from __future__ import annotations

import numpy as np

from .. import _threads
from ..errors import EncodeError
from ..policy.allocation import DROP, RAW_EXACT
from ..stages import bitpack, rans
from ..wire.container import ENCODING_NONE, ENCODING_ZSTD, write_container, zstd_compress
from ..wire.header import RAW_FORMATS, Context, Layout, Schema, build_header
from .contexts import centroid_levels, group_classes
from .plans import Plan
from .source import Input

__all__ = ["assemble"]

#: The raw format that holds a tensor dtype's values exactly.
RAW_FORMAT_OF_DTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64"}
#: A section is stored zstd-encoded only if that makes it at least this much smaller.
_ZSTD_MIN_GAIN = 0.98
#: Contexts of at most this width and at least this many elements carry their bins' centroids as
#: an explicit codebook (2**width float32 levels): at low rates a bin's centroid sits well inside
#: it, and decoding to it instead of the bin's middle cuts the error for a few bytes.
_CENTROID_MAX_WIDTH = 4
_CENTROID_MIN_ELEMENTS = 512


def _maybe_zstd(payload: bytes, kind: str) -> tuple[list, bytes]:
    """A section table entry and the stored bytes, zstd-encoded when that is clearly smaller."""
    if len(payload) >= 64:
        compressed = zstd_compress(payload)
        if len(compressed) < len(payload) * _ZSTD_MIN_GAIN:
            return [kind, len(compressed), ENCODING_ZSTD, len(payload)], compressed
    return [kind, len(payload), ENCODING_NONE, len(payload)], payload


class _Contexts:
    """The contexts of a message under construction: each with its code stream, and the context
    of every block."""

    def __init__(self, num_blocks: int):
        self.contexts: list[Context] = []
        self.streams: list[bytes] = []
        self.codebooks: list[np.ndarray] = []
        self.of_block = np.zeros(num_blocks, dtype=np.uint8)

    def add(self, context: Context, stream: bytes, rows) -> None:
        self.of_block[rows] = len(self.contexts)
        self.contexts.append(context)
        self.streams.append(stream)


def assemble(source: Input, plan: Plan, *, meta: dict | None, compress_header: bool, schema: Schema | None = None, masked: tuple | None = None,
             estimate: bool = False) -> bytes:
    """Turn a plan into a message: a zero context, raw contexts by format, then the quantized
    contexts, each section zstd-encoded where that pays.

    ``estimate``: a stand-in of about the message's size, for the size loop, built without most
    codes: every part as in the message but the rANS code streams, which are zero bytes of their
    expected length (from the plan's code statistics).

    ``masked`` (from :func:`fstqcodec.encoder.masking.apply_masks`) is ``(declared specs, tensor
    index -> masks)``: the source then holds masked tensors' visible elements only, and the header
    declares the real shapes and the masks (format version 1.1).

    Raises
    ------
    EncodeError
        If the plan needs more contexts than the format's 256.
    """
    if not estimate:
        plan.complete()
    built = _Contexts(len(plan.mode))
    dropped = plan.mode == DROP
    if np.any(dropped):
        built.add(Context("zero"), b"", dropped)
    _add_raw_contexts(built, source, plan)
    if len(plan.quantized_rows):
        _add_quantized_contexts(built, source, plan, estimate)
    if len(built.contexts) > 256:
        raise EncodeError(f"{len(built.contexts)} contexts exceed the format's 256")
    section_table, body_parts = [], []
    for kind, payload in (("blocks", built.of_block.tobytes()), ("scales", plan.scale_bits.astype("<u2").tobytes())):
        remembered = plan.memo.get(kind)
        if remembered is None or remembered[0] != payload:
            plan.memo[kind] = remembered = (payload, *_maybe_zstd(payload, kind))
        entry, stored = list(remembered[1]), remembered[2]
        section_table.append(entry)
        body_parts.append(stored)
    for context, stream in zip(built.contexts, built.streams):
        if context.kind == "rans":  # rANS output is incompressible: do not spend time on zstd
            entry, stored = ["codes", len(stream), ENCODING_NONE, len(stream)], stream
        else:  # a packed stream the plan's estimate already stored is not compressed again
            remembered = plan.memo.setdefault("stored", {}).get(id(stream))
            if remembered is None or remembered[0] is not stream:
                plan.memo["stored"][id(stream)] = remembered = (stream, *_maybe_zstd(stream, "codes"))
            entry, stored = list(remembered[1]), remembered[2]
        section_table.append(entry)
        body_parts.append(stored)
    declared, masks = masked if masked is not None else (source.specs, {})
    layout = Layout(tensors=declared, contexts=built.contexts, codebooks=built.codebooks, meta=meta or {}, masks=masks)
    header = build_header(layout, section_table, schema=schema)
    return write_container(header, body_parts, compress_header=compress_header, minor=1 if masks else 0)


def _add_raw_contexts(built: _Contexts, source: Input, plan: Plan) -> None:
    """One raw context per format (each block raw at its tensor's dtype), in the format's order."""
    raw = np.flatnonzero(plan.mode == RAW_EXACT)
    if not len(raw):
        return
    # Formats as their index in RAW_FORMATS, per tensor and then per raw block.
    order = list(RAW_FORMATS)
    tensor_format = np.array([order.index(RAW_FORMAT_OF_DTYPE[s.dtype]) for s in source.specs], dtype=np.int8)
    formats = tensor_format[source.block_tensor[raw]]
    for code in np.unique(tensor_format[np.unique(source.block_tensor[raw])]):
        fmt = order[int(code)]
        rows = raw if len(order) == 1 or np.all(formats == code) else raw[formats == code]
        # The values' own buffer: bytes() would copy a raw section once more.
        values = np.ascontiguousarray(source.raw_values(rows, fmt))
        built.add(Context("raw", width=8 * RAW_FORMATS[fmt], raw_format=fmt), memoryview(values).cast("B"), rows)


def _add_quantized_contexts(built: _Contexts, source: Input, plan: Plan, estimate: bool = False) -> None:
    """One context per group of classes, with its coder, and centroid codebooks where they pay.
    The code streams are built on the worker threads when ``encode`` has them."""
    if "groups" not in plan.memo:
        plan.memo["groups"] = group_classes(plan)
    group_of_class, groups = plan.memo["groups"]
    # Each context's rows (ascending) from one stable sort of the rows by context, not a scan of
    # every row per context. (Contexts number at most 256: a radix sort of 16-bit keys.)
    if len(groups) == 1:  # fixed-rate plans and small messages: every row, no sort
        by_context, ends = np.arange(len(plan.row_class)), [len(plan.row_class)]
    else:
        context_of_row = group_of_class[plan.row_class].astype(np.int16)
        by_context = np.argsort(context_of_row, kind="stable")
        ends = np.cumsum(np.bincount(context_of_row, minlength=len(groups)))
    if plan.codebook is not None:
        built.codebooks.append(plan.codebook)
    jobs = []
    for g, (width, counts, choice, classes) in enumerate(groups):
        members = by_context[(ends[g - 1] if g else 0) : ends[g]]
        rows = plan.quantized_rows[members]
        codebook_index = 0 if plan.codebook is not None else None
        # A sign context (width 1) always decodes through its two centroids.
        if plan.codebook is None and plan.class_sums is not None and (
            width == 1 or plan.grid_centroids and width <= _CENTROID_MAX_WIDTH
            and int(source.counts[rows].sum()) >= _CENTROID_MIN_ELEMENTS
        ):
            codebook_index = len(built.codebooks)
            built.codebooks.append(centroid_levels(plan, classes, width))
        if choice["kind"] == "rans":
            first, last = choice["first"], choice["last"]
            context = Context(
                "rans",
                width=width,
                codebook=codebook_index,
                lanes=choice["lanes"],
                prob_bits=choice["prob_bits"],
                first_symbol=first,
                freqs=tuple(int(f) for f in choice["freqs"][first : last + 1]),
            )
        else:
            context = Context("packed", width=width, codebook=codebook_index)
        jobs.append((context, dict(choice, counts=counts) if estimate else choice, members, rows))
    if estimate:  # the packed contexts' codes, before the (threaded) streams
        for context, _, members, _ in jobs:
            if context.kind != "rans":
                plan.complete(members)
    stream = _estimated_stream if estimate else _code_stream

    def build(numbered):
        """A job's stream; packed streams are real in an estimate too, and kept for the message."""
        number, job = numbered
        if job[0].kind == "rans":
            return stream(source, plan, *job)
        key = ("packed", number)
        if key not in plan.memo:
            plan.memo[key] = stream(source, plan, *job)
        return plan.memo[key]

    streams = _threads.map_items(build, enumerate(jobs))
    for (context, _, _, rows), stream in zip(jobs, streams):
        built.add(context, stream, rows)


def _code_stream(source: Input, plan: Plan, context: Context, choice: dict, members, rows) -> bytes:
    """The code stream of one context: its blocks' codes as symbols, rANS-coded or packed."""
    offset = 0 if plan.codebook is not None else 1 << (context.width - 1)
    if source.aligned or np.all(source.counts[rows] == source.block_size):
        # Whole rows: the coder reads them where they are (no gathered copy of the codes).
        if context.kind == "rans":
            return rans.encode_rows(plan.codes, members, offset, choice["freqs"], choice["prob_bits"], choice["lanes"])
        return bitpack.pack_rows(plan.codes, members, offset, context.width)
    flat = source.flatten_rows(plan.codes[members], rows)
    if plan.codebook is not None:
        symbols = flat.view(np.uint8)
    else:
        # Codes lie in [-2**(w-1), 2**(w-1) - 1]: adding the offset modulo 256 is exact. (In
        # place: ``flat`` is a copy, the gather above.)
        symbols = flat.view(np.uint8)
        symbols += np.uint8(1 << (context.width - 1))
    if context.kind == "rans":
        return rans.encode(symbols, choice["freqs"], choice["prob_bits"], choice["lanes"])
    return bitpack.pack(symbols, context.width)


def _estimated_stream(source: Input, plan: Plan, context: Context, choice: dict, members, rows) -> bytes:
    """The context's code stream where it is packed; where it is rANS-coded, zero bytes of the
    length it is expected to have: the cross-entropy of the sampled code counts scaled to the
    context's elements, plus the lanes' 4-byte states less the 8 bits a lane's final state holds
    on average (2 bytes per word)."""
    if context.kind != "rans":
        # Packed codes can compress (a real update's signs do, by a fifth): the real stream
        # (assemble filled its codes).
        return _code_stream(source, plan, context, choice, members, rows)
    elements = int(source.counts[rows].sum())
    counts = np.asarray(choice["counts"], dtype=np.float64)
    bits = rans.estimate_bits(counts, choice["freqs"], choice["prob_bits"]) * elements / max(float(counts.sum()), 1.0)
    lanes = choice["lanes"]
    words = max(0, int(round((bits - 8 * lanes) / 16)))
    return bytes(4 * lanes + 2 * words)
