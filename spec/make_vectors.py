#!/usr/bin/env python3
"""Generate the fstq v1 test vectors in ``spec/vectors/`` (see ``spec/FORMAT.md``, section 13).

Usage::

    python spec/make_vectors.py [--out DIR]

Writes ``DIR/manifest.json``, ``DIR/valid/*.fstq`` (with ``*.npz`` holding the decoded tensors)
and ``DIR/invalid/*.fstq``. The output is deterministic: the same versions of this script,
fstqcodec, numpy and libzstd give the same bytes (the manifest records the versions).

Valid vectors come from two sources: the reference encoder (``fstqcodec.encode``), and messages
built here by hand from the spec, to cover features the encoder does not emit (bfloat16 and
float64 tensors, every packed width, rANS corner cases, unknown header keys, a newer minor
version, a ``schema`` not listed in ``critical``, a rANS lane at its 65536-step bound). Their
expected tensors are computed by :func:`spec_decode`, a small decoder written from the spec alone,
and the script checks that ``fstqcodec.decode`` agrees bit for bit.

Vectors whose header names its tensors by ``schema`` (FORMAT.md 5.8) list the schema's tensor list in
the manifest (``schemas``), so that a decoder can be given it.

Invalid vectors are mostly built by hand with :func:`frame`, which writes a correct preamble and
CRC-32, so that each one fails for the intended reason and not with a checksum error. The script
checks that ``fstqcodec.decode`` raises the named error for every invalid vector, except those in
:data:`REFERENCE_DECODER_GAPS`, where the reference decoder would be known not to conform (FORMAT.md,
Appendix B records the reference implementation's state; there are none).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import msgpack
import numpy as np
import zstandard

import fstqcodec

# ---------------------------------------------------------------------------------------------
# Format constants, restated from spec/FORMAT.md (not imported, so the script checks the code).

MAGIC = b"\x89FSQ\r\n\x1a\n"
PREAMBLE = struct.Struct("<8sBBBBIIQ")  # 28 bytes
RANS_L = 1 << 16
RAW_SIZES = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8}
TENSOR_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "float64": "<f8"}
SCHEMA_DIGEST_SIZE = 16
RANS_MAX_STEPS = 1 << 16  # symbols per lane of one rANS context

#: Invalid vectors the reference decoder does not reject as the spec requires (FORMAT.md, Appendix B,
#: would list them). The test suite marks them as expected failures.
REFERENCE_DECODER_GAPS: dict = {}


def zstd_frame(payload: bytes, *, checksum: bool = False) -> bytes:
    """One zstd frame with its content size, at the level the reference encoder uses."""
    return zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=checksum).compress(payload)


def packb(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def schema_digest(tensors) -> bytes:
    """FORMAT.md 5.8: the first 16 bytes of SHA-256 over the shortest-form msgpack of the tensor list."""
    return hashlib.sha256(packb([[n, d, list(s), b] for n, d, s, b in tensors])).digest()[:SCHEMA_DIGEST_SIZE]


def frame(
    header,
    body: bytes = b"",
    *,
    magic: bytes = MAGIC,
    major: int = 1,
    minor: int = 0,
    header_encoding: int = 0,
    reserved: int = 0,
    stored_header: bytes | None = None,
    header_stored_length: int | None = None,
    header_length: int | None = None,
    body_length: int | None = None,
) -> bytes:
    """Frame a header (a map, or its msgpack bytes) and a body into a message with a correct CRC-32.

    Any preamble field can be overridden, so a vector can break exactly one rule.
    """
    header_bytes = header if isinstance(header, (bytes, bytearray)) else packb(header)
    if stored_header is None:
        stored_header = zstd_frame(header_bytes) if header_encoding == 1 else header_bytes
    preamble = PREAMBLE.pack(
        magic,
        major,
        minor,
        header_encoding,
        reserved,
        len(stored_header) if header_stored_length is None else header_stored_length,
        len(header_bytes) if header_length is None else header_length,
        len(body) if body_length is None else body_length,
    )
    message = preamble + stored_header + body
    return message + struct.pack("<I", zlib.crc32(message))


# ---------------------------------------------------------------------------------------------
# Stages written from the spec (independent of fstqcodec.stages).


def pack_codes(codes, width: int) -> bytes:
    """LSB-first bit packing: bit k of the stream is bit k % 8 of byte k // 8."""
    acc = 0
    for index, code in enumerate(codes):
        acc |= int(code) << (index * width)
    return acc.to_bytes((len(codes) * width + 7) // 8, "little")


def rans_encode(symbols, freqs, prob_bits: int, lanes: int) -> bytes:
    """Interleaved rANS, the exact inverse of the decoder in FORMAT.md section 8."""
    cumulative = [0]
    for f in freqs:
        cumulative.append(cumulative[-1] + f)
    state = [RANS_L] * lanes
    words = {}
    for i in range(len(symbols) - 1, -1, -1):
        s = int(symbols[i])
        f, c = freqs[s], cumulative[s]
        x = state[i % lanes]
        if x >= f << (32 - prob_bits):
            words[i] = x & 0xFFFF
            x >>= 16
        state[i % lanes] = ((x // f) << prob_bits) + (x % f) + c
    out = b"".join(struct.pack("<I", x) for x in state)
    return out + b"".join(struct.pack("<H", words[i]) for i in sorted(words))


def rans_decode(stream: bytes, count: int, freqs, prob_bits: int, lanes: int) -> list:
    """The decoder of FORMAT.md section 8, one symbol at a time (valid streams only)."""
    mask = (1 << prob_bits) - 1
    state = list(struct.unpack_from(f"<{lanes}I", stream, 0))
    words = struct.unpack_from(f"<{(len(stream) - 4 * lanes) // 2}H", stream, 4 * lanes)
    cumulative = [0]
    for f in freqs:
        cumulative.append(cumulative[-1] + f)
    slot_symbol = []
    for s, f in enumerate(freqs):
        slot_symbol.extend([s] * f)
    assert all(x >= RANS_L for x in state)
    out, position = [], 0
    for i in range(count):
        j = i % lanes
        x = state[j]
        slot = x & mask
        s = slot_symbol[slot]
        out.append(s)
        x = freqs[s] * (x >> prob_bits) + slot - cumulative[s]
        if x < RANS_L:
            x = (x << 16) | words[position]
            position += 1
        state[j] = x
    assert position == len(words) and all(x == RANS_L for x in state)
    return out


def bf16_to_f32(bits) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16_bits(values) -> np.ndarray:
    """binary32 -> bfloat16 bit patterns, round to nearest, ties to even (finite inputs)."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


# ---------------------------------------------------------------------------------------------
# Seeded masks (FORMAT.md 5.9), in Python integers.

MASK_GRANULARITIES = ("element", "row", "column")
_U64 = (1 << 64) - 1


def mask_draw(seed: int, n: int) -> int:
    """Generator 1: the SplitMix64 output for unit index ``n`` of ``seed``."""
    z = (seed + (n + 1) * 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def mask_threshold(keep: float) -> int:
    """floor(keep * 2**64), exactly: a binary64 value is numerator / 2**k."""
    numerator, denominator = keep.as_integer_ratio()
    return (numerator << 64) // denominator


def mask_visible(shape, seed: int, keep: float, granularity: str) -> list:
    """C-order list of booleans over the tensor: the elements one mask keeps."""
    threshold = mask_threshold(keep)
    size = 1
    for d in shape:
        size *= d
    units = {"element": size, "row": shape[0] if len(shape) == 2 else 0, "column": shape[1] if len(shape) == 2 else 0}[granularity]
    kept = [mask_draw(seed, n) < threshold for n in range(units)]
    if granularity == "element":
        return kept
    return [kept[i // shape[1]] if granularity == "row" else kept[i % shape[1]] for i in range(size)]


def tensor_visibility(header) -> dict:
    """Tensor index -> C-order list of booleans (every mask of the tensor keeps the element)."""
    visible = {}
    for tensor, generator, seed, keep, granularity in header.get("masks") or []:
        assert generator == 1 and 0.0 < keep <= 1.0 and granularity in MASK_GRANULARITIES
        shape = header["tensors"][tensor][2]
        one = mask_visible(shape, seed, keep, granularity)
        visible[tensor] = [a and b for a, b in zip(visible.get(tensor, one), one)]
    return visible


def masks_entry(message: bytes, schemas=()) -> dict:
    """The manifest's "masks" of a valid vector: each mask with its tensor's shape and the mask it
    defines (bit i of byte i // 8, LSB first, is element i in C order: 1 = kept)."""
    header = read_header(message)
    if not header.get("masks"):
        return {}
    tensors = header["tensors"] if "tensors" in header else [t for t in schemas if schema_digest(t) == header["schema"]][0]
    entries = []
    for tensor, generator, seed, keep, granularity in header["masks"]:
        shape = tensors[tensor][2]
        bits = mask_visible(shape, seed, keep, granularity)
        library = fstqcodec.Mask(seed, keep, granularity, generator).visible(tuple(shape)).reshape(-1).tolist()
        assert library == bits, "fstqcodec's mask differs from the spec's generator"
        packed = sum(1 << i for i, b in enumerate(bits) if b).to_bytes((len(bits) + 7) // 8, "little")
        entries.append({"tensor": tensor, "generator": generator, "seed": seed, "keep": keep, "granularity": granularity,
                        "shape": list(shape), "kept": sum(bits), "mask_hex": packed.hex()})
    return {"masks": entries}


def spec_decode(data: bytes, schemas=()) -> list:
    """Decode a *valid* message following FORMAT.md step by step; returns (name, dtype, shape, LE bytes).

    ``schemas`` holds tensor lists (``[[name, dtype, shape, block_size], ...]``) that a header's
    ``schema`` digest may name. This is deliberately naive (no limits, asserts instead of errors):
    it is the executable reading of the spec that the expected values of the valid vectors come from.
    """
    magic, major, minor, enc, reserved, stored_len, header_len, body_len = PREAMBLE.unpack_from(data, 0)
    assert magic == MAGIC and major == 1 and reserved == 0
    assert len(data) == PREAMBLE.size + stored_len + body_len + 4
    assert zlib.crc32(data[:-4]) == struct.unpack("<I", data[-4:])[0]
    stored = data[PREAMBLE.size : PREAMBLE.size + stored_len]
    header_bytes = zstandard.ZstdDecompressor().decompress(stored) if enc == 1 else stored
    assert len(header_bytes) == header_len
    header = msgpack.unpackb(header_bytes, raw=False)
    assert ("tensors" in header) != ("schema" in header)
    if "schema" in header:
        matches = [t for t in schemas if schema_digest(t) == header["schema"]]
        assert isinstance(header["schema"], bytes) and len(header["schema"]) == SCHEMA_DIGEST_SIZE and matches
        header["tensors"] = matches[0]
    offset = PREAMBLE.size + stored_len
    sections = []
    for kind, slen, sencoding, dlen in header["sections"]:
        raw = data[offset : offset + slen]
        offset += slen
        payload = zstandard.ZstdDecompressor().decompress(raw) if sencoding == "zstd" else raw
        assert len(payload) == dlen, (kind, len(payload), dlen)
        sections.append(payload)
    codebooks = [np.frombuffer(b, dtype="<f4") for b in header.get("codebooks") or []]
    contexts = header["contexts"]
    # A masked tensor's blocks cut its visible elements only (5.9).
    visible = tensor_visibility(header)
    # Blocks in order: (tensor index, element offset in the tensor's coded elements, count).
    blocks = []
    for t, (name, dtype, shape, block_size) in enumerate(header["tensors"]):
        size = 1
        for d in shape:
            size *= d
        if t in visible:
            size = sum(visible[t])
        for start in range(0, size, block_size):
            blocks.append((t, start, min(block_size, size - start)))
    block_context = list(sections[0])
    assert len(block_context) == len(blocks)
    quantized = [contexts[k][0] in ("packed", "rans") for k in block_context]
    scale_bits = np.frombuffer(sections[1], dtype="<u2")
    assert len(scale_bits) == sum(quantized)
    assert np.all((scale_bits >= 1) & (scale_bits <= 0x7F7F))
    scale_of_block = {}
    for index in [b for b, q in enumerate(quantized) if q]:
        scale_of_block[index] = bf16_to_f32([scale_bits[len(scale_of_block)]])[0]
    # Element values per tensor, as numpy scalars of binary32 or binary64.
    values = [dict() for _ in header["tensors"]]
    for k, context in enumerate(contexts):
        members = [b for b, c in enumerate(block_context) if c == k]
        n = sum(blocks[b][2] for b in members)
        payload = sections[2 + k]
        kind = context[0]
        if kind == "zero":
            assert len(payload) == 0
            element_values = [np.float32(0.0)] * n
        elif kind == "raw":
            fmt = context[1]
            assert len(payload) == n * RAW_SIZES[fmt]
            if fmt == "bf16":
                element_values = list(bf16_to_f32(np.frombuffer(payload, dtype="<u2")))
            else:
                element_values = list(np.frombuffer(payload, dtype={"f16": "<f2", "f32": "<f4", "f64": "<f8"}[fmt]))
                if fmt == "f16":
                    element_values = [np.float32(v) for v in element_values]
        else:
            width, codebook = context[1], context[2]
            if kind == "packed":
                assert len(payload) == (n * width + 7) // 8
                acc = int.from_bytes(payload, "little")
                assert acc >> (n * width) == 0, "padding bits must be zero"
                symbols = [(acc >> (i * width)) & ((1 << width) - 1) for i in range(n)]
            else:
                _, _, _, lanes, prob_bits, first, stored_freqs = context
                freqs = [0] * (1 << width)
                freqs[first : first + len(stored_freqs)] = stored_freqs
                assert n <= RANS_MAX_STEPS * lanes, "at most 65536 steps per rANS context"
                symbols = rans_decode(payload, n, freqs, prob_bits, lanes)
            if codebook is None:
                levels = [np.float32(u - (1 << (width - 1))) for u in range(1 << width)]
            else:
                levels = list(codebooks[codebook])
            scales = []
            for b in members:
                scales.extend([scale_of_block[b]] * blocks[b][2])
            element_values = [np.float32(levels[u]) * np.float32(s) for u, s in zip(symbols, scales)]
        position = 0
        for b in members:
            t, start, count = blocks[b]
            for i in range(count):
                values[t][start + i] = element_values[position + i]
            position += count
    out = []
    for t, (name, dtype, shape, _) in enumerate(header["tensors"]):
        size = len(values[t])
        ordered = [values[t][i] for i in range(size)]
        if t in visible:  # hidden elements are +0.0 (5.9)
            coded = iter(ordered)
            ordered = [next(coded) if kept else np.float32(0.0) for kept in visible[t]]
        # Conversions through Python's struct (CPython's own IEEE packing), not numpy's casts, so
        # that the expected values do not come from the same code as the decoder's.
        if dtype == "float64":
            array = np.array([float(v) for v in ordered], dtype="<f8")
        elif dtype == "float32":
            array = np.frombuffer(b"".join(struct.pack("<f", float(v)) for v in ordered), dtype="<f4")
        elif dtype == "float16":
            # Directly from the element's value (binary32 or binary64), round to nearest even.
            array = np.frombuffer(b"".join(struct.pack("<e", float(v)) for v in ordered), dtype="<f2")
        else:  # bfloat16: to binary32 first, then to bfloat16
            as_f32 = np.frombuffer(b"".join(struct.pack("<f", float(v)) for v in ordered), dtype="<f4")
            array = f32_to_bf16_bits(as_f32).astype("<u2")
            assert np.all((array & 0x7F80) != 0x7F80)
        if dtype != "bfloat16":
            assert np.all(np.isfinite(array))
        out.append((name, dtype, list(shape), array.tobytes()))
    return out


# ---------------------------------------------------------------------------------------------
# Hand-built messages.


def build(tensors, contexts, block_contexts, scale_bits, codes, *, codebooks=None, extra=None, encodings=None, **frame_options):
    """A message from its parts: ``codes`` holds one payload per context (unencoded bytes).

    ``encodings`` optionally maps a section index to "zstd". ``extra`` adds header keys.
    """
    payloads = [bytes(block_contexts), np.asarray(scale_bits, dtype="<u2").tobytes(), *codes]
    kinds = ["blocks", "scales"] + ["codes"] * len(contexts)
    table, body = [], b""
    for index, (kind, payload) in enumerate(zip(kinds, payloads)):
        if (encodings or {}).get(index) == "zstd":
            stored = zstd_frame(payload)
            table.append([kind, len(stored), "zstd", len(payload)])
        else:
            stored = payload
            table.append([kind, len(payload), "none", len(payload)])
        body += stored
    header = {"tensors": tensors, "contexts": contexts}
    if codebooks is not None:
        header["codebooks"] = [np.asarray(c, dtype="<f4").tobytes() for c in codebooks]
    header["sections"] = table
    header.update(extra or {})
    return header, body, frame(header, body, **frame_options)


def base_parts():
    """The hand-built base message: one float32 tensor of 3x5 elements in blocks of 4.

    Block 0 -> packed width 3 (scale 0.5), block 1 -> rANS width 2 (scale 0.25),
    block 2 -> raw f32, block 3 (3 elements) -> zero.
    """
    tensors = [["w", "float32", [3, 5], 4]]
    rans_freqs = [2, 6, 6, 2]
    contexts = [["zero"], ["raw", "f32"], ["packed", 3, None], ["rans", 2, None, 2, 4, 0, rans_freqs]]
    block_contexts = [2, 3, 1, 0]
    scale_bits = [0x3F00, 0x3E80]  # 0.5, 0.25
    codes = [
        b"",
        np.array([1.5, -2.25, 1e-40, 3.0e38], dtype="<f4").tobytes(),
        pack_codes([0, 3, 4, 7], 3),
        rans_encode([1, 2, 3, 0], rans_freqs, 4, 2),
    ]
    return tensors, contexts, block_contexts, scale_bits, codes


def base_message(**overrides):
    tensors, contexts, block_contexts, scale_bits, codes = base_parts()
    parts = dict(tensors=tensors, contexts=contexts, block_contexts=block_contexts, scale_bits=scale_bits, codes=codes)
    options = {k: v for k, v in overrides.items() if k not in parts}
    parts.update({k: v for k, v in overrides.items() if k in parts})
    return build(parts["tensors"], parts["contexts"], parts["block_contexts"], parts["scale_bits"], parts["codes"], **options)


def rebuild(header, body, **frame_options):
    return frame(header, body, **frame_options)


# ---------------------------------------------------------------------------------------------
# Valid vectors.


def lora_source():
    rng = np.random.default_rng(20260521)
    a = (rng.standard_normal((48, 80)) * 0.01).astype(np.float32)
    b = (rng.standard_normal((80, 48)) * np.exp(rng.standard_normal((80, 1))) * 0.003).astype(np.float32)
    b[:16] = 0.0  # whole zero rows: zero blocks
    fisher_a = np.exp(rng.standard_normal(a.shape) * 1.5).astype(np.float32)
    return {"lora_A": a, "lora_B": b}, {"lora_A": fisher_a, "lora_B": 1.0}


#: Valid vectors that the reference encoder's budgeted path wrote. That path's output is not
#: normative (FORMAT.md Section 19) and changed on purpose in issue 17 (Section 17's change log);
#: the vectors are fixed bytes that decoders must decode, so they are kept as committed, never
#: rewritten by a newer encoder. Delete an entry here only to replace its vector deliberately.
FROZEN_ENCODER_VECTORS = {"budget_1bpp", "budget_2bpp", "budget_4bpp", "stochastic_seed7", "masks_proxy_budget_2bpp"}
COMMITTED = Path(__file__).resolve().parent / "vectors" / "valid"
# Read before generate() clears the output directory (by default, spec/vectors itself).
_FROZEN_BYTES = {name: (COMMITTED / f"{name}.fstq").read_bytes() for name in FROZEN_ENCODER_VECTORS
                 if (COMMITTED / f"{name}.fstq").is_file()}


def _frozen(name: str, encode) -> bytes:
    """The committed bytes of vector ``name`` where it is frozen (a missing file is an error, not
    regenerated), else ``encode()``."""
    if name not in FROZEN_ENCODER_VECTORS:
        return encode()
    if name not in _FROZEN_BYTES:
        sys.exit(f"{COMMITTED / name}.fstq is missing: it is a frozen vector (FROZEN_ENCODER_VECTORS), restore it from git")
    return _FROZEN_BYTES[name]


def valid_vectors():
    """Yield (name, description, message bytes)."""
    f32 = np.float32
    specials = np.array(
        [0.0, -0.0, 1.0, -1.5, np.pi, 1e-45, -1e-45, 1.1754942e-38, 1.17549435e-38, 3.4028235e38, -3.4028235e38, 2.0**-126 * 1.5, 65504.0, 1e-30]
        + list(np.linspace(-3, 3, 50))
        + [0.0] * 64  # elements 64..127: exactly the second block
        + [-0.0] + list(np.linspace(-1, 1, 21)),
        dtype=f32,
    ).reshape(6, 25)
    yield (
        "lossless_float32_specials",
        "Lossless float32 (budget=None): +0.0 and -0.0, the smallest and largest subnormals, the smallest "
        "normal, +-FLT_MAX; a block of zeros becomes a zero block, the rest raw f32.",
        fstqcodec.encode({"specials": specials}),
    )
    half = np.array(
        [0.0, -0.0, 6e-08, -6e-08, 6.1e-05, 65504.0, -65504.0, 1.0, -2.0, 0.333]
        + list(np.linspace(-100, 100, 53)),
        dtype=np.float16,
    ).reshape(7, 9)
    yield ("lossless_float16", "Lossless float16 with -0.0, subnormals and +-65504 (raw f16 context).", fstqcodec.encode({"h": half}))
    yield (
        "lossless_float64",
        "Lossless float64 (raw f64 context); values not representable in float32.",
        fstqcodec.encode({"d": np.array([1e-300, -1e300, 1 / 3, 0.1, -0.0, 2.0**-1074], dtype=np.float64)}),
    )
    yield (
        "scalar_and_empty",
        "A 0-d scalar, a zero-size float32 tensor of shape (0, 3) and a zero-size float16 tensor of shape (4, 0, 2).",
        fstqcodec.encode(
            {"scalar": np.array(2.5, dtype=f32), "empty": np.zeros((0, 3), f32), "empty16": np.zeros((4, 0, 2), np.float16)}
        ),
    )
    rng = np.random.default_rng(7)
    odd = {
        "v3": rng.standard_normal(3).astype(f32),
        "m5x7": rng.standard_normal((5, 7)).astype(f32),
        "one": rng.standard_normal((1, 1, 1)).astype(f32),
        "h": rng.standard_normal((2, 13)).astype(np.float16),
    }
    yield (
        "odd_shapes_bits3",
        "Odd shapes and tensors smaller than a block, block_size 8 (short last blocks), fixed-rate 3-bit packed codes "
        "(codes straddle byte boundaries).",
        fstqcodec.encode(odd, bits=3, block_size=8),
    )
    tensors, fisher = lora_source()
    for bpp in (0.5, 1, 2, 4):
        name = f"budget_{str(bpp).replace('.', 'p')}bpp"
        yield (
            name,
            f"Fisher-weighted RD allocation at {bpp} bits/param (LoRA-shaped 48x80 and 80x48 float32, block 64): "
            "zero blocks, rANS contexts, centroid codebooks, zstd-encoded blocks/scales sections, zstd header.",
            _frozen(name, lambda: fstqcodec.encode(tensors, fisher=fisher, budget=fstqcodec.Budget(bits_per_param=bpp))),
        )
    yield ("fixed_bits4", "Fixed-rate bits=4: uniform grid, absmax bfloat16 scales, packed codes.", fstqcodec.encode(tensors, bits=4))
    yield ("fixed_bits8", "Fixed-rate bits=8: packed width 8.", fstqcodec.encode({"lora_A": tensors["lora_A"]}, bits=8))
    yield ("fixed_nf4", "Fixed-rate codebook='nf4': explicit 16-level codebook carried in the header, packed codes.", fstqcodec.encode(tensors, codebook="nf4"))
    yield (
        "stochastic_seed7",
        "Stochastic rounding with seed 7 at 2 bits/param.",
        _frozen("stochastic_seed7", lambda: fstqcodec.encode(tensors, budget=fstqcodec.Budget(bits_per_param=2), rounding="stochastic", seed=7)),
    )
    many = {f"model.layers.{i}.self_attn.q_proj.lora_A.weight": np.full((2, 2), i, dtype=f32) for i in range(40)}
    yield ("zstd_header", "40 small tensors with long, similar names: the header is stored zstd-compressed (header encoding 1).", fstqcodec.encode(many))
    yield (
        "meta",
        "A header 'meta' map with string, integer, float, boolean, binary and nil values.",
        fstqcodec.encode(
            {"x": np.arange(6, dtype=f32).reshape(2, 3)},
            meta={"round": 3, "client": "c-17", "lr": 0.001, "final": True, "digest": b"\x00\x01\xfe", "note": None},
        ),
    )

    # ---- hand-built: features the reference encoder does not emit -----------------------
    _, _, message = base_message()
    yield ("handmade_all_kinds", "Hand-built: one tensor whose four blocks use packed (width 3), rANS (2 lanes), raw f32 and zero contexts.", message)

    # Every packed width 1..8, uniform grid, plus a block of each in one tensor of 8 blocks of 5.
    contexts, codes, scales = [], [], []
    symbols_all = []
    for width in range(1, 9):
        symbols = [(3 * i + width) % (1 << width) for i in range(5)]
        contexts.append(["packed", width, None])
        codes.append(pack_codes(symbols, width))
        scales.append(int(f32_to_bf16_bits([0.375 * width])[0]))
        symbols_all.append(symbols)
    _, _, message = build([["p", "float32", [8, 5], 5]], contexts, list(range(8)), scales, codes)
    yield ("packed_widths_1_to_8", "Hand-built: packed contexts of every width 1..8 on the uniform grid (value = (u - 2**(w-1)) * scale).", message)

    # rANS corners: a single-symbol table with prob_bits 16 (the state never changes), more
    # lanes than symbols, an unused context, an empty zstd frame as a section, zstd blocks section.
    long_symbols = [(i * i + 3 * i) % 4 for i in range(150)]
    long_freqs = [3, 7, 4, 2]
    contexts = [
        ["rans", 2, None, 1, 16, 3, [65536]],
        ["rans", 2, None, 7, 4, 0, long_freqs],
        ["rans", 3, None, 5, 4, 0, [16]],  # unused: no blocks point at it
        ["raw", "f16"],  # unused, stored as an empty zstd frame
    ]
    tensors = [["r", "float32", [160], 64], ["s", "float32", [3], 64]]
    block_contexts = [0, 1, 1, 0]  # r: 64 (single symbol), 64 + 32 (long stream, 96 symbols); s: single symbol
    long_stream = rans_encode(long_symbols[:96], long_freqs, 4, 7)
    codes = [
        rans_encode([3] * (64 + 3), [0, 0, 0, 65536], 16, 1),
        long_stream,
        rans_encode([], [16, 0, 0, 0, 0, 0, 0, 0], 4, 5),
        b"",
    ]
    scales = [int(b) for b in f32_to_bf16_bits([0.125, 1.0, 0.0625, 3.0])]
    _, _, message = build(tensors, contexts, block_contexts, scales, codes, encodings={0: "zstd", 5: "zstd"})
    yield (
        "rans_corners",
        "Hand-built rANS corners: a one-symbol table at prob_bits 16 (first_symbol 3), a 7-lane stream over 96 symbols with "
        "renormalisation words, an unused rANS context (4*5 bytes of states, no symbols), an unused raw context whose empty "
        "section is an empty zstd frame, and a zstd-encoded blocks section.",
        message,
    )

    # bfloat16 tensor: raw bf16 values, quantized values that need rounding to bfloat16 (ties to
    # even), and raw f64 values converted to binary32 first and then to bfloat16 (double rounding).
    tie_up = 1 + 3 * 2.0**-8  # between bf16 1+2**-7 and 1+2**-6: tie, rounds to even (1+2**-6)
    double_round = 1 + 2.0**-8 + 2.0**-30  # binary32 gives 1+2**-8 (a tie), bf16 then gives 1.0
    contexts = [["raw", "bf16"], ["packed", 8, 0], ["raw", "f64"]]
    codebook = np.linspace(-1, 1, 256, dtype=np.float32)
    codebook[200] = np.float32(tie_up)
    codebook[201] = np.float32(1 + 2.0**-9)
    bf16_raw = [0x3F80, 0x8000, 0x0001, 0x7F7F, 0xC2F7]
    _, _, message = build(
        [["b", "bfloat16", [3, 5], 5], ["f", "float16", [5], 5], ["g", "float32", [5], 5]],
        contexts,
        [0, 1, 2, 2, 2],
        [0x3F80],
        [
            np.array(bf16_raw, dtype="<u2").tobytes(),
            bytes([200, 201, 0, 255, 128]),
            np.array(
                [double_round, -1e-300, 1e38, 1 / 3, 3.0e38]  # b, third block: to binary32, then bfloat16
                + [1 + 2.0**-11 + 2.0**-40, 65519.99, -1e-8, 2.0**-25 * 1.5, 0.1]  # f: directly to float16 (one rounding)
                + [1 / 3, 2.0**-149, 2.0**-150, 3.4028235e38, -0.0],  # g: to float32 (2**-150 is a tie -> 0)
                dtype="<f8",
            ).tobytes(),
        ],
        codebooks=[codebook],
    )
    yield (
        "conversions",
        "Hand-built conversions to the tensor dtype: a bfloat16 tensor (raw bf16 values; codebook values rounded to bfloat16 "
        "with a tie to even; a raw f64 value rounded to binary32 and then to bfloat16), a float16 tensor from raw f64 "
        "(one rounding: 1 + 2**-11 + 2**-40 gives 1 + 2**-10, where rounding through binary32 would give 1.0; 65519.99 "
        "stays finite; subnormal results), and a float32 tensor from raw f64 (2**-150 is a tie and rounds to 0).",
        message,
    )

    # Forward compatibility: newer minor version, unknown non-critical keys, critical listing
    # known fields only, meta, codebooks key present but empty.
    header, body, _ = base_message()
    header["critical"] = ["tensors", "contexts", "sections"]
    header["x-future-field"] = {"nested": [1, 2, {"deep": b"\x00"}], "ignored": True}
    header["codebooks"] = []
    yield (
        "forward_compatible",
        "The base message with minor version 7, an unknown non-critical header key (ignored), 'critical' naming only "
        "known fields and an empty 'codebooks' array.",
        frame(header, body, minor=7),
    )

    # ---- schema: the tensor list named by its digest (FORMAT.md 5.8) ----------------------
    tensors, fisher = lora_source()
    lora_schema = [["lora_A", "float32", [48, 80], 64], ["lora_B", "float32", [80, 48], 64]]
    yield (
        "schema_budget_1bpp",
        "The reference encoder with schema=: the header carries the 16-byte digest of the LoRA tensor list (key 'schema', "
        "listed in 'critical') instead of 'tensors'; Fisher-weighted RD allocation at 1 bit/param. Decoding needs the "
        "manifest's schema.",
        fstqcodec.encode(tensors, fisher=fisher, budget=fstqcodec.Budget(bits_per_param=1), schema=fstqcodec.Schema(lora_schema)),
        lora_schema,
    )
    header, body, _ = base_message()
    base_schema = header.pop("tensors")
    yield (
        "schema_not_critical",
        "Hand-built: the base message with 'schema' (the digest of its tensor list) instead of 'tensors', and no "
        "'critical' key. Encoders list 'schema' in 'critical', but decoders must not require it.",
        frame({"schema": schema_digest(base_schema), **header}, body),
        base_schema,
    )

    # ---- rANS: the most steps a context may take (FORMAT.md 6, 10) ------------------------
    _, _, message = build(
        [["s", "float16", [RANS_MAX_STEPS], RANS_MAX_STEPS // 2]],
        [["rans", 2, None, 1, 16, 3, [65536]]],
        [0, 0],
        [int(b) for b in f32_to_bf16_bits([0.5, 0.25])],
        [struct.pack("<I", RANS_L)],
    )
    yield (
        "rans_65536_steps",
        "Hand-built: one rANS context of 1 lane coding 65536 symbols (two blocks of 32768), the most one lane may "
        "code; a one-symbol table at prob_bits 16, so the stream is the 4-byte final state.",
        message,
    )

    # ---- boundaries fixed by document revision 2 (FORMAT.md 5.1, 7, 11) --------------------
    header, body, _ = base_message()
    yield (
        "header_depth_16",
        "The base message with an unknown key whose value is 15 nested arrays: containers at depths 2 to 16, the "
        "deepest a header may hold (Section 5.1 rule 6).",
        frame(with_extra_key(header, "x-deep", b"\x91" * 14 + b"\x90"), body),
    )
    raw_payload = np.array([1.5, -2.25, 1e-40, 3.0e38], dtype="<f4").tobytes()
    window_8mib = ZSTD_MAGIC + bytes([0x80, 0x68]) + struct.pack("<I", 16) + zstd_block(1, 0, 16) + raw_payload
    yield (
        "zstd_window_8mib",
        "The base message with its raw codes section stored as a hand-made zstd frame that is not single-segment and "
        "declares a Window_Size of exactly 8 MiB (descriptor 0x68), the largest allowed (Section 11 pass 1 item 2).",
        replace_section(header, body, 3, window_8mib, "zstd", 16),
    )
    dictionary_zero = ZSTD_MAGIC + bytes([0x21, 0x00, 16]) + zstd_block(1, 0, 16) + raw_payload
    yield (
        "zstd_dictionary_id_zero",
        "The base message with its raw codes section stored as a single-segment zstd frame whose 1-byte Dictionary_ID "
        "field is present and 0 (no dictionary), which is allowed (Section 11 pass 1 item 2).",
        replace_section(header, body, 3, dictionary_zero, "zstd", 16),
    )
    # level * scale rounded to binary32 first, then to the tensor dtype (Section 7): the exact
    # products 2.0009766221... and 0.5019531548... round differently when converted directly.
    level_h, level_b = np.float32(73.17857360839844), np.float32(0.1673177182674408)
    _, _, message = build(
        [["h", "float16", [1], 1], ["b", "bfloat16", [1], 1]],
        [["packed", 1, 0]],
        [0, 0],
        [0x3CE0, 0x4040],
        [pack_codes([0, 1], 1)],
        codebooks=[[level_h, level_b]],
    )
    yield (
        "product_rounded_to_binary32_first",
        "Hand-built: codebook levels times bfloat16 scales whose binary32 products are ties in float16 (2.0009765625 -> "
        "0x4000) and in bfloat16 (0.501953125 -> 0x3F00); converting the exact products directly would give 0x4001 "
        "and 0x3F01 (Section 7: the product is a binary32 value).",
        message,
    )
    yield from mask_valid_vectors()


def mask_source():
    rng = np.random.default_rng(20261201)
    return {
        "A": rng.standard_normal((6, 10)).astype(np.float32),
        "b": rng.standard_normal(37).astype(np.float16),
        "B": (rng.standard_normal((10, 6)) * 0.01).astype(np.float32),
    }


def mask_valid_vectors():
    """Seeded masks (FORMAT.md 5.9, format 1.1); the manifest lists each mask with the mask it defines."""
    Mask = fstqcodec.Mask
    tensors = mask_source()
    yield (
        "masks_lossless",
        "Format 1.1, reference encoder, lossless: 'A' (6x10) under an element mask (seed 1, keep 0.6) and a row mask "
        "(seed 2**64-1, keep 0.75); 'b' (float16, 37) under an element mask (seed 12345, keep 0.5); 'B' unmasked. "
        "Blocks cut the visible elements only; hidden elements decode to +0.0.",
        fstqcodec.encode(tensors, block_size=8, masks={"A": [Mask(1, 0.6), Mask(2**64 - 1, 0.75, "row")], "b": Mask(12345, 0.5)}),
    )
    lora = lora_source()[0]
    proxy_masks = {
        "lora_A": [Mask(7, 0.7, "column"), Mask(70, 0.9, "column")],
        "lora_B": [Mask(8, 0.7, "row"), Mask(80, 0.9)],
    }
    yield (
        "masks_proxy_budget_2bpp",
        "Format 1.1, reference encoder: a downlink proxy of the LoRA pair (server mask keep 0.7 and client mask keep "
        "0.9 each; columns of lora_A, rows then elements of lora_B), Fisher-free RD allocation at 2 bits per visible "
        "element.",
        _frozen("masks_proxy_budget_2bpp", lambda: fstqcodec.encode(lora, masks=proxy_masks, budget=fstqcodec.Budget(bits_per_param=2))),
    )
    yield (
        "masks_keep_one_and_none",
        "Format 1.1, reference encoder, 3-bit fixed rate: 'A' under a column mask of keep 1.0 (threshold 2**64: every "
        "column kept) and 'B' under an element mask of keep 2**-70 (threshold 0: no element kept, the tensor has no "
        "blocks and decodes to zeros).",
        fstqcodec.encode({"A": tensors["A"], "B": tensors["B"]}, bits=3, masks={"A": Mask(3, 1.0, "column"), "B": Mask(4, 2.0**-70)}),
    )
    header, body = split_message(fstqcodec.encode({"A": tensors["A"]}, masks={"A": Mask(5, 0.5)}, compress_header=False))
    header.pop("critical")
    masks_float64 = packb(header["masks"])
    masks_float32 = masks_float64.replace(b"\xcb" + struct.pack(">d", 0.5), b"\xca" + struct.pack(">f", 0.5))
    assert masks_float32 != masks_float64
    yield (
        "masks_keep_float32_not_critical",
        "Format 1.1, hand-edited: a mask whose keep probability is a msgpack float32 (0.5), and 'masks' not listed in "
        "'critical' (encoders list it; a decoder that implements masks applies them whether or not listed).",
        frame(packb(header).replace(masks_float64, masks_float32), body, minor=1),
    )


def split_message(message: bytes) -> tuple:
    """(header map, body) of a well-framed message."""
    _, _, _, _, _, stored_length, _, body_length = PREAMBLE.unpack_from(message, 0)
    return read_header(message), message[PREAMBLE.size + stored_length : PREAMBLE.size + stored_length + body_length]


# ---------------------------------------------------------------------------------------------
# Invalid vectors.


def invalid_vectors():
    """Yield (name, description, error class name, why, message bytes)."""
    good = fstqcodec.encode(*lora_source()[:1], budget=fstqcodec.Budget(bits_per_param=2))
    base_header, base_body, base = base_message()

    def variant(**changes):
        header = json.loads(json.dumps(base_header, default=lambda b: None))  # deep copy (no bytes in base)
        header.update(changes)
        return frame(header, base_body)

    def with_tensor(index, value):
        tensors = [list(t) for t in base_header["tensors"]]
        tensors[0][index] = value
        return variant(tensors=tensors)

    def with_context(index, value):
        contexts = [list(c) for c in base_header["contexts"]]
        contexts[index] = value
        return variant(contexts=contexts)

    def with_codes(context_index, payload, *, block_contexts=None, scale_bits=None, **options):
        tensors, contexts, blocks, scales, codes = base_parts()
        codes[context_index] = payload
        return build(tensors, contexts, block_contexts or blocks, scales if scale_bits is None else scale_bits, codes, **options)[2]

    # --- framing -------------------------------------------------------------------------
    yield "empty", "Zero bytes.", "TruncatedError", "Shorter than the 28-byte preamble (an empty prefix of the magic).", b""
    for cut in (5, 20, 28, 40, len(good) // 2, len(good) - 1):
        yield (
            f"truncated_at_{cut}",
            f"A valid message cut to its first {cut} bytes.",
            "TruncatedError",
            "Fewer bytes than the preamble, or than the preamble declares (step 1 or 5).",
            good[:cut],
        )
    yield "bad_magic", "The magic's 'FSQ' replaced by 'FSX'.", "BadFormatError", "Magic mismatch (step 1).", good[:3] + b"X" + good[4:]
    yield (
        "text_mode_crlf_to_lf",
        "Every \\r\\n replaced by \\n, as a text-mode transfer does.",
        "BadFormatError",
        "The magic's \\r\\n became \\n (step 1).",
        good.replace(b"\r\n", b"\n"),
    )
    yield (
        "text_mode_lf_to_crlf",
        "Every lone \\n replaced by \\r\\n.",
        "BadFormatError",
        "The magic's final \\n became \\r\\n (step 1).",
        good.replace(b"\r\n", b"\0\0").replace(b"\n", b"\r\n").replace(b"\0\0", b"\r\n"),
    )
    yield "major_version_2", "Major version 2.", "UnsupportedVersionError", "Unknown major version (step 2).", frame(base_header, base_body, major=2)
    yield "major_version_0", "Major version 0.", "UnsupportedVersionError", "Unknown major version (step 2).", frame(base_header, base_body, major=0)
    yield "reserved_nonzero", "Reserved preamble byte (offset 11) set to 1.", "BadFormatError", "Reserved byte must be 0 (step 3).", frame(base_header, base_body, reserved=1)
    yield "header_encoding_2", "Header encoding byte 2.", "BadFormatError", "Only 0 (none) and 1 (zstd) are defined (step 3).", frame(base_header, base_body, header_encoding=2, stored_header=packb(base_header))
    raw_header = packb(base_header)
    yield (
        "raw_header_length_mismatch",
        "Header encoding 0 with header_length one more than header_stored_length.",
        "BadFormatError",
        "An unencoded header's two lengths must be equal (step 3).",
        frame(raw_header, base_body, header_length=len(raw_header) + 1),
    )
    yield (
        "header_length_over_limit",
        "Preamble declares a 16 MiB + 1 byte raw header; the message is only 32 bytes.",
        "LimitExceededError",
        "header_length > max_header_size (16 MiB) is checked before the message length (step 4).",
        frame(b"", b"", header_stored_length=(16 << 20) + 1, header_length=(16 << 20) + 1),
    )
    yield (
        "message_length_over_limit",
        "Preamble declares a body of 2**40 bytes.",
        "LimitExceededError",
        "The declared total length exceeds max_message_size (2 GiB) (step 4).",
        frame(base_header, base_body, body_length=1 << 40),
    )
    flipped = bytearray(good)
    flipped[len(good) - 10] ^= 0x01
    yield "checksum_mismatch", "One bit of the body flipped.", "ChecksumError", "CRC-32 over the message differs from the stored one (step 6).", bytes(flipped)
    crc_flipped = bytearray(good)
    crc_flipped[-1] ^= 0x80
    yield "checksum_field_flipped", "One bit of the stored CRC-32 flipped.", "ChecksumError", "Stored CRC-32 wrong (step 6).", bytes(crc_flipped)
    yield "trailing_byte", "A valid message followed by one zero byte.", "TrailingDataError", "Bytes after the CRC (step 5).", good + b"\x00"
    yield "trailing_message", "A valid message followed by a second copy of itself.", "TrailingDataError", "Bytes after the CRC (step 5).", base + base

    # --- header bytes --------------------------------------------------------------------
    header_bytes = packb(base_header)
    yield (
        "header_zstd_declares_1gib",
        "zstd header whose frame declares a content size of 1 GiB while header_length says the real size.",
        "BadFormatError",
        "Frame content size must equal header_length, checked before decompressing (step 7).",
        frame(header_bytes, base_body, header_encoding=1, stored_header=fake_zstd_frame(1 << 30)),
    )
    yield (
        "header_zstd_trailing_bytes",
        "zstd header frame followed by 3 more bytes inside the stored header.",
        "TrailingDataError",
        "Nothing may follow the single zstd frame (step 7).",
        frame(header_bytes, base_body, header_encoding=1, stored_header=zstd_frame(header_bytes) + b"abc"),
    )
    yield (
        "header_zstd_no_content_size",
        "zstd header frame without the content size field.",
        "BadFormatError",
        "A zstd frame must declare its content size (step 7).",
        frame(header_bytes, base_body, header_encoding=1, stored_header=zstandard.ZstdCompressor(write_content_size=False).compress(header_bytes)),
    )
    yield "header_not_a_map", "Header is a msgpack array.", "BadFormatError", "The header must be a map (step 8).", frame([1, 2, 3], base_body)
    yield "header_empty", "Header of zero bytes.", "BadFormatError", "Not a msgpack value (step 8).", frame(b"", base_body)
    yield (
        "header_nesting_bomb",
        "Header is 10000 nested one-element arrays.",
        "BadFormatError",
        "Nesting deeper than any decoder's bound (at most 1024) must be refused, not recursed into (step 8).",
        frame(b"\x91" * 10000 + b"\xc0", base_body),
    )
    yield (
        "header_container_bomb",
        "Header map whose unknown key holds 200000 empty arrays (about 200 KB, 0.3 KB once zstd-encoded).",
        "LimitExceededError",
        "More arrays and maps than 2*max_tensors + 3*max_contexts + 4096 at the default limits (Section 5.1 rule 8, step 8).",
        frame(
            b"\x84" + msgpack.packb({"tensors": base_header["tensors"]})[1:]
            + msgpack.packb("contexts") + msgpack.packb(base_header["contexts"])
            + msgpack.packb("sections") + msgpack.packb(base_header["sections"])
            + msgpack.packb("x") + b"\xdd" + (200_000).to_bytes(4, "big") + b"\x90" * 200_000,
            base_body,
            header_encoding=1,
        ),
    )
    yield (
        "header_ext_type",
        "Header map with a msgpack extension value (type 5) under an unknown key.",
        "BadFormatError",
        "Extension types are forbidden anywhere in the header (step 8).",
        frame(packb({**base_header, "x": msgpack.ExtType(5, b"\x01\x02")}), base_body),
    )
    yield (
        "header_timestamp",
        "Header map with a msgpack timestamp (extension type -1).",
        "BadFormatError",
        "Extension types, including the predefined timestamp, are forbidden (step 8).",
        frame(packb({**base_header, "when": msgpack.Timestamp(1, 0)}), base_body),
    )
    yield (
        "header_trailing_bytes",
        "One msgpack nil after the header map, inside header_length.",
        "TrailingDataError",
        "The header bytes must hold exactly one msgpack map (step 8).",
        frame(header_bytes + b"\xc0", base_body),
    )
    yield (
        "header_invalid_utf8",
        "A header key that is not valid UTF-8.",
        "BadFormatError",
        "msgpack str values must be UTF-8 (step 8).",
        frame(header_bytes[:1].replace(b"\x83", b"\x84") + header_bytes[1:] + b"\xa2\xff\xfe\xc0", base_body),
    )
    yield (
        "header_int_key",
        "A top-level header key that is an integer.",
        "BadFormatError",
        "Map keys must be strings (step 8).",
        frame(bytes([header_bytes[0] + 1]) + header_bytes[1:] + b"\x01\xc0", base_body),
    )
    yield (
        "header_nested_binary_key",
        "An unknown header key whose value is a map with a bin key.",
        "BadFormatError",
        "Map keys are str at every level (step 8).",
        frame(packb({**base_header, "x-unknown": {b"k": 1}}), base_body),
    )
    duplicate = bytes([header_bytes[0] + 1]) + header_bytes[1:] + packb("tensors") + packb([["other", "float32", [15], 4]])
    yield (
        "header_duplicate_key",
        "The header map holds the key 'tensors' twice (the second declares another tensor of the same size).",
        "BadFormatError",
        "Duplicate map keys are forbidden: decoders that keep the first and those that keep the last would disagree (step 8).",
        frame(duplicate, base_body),
    )

    # --- header fields -------------------------------------------------------------------
    for key in ("contexts", "sections"):
        header = dict(base_header)
        del header[key]
        yield f"missing_{key}", f"Header without the required key '{key}'.", "BadFormatError", "Required field missing (step 10).", frame(header, base_body)
    header = dict(base_header)
    del header["tensors"]
    yield (
        "missing_tensors",
        "Header with neither 'tensors' nor 'schema'.",
        "BadFormatError",
        "Exactly one of 'tensors' and 'schema' is required (step 10).",
        frame(header, base_body),
    )

    # schema (FORMAT.md 5.8); the decoder is given the base message's tensor list as a schema
    base_schema = [list(t) for t in base_header["tensors"]]
    base_digest = schema_digest(base_schema)
    no_tensors = {k: v for k, v in base_header.items() if k != "tensors"}

    def with_schema(value, **changes):
        return frame({"schema": value, **no_tensors, "critical": ["schema"], **changes}, base_body)

    assert spec_decode(with_schema(base_digest), [base_schema])
    yield (
        "schema_unknown_digest",
        "'schema' is the digest of the base tensor list with its last bit flipped; the decoder knows only the base list.",
        "UnknownSchemaError",
        "No schema given to the decoder has this digest (step 11).",
        with_schema(base_digest[:-1] + bytes([base_digest[-1] ^ 1])),
        [base_schema],
    )
    yield (
        "schema_digest_15_bytes",
        "'schema' is the first 15 bytes of the right digest.",
        "BadFormatError",
        "A schema digest is a bin of exactly 16 bytes (step 11).",
        with_schema(base_digest[:15]),
        [base_schema],
    )
    yield (
        "schema_digest_32_bytes",
        "'schema' is the whole SHA-256 (32 bytes) of the base tensor list, not its first 16 bytes.",
        "BadFormatError",
        "A schema digest is a bin of exactly 16 bytes (step 11).",
        with_schema(hashlib.sha256(packb(base_schema)).digest()),
        [base_schema],
    )
    yield (
        "schema_digest_str",
        "'schema' is the right digest written as a 32-character hex str.",
        "BadFormatError",
        "A schema digest is a bin, not a str (step 11).",
        with_schema(base_digest.hex()),
        [base_schema],
    )
    yield (
        "schema_nil",
        "'schema' is nil and 'tensors' is absent.",
        "BadFormatError",
        "A present 'schema' key must hold a 16-byte bin; nil does not mean absent here (step 11).",
        with_schema(None),
        [base_schema],
    )
    yield (
        "tensors_and_schema",
        "The base header (with 'tensors') plus 'schema', the digest of the same tensor list.",
        "BadFormatError",
        "Exactly one of 'tensors' and 'schema' (step 10).",
        frame({**base_header, "schema": base_digest, "critical": ["schema"]}, base_body),
        [base_schema],
    )
    yield (
        "critical_unknown",
        "'critical' lists 'x-sparse-v2', a field this version does not define.",
        "UnsupportedFeatureError",
        "A must-understand field the decoder does not implement (step 9).",
        variant(critical=["tensors", "x-sparse-v2"], **{"x-sparse-v2": 1}),
    )
    yield "critical_not_array", "'critical' is a string.", "BadFormatError", "'critical' must be an array of strings (step 9).", variant(critical="tensors")
    yield "tensors_not_array", "'tensors' is a map.", "BadFormatError", "Wrong type (step 11).", variant(tensors={"w": 1})
    tensors = [list(t) for t in base_header["tensors"]] * 2
    yield "duplicate_tensor_name", "Two tensors named 'w'.", "BadFormatError", "Tensor names must be unique (step 11).", variant(tensors=tensors)
    yield "empty_tensor_name", "Tensor name ''.", "BadFormatError", "Names must be non-empty (step 11).", with_tensor(0, "")
    yield "tensor_name_too_long", "Tensor name of 1025 bytes.", "LimitExceededError", "Over max_name_length (1024) (step 11).", with_tensor(0, "n" * 1025)
    yield "unknown_dtype", "dtype 'int8'.", "BadFormatError", "dtype must be float32, float16, bfloat16 or float64 (step 11).", with_tensor(1, "int8")
    yield (
        "tensor_dtype_not_a_string",
        "dtype is an array ['float32'].",
        "BadFormatError",
        "dtype must be one of the four strings; any other msgpack value is malformed (step 11).",
        with_tensor(1, ["float32"]),
    )
    yield "negative_shape", "Shape [3, -5].", "BadFormatError", "Dimensions are non-negative integers (step 11).", with_tensor(2, [3, -5])
    yield "float_shape", "Shape [3.0, 5].", "BadFormatError", "Dimensions are integers, not floats (step 11).", with_tensor(2, [3.0, 5])
    yield "shape_too_many_dims", "A shape of 33 ones.", "LimitExceededError", "Over max_ndim (32) (step 11).", with_tensor(2, [1] * 33)
    yield (
        "elements_10e12",
        "Shape [1000000, 1000000]: 10**12 float32 elements.",
        "LimitExceededError",
        "4 * 10**12 bytes exceed max_output_size (2 GiB); computed with exact integers, before any allocation (step 11).",
        with_tensor(2, [10**6, 10**6]),
    )
    yield (
        "elements_overflow_int64",
        "Shape [2**62, 4]: an element count that overflows 64-bit integers.",
        "LimitExceededError",
        "Sizes are computed without overflow (arbitrary precision or checked arithmetic) (step 11).",
        with_tensor(2, [2**62, 4]),
    )
    million = msgpack.packb({"tensors": [None] * 10**6, "contexts": [], "sections": [["blocks", 0, "none", 0], ["scales", 0, "none", 0]]})
    yield (
        "tensors_10e6",
        "zstd-compressed header (about 100 bytes stored) declaring an array of 10**6 tensor entries.",
        "LimitExceededError",
        "Tensor count over max_tensors (65536), checked on the array length before any per-tensor work (step 11).",
        frame(million, b"", header_encoding=1),
    )
    yield "block_size_0", "block_size 0.", "BadFormatError", "block_size is in [1, 65536] (step 11).", with_tensor(3, 0)
    yield "block_size_65537", "block_size 65537.", "BadFormatError", "block_size is in [1, 65536] (step 11).", with_tensor(3, 65537)
    yield (
        "blocks_over_limit",
        "One float16 tensor of 2**24 + 1 elements in blocks of 1 (32 MiB of output, within max_output_size).",
        "LimitExceededError",
        "2**24 + 1 blocks exceed max_blocks (2**24), checked from the shape before any allocation (step 11).",
        variant(tensors=[["w", "float16", [2**24 + 1], 1]]),
    )
    yield (
        "blocks_over_limit_in_total",
        "Two float16 tensors of 2**23 + 1 and 2**23 elements in blocks of 1: neither alone exceeds max_blocks.",
        "LimitExceededError",
        "The running block count over all tensors, 2**24 + 1, exceeds max_blocks (2**24) (step 11).",
        variant(tensors=[["a", "float16", [2**23 + 1], 1], ["b", "float16", [2**23], 1]]),
    )
    yield "tensor_entry_short", "A tensor entry of three fields.", "BadFormatError", "A tensor is [name, dtype, shape, block_size] (step 11).", variant(tensors=[["w", "float32", [3, 5]]])

    # codebooks
    codebook_header = dict(base_header, contexts=[["zero"], ["raw", "f32"], ["packed", 3, 0], base_header["contexts"][3]])
    for name, levels, why in (
        ("codebook_nan_level", [0, 1, 2, float("nan"), 4, 5, 6, 7], "Levels must be finite (step 12)."),
        ("codebook_inf_level", [0, 1, 2, float("inf"), 4, 5, 6, 7], "Levels must be finite (step 12)."),
        ("codebook_3_levels", [0, 1, 2], "A codebook has 2, 4, ..., 256 levels (step 12)."),
    ):
        header = dict(codebook_header, codebooks=[np.array(levels, dtype="<f4").tobytes()])
        yield name, f"Codebook levels {levels}.", "BadFormatError", why, frame(header, base_body)
    header = dict(codebook_header, codebooks=[np.zeros(8, "<f4").tobytes()[:-1]])
    yield "codebook_ragged", "Codebook of 31 bytes.", "BadFormatError", "Not a whole number of float32 levels (step 12).", frame(header, base_body)
    header = dict(codebook_header, codebooks=[np.zeros(16, "<f4").tobytes()])
    yield "codebook_wrong_size_for_width", "A width-3 context naming a 16-level codebook.", "BadFormatError", "2**width levels needed (step 13).", frame(header, base_body)
    header = dict(codebook_header, codebooks=[np.zeros(8, "<f4").tobytes()], contexts=[["zero"], ["raw", "f32"], ["packed", 3, 1], base_header["contexts"][3]])
    yield "codebook_index_out_of_range", "A context naming codebook 1 of 1.", "BadFormatError", "Index out of range (step 13).", frame(header, base_body)
    yield "codebook_missing", "A context naming codebook 0 with no 'codebooks' key.", "BadFormatError", "Index out of range (step 13).", frame(codebook_header, base_body)

    # contexts
    yield "context_unknown_kind", "Context ['huffman', 3].", "BadFormatError", "Unknown context kind (step 13).", with_context(2, ["huffman", 3])
    yield "context_width_9", "Packed context of width 9.", "BadFormatError", "Widths are 1..8 (step 13).", with_context(2, ["packed", 9, None])
    yield "context_width_0", "Packed context of width 0.", "BadFormatError", "Widths are 1..8 (step 13).", with_context(2, ["packed", 0, None])
    yield "raw_format_unknown", "Raw context of format 'f8'.", "BadFormatError", "Raw formats are f16, bf16, f32, f64 (step 13).", with_context(1, ["raw", "f8"])
    yield "raw_format_not_a_string", "Raw context whose format is an array ['f32'].", "BadFormatError", "Raw format must be one of four strings (step 13).", with_context(1, ["raw", ["f32"]])
    yield "zero_context_with_parameter", "Context ['zero', 1].", "BadFormatError", "A zero context has no parameters (step 13).", with_context(0, ["zero", 1])
    rans_context = base_header["contexts"][3]
    yield "rans_freqs_sum", "rANS frequencies [2, 6, 6, 3] at prob_bits 4 (sum 17).", "BadFormatError", "Frequencies must sum to 2**prob_bits (step 13).", with_context(3, rans_context[:6] + [[2, 6, 6, 3]])
    yield "rans_lanes_0", "rANS context with 0 lanes.", "BadFormatError", "lanes >= 1 (step 13).", with_context(3, rans_context[:3] + [0] + rans_context[4:])
    yield "rans_lanes_over_limit", "rANS context with 65537 lanes.", "LimitExceededError", "Over max_rans_lanes (65536) (step 13).", with_context(3, rans_context[:3] + [65537] + rans_context[4:])
    yield "rans_prob_bits_17", "rANS context with prob_bits 17.", "BadFormatError", "prob_bits is 1..16 (step 13).", with_context(3, rans_context[:4] + [17, 0, [2**17]])
    yield "rans_freqs_overflow_alphabet", "Width-2 rANS table of 4 frequencies starting at symbol 1.", "BadFormatError", "first_symbol + len(freqs) <= 2**width (step 13).", with_context(3, rans_context[:5] + [1, [2, 6, 6, 2]])
    yield "rans_negative_frequency", "rANS frequencies [-2, 10, 6, 2].", "BadFormatError", "Frequencies are in [0, 2**prob_bits] (step 13).", with_context(3, rans_context[:6] + [[-2, 10, 6, 2]])
    yield (
        "contexts_257",
        "257 zero contexts.",
        "LimitExceededError",
        "At most 256 contexts (a block's context index is one byte) (step 13).",
        variant(contexts=[["zero"]] * 257, sections=[["blocks", 4, "none", 4], ["scales", 4, "none", 4]] + [["codes", 0, "none", 0]] * 257),
    )

    # sections
    sections = [list(s) for s in base_header["sections"]]
    yield "sections_out_of_order", "The 'blocks' and 'scales' section entries swapped.", "BadFormatError", "Kinds are blocks, scales, then one codes per context (step 14).", variant(sections=[sections[1], sections[0]] + sections[2:])
    yield "sections_missing_one", "One codes section fewer than contexts.", "BadFormatError", "2 + len(contexts) sections (step 14).", variant(sections=sections[:-1])
    bigger = [list(s) for s in sections]
    bigger[2] = ["codes", 0, "none", 0]
    bigger[3][1] += 1
    bigger[3][3] += 1
    yield "sections_do_not_tile", "Section lengths that sum to one byte more than the body.", "BadFormatError", "Sections tile the body exactly (step 14).", variant(sections=bigger)
    unequal = [list(s) for s in sections]
    unequal[4] = ["codes", unequal[4][1], "none", unequal[4][3] + 2]
    yield "section_none_lengths_differ", "Unencoded section with decoded length != stored length.", "BadFormatError", "An unencoded section's lengths are equal (step 14).", variant(sections=unequal)
    brotli = [list(s) for s in sections]
    brotli[4][2] = "brotli"
    yield "section_unknown_encoding", "Section encoding 'brotli'.", "BadFormatError", "Encodings are 'none' and 'zstd' (step 14).", variant(sections=brotli)

    # body: blocks and scales
    yield "block_context_out_of_range", "A block naming context 4 of 4.", "BadFormatError", "Context index out of range (step 16).", base_message(block_contexts=[2, 3, 1, 4])[2]
    yield (
        "blocks_section_wrong_length",
        "A blocks section of 5 bytes for 4 blocks (and a fifth, zero, context index).",
        "BadFormatError",
        "One byte per block (step 15).",
        base_message(block_contexts=[2, 3, 1, 0, 0])[2],
    )
    yield "scales_section_wrong_length", "Three scales for two quantized blocks.", "BadFormatError", "One scale per packed/rANS block (step 17).", base_message(scale_bits=[0x3F00, 0x3E80, 0x3F80])[2]
    for name, bits, what in (
        ("scale_zero", 0x0000, "+0"),
        ("scale_negative_zero", 0x8000, "-0"),
        ("scale_negative", 0xBF00, "-0.5"),
        ("scale_inf", 0x7F80, "+inf"),
        ("scale_nan", 0x7FC0, "NaN"),
    ):
        yield name, f"The first scale is bfloat16 {what} ({bits:#06x}).", "BadFormatError", "Scales are finite and strictly positive (0x0001..0x7F7F) (step 18).", base_message(scale_bits=[bits, 0x3E80])[2]

    # body: codes
    yield "packed_padding_bits", "The 12-bit packed stream with a padding bit set in its last byte.", "BadFormatError", "Padding bits are zero (step 19).", with_codes(2, pack_codes([0, 3, 4, 7], 3)[:1] + bytes([pack_codes([0, 3, 4, 7], 3)[1] | 0x80]))
    yield "raw_codes_wrong_length", "Raw f32 section of 12 bytes for 4 elements.", "BadFormatError", "n * 4 bytes (step 19).", with_codes(1, np.zeros(3, "<f4").tobytes())
    yield "raw_nan", "A raw f32 NaN.", "BadFormatError", "Decoded values must be finite (step 21).", with_codes(1, np.array([1, float("nan"), 2, 3], "<f4").tobytes())
    yield "raw_inf", "A raw f32 -inf.", "BadFormatError", "Decoded values must be finite (step 21).", with_codes(1, np.array([1, -np.inf, 2, 3], "<f4").tobytes())
    yield (
        "raw_bf16_inf",
        "A raw bf16 +inf (0x7F80).",
        "BadFormatError",
        "Decoded values must be finite (step 21).",
        build([["w", "float32", [2], 4]], [["raw", "bf16"]], [0], [], [np.array([0x3F80, 0x7F80], "<u2").tobytes()])[2],
    )
    yield (
        "float16_overflow",
        "A float16 tensor holding the raw f32 value 65520 (rounds to inf in float16).",
        "BadFormatError",
        "Values must be finite after conversion to the tensor dtype (step 21).",
        build([["h", "float16", [2], 4]], [["raw", "f32"]], [0], [], [np.array([1.0, 65520.0], "<f4").tobytes()])[2],
    )
    yield (
        "quantized_overflow",
        "Codebook level 3e38 times scale 2: the binary32 product overflows.",
        "BadFormatError",
        "Values must be finite (step 21).",
        build([["w", "float32", [2], 4]], [["packed", 1, 0]], [0], [0x4000], [pack_codes([0, 1], 1)], codebooks=[[0.0, 3e38]])[2],
    )
    rans_long = [(i * 7 + i // 3) % 4 for i in range(64)]
    long_freqs = [4, 5, 4, 3]
    stream = rans_encode(rans_long, long_freqs, 4, 2)
    assert len(stream) > 8 + 4, "the stream needs renormalisation words"

    def rans_message(payload, freqs=long_freqs):
        return build([["r", "float32", [64], 64]], [["rans", 2, None, 2, 4, 0, freqs]], [0], [0x3F80], [payload])[2]

    assert spec_decode(rans_message(stream))
    yield "rans_words_left_over", "A valid 2-lane rANS stream with one extra 16-bit word.", "TrailingDataError", "Words left after the last symbol (step 19).", rans_message(stream + b"\x34\x12")
    yield "rans_runs_out", "A valid 2-lane rANS stream without its last word.", "BadFormatError", "The decoder needs a word past the end (step 19).", rans_message(stream[:-2])
    yield "rans_odd_length", "A rANS stream with one extra byte (odd word area).", "BadFormatError", "States then whole 16-bit words (step 19).", rans_message(stream + b"\x00")
    yield "rans_shorter_than_states", "A 6-byte stream for 2 lanes.", "BadFormatError", "At least 4 bytes per lane (step 19).", rans_message(stream[:6])
    low_state = struct.pack("<I", RANS_L - 1) + stream[4:]
    yield "rans_initial_state_low", "First lane's initial state 2**16 - 1.", "BadFormatError", "States start in [2**16, 2**32) (step 19).", rans_message(low_state)
    single = build(
        [["r", "float32", [64], 64]],
        [["rans", 2, None, 1, 16, 3, [65536]]],
        [0],
        [0x3F80],
        [struct.pack("<I", RANS_L + 1)],
    )[2]
    yield (
        "rans_bad_final_state",
        "One-symbol table at prob_bits 16 (the state never changes) with initial state 2**16 + 1.",
        "BadFormatError",
        "Every lane must end in state 2**16 (step 19).",
        single,
    )
    too_many = build(
        [["s", "float16", [RANS_MAX_STEPS + 1], RANS_MAX_STEPS // 2]],
        [["rans", 2, None, 1, 16, 3, [65536]]],
        [0, 0, 0],
        [0x3F00, 0x3E80, 0x3F80],
        [struct.pack("<I", RANS_L)],
    )[2]
    yield (
        "rans_too_few_lanes",
        "One rANS context of 1 lane coding 65537 symbols (blocks of 32768, 32768 and 1); the stream itself (a one-symbol "
        "table, the 4-byte final state) would be valid.",
        "BadFormatError",
        "lanes >= ceil(n_k / 65536): at most 65536 steps per context, checked with the section lengths, before decoding "
        "the stream (step 19).",
        too_many,
    )
    yield (
        "rans_stream_too_long_for_count",
        "rANS section declaring more bytes than 4*lanes + 2*symbols.",
        "BadFormatError",
        "A stream holds at most one word per symbol (step 19).",
        rans_message(stream + b"\x00\x00" * 80),
    )

    # zstd sections
    raw_payload = np.array([1.5, -2.25, 1e-40, 3.0e38], dtype="<f4").tobytes()
    yield (
        "section_zstd_declares_4gib",
        "Raw codes section stored as zstd whose frame declares a content size of 4 GiB.",
        "BadFormatError",
        "Frame content size must equal the declared decoded length, checked before decompressing (step 19).",
        replace_section(base_header, base_body, 3, fake_zstd_frame(4 << 30), "zstd", 16),
    )
    yield (
        "section_declares_4gib",
        "Raw codes section whose table entry declares a decoded length of 4 GiB.",
        "BadFormatError",
        "Declared decoded length differs from what the blocks need, checked before decompressing (step 19).",
        replace_section(base_header, base_body, 3, fake_zstd_frame(4 << 30), "zstd", 4 << 30),
    )
    yield (
        "section_zstd_trailing_bytes",
        "Raw codes section: a valid zstd frame followed by 2 bytes.",
        "TrailingDataError",
        "Exactly one frame, nothing after it (step 19).",
        replace_section(base_header, base_body, 3, zstd_frame(raw_payload) + b"\x00\x00", "zstd", 16),
    )
    yield (
        "section_zstd_two_frames",
        "Raw codes section: a zstd frame of the 16 bytes followed by a second, empty frame.",
        "TrailingDataError",
        "Exactly one frame (step 19).",
        replace_section(base_header, base_body, 3, zstd_frame(raw_payload) + zstd_frame(b""), "zstd", 16),
    )
    bad_checksum = bytearray(zstd_frame(raw_payload, checksum=True))
    bad_checksum[-1] ^= 0xFF
    yield (
        "section_zstd_bad_checksum",
        "Raw codes section: a zstd frame whose content checksum does not match.",
        "BadFormatError",
        "An invalid zstd frame (step 19).",
        replace_section(base_header, base_body, 3, bytes(bad_checksum), "zstd", 16),
    )
    yield (
        "section_zstd_truncated_frame",
        "Raw codes section: a zstd frame missing its last 3 bytes.",
        "TruncatedError",
        "The zstd frame ends before its last block (step 19).",
        replace_section(base_header, base_body, 3, zstd_frame(raw_payload)[:-3], "zstd", 16),
    )
    yield (
        "zero_context_section_not_zstd",
        "The zero context's empty section marked 'zstd' holding 5 bytes that are not a zstd frame.",
        "BadFormatError",
        "Every zstd section must be one valid frame, whether or not a block uses its context (step 19).",
        replace_section(base_header, base_body, 2, b"hello", "zstd", 0),
    )
    yield (
        "section_skippable_zstd_frame",
        "The zero context's empty section marked 'zstd' holding a zstd skippable frame.",
        "BadFormatError",
        "A skippable frame has no content size; a zstd section is one ordinary frame (step 19).",
        replace_section(base_header, base_body, 2, struct.pack("<II", 0x184D2A50, 0), "zstd", 0),
    )


    # --- error precedence fixed by document revision 2 ------------------------------------
    yield from precedence_vectors(base_header, base_body, variant, with_context, raw_payload, stream)
    yield from mask_invalid_vectors()


def mask_invalid_vectors():
    """Masks out of range (FORMAT.md 5.9, step 14): one defect each, correct CRC-32."""
    Mask = fstqcodec.Mask
    tensors = mask_source()
    header, body = split_message(
        fstqcodec.encode({"A": tensors["A"], "b": tensors["b"]}, masks={"A": Mask(1, 0.6), "b": Mask(2, 0.5)}, compress_header=False)
    )
    assert header["masks"] == [[0, 1, 1, 0.6, "element"], [1, 1, 2, 0.5, "element"]]

    def with_mask(index, field, value):
        masks = [list(m) for m in header["masks"]]
        masks[index][field] = value
        return frame(dict(header, masks=masks), body, minor=1)

    step = "(5.9, step 14)"
    cases = [
        ("mask_keep_zero", "keep probability 0.0.", "BadMaskError", f"keep must be in (0, 1] {step}.", with_mask(0, 3, 0.0)),
        ("mask_keep_above_one", "keep probability 1.0000000000000002 (the next binary64 above 1).", "BadMaskError",
         f"keep must be in (0, 1] {step}.", with_mask(0, 3, 1.0000000000000002)),
        ("mask_keep_negative", "keep probability -0.5.", "BadMaskError", f"keep must be in (0, 1] {step}.", with_mask(0, 3, -0.5)),
        ("mask_keep_nan", "keep probability NaN.", "BadMaskError", f"NaN is not in (0, 1] {step}.", with_mask(0, 3, float("nan"))),
        ("mask_generator_unknown", "generator id 2.", "BadMaskError", f"Only generator 1 (SplitMix64) is defined {step}.", with_mask(0, 1, 2)),
        ("mask_generator_zero", "generator id 0.", "BadMaskError", f"Only generator 1 (SplitMix64) is defined {step}.", with_mask(0, 1, 0)),
        ("mask_row_on_1d_tensor", "a row mask on the 1-D tensor 'b'.", "BadMaskError",
         f"row and column masks need a 2-D tensor {step}.", with_mask(1, 4, "row")),
        ("mask_granularity_unknown", "granularity 'block'.", "BadMaskError", f"granularity is element, row or column {step}.",
         with_mask(0, 4, "block")),
        ("mask_tensor_index_out_of_range", "a mask naming tensor #2 of two.", "BadMaskError",
         f"the tensor index must name a tensor {step}.", with_mask(1, 0, 2)),
        ("mask_seed_negative", "seed -1.", "BadMaskError", f"seed must be in [0, 2**64) {step}.", with_mask(0, 2, -1)),
        ("mask_keep_integer", "keep probability the msgpack int 1.", "BadFormatError",
         f"keep must be a msgpack float {step}.", with_mask(0, 3, 1)),
        ("mask_types_before_ranges", "keep 0.0 (out of range) and granularity the int 5 (wrong type) in one entry.",
         "BadFormatError", f"every field's type is checked before any range {step}.",
         frame(dict(header, masks=[[0, 1, 1, 0.0, 5], header["masks"][1]]), body, minor=1)),
        ("mask_entry_short", "a mask entry of 4 elements.", "BadFormatError", f"an entry has exactly 5 elements {step}.",
         frame(dict(header, masks=[[0, 1, 1, 0.6], header["masks"][1]]), body, minor=1)),
        ("masks_not_array", "'masks' is a map.", "BadFormatError", f"'masks' must be an array {step}.",
         frame(dict(header, masks={"A": 1}), body, minor=1)),
        ("mask_five_on_one_tensor", "five copies of the mask of 'A'.", "BadMaskError", f"at most 4 masks per tensor {step}.",
         frame(dict(header, masks=[header["masks"][0]] * 5 + [header["masks"][1]]), body, minor=1)),
        ("mask_meta_before_masks", "a non-scalar meta value and a keep probability of 0.0.", "BadFormatError",
         f"meta is checked before masks {step}.", frame(dict(header, meta={"x": [1]}, masks=[[0, 1, 1, 0.0, "element"], header["masks"][1]]), body, minor=1)),
        ("mask_keeps_more_than_coded", "the mask of 'A' with keep 0.9 instead of 0.6: more visible elements, so more blocks "
         "than the blocks section holds.", "BadFormatError", "The blocks section's length must equal the block count of the "
         "visible elements (step 15).", with_mask(0, 3, 0.9)),
    ]
    for name, description, error, why, message in cases:
        yield name, f"Format 1.1 masks: {description}", error, why, message


def precedence_vectors(base_header, base_body, variant, with_context, raw_payload, stream):
    """Invalid vectors with two candidate errors, where the rule of FORMAT.md 13.2 picks one."""
    yield from msgpack_precedence_vectors(base_header, base_body)
    yield from zstd_precedence_vectors(base_header, base_body, raw_payload)
    yield (
        "critical_unknown_then_not_a_string",
        "'critical' is ['x-unknown', 5]: an unknown name, then an entry that is not a str.",
        "BadFormatError",
        "Every entry's type is checked before any name is looked up, so the class does not depend on the keys a decoder "
        "implements (step 9).",
        variant(critical=["x-unknown", 5]),
    )
    rans_context = base_header["contexts"][3]
    yield (
        "rans_lanes_over_limit_then_bad_prob_bits",
        "rANS context with 65537 lanes and prob_bits 17.",
        "LimitExceededError",
        "A context's fields are checked in index order: lanes (index 3) before prob_bits (index 4) (step 13).",
        with_context(3, rans_context[:3] + [65537, 17, 0, [2**17]]),
    )
    yield (
        "rans_bad_width_then_lanes_over_limit",
        "rANS context of width 9 with 65537 lanes.",
        "BadFormatError",
        "A context's fields are checked in index order: width (index 1) before lanes (index 3) (step 13).",
        with_context(3, ["rans", 9, None, 65537, 4, 0, [16]]),
    )
    codebook_contexts = [["zero"], ["raw", "f32"], ["packed", 3, 0], rans_context]
    yield (
        "codebook_over_limit_then_not_power_of_two",
        "One codebook of 65537 zero levels (zstd-encoded header).",
        "LimitExceededError",
        "Within a codebook entry the running level count (max_codebook_entries, 65536) is checked before the level count "
        "is checked to be a power of two in [2, 256] (step 12).",
        frame(dict(base_header, contexts=codebook_contexts, codebooks=[bytes(4 * 65537)]), base_body, header_encoding=1),
    )
    yield (
        "codebook_bad_entry_then_over_limit",
        "Codebooks of 3 levels and then 65536 levels (zstd-encoded header).",
        "BadFormatError",
        "Codebook entries are checked in index order: entry 0 has 3 levels before entry 1 passes max_codebook_entries "
        "(step 12).",
        frame(dict(base_header, contexts=codebook_contexts, codebooks=[bytes(12), bytes(4 * 65536)]), base_body, header_encoding=1),
    )
    tensors, contexts = [["r", "float32", [64], 64]], [["rans", 2, None, 2, 4, 0, [4, 5, 4, 3]]]
    header, body, _ = build(tensors, contexts, [0], [0x3F80], [stream])
    yield (
        "rans_odd_length_zstd_truncated",
        "A 2-lane rANS section declaring an odd decoded length, stored as a zstd frame cut short.",
        "BadFormatError",
        "The whole length rule of Section 6 (4*lanes + 2*m, m <= n_k) is checked before the section is decompressed "
        "(step 19a before 19b's TruncatedError).",
        replace_section(header, body, 2, zstd_frame(stream + b"\x00")[:-3], "zstd", len(stream) + 1),
    )
    yield (
        "rans_shorter_than_states_zstd_truncated",
        "A 2-lane rANS section declaring 6 decoded bytes (less than its 8 bytes of states), stored as a zstd frame cut short.",
        "BadFormatError",
        "decoded_length >= 4*lanes is checked before the section is decompressed (step 19a before 19b).",
        replace_section(header, body, 2, zstd_frame(stream[:6])[:-2], "zstd", 6),
    )
    yield (
        "bfloat16_nan_all_ones",
        "A bfloat16 tensor holding a raw f32 NaN with bit pattern 0xFFFFFFFF.",
        "BadFormatError",
        "A NaN stays non-finite through the conversion to bfloat16 (the rounding formula of Section 7 is for finite values; "
        "applied to 0xFFFFFFFF in 32-bit arithmetic it would wrap to +0.0) (step 21).",
        build([["b", "bfloat16", [2], 4]], [["raw", "f32"]], [0], [], [struct.pack("<II", 0x3F800000, 0xFFFFFFFF)])[2],
    )


def msgpack_precedence_vectors(base_header, base_body):
    """Section 5.1: checks in byte order; a container's header is checked, then counted, when read."""
    base_containers = count_containers(base_header)
    yield (
        "header_not_a_map_then_trailing",
        "Header bytes: the msgpack array [1, 2, 3] followed by a nil.",
        "BadFormatError",
        "The first byte must start a map; that is checked before the end of the object is looked for (5.1 rules 1 "
        "and 2, step 8).",
        frame(packb([1, 2, 3]) + b"\xc0", base_body),
    )
    yield (
        "header_depth_17",
        "The base header with an unknown key whose value is 16 nested arrays (the deepest at depth 17).",
        "BadFormatError",
        "Containers deeper than 16 are rejected (5.1 rule 6, step 8).",
        frame(with_extra_key(base_header, "x-deep", b"\x91" * 15 + b"\x90"), base_body),
    )
    present = 200_000
    yield (
        "header_length_past_end_before_count",
        f"The base header plus a key whose array32 declares {present + 1} elements, followed by the {present} bytes "
        "of empty arrays that end the header (zstd-encoded header).",
        "BadFormatError",
        "A container's declared length is checked against the bytes left when its header is read, before the "
        "containers inside it are counted (5.1 rules 1 and 8, step 8); counting first would give LimitExceededError.",
        frame(with_extra_key(base_header, "x", b"\xdd" + (present + 1).to_bytes(4, "big") + b"\x90" * present), base_body, header_encoding=1),
    )
    elements = CONTAINER_BUDGET - base_containers
    yield (
        "header_count_before_later_defect",
        f"The base header ({base_containers} arrays and maps) plus a key whose array holds {elements - 1} empty arrays "
        "and a one-element array holding a str that is not UTF-8 (zstd-encoded header).",
        "LimitExceededError",
        "Containers are counted when their header is read: the last array is container number "
        f"{CONTAINER_BUDGET + 1}, past 2*max_tensors + 3*max_contexts + 4096 = {CONTAINER_BUDGET}, before its invalid "
        "str is read (5.1 rule 8, step 8); counting containers when they end would reach the str first.",
        frame(
            with_extra_key(base_header, "x", b"\xdd" + elements.to_bytes(4, "big") + b"\x90" * (elements - 1) + b"\x91\xa1\xff"),
            base_body,
            header_encoding=1,
        ),
    )
    # Each pair: a 3-letter key and an array16 of 1000 empty arrays (1001 containers in 1007 bytes).
    per_pair = 1001
    pairs = -(-(CONTAINER_BUDGET + 1 - base_containers - 1) // per_pair)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
    body_bytes = b"".join(packb("k" + alphabet[i // 64] + alphabet[i % 64]) + b"\xdc" + (per_pair - 1).to_bytes(2, "big") + b"\x90" * (per_pair - 1) for i in range(pairs))
    declared = len(body_bytes) // 2 + 1
    assert declared <= len(body_bytes) < 2 * declared
    yield (
        "header_map_length_counts_pairs",
        f"The base header plus a key whose map32 declares {declared} pairs, followed by {pairs} pairs (a 3-letter key and "
        f"an array of 1000 empty arrays each, {len(body_bytes)} bytes) that end the header (zstd-encoded header).",
        "BadFormatError",
        "A map's length counts key-value pairs: 2 * length objects need at least 2 * length bytes, more than are left "
        "(5.1 rule 1, step 8); reading the length as a count of objects would pass this check, parse on and count past "
        "the container bound (LimitExceededError).",
        frame(with_extra_key(base_header, "x", b"\xdf" + declared.to_bytes(4, "big") + body_bytes), base_body, header_encoding=1),
    )


def zstd_precedence_vectors(base_header, base_body, raw_payload):
    """Section 11: the frame's structure in byte order (truncated or bad format), then its content."""
    single_16 = ZSTD_MAGIC + bytes([0x20, 16])  # single-segment, 1-byte Frame_Content_Size 16

    def codes_section(name, description, error, why, stored):
        return name, description, error, why, replace_section(base_header, base_body, 3, stored, "zstd", 16)

    yield codes_section(
        "section_zstd_cut_in_magic",
        "The raw codes section (zstd, 16 bytes declared) holds the first 3 bytes of the frame magic.",
        "BadFormatError",
        "Stored bytes that do not begin with the 4-byte magic are not a frame (Section 11 pass 1 item 1, step 19b).",
        ZSTD_MAGIC[:3],
    )
    yield codes_section(
        "section_zstd_magic_only",
        "The raw codes section (zstd) holds the 4-byte frame magic and nothing else.",
        "TruncatedError",
        "After the magic, stored bytes that end inside the frame header are a truncated frame (Section 11, step 19b).",
        ZSTD_MAGIC,
    )
    yield codes_section(
        "section_zstd_content_size_wrong_then_cut",
        "The raw codes section (zstd, 16 bytes declared) holds a frame header declaring 17 bytes, and nothing after it.",
        "BadFormatError",
        "Frame header fields are checked as they are read: Frame_Content_Size differs from the declared length before "
        "the missing blocks are noticed (Section 11 pass 1 item 2, step 19b).",
        ZSTD_MAGIC + bytes([0x20, 17]),
    )
    yield codes_section(
        "section_zstd_window_over_8mib",
        "The raw codes section stored as a frame that is not single-segment with a Window_Size of 9 MiB (descriptor 0x69).",
        "BadFormatError",
        "Window_Size above 8 MiB is rejected unless the frame is single-segment (Section 11 pass 1 item 2, step 19b).",
        ZSTD_MAGIC + bytes([0x80, 0x69]) + struct.pack("<I", 16) + zstd_block(1, 0, 16) + raw_payload,
    )
    yield codes_section(
        "section_zstd_block_larger_than_rest",
        "The raw codes section stored as a single-segment frame whose raw block declares 16 bytes with only 10 left.",
        "TruncatedError",
        "A block whose Block_Size is allowed but larger than the bytes left is a truncated frame (Section 11 pass 1 item 3, step 19b).",
        single_16 + zstd_block(1, 0, 16) + raw_payload[:10],
    )
    yield codes_section(
        "section_zstd_block_over_maximum",
        "The raw codes section stored as a single-segment frame of content size 16 whose raw block declares 17 bytes, "
        "all present.",
        "BadFormatError",
        "Block_Size above Block_Maximum_Size = min(Window_Size, 128 KiB), with Window_Size = Frame_Content_Size for a "
        "single-segment frame (Section 11 pass 1 item 3, step 19b).",
        single_16 + zstd_block(1, 0, 17) + raw_payload + b"\x00",
    )
    yield codes_section(
        "section_zstd_block_over_maximum_cut",
        "As section_zstd_block_over_maximum with Block_Size 200 and only 10 bytes after the block header.",
        "BadFormatError",
        "The block header is checked when it is read, before the block's bytes are found missing (Section 11 pass 1 item 3, "
        "step 19b).",
        single_16 + zstd_block(1, 0, 200) + raw_payload[:10],
    )
    yield codes_section(
        "section_zstd_reserved_block_type_cut",
        "The raw codes section stored as a frame whose block has the reserved Block_Type 3 and is cut short.",
        "BadFormatError",
        "Block_Type 3 is invalid, decided from the block header (Section 11 pass 1 item 3, step 19b).",
        single_16 + zstd_block(1, 3, 5) + b"\x00\x00",
    )
    yield codes_section(
        "section_zstd_checksum_cut",
        "The raw codes section stored as a frame with Content_Checksum_flag set and only 2 bytes of the checksum.",
        "TruncatedError",
        "A frame that ends inside its Content_Checksum is truncated (Section 11 pass 1 item 4, step 19b).",
        ZSTD_MAGIC + bytes([0x24, 16]) + zstd_block(1, 0, 16) + raw_payload + b"\x00\x00",
    )
    corrupt = single_16 + zstd_block(1, 2, 8) + b"\xff" * 8
    try:
        zstandard.ZstdDecompressor().decompressobj().decompress(corrupt)
    except zstandard.ZstdError:
        pass
    else:
        raise AssertionError("the corrupt compressed block must not decode")
    yield codes_section(
        "section_zstd_trailing_after_corrupt_block",
        "The raw codes section stored as a frame whose only (compressed) block is 8 bytes of 0xFF, complete, followed "
        "by 2 more bytes.",
        "TrailingDataError",
        "The frame's structure, up to bytes after its end, is checked before its content is decoded (Section 11 pass 1 "
        "item 5 before pass 2, step 19b).",
        corrupt + b"\x00\x00",
    )
    yield codes_section(
        "section_zstd_corrupt_block_then_cut",
        "The raw codes section stored as a frame of a complete corrupt compressed block (8 bytes of 0xFF) and then a "
        "raw last block of 8 bytes with 3 present.",
        "TruncatedError",
        "Structure before content: the cut second block is found before the first block is decoded (Section 11 pass 1 item 3, "
        "step 19b).",
        single_16 + zstd_block(0, 2, 8) + b"\xff" * 8 + zstd_block(1, 0, 8) + b"abc",
    )
    header_bytes = packb(base_header)
    yield (
        "header_zstd_cut_in_frame_header",
        "The stored header is a zstd frame header cut inside its 4-byte Frame_Content_Size field (8 bytes in all).",
        "TruncatedError",
        "Stored bytes that end inside the frame header after a complete magic are a truncated frame (Section 11, step 7).",
        frame(header_bytes, base_body, header_encoding=1, stored_header=ZSTD_MAGIC + bytes([0x80, 0x00]) + struct.pack("<I", len(header_bytes))[:2]),
    )


def fake_zstd_frame(content_size: int) -> bytes:
    """A zstd frame header declaring ``content_size`` (8-byte field) followed by one empty raw block."""
    magic = struct.pack("<I", 0xFD2FB528)
    descriptor = bytes([0xC0])  # Frame_Content_Size_flag 3 (8 bytes), not single-segment, no checksum
    window = bytes([0x00])  # 1 KiB window
    last_empty_raw_block = bytes([0x01, 0x00, 0x00])
    return magic + descriptor + window + struct.pack("<Q", content_size) + last_empty_raw_block


ZSTD_MAGIC = struct.pack("<I", 0xFD2FB528)
CONTAINER_BUDGET = 2 * 65536 + 3 * 256 + 4096  # FORMAT.md 5.1 rule 8 at the default limits


def zstd_block(last: int, block_type: int, size: int) -> bytes:
    """A zstd Block_Header (RFC 8878 3.1.1.2): Last_Block, Block_Type, Block_Size, 3 bytes little-endian."""
    return (last | (block_type << 1) | (size << 3)).to_bytes(3, "little")


def count_containers(obj) -> int:
    """Arrays and maps in a msgpack-ready object, itself included (FORMAT.md 5.1 rule 8)."""
    if isinstance(obj, dict):
        return 1 + sum(count_containers(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return 1 + sum(count_containers(v) for v in obj)
    return 0


def with_extra_key(header: dict, key: str, value_bytes: bytes) -> bytes:
    """The msgpack bytes of ``header`` (a fixmap) with one more key whose value is given as raw bytes."""
    encoded = packb(header)
    assert 0x80 <= encoded[0] < 0x8F
    return bytes([encoded[0] + 1]) + encoded[1:] + packb(key) + value_bytes


def replace_section(header, body, index, stored, encoding, decoded_length):
    """The base message with section ``index`` replaced by ``stored`` bytes."""
    sections = [list(s) for s in header["sections"]]
    offsets = [0]
    for s in sections:
        offsets.append(offsets[-1] + s[1])
    new_body = body[: offsets[index]] + stored + body[offsets[index + 1] :]
    sections[index] = [sections[index][0], len(stored), encoding, decoded_length]
    return frame(dict(header, sections=sections), new_body)


# ---------------------------------------------------------------------------------------------
# Output.


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def npz_bytes(arrays: dict) -> bytes:
    """An .npz archive with fixed timestamps (numpy.savez stamps the current time)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.array(array, order="C", copy=True), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def decoded_entry(name, dtype, shape, raw: bytes, key: str) -> dict:
    entry = {"name": name, "dtype": dtype, "shape": shape, "npz_key": key, "sha256": sha256(raw)}
    if len(raw) <= 256:
        entry["hex"] = raw.hex()
    return entry


#: What each encoder-made valid vector's description promises, checked so that a change in the
#: encoder cannot silently hollow out a vector: (header encoding or None, required context kinds,
#: whether some quantized context must name a codebook).
FEATURES = {
    "lossless_float32_specials": (None, {"raw", "zero"}, False),
    "odd_shapes_bits3": (None, {"packed"}, False),
    "budget_0p5bpp": (None, {"rans", "zero"}, True),
    "budget_1bpp": (None, {"rans", "zero"}, True),
    "budget_2bpp": (None, {"rans", "zero"}, True),
    "budget_4bpp": (None, {"rans", "zero"}, True),
    "fixed_bits4": (None, {"packed"}, False),
    "fixed_nf4": (None, {"packed"}, True),
    "zstd_header": ("zstd", set(), False),
    "schema_budget_1bpp": (None, {"rans", "zero"}, True),
}


def schemas_entry(schemas) -> dict:
    """The manifest's "schemas": the tensor lists a decoder must be given, with their digests."""
    if not schemas:
        return {}
    return {"schemas": [{"digest": schema_digest(t).hex(), "tensors": t} for t in schemas]}


def read_header(message: bytes) -> dict:
    """The header map of a well-framed message."""
    _, _, _, encoding, _, stored_length, _, _ = PREAMBLE.unpack_from(message, 0)
    stored = message[PREAMBLE.size : PREAMBLE.size + stored_length]
    return msgpack.unpackb(zstandard.ZstdDecompressor().decompress(stored) if encoding == 1 else stored, raw=False)


def check_schema_use(name: str, message: bytes, schemas):
    """A vector given a schema names its tensors by it (and the encoder marks it critical)."""
    header = read_header(message)
    if not schemas:
        assert "schema" not in header, name
        return
    assert "tensors" not in header and header["schema"] == schema_digest(schemas[0]), name
    if not name.startswith("schema_not_critical"):
        assert header.get("critical") == ["schema"], (name, header.get("critical"))
    else:
        assert "critical" not in header, name
    try:
        fstqcodec.decode(message)
    except fstqcodec.UnknownSchemaError as exc:
        assert exc.digest == header["schema"], name
    else:
        raise AssertionError(f"{name}: decoded without its schema")


def check_features(name: str, message: bytes, schemas=()):
    if name not in FEATURES:
        return
    header_encoding, kinds, needs_codebook = FEATURES[name]
    facts = fstqcodec.inspect(message, schemas=[fstqcodec.Schema(t) for t in schemas])
    if header_encoding is not None:
        assert facts["header_encoding"] == header_encoding, name
    assert kinds <= {c[0] for c in facts["contexts"]}, (name, facts["contexts"])
    if needs_codebook:
        assert any(c[0] in ("packed", "rans") and c[2] is not None for c in facts["contexts"]), name


def check_matches_reference(expected: list, message: bytes, name: str, schemas=()):
    """fstqcodec.decode must give exactly the spec decoder's tensors."""
    decoded = fstqcodec.decode(message, schemas=[fstqcodec.Schema(t) for t in schemas])
    assert list(decoded) == [e[0] for e in expected], name
    for tensor_name, dtype, shape, raw in expected:
        array = decoded[tensor_name]
        if dtype == "bfloat16":
            assert array.dtype == np.float32
            assert np.all(array.view(np.uint32) & 0xFFFF == 0), name
            got = (array.view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            assert array.dtype == np.dtype(TENSOR_DTYPES[dtype]), (name, array.dtype)
            got = array.astype(TENSOR_DTYPES[dtype]).tobytes()
        assert list(array.shape) == shape, (name, array.shape, shape)
        assert got == raw, f"{name}/{tensor_name}: fstqcodec.decode differs from the spec decoder"


def generate(out: Path) -> dict:
    for sub in ("valid", "invalid"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
        (out / sub).mkdir(parents=True)
    manifest = {
        "format": "fstq",
        "format_version": "1.1",
        "spec": "spec/FORMAT.md",
        "generator": "spec/make_vectors.py",
        "generated_with": {
            "fstqcodec": fstqcodec.__version__,
            "numpy": np.__version__,
            "msgpack": ".".join(map(str, msgpack.version)),
            "zstandard": zstandard.__version__,
            "libzstd": ".".join(map(str, zstandard.ZSTD_VERSION)),
        },
        "notes": (
            "Valid vectors: decoding 'file' must give exactly 'tensors' (in this order): dtype, shape, and the "
            "little-endian bytes of the values (bfloat16 as 16-bit patterns) given as 'hex' (when short) and "
            "always as the array 'npz_key' of the file 'values' and by their sha256. Invalid vectors: decoding "
            "must raise 'error' (a class of FORMAT.md section 13.1) and nothing else, with the default limits of section 14. An entry with "
            "'schemas' (valid or invalid) is decoded with those schemas known to the decoder (FORMAT.md section 5.8): "
            "each is a tensor list [[name, dtype, shape, block_size], ...] with its 16-byte 'digest' in hex. Every "
            "file's sha256 is listed."
        ),
        "valid": [],
        "invalid": [],
    }
    seen = set()
    for name, description, message, *schema in valid_vectors():
        assert name not in seen
        seen.add(name)
        schemas = schema  # zero or one tensor list
        check_features(name, message, schemas)
        check_schema_use(name, message, schemas)
        expected = spec_decode(message, schemas)
        check_matches_reference(expected, message, name, schemas)
        file = f"valid/{name}.fstq"
        (out / file).write_bytes(message)
        arrays = {}
        tensors = []
        for index, (tensor_name, dtype, shape, raw) in enumerate(expected):
            key = f"t{index}"
            arrays[key] = np.frombuffer(raw, dtype=TENSOR_DTYPES[dtype]).reshape(shape)
            tensors.append(decoded_entry(tensor_name, dtype, shape, raw, key))
        values_file = f"valid/{name}.npz"
        values = npz_bytes(arrays)
        (out / values_file).write_bytes(values)
        manifest["valid"].append(
            {
                "file": file,
                "sha256": sha256(message),
                "size": len(message),
                "description": description,
                "values": values_file,
                "values_sha256": sha256(values),
                "tensors": tensors,
                **schemas_entry(schemas),
                **masks_entry(message, schemas),
            }
        )
    for name, description, error, why, message, *schemas in invalid_vectors():
        schemas = schemas[0] if schemas else []
        assert name not in seen, name
        seen.add(name)
        file = f"invalid/{name}.fstq"
        error_class = getattr(fstqcodec, error)
        assert issubclass(error_class, fstqcodec.DecodeError)
        if file not in REFERENCE_DECODER_GAPS:
            try:
                fstqcodec.decode(message, schemas=[fstqcodec.Schema(t) for t in schemas])
            except fstqcodec.DecodeError as exc:
                assert type(exc) is error_class, f"{name}: expected {error}, fstqcodec raised {type(exc).__name__}: {exc}"
            else:
                raise AssertionError(f"{name}: fstqcodec decoded an invalid vector")
        (out / file).write_bytes(message)
        manifest["invalid"].append(
            {
                "file": file,
                "sha256": sha256(message),
                "size": len(message),
                "description": description,
                "error": error,
                "why": why,
                **schemas_entry(schemas),
            }
        )
    text = json.dumps(manifest, indent=1, ensure_ascii=True) + "\n"
    (out / "manifest.json").write_text(text, encoding="utf-8", newline="\n")
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "vectors", help="output directory (default: spec/vectors)")
    args = parser.parse_args(argv)
    manifest = generate(args.out)
    print(f"wrote {len(manifest['valid'])} valid and {len(manifest['invalid'])} invalid vectors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
