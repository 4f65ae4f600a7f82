"""The decoder on hostile bytes: mutated valid messages raise only DecodeError subclasses, named
adversarial inputs raise their documented error, and decoding stays within the limits' memory.

Mutations come in two depths. Mutating a message as is mostly stops at the CRC-32 (which is the
point of it, and is checked). To reach the header and body parsers, the ``reframe`` helper of
``common.py`` rebuilds the preamble and the CRC-32 around a modified header or body.

Memory is measured with tracemalloc (numpy buffers and Python objects are traced) and compared
with :func:`memory_bound`: spec Section 14 asks for working memory "within a small constant
multiple of max_output_size plus the message size"; the header is bounded by max_header_size.
"""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fstqcodec
from common import (
    PREAMBLE,
    bits_of,
    SMALL_LIMITS,
    check_decode_error,
    decode_outcome,
    peak_allocation,
    reframe,
    split,
    with_crc,
)

MiB = 1 << 20


def memory_bound(limits: fstqcodec.Limits, message: bytes) -> int:
    """Most a decode may allocate: 4x the output limit (output buffer, returned arrays, a
    decompressed section), 8x the header limit (the parsed header's objects), 64 bytes per block
    of max_blocks (the block table), the message, 1 MiB."""
    return 4 * limits.max_output_size + 8 * limits.max_header_size + 64 * limits.max_blocks + len(message) + MiB


def check_within_memory(message: bytes, limits=SMALL_LIMITS, expected=None):
    """Decode under ``limits``: only a DecodeError (of class ``expected`` if given), within memory."""
    outcome, peak = peak_allocation(fstqcodec.decode, message, limits=limits)
    if expected is not None:
        assert isinstance(outcome, expected), f"expected {expected.__name__}, got {outcome!r}"
    assert peak <= memory_bound(limits, message), f"decode allocated {peak / MiB:.1f} MiB, bound {memory_bound(limits, message) / MiB:.1f} MiB"
    return outcome, peak


def _base_messages() -> dict:
    rng = np.random.default_rng(5)
    update = {"a": (rng.standard_normal((6, 32)) * 0.01).astype(np.float32), "b": rng.standard_normal(40).astype(np.float16)}
    return {
        "lossless": fstqcodec.encode({"x": np.array([1.5, -0.0, 3e-45, 7.0], np.float32), "s": np.float64(2.0)}, compress_header=False),
        "lossless_zstd_header": fstqcodec.encode(update),
        "bits3": fstqcodec.encode(update, bits=3, compress_header=False),
        "nf4": fstqcodec.encode(update, codebook="nf4", compress_header=False),
        "budget": fstqcodec.encode(
            {"w": (rng.standard_normal((64, 64)) * np.exp(rng.standard_normal((64, 1)))).astype(np.float32)},
            budget=fstqcodec.Budget(bits_per_param=1.5),
            compress_header=False,
            meta={"round": 1},
        ),
        "empty": fstqcodec.encode({}),
        "masked": fstqcodec.encode(
            update,
            masks={"a": [fstqcodec.Mask(3, 0.7, "row"), fstqcodec.Mask(4, 0.8)], "b": fstqcodec.Mask(5, 0.5)},
            budget=300,
            compress_header=False,
        ),
    }


BASE = _base_messages()
BASE_NAMES = sorted(BASE)


def test_base_messages_are_valid_and_varied():
    kinds = set()
    for message in BASE.values():
        report = fstqcodec.inspect(message)
        fstqcodec.decode(message)
        kinds.update(context[0] for context in report["contexts"])
    assert {"raw", "packed", "rans"} <= kinds, kinds
    assert len(BASE["budget"]) < 2000


# ------------------------------------------------------------------------------------------
# Mutations of whole messages (the CRC-32 stays as it was)


@pytest.mark.parametrize("name", BASE_NAMES)
def test_truncation_at_every_offset(name):
    message = BASE[name]
    for length in range(len(message)):
        check_decode_error(message[:length], fstqcodec.TruncatedError)


@pytest.mark.parametrize("name", BASE_NAMES)
@pytest.mark.parametrize("extra", [b"\0", b"\n", b"\xff" * 1000])
def test_appended_bytes(name, extra):
    error = check_decode_error(BASE[name] + extra, fstqcodec.TrailingDataError)
    assert error.extra == len(extra)


def test_two_messages_back_to_back():
    error = check_decode_error(BASE["bits3"] + BASE["lossless"], fstqcodec.TrailingDataError)
    assert error.extra == len(BASE["lossless"])


@given(name=st.sampled_from(BASE_NAMES), data=st.data())
def test_bit_flip(name, data):
    message = bytearray(BASE[name])
    position = data.draw(st.integers(0, len(message) - 1), label="position")
    message[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    # Past the preamble every single-bit change is caught by the CRC-32.
    expected = fstqcodec.ChecksumError if position >= PREAMBLE.size else fstqcodec.DecodeError
    check_decode_error(bytes(message), expected)


@given(name=st.sampled_from(BASE_NAMES), data=st.data())
def test_random_overwrite(name, data):
    message = bytearray(BASE[name])
    start = data.draw(st.integers(0, len(message) - 1), label="start")
    patch = data.draw(st.binary(min_size=1, max_size=16), label="patch")
    message[start : start + len(patch)] = patch
    assume(bytes(message) != BASE[name])
    check_decode_error(bytes(message))


@given(data=st.binary(max_size=300))
def test_arbitrary_bytes(data):
    check_decode_error(data)


@given(tail=st.binary(max_size=200))
def test_arbitrary_bytes_after_magic(tail):
    check_decode_error(b"\x89FSQ\r\n\x1a\n" + tail)


def test_checksum_error_carries_values():
    message = bytearray(BASE["lossless"])
    message[-1] ^= 0xFF
    error = check_decode_error(bytes(message), fstqcodec.ChecksumError)
    stored = struct.unpack("<I", bytes(message[-4:]))[0]
    assert error.expected == stored and error.actual != stored


_LIMIT_FIELDS = [field for field in fstqcodec.Limits.__dataclass_fields__]


@given(name=st.sampled_from(BASE_NAMES), data=st.data())
def test_limits_only_choose_between_output_and_error(name, data):
    """Spec 16: the limits decide between the one output and LimitExceededError, nothing else."""
    message = BASE[name]
    reference = fstqcodec.decode(message)
    values = {}
    for field in data.draw(st.lists(st.sampled_from(_LIMIT_FIELDS), unique=True, max_size=4), label="fields"):
        default = getattr(fstqcodec.DEFAULT_LIMITS, field)
        values[field] = data.draw(st.one_of(st.integers(1, 64), st.integers(1, 2 * len(message)), st.just(default)), label=field)
    try:
        limits = fstqcodec.Limits(**values)
    except ValueError:
        assume(False)  # a combination the Limits class refuses (e.g. above the format's cap)
    try:
        decoded = fstqcodec.decode(message, limits=limits)
    except fstqcodec.LimitExceededError as exc:
        assert exc.limit_name in values and exc.actual > exc.limit
        return
    assert list(decoded) == list(reference)
    for key in reference:
        assert bits_of(decoded[key]) == bits_of(reference[key])


# ------------------------------------------------------------------------------------------
# The preamble


def _with_preamble(message: bytes, **fields) -> bytes:
    names = ("magic", "major", "minor", "header_encoding", "reserved", "header_stored", "header_length", "body_length")
    values = dict(zip(names, PREAMBLE.unpack_from(message, 0)))
    values.update(fields)
    return PREAMBLE.pack(*(values[n] for n in names)) + message[PREAMBLE.size :]


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"header_length": 2**32 - 1, "header_stored": 2**32 - 1}, fstqcodec.LimitExceededError),
        ({"header_length": SMALL_LIMITS.max_header_size + 1, "header_stored": SMALL_LIMITS.max_header_size + 1}, fstqcodec.LimitExceededError),
        ({"body_length": 2**64 - 1}, fstqcodec.LimitExceededError),
        ({"body_length": 2**40}, fstqcodec.LimitExceededError),
        ({"body_length": SMALL_LIMITS.max_message_size}, fstqcodec.LimitExceededError),
        ({"body_length": 10_000}, fstqcodec.TruncatedError),
        ({"body_length": 0}, fstqcodec.TrailingDataError),
        ({"header_stored": 5}, fstqcodec.BadFormatError),  # raw header: stored != length
        ({"header_length": 5}, fstqcodec.BadFormatError),
        ({"header_encoding": 2}, fstqcodec.BadFormatError),
        ({"header_encoding": 255}, fstqcodec.BadFormatError),
        ({"reserved": 1}, fstqcodec.BadFormatError),
        ({"major": 0}, fstqcodec.UnsupportedVersionError),
        ({"major": 2}, fstqcodec.UnsupportedVersionError),
        ({"major": 255, "body_length": 2**64 - 1}, fstqcodec.UnsupportedVersionError),
        ({"magic": b"\x89FSQ\n\x1a\n\0"}, fstqcodec.BadFormatError),  # newline conversion
        ({"magic": b"\x09FSQ\r\n\x1a\n"}, fstqcodec.BadFormatError),  # 7-bit channel
    ],
)
def test_preamble_fields(fields, expected):
    message = _with_preamble(BASE["lossless"], **fields)
    outcome, peak = check_within_memory(message, expected=expected)
    assert peak < MiB
    if expected is fstqcodec.UnsupportedVersionError:
        assert (outcome.major, outcome.minor) == (fields["major"], 0)
    if expected is fstqcodec.LimitExceededError:
        assert outcome.actual > outcome.limit


def test_any_minor_version_accepted():
    for minor in (1, 7, 255):
        message = with_crc(_with_preamble(BASE["lossless"], minor=minor))
        assert set(fstqcodec.decode(message)) == {"x", "s"}


# ------------------------------------------------------------------------------------------
# Re-framed mutations: the CRC-32 is right, the header or body is not


def _paths(value, prefix=()):
    """Every path (tuple of keys/indices) to a node of a parsed header."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, prefix + (index,))


def _get(value, path):
    for key in path:
        value = value[key]
    return value


def _replace(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(value[path[0]], path[1:], new)
    return copy


msgpack_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63 - 1, 2**64 - 1, 10**12, 255, 256, 257, 65536, 65537]),
    st.floats(),
    st.text(max_size=10),
    st.sampled_from(["zero", "raw", "packed", "rans", "f16", "bf16", "f32", "f64", "float16", "float32", "none", "zstd", "blocks", "scales", "codes"]),
    st.binary(max_size=40),
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda children: st.one_of(st.lists(children, max_size=6), st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=12,
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(BASE_NAMES), data=st.data())
def test_header_value_replaced(name, data):
    header, body = split(BASE[name])
    paths = list(_paths(header))
    path = data.draw(st.sampled_from(paths), label="path")
    new = data.draw(msgpack_values, label="value")
    try:
        mutated = reframe(_replace(header, path, new), body)
    except (OverflowError, ValueError, TypeError):
        assume(False)  # not representable as msgpack (an int past 2**64, a surrogate)
    kind, result = decode_outcome(mutated)
    if kind == "ok":
        for array in result.values():
            assert np.all(np.isfinite(array))


@given(name=st.sampled_from(BASE_NAMES), data=st.data())
def test_header_integer_replaced_within_memory(name, data):
    """Any integer of the header (a length, a dimension, a width, a lane count) set to an extreme
    value: a DecodeError or a decode, within the limits' memory."""
    header, body = split(BASE[name])
    paths = [path for path in _paths(header) if path and isinstance(_get(header, path), int) and not isinstance(_get(header, path), bool)]
    assume(paths)
    path = data.draw(st.sampled_from(paths), label="path")
    new = data.draw(st.sampled_from([0, 1, 255, 256, 65535, 65536, 2**24, 2**31 - 1, 2**32, 2**40, 2**63 - 1, 2**64 - 1, -1, -(2**63)]), label="value")
    check_within_memory(reframe(_replace(header, path, new), body))


@given(name=st.sampled_from(BASE_NAMES), data=st.data())
def test_header_entry_deleted_or_added(name, data):
    header, body = split(BASE[name])
    key = data.draw(st.sampled_from(sorted(header) + ["critical", "codebooks", "meta", "future"]), label="key")
    if key in header and data.draw(st.booleans(), label="delete"):
        header = {k: v for k, v in header.items() if k != key}
    else:
        header[key] = data.draw(msgpack_values, label="value")
    try:
        mutated = reframe(header, body)
    except (OverflowError, ValueError, TypeError):
        assume(False)
    decode_outcome(mutated)


@given(name=st.sampled_from(BASE_NAMES), data=st.data())
def test_header_bytes_mutated(name, data):
    header, body = split(BASE[name])
    raw = bytearray(msgpack.packb(header, use_bin_type=True))
    for _ in range(data.draw(st.integers(1, 4), label="count")):
        position = data.draw(st.integers(0, len(raw) - 1), label="position")
        raw[position] = data.draw(st.integers(0, 255), label="byte")
    compress = data.draw(st.booleans(), label="compress")
    decode_outcome(reframe(bytes(raw), body, compress_header=compress))


@given(name=st.sampled_from(BASE_NAMES), data=st.data())
def test_body_mutated(name, data):
    header, body = split(BASE[name])
    assume(len(body) > 0)
    body = bytearray(body)
    for _ in range(data.draw(st.integers(1, 8), label="count")):
        position = data.draw(st.integers(0, len(body) - 1), label="position")
        body[position] = data.draw(st.integers(0, 255), label="byte")
    kind, result = decode_outcome(reframe(header, bytes(body)))
    if kind == "ok":
        assert list(result) == [t[0] for t in header["tensors"]]
        for array in result.values():
            assert np.all(np.isfinite(array))


@given(name=st.sampled_from(BASE_NAMES), data=st.data())
def test_body_resized(name, data):
    """Sections that overlap, leave holes or run past the end: lengths that do not tile the body."""
    header, body = split(BASE[name])
    index = data.draw(st.integers(0, len(header["sections"]) - 1), label="section")
    delta = data.draw(st.integers(-3, 3).filter(bool), label="delta")
    entry = list(header["sections"][index])
    entry[1] = max(0, entry[1] + delta)
    if entry[2] == "none":
        entry[3] = entry[1]
    header["sections"][index] = entry
    grow = data.draw(st.booleans(), label="grow body too")
    new_body = body + b"\0" * max(delta, 0) if grow else body
    decode_outcome(reframe(header, new_body))


@given(header=msgpack_values, body=st.binary(max_size=64))
def test_random_header(header, body):
    try:
        message = reframe(msgpack.packb(header, use_bin_type=True), body)
    except (OverflowError, ValueError, TypeError):
        assume(False)
    check_decode_error(message)


# ------------------------------------------------------------------------------------------
# Named adversarial inputs


def _zero_tensor_message(tensors: list, *, block_size_blocks: int, compress_blocks: bool = True) -> bytes:
    """A message whose blocks all point at one ``zero`` context (a few hundred bytes at most)."""
    blocks = bytes(block_size_blocks)
    if compress_blocks:
        stored = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(blocks)
        sections = [["blocks", len(stored), "zstd", len(blocks)]]
    else:
        stored = blocks
        sections = [["blocks", len(stored), "none", len(stored)]]
    header = {"tensors": tensors, "contexts": [["zero"]], "sections": sections + [["scales", 0, "none", 0], ["codes", 0, "none", 0]]}
    return reframe(header, stored)


@pytest.mark.parametrize(
    "shape",
    [[10**6, 10**6], [10**12], [2**64 - 1], [2**64 - 1, 2**64 - 1, 2**64 - 1], [2**32, 2**32], [0, 2**64 - 1, 2**64 - 1]],
    ids=["1e6x1e6", "1e12", "2**64-1", "2**192", "2**64", "zero-times-huge"],
)
def test_huge_shapes(shape):
    message = _zero_tensor_message([["x", "float32", shape, 64]], block_size_blocks=1, compress_blocks=False)
    size = 1
    for dim in shape:
        size *= dim
    if size == 0:
        # 0 elements: no blocks at all, so the blocks section (one byte here) has the wrong length.
        check_within_memory(message, expected=fstqcodec.BadFormatError)
        return
    outcome, peak = check_within_memory(message, expected=fstqcodec.LimitExceededError)
    assert outcome.limit_name == "max_output_size" and outcome.actual == 4 * size
    assert peak < MiB
    check_within_memory(message, limits=fstqcodec.DEFAULT_LIMITS, expected=fstqcodec.LimitExceededError)


def test_output_limit_is_cumulative():
    half = SMALL_LIMITS.max_output_size // 4 // 2
    tensors = [["a", "float32", [half], 65536], ["b", "float32", [half], 65536], ["c", "float32", [1], 1]]
    message = _zero_tensor_message(tensors, block_size_blocks=3)
    outcome, _ = check_within_memory(message, expected=fstqcodec.LimitExceededError)
    assert outcome.limit_name == "max_output_size"


def test_million_tensors_declared():
    # An array header declaring 10**6 entries with far fewer present: bounded by the bytes.
    entries = b"".join(msgpack.packb([f"t{i}", "float32", [1], 1]) for i in range(2000))
    raw = b"\x83" + msgpack.packb("tensors") + b"\xdd" + struct.pack(">I", 10**6) + entries
    raw += msgpack.packb("contexts") + msgpack.packb([]) + msgpack.packb("sections") + msgpack.packb([])
    check_within_memory(reframe(raw, b""), expected=fstqcodec.BadFormatError)
    # Actually present, past max_tensors: refused on the count, within memory (zstd header: small message).
    many = {"tensors": [[f"{i:x}", "float32", [], 1] for i in range(60_000)], "contexts": [], "sections": []}
    message = reframe(many, b"", compress_header=True)
    assert len(message) < 300_000
    outcome, _ = check_within_memory(message, expected=fstqcodec.LimitExceededError)
    # Refused while unpacking (the header holds more containers than max_tensors allows) or on
    # the tensor count: either way on max_tensors, past it.
    assert outcome.limit_name == "max_tensors" and outcome.actual > SMALL_LIMITS.max_tensors


@pytest.mark.parametrize("depth", [100, 1025, 100_000])
def test_nesting_bomb(depth):
    header = {"tensors": [], "contexts": [], "sections": [["blocks", 0, "none", 0], ["scales", 0, "none", 0]]}
    raw = msgpack.packb(header)
    nested = b"\x91" * depth + b"\xc0"
    raw = b"\x84" + raw[1:] + msgpack.packb("deep") + nested
    outcome, peak = check_within_memory(reframe(raw, b""))
    if depth > 1024:
        assert isinstance(outcome, fstqcodec.BadFormatError)
    assert peak < 8 * MiB


@pytest.mark.parametrize("container", [b"\x90", b"\x80"], ids=["empty-arrays", "empty-maps"])
def test_header_container_bomb(container):
    # ~1 MiB of one-byte msgpack containers under an unknown key: ~300 bytes once zstd-encoded,
    # a million Python lists or dicts once unpacked (at the default 16 MiB header limit, ~1 GiB).
    header = {"tensors": [], "contexts": [], "sections": [["blocks", 0, "none", 0], ["scales", 0, "none", 0]]}
    count = SMALL_LIMITS.max_header_size - 200
    raw = b"\x84" + msgpack.packb(header)[1:] + msgpack.packb("x") + b"\xdd" + struct.pack(">I", count) + container * count
    message = reframe(raw, b"", compress_header=True)
    assert len(message) < 1000
    check_within_memory(message)


def _set_frame_content_size(frame: bytes, value: int) -> bytes:
    """A zstd frame with its Frame_Content_Size field overwritten (RFC 8878, 3.1.1.1)."""
    descriptor = frame[4]
    flag, single_segment, dictionary_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    offset = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dictionary_flag]
    size = (1 if single_segment else 0, 2, 4, 8)[flag]
    assert size in (4, 8), "the frames built here carry a 4- or 8-byte content size"
    return frame[:offset] + value.to_bytes(size, "little") + frame[offset + size :]


def test_header_zstd_frame_declaring_gigabytes():
    header_bytes = msgpack.packb({"tensors": [], "contexts": [], "sections": [["blocks", 0, "none", 0], ["scales", 0, "none", 0]]})
    # The preamble declares a header within the limit; the frame claims 4 GiB.
    bomb = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(bytes(MiB))
    frame = _set_frame_content_size(bomb, 2**32 - 1)
    preamble = PREAMBLE.pack(b"\x89FSQ\r\n\x1a\n", 1, 0, 1, 0, len(frame), len(header_bytes), 0)
    message = with_crc(preamble + bytes(frame) + b"\0" * 4)
    outcome, peak = check_within_memory(message, expected=fstqcodec.BadFormatError)
    assert peak < MiB
    # The preamble itself declares 4 GiB of header.
    preamble = PREAMBLE.pack(b"\x89FSQ\r\n\x1a\n", 1, 0, 1, 0, len(bomb), 2**32 - 1, 0)
    check_within_memory(with_crc(preamble + bomb + b"\0" * 4), expected=fstqcodec.LimitExceededError)


def _raw_context_message(stored: bytes, decoded_length: int) -> bytes:
    header = {
        "tensors": [["x", "float32", [100], 64]],
        "contexts": [["raw", "f32"]],
        "sections": [["blocks", 2, "none", 2], ["scales", 0, "none", 0], ["codes", len(stored), "zstd", decoded_length]],
    }
    return reframe(header, b"\0\0" + stored)


def test_section_declaring_gigabytes():
    payload = np.ones(100, "<f4").tobytes()
    frame = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(payload)
    assert fstqcodec.decode(_raw_context_message(frame, 400))["x"][0] == 1.0
    # The header declares 8 GiB: wrong for 100 float32 elements, refused before decompressing.
    check_within_memory(_raw_context_message(frame, 8 << 30), expected=fstqcodec.BadFormatError)


@pytest.mark.parametrize("real_size", [MiB, 256 * MiB], ids=["1MiB", "256MiB"])
def test_zstd_frame_lying_about_its_size(real_size):
    # A frame that decompresses to far more than its content-size field (and the header) say.
    bomb = _set_frame_content_size(zstandard.ZstdCompressor(level=19, write_content_size=True).compress(bytes(real_size)), 400)
    outcome, peak = check_within_memory(_raw_context_message(bytes(bomb), 400), expected=fstqcodec.DecodeError)
    assert peak < 4 * MiB


def test_zstd_frame_without_content_size():
    frame = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(np.ones(100, "<f4").tobytes())
    check_within_memory(_raw_context_message(frame, 400), expected=fstqcodec.BadFormatError)


@pytest.mark.parametrize("dtype, block_size", [("float16", 1), ("float16", 2), ("float32", 1)])
def test_many_tiny_blocks_memory(dtype, block_size):
    # Within max_output_size but far beyond max_blocks: refused before any per-block allocation.
    elements = SMALL_LIMITS.max_output_size // np.dtype(dtype).itemsize
    message = _zero_tensor_message([["x", dtype, [elements], block_size]], block_size_blocks=elements // block_size)
    assert len(message) < 1000
    check_within_memory(message, expected=fstqcodec.LimitExceededError)
    # At max_blocks exactly: decodes, and the block table stays within its share of the bound.
    elements = SMALL_LIMITS.max_blocks * block_size
    message = _zero_tensor_message([["x", dtype, [elements], block_size]], block_size_blocks=SMALL_LIMITS.max_blocks)
    outcome, _ = check_within_memory(message)
    assert not isinstance(outcome, Exception), outcome


@pytest.mark.parametrize(
    "tensors, options",
    [
        ({"x": np.ones(SMALL_LIMITS.max_output_size // 4, np.float32)}, {}),
        ({"x": np.random.default_rng(1).standard_normal(SMALL_LIMITS.max_output_size // 4).astype(np.float32)}, {}),
        ({"x": np.random.default_rng(2).standard_normal(SMALL_LIMITS.max_output_size // 4).astype(np.float32)}, {"budget": fstqcodec.Budget(bits_per_param=2)}),
        ({"x": np.random.default_rng(3).standard_normal(SMALL_LIMITS.max_output_size // 2).astype(np.float16)}, {"bits": 4}),
    ],
    ids=["ones", "lossless", "budget", "bits4-f16"],
)
def test_valid_message_at_output_limit_within_memory(tensors, options):
    message = fstqcodec.encode(tensors, **options)
    outcome, _ = check_within_memory(message)
    assert isinstance(outcome, dict) and outcome["x"].shape == tensors["x"].shape
    # One element more than the limit allows is refused before any allocation.
    bigger = fstqcodec.encode({"x": np.ones(tensors["x"].size + 1, tensors["x"].dtype)})
    outcome, peak = check_within_memory(bigger, expected=fstqcodec.LimitExceededError)
    assert peak < len(bigger) + MiB


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda h: h["tensors"].append(list(h["tensors"][0])), fstqcodec.BadFormatError),  # duplicate name
        (lambda h: h["tensors"][0].__setitem__(0, ""), fstqcodec.BadFormatError),  # empty name
        (lambda h: h["tensors"][0].__setitem__(0, "n" * 300), fstqcodec.LimitExceededError),
        (lambda h: h["tensors"][0].__setitem__(2, [1] * 9), fstqcodec.LimitExceededError),  # max_ndim 8
        (lambda h: h["tensors"][0].__setitem__(2, [-1]), fstqcodec.BadFormatError),
        (lambda h: h["tensors"][0].__setitem__(2, [True]), fstqcodec.BadFormatError),
        (lambda h: h["tensors"][0].__setitem__(3, 0), fstqcodec.BadFormatError),
        (lambda h: h["tensors"][0].__setitem__(3, 65537), fstqcodec.BadFormatError),
        (lambda h: h["tensors"][0].__setitem__(1, "int8"), fstqcodec.BadFormatError),
        (lambda h: h["contexts"][0].__setitem__(1, 9), fstqcodec.BadFormatError),  # width outside the set
        (lambda h: h["contexts"][0].__setitem__(1, 0), fstqcodec.BadFormatError),
        (lambda h: h["contexts"][0].__setitem__(0, "huffman"), fstqcodec.BadFormatError),
        (lambda h: h.__setitem__("contexts", h["contexts"] * 257), fstqcodec.LimitExceededError),
        (lambda h: h["sections"][2].__setitem__(2, "lz4"), fstqcodec.BadFormatError),
        (lambda h: h["sections"].reverse(), fstqcodec.BadFormatError),
        (lambda h: h["sections"].pop(), fstqcodec.BadFormatError),
        (lambda h: h.update(critical=["future"], future=1), fstqcodec.UnsupportedFeatureError),
        (lambda h: h.update(critical=[1]), fstqcodec.BadFormatError),
        (lambda h: h.update(meta={"k": [1, 2]}), fstqcodec.BadFormatError),
        (lambda h: h.pop("sections"), fstqcodec.BadFormatError),
    ],
)
def test_named_header_defects(mutate, expected):
    header, body = split(BASE["bits3"])
    mutate(header)
    outcome, peak = check_within_memory(reframe(header, body), expected=expected)
    assert peak < MiB
    if expected is fstqcodec.UnsupportedFeatureError:
        assert outcome.feature == "future"


@pytest.mark.parametrize(
    "change",
    ["section-runs-past-end", "hole-at-end", "overlap", "hole-between", "body-grows"],
)
def test_sections_must_tile_the_body(change):
    header, body = split(BASE["bits3"])
    sections = header["sections"]
    codes = sections[-1]
    assert codes[2] == "none" and codes[1] > 2
    if change == "section-runs-past-end":
        codes[1] += 1
        codes[3] += 1
    elif change == "hole-at-end":
        body += b"\0"
    elif change == "overlap":  # the scales section claims a byte the next section also starts with
        sections[1][1] += 1
        sections[1][3] += 1
    elif change == "hole-between":  # a byte between the scales and the codes belongs to no section
        scale_end = sections[0][1] + sections[1][1]
        body = body[:scale_end] + b"\0" + body[scale_end:]
    elif change == "body-grows":
        codes[1] += 4
        codes[3] += 4
        body += b"\0" * 4
    check_within_memory(reframe(header, body), expected=fstqcodec.BadFormatError)


def test_unknown_keys_ignored_unless_critical():
    header, body = split(BASE["bits3"])
    header["future"] = {"anything": [1, 2, 3]}
    assert set(fstqcodec.decode(reframe(header, body))) == {"a", "b"}
    header["critical"] = ["tensors", "sections"]
    assert set(fstqcodec.decode(reframe(header, body))) == {"a", "b"}


@pytest.mark.parametrize("scale_bits", [0x0000, 0x8000, 0x8001, 0x7F80, 0xFF80, 0x7FC0, 0xFFFF], ids=hex)
def test_invalid_scales(scale_bits):
    header, body = split(BASE["bits3"])
    assert header["sections"][1][2] == "none"
    start = header["sections"][0][1]
    body = bytearray(body)
    body[start : start + 2] = struct.pack("<H", scale_bits)
    check_within_memory(reframe(header, bytes(body)), expected=fstqcodec.BadFormatError)


def test_overflowing_product_is_refused():
    # A float16 tensor whose largest scale times its largest code overflows float16.
    header, body = split(BASE["bits3"])
    start = header["sections"][0][1]
    scale_count = header["sections"][1][1] // 2
    body = bytearray(body)
    body[start : start + 2 * scale_count] = struct.pack("<H", 0x7F7F) * scale_count
    check_within_memory(reframe(header, bytes(body)), expected=fstqcodec.BadFormatError)


def test_block_context_out_of_range():
    header, body = split(BASE["bits3"])
    assert header["sections"][0][2] == "none"
    body = bytearray(body)
    body[0] = 200
    check_within_memory(reframe(header, bytes(body)), expected=fstqcodec.BadFormatError)


@pytest.mark.parametrize("name", BASE_NAMES)
def test_inspect_raises_only_decode_errors_on_truncated_header(name):
    header, body = split(BASE[name])
    raw = msgpack.packb(header, use_bin_type=True)
    for cut in range(0, len(raw), max(1, len(raw) // 40)):
        message = reframe(raw[:cut], body)
        for function in (fstqcodec.inspect, fstqcodec.decode):
            with pytest.raises(fstqcodec.DecodeError):
                function(message)


# ------------------------------------------------------------------------------------------
# Messages that name their tensors by schema digest


SCHEMA_TENSORS = {"a": np.ones((4, 64), np.float32), "b": np.ones(3, np.float16)}
SCHEMA = fstqcodec.Schema.of(SCHEMA_TENSORS)


def _schema_message() -> tuple[dict, bytes]:
    return split(fstqcodec.encode(SCHEMA_TENSORS, schema=SCHEMA, compress_header=False))


def test_schema_message_needs_its_schema():
    header, body = _schema_message()
    message = reframe(header, body)
    assert set(fstqcodec.decode(message, schemas=SCHEMA)) == {"a", "b"}
    for function in (fstqcodec.decode, fstqcodec.inspect):
        with pytest.raises(fstqcodec.UnknownSchemaError) as info:
            function(message)
        assert info.value.digest == SCHEMA.digest
        assert isinstance(info.value, fstqcodec.DecodeError)
    other = fstqcodec.Schema.of({"a": np.ones((4, 64), np.float32)})
    with pytest.raises(fstqcodec.UnknownSchemaError):
        fstqcodec.decode(message, schemas=[other])


@pytest.mark.parametrize("digest", [b"", b"\0" * 15, b"\0" * 17, "0" * 16, 16, None, [1]], ids=repr)
def test_schema_digest_malformed(digest):
    header, body = _schema_message()
    header["schema"] = digest
    check_within_memory(reframe(header, body), expected=fstqcodec.BadFormatError)


def test_schema_and_tensor_list_together():
    header, body = _schema_message()
    header["tensors"] = [["a", "float32", [4, 64], 64], ["b", "float16", [3], 64]]
    outcome, _ = peak_allocation(fstqcodec.decode, reframe(header, body), schemas=SCHEMA)
    assert isinstance(outcome, fstqcodec.BadFormatError)


@pytest.mark.parametrize(
    "entries, limit_name",
    [
        ([("x", "float32", (10**12,), 64)], "max_output_size"),
        ([("x", "float32", (1 << 20,), 1)], "max_blocks"),
        ([(f"t{i}", "float32", (1,), 1) for i in range(SMALL_LIMITS.max_tensors + 1)], "max_tensors"),
        ([("n" * 300, "float32", (1,), 1)], "max_name_length"),
    ],
    ids=["1e12-elements", "1M-blocks", "too-many-tensors", "long-name"],
)
def test_schema_from_caller_still_bounded_by_limits(entries, limit_name):
    """The schema is the caller's, but a message that names it must still fit the limits."""
    schema = fstqcodec.Schema(entries)
    header, body = _schema_message()
    header["schema"] = schema.digest
    outcome, peak = peak_allocation(fstqcodec.decode, reframe(header, body), limits=SMALL_LIMITS, schemas=schema)
    assert isinstance(outcome, fstqcodec.LimitExceededError), outcome
    assert outcome.limit_name == limit_name
    assert peak < 4 * MiB
