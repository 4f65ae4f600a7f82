"""The header map: tensors, contexts, codebooks, sections (spec section 4).

:func:`build_header` turns a :class:`Layout` into the msgpack-ready map an encoder writes;
:func:`parse_header` validates an untrusted map into a :class:`Layout`, checking every type, range
and limit, and computing sizes with Python integers (no overflow).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

import hashlib

import msgpack

from ..errors import BadFormatError, UnknownSchemaError, UnsupportedFeatureError
from ..limits import Limits, check_limit
from .container import ENCODING_NONE, SECTION_ENCODINGS, Section

__all__ = [
    "DTYPES",
    "RAW_FORMATS",
    "QUANTIZED_WIDTHS",
    "TensorSpec",
    "Context",
    "Layout",
    "build_header",
    "parse_header",
    "Schema",
]

#: Tensor dtypes a message may declare, with the numpy dtype ``decode`` returns for each.
#: bfloat16 tensors decode to float32 arrays holding bfloat16 values (numpy has no bfloat16).
DTYPES = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}

#: Raw value formats of ``raw`` contexts and their sizes in bytes.
RAW_FORMATS = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8}

#: Widths of quantized contexts (``packed`` and ``rans``).
QUANTIZED_WIDTHS = range(1, 9)

MAX_BLOCK_SIZE = 65536
MAX_CONTEXTS = 256
KNOWN_FIELDS = frozenset({"tensors", "schema", "contexts", "codebooks", "sections", "meta", "critical"})
SCHEMA_DIGEST_SIZE = 16
SECTION_KINDS_FIXED = ("blocks", "scales")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor: name, dtype name, shape and block size."""

    name: str
    dtype: str
    shape: tuple
    block_size: int

    @property
    def size(self) -> int:
        """Element count (a Python int)."""
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        """Blocks the tensor is cut into; the last one may be short."""
        return -(-self.size // self.block_size)


@dataclasses.dataclass(frozen=True)
class Context:
    """How the blocks that point at this context are coded.

    ``kind`` is ``"zero"`` (all elements zero), ``"raw"`` (``raw_format`` values), ``"packed"``
    (fixed-length codes of ``width`` bits) or ``"rans"`` (codes of ``width`` bits, rANS-coded with
    ``freqs`` at ``prob_bits`` over ``lanes`` lanes). Quantized contexts use the uniform grid when
    ``codebook`` is None, else the explicit codebook with that index.
    """

    kind: str
    width: int = 0
    codebook: int | None = None
    raw_format: str | None = None
    lanes: int = 0
    prob_bits: int = 0
    first_symbol: int = 0
    freqs: tuple = ()

    @property
    def quantized(self) -> bool:
        """True for contexts whose blocks carry a scale."""
        return self.kind in ("packed", "rans")

    def full_frequencies(self) -> np.ndarray:
        """The frequency of every symbol 0 .. 2**width - 1 (zeros outside the stored range)."""
        table = np.zeros(1 << self.width, dtype=np.int64)
        table[self.first_symbol : self.first_symbol + len(self.freqs)] = self.freqs
        return table

    def to_wire(self) -> list:
        if self.kind == "zero":
            return ["zero"]
        if self.kind == "raw":
            return ["raw", self.raw_format]
        if self.kind == "packed":
            return ["packed", self.width, self.codebook]
        return ["rans", self.width, self.codebook, self.lanes, self.prob_bits, self.first_symbol, list(self.freqs)]


@dataclasses.dataclass
class Layout:
    """Everything the header says, validated."""

    tensors: list
    contexts: list
    codebooks: list
    sections: list = dataclasses.field(default_factory=list)
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def total_blocks(self) -> int:
        return sum(t.num_blocks for t in self.tensors)

    @property
    def total_elements(self) -> int:
        return sum(t.size for t in self.tensors)


def _tensor_entries(tensors) -> list:
    return [[t.name, t.dtype, list(t.shape), t.block_size] for t in tensors]


class Schema:
    """The tensor list of a model (names, dtypes, shapes, block sizes), shared by both ends.

    A message encoded with ``schema=`` carries the schema's 16-byte digest instead of its tensor
    list, which saves the names (often most of a sub-bit message's header); the decoder must be
    given the same schema. Build it once per model on each side, e.g. ``Schema.of(update)``.

    Parameters
    ----------
    tensors : list of (name, dtype, shape, block_size)
        dtype is ``"float32"``, ``"float16"``, ``"bfloat16"`` or ``"float64"``.
    """

    def __init__(self, tensors):
        self.tensors = [TensorSpec(str(n), str(d), tuple(int(x) for x in s), int(b)) for n, d, s, b in tensors]
        seen = set()
        for spec in self.tensors:
            if not spec.name or spec.name in seen:
                raise ValueError(f"schema tensor names must be non-empty and unique: {spec.name!r}")
            seen.add(spec.name)
            if spec.dtype not in DTYPES:
                raise ValueError(f"schema tensor {spec.name!r}: dtype {spec.dtype!r} is not one of {sorted(DTYPES)}")
            if any(d < 0 for d in spec.shape) or not 1 <= spec.block_size <= MAX_BLOCK_SIZE:
                raise ValueError(f"schema tensor {spec.name!r}: bad shape {spec.shape} or block size {spec.block_size}")
        canonical = msgpack.packb(_tensor_entries(self.tensors), use_bin_type=True)
        self.digest = hashlib.sha256(canonical).digest()[:SCHEMA_DIGEST_SIZE]

    @classmethod
    def of(cls, tensors, *, block_size: int = 64) -> "Schema":
        """The schema of a mapping of names to arrays (numpy or torch), in its order."""
        entries = []
        for name, value in tensors.items():
            dtype = str(value.dtype).replace("torch.", "")
            entries.append((name, dtype, tuple(value.shape), block_size))
        return cls(entries)

    def __eq__(self, other):
        return isinstance(other, Schema) and self.digest == other.digest

    def __hash__(self):
        return hash(self.digest)

    def __repr__(self):
        return f"Schema({len(self.tensors)} tensors, digest={self.digest.hex()})"


def build_header(layout: Layout, section_table: list, *, schema: "Schema | None" = None) -> dict:
    """The header map for ``layout``; ``section_table`` is ``[[kind, stored, encoding, decoded], ...]``.

    With ``schema``, the tensor list is replaced by the schema's digest (marked must-understand).
    """
    if schema is not None:
        header = {"schema": schema.digest, "contexts": [c.to_wire() for c in layout.contexts]}
    else:
        header = {"tensors": _tensor_entries(layout.tensors), "contexts": [c.to_wire() for c in layout.contexts]}
    if layout.codebooks:
        header["codebooks"] = [np.asarray(levels, dtype="<f4").tobytes() for levels in layout.codebooks]
    header["sections"] = section_table
    if layout.meta:
        header["meta"] = layout.meta
    if schema is not None:
        header["critical"] = ["schema"]
    return header


# ---------------------------------------------------------------------------------------------
# Validation of untrusted headers.


def _fail(message: str):
    raise BadFormatError(f"header: {message}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(value, low: int, high: int, what: str) -> int:
    if not _is_int(value) or not low <= value <= high:
        _fail(f"{what} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _list(value, what: str) -> list:
    if not isinstance(value, list):
        _fail(f"{what} must be an array, got {type(value).__name__}")
    return value


def _check_limit(name: str, limit: int, actual: int, what: str):
    check_limit(None, name, actual, what, limit=limit)


def _parse_tensors(raw, limits: Limits) -> list:
    entries = _list(raw, "tensors")
    _check_limit("max_tensors", limits.max_tensors, len(entries), "tensor count")
    tensors = []
    seen = set()
    output_bytes = 0
    blocks = 0
    for index, entry in enumerate(entries):
        what = f"tensor #{index}"
        if not isinstance(entry, list) or len(entry) != 4:
            _fail(f"{what} must be [name, dtype, shape, block_size]")
        name, dtype, shape, block_size = entry
        if not isinstance(name, str) or not name:
            _fail(f"{what}: name must be a non-empty string")
        _check_limit("max_name_length", limits.max_name_length, len(name.encode("utf-8", "surrogatepass")), f"{what} name length")
        if name in seen:
            _fail(f"duplicate tensor name {name!r}")
        seen.add(name)
        if not isinstance(dtype, str) or dtype not in DTYPES:
            _fail(f"{what} ({name!r}): unknown dtype {dtype!r}; known: {sorted(DTYPES)}")
        shape = _list(shape, f"{what} shape")
        _check_limit("max_ndim", limits.max_ndim, len(shape), f"{what} ({name!r}) rank")
        for dim in shape:
            if not _is_int(dim) or dim < 0:
                _fail(f"{what} ({name!r}): shape entries must be non-negative integers, got {dim!r}")
        block_size = _int_in(block_size, 1, MAX_BLOCK_SIZE, f"{what} ({name!r}) block_size")
        spec = TensorSpec(name, dtype, tuple(shape), block_size)
        # Python ints: a 10**12-element shape is caught here, not by an overflowing allocation.
        output_bytes += spec.size * DTYPES[dtype].itemsize
        _check_limit("max_output_size", limits.max_output_size, output_bytes, "decoded size of the tensors")
        blocks += spec.num_blocks
        _check_limit("max_blocks", limits.max_blocks, blocks, "block count")
        tensors.append(spec)
    return tensors


def _parse_codebooks(raw, limits: Limits) -> list:
    if raw is None:
        return []
    entries = _list(raw, "codebooks")
    books = []
    total = 0
    for index, entry in enumerate(entries):
        if not isinstance(entry, bytes):
            _fail(f"codebook #{index} must be binary (float32 little-endian levels)")
        if len(entry) % 4:
            _fail(f"codebook #{index} is {len(entry)} bytes, not a whole number of float32 levels")
        count = len(entry) // 4
        total += count
        _check_limit("max_codebook_entries", limits.max_codebook_entries, total, "codebook levels")
        if count < 2 or count > 256 or count & (count - 1):
            _fail(f"codebook #{index} has {count} levels; must be a power of two from 2 to 256")
        levels = np.frombuffer(entry, dtype="<f4").astype(np.float32)
        if not np.all(np.isfinite(levels)):
            _fail(f"codebook #{index} holds a non-finite level")
        books.append(levels)
    return books


def _parse_context(entry, index: int, codebooks: list, limits: Limits) -> Context:
    what = f"context #{index}"
    if not isinstance(entry, list) or not entry or not isinstance(entry[0], str):
        _fail(f"{what} must be an array starting with its kind")
    kind = entry[0]
    if kind == "zero":
        if len(entry) != 1:
            _fail(f"{what}: a zero context has no parameters")
        return Context("zero")
    if kind == "raw":
        if len(entry) != 2 or not isinstance(entry[1], str) or entry[1] not in RAW_FORMATS:
            _fail(f"{what}: a raw context is ['raw', format] with format in {sorted(RAW_FORMATS)}")
        return Context("raw", width=8 * RAW_FORMATS[entry[1]], raw_format=entry[1])
    if kind not in ("packed", "rans"):
        _fail(f"{what}: unknown kind {kind!r}")
    expected_length = 3 if kind == "packed" else 7
    if len(entry) != expected_length:
        _fail(f"{what}: a {kind} context has {expected_length} fields, got {len(entry)}")
    width = _int_in(entry[1], 1, 8, f"{what} width")
    codebook = entry[2]
    if codebook is not None:
        codebook = _int_in(codebook, 0, max(0, len(codebooks) - 1), f"{what} codebook index") if codebooks else _fail(
            f"{what} names codebook {codebook!r} but the message has none"
        )
        if len(codebooks[codebook]) != 1 << width:
            _fail(f"{what}: codebook #{codebook} has {len(codebooks[codebook])} levels, width {width} needs {1 << width}")
    if kind == "packed":
        return Context("packed", width=width, codebook=codebook)
    lanes = entry[3]
    if not _is_int(lanes) or lanes < 1:
        _fail(f"{what}: lanes must be a positive integer, got {lanes!r}")
    _check_limit("max_rans_lanes", limits.max_rans_lanes, lanes, f"{what} lanes")
    prob_bits = _int_in(entry[4], 1, 16, f"{what} prob_bits")
    first = _int_in(entry[5], 0, (1 << width) - 1, f"{what} first_symbol")
    freqs = _list(entry[6], f"{what} frequencies")
    if not freqs or first + len(freqs) > 1 << width:
        _fail(f"{what}: {len(freqs)} frequencies from symbol {first} do not fit width {width}")
    total = 0
    for value in freqs:
        if not _is_int(value) or not 0 <= value <= 1 << prob_bits:
            _fail(f"{what}: frequencies must be integers in [0, 2**prob_bits]")
        total += value
    if total != 1 << prob_bits:
        _fail(f"{what}: frequencies sum to {total}, must sum to 2**prob_bits = {1 << prob_bits}")
    return Context("rans", width=width, codebook=codebook, lanes=lanes, prob_bits=prob_bits, first_symbol=first, freqs=tuple(freqs))


def _parse_sections(raw, context_count: int, body_offset: int, body_length: int) -> list:
    entries = _list(raw, "sections")
    kinds = list(SECTION_KINDS_FIXED) + ["codes"] * context_count
    if len(entries) != len(kinds):
        _fail(f"{len(entries)} sections, expected {len(kinds)} (blocks, scales, one per context)")
    sections = []
    offset = body_offset
    for index, (entry, kind) in enumerate(zip(entries, kinds)):
        what = f"section #{index}"
        if not isinstance(entry, list) or len(entry) != 4:
            _fail(f"{what} must be [kind, stored_length, encoding, decoded_length]")
        if entry[0] != kind:
            _fail(f"{what} has kind {entry[0]!r}, expected {kind!r} at this position")
        stored, encoding, decoded = entry[1], entry[2], entry[3]
        if not _is_int(stored) or stored < 0 or not _is_int(decoded) or decoded < 0:
            _fail(f"{what}: lengths must be non-negative integers")
        if not isinstance(encoding, str) or encoding not in SECTION_ENCODINGS:
            _fail(f"{what}: unknown encoding {encoding!r}")
        if encoding == ENCODING_NONE and stored != decoded:
            _fail(f"{what}: unencoded section with stored length {stored} != decoded length {decoded}")
        sections.append(Section(kind, offset, stored, encoding, decoded))
        offset += stored
    # Sections tile the body exactly: contiguous by construction, so only the total can be off.
    if offset - body_offset != body_length:
        _fail(f"sections hold {offset - body_offset} bytes, the body is {body_length}")
    return sections


def _parse_meta(raw) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        _fail("meta must be a map")
    for key, value in raw.items():
        if not isinstance(key, str):
            _fail("meta keys must be strings")
        if not isinstance(value, (str, int, float, bool, bytes)) and value is not None:
            _fail(f"meta value for {key!r} must be a scalar")
    return raw


def _resolve_schema(digest, schemas) -> list:
    if not isinstance(digest, bytes) or len(digest) != SCHEMA_DIGEST_SIZE:
        _fail(f"schema must be a {SCHEMA_DIGEST_SIZE}-byte binary digest")
    for schema in schemas:
        if schema.digest == digest:
            return _tensor_entries(schema.tensors)
    raise UnknownSchemaError(
        f"message names its tensors by schema {digest.hex()}; pass the matching fstqcodec.Schema as schemas=",
        digest=digest,
    )


def parse_header(header: dict, limits: Limits, *, body_offset: int, body_length: int, schemas: tuple = ()) -> Layout:
    """Validate an untrusted header map (spec 5, steps 10-14).

    ``schemas`` (a tuple of :class:`Schema`, type-checked by the caller) resolves a header that
    names its tensors by digest.

    Raises
    ------
    BadFormatError, LimitExceededError, UnsupportedFeatureError, UnknownSchemaError
    """
    for key in header:
        if not isinstance(key, str):
            _fail("keys must be strings")
    critical = header.get("critical")
    if critical is not None:
        # Every entry's type first, then the names: the error class of a malformed list must not
        # depend on which keys a decoder happens to implement (FORMAT.md step 9).
        if not all(isinstance(name, str) for name in _list(critical, "critical")):
            _fail("critical entries must be strings")
        for name in critical:
            if name not in KNOWN_FIELDS:
                raise UnsupportedFeatureError(
                    f"header field {name!r} is marked must-understand and this decoder does not know it",
                    feature=name,
                )
    for key in ("contexts", "sections"):
        if key not in header:
            _fail(f"missing required field {key!r}")
    if ("tensors" in header) == ("schema" in header):
        _fail("exactly one of 'tensors' and 'schema' must be present")
    raw_tensors = header["tensors"] if "tensors" in header else _resolve_schema(header["schema"], schemas)
    tensors = _parse_tensors(raw_tensors, limits)
    codebooks = _parse_codebooks(header.get("codebooks"), limits)
    raw_contexts = _list(header["contexts"], "contexts")
    _check_limit("max_contexts", min(limits.max_contexts, MAX_CONTEXTS), len(raw_contexts), "context count")
    contexts = [_parse_context(entry, index, codebooks, limits) for index, entry in enumerate(raw_contexts)]
    sections = _parse_sections(header["sections"], len(contexts), body_offset, body_length)
    meta = _parse_meta(header.get("meta"))
    return Layout(tensors=tensors, contexts=contexts, codebooks=codebooks, sections=sections, meta=meta)
