"""The byte-order rules of FORMAT.md 5.1 (msgpack subset) and 11 (zstd frames) against the code.

The header parser has two paths: msgpack-python for valid headers and :func:`msgpack_subset.scan`
(the spec's byte-order walk) to name the error of an invalid one. These tests check that the two
agree on which headers are valid, and that the zstd structure walk accepts every frame libzstd
writes and finds the frame's end where libzstd does.
"""

from __future__ import annotations

import random

import msgpack
import pytest
import zstandard

from fstqcodec.errors import BadFormatError, DecodeError, LimitExceededError, TrailingDataError, TruncatedError
from fstqcodec.limits import DEFAULT_LIMITS, Limits
from fstqcodec.stages import rans
from fstqcodec.wire import container, msgpack_subset, zstd_frame

NATIVE = getattr(rans._speedups, "msgpack_scan", None) is not None

SEED_HEADERS = [
    {
        "tensors": [["w", "float32", [3, 5], 4], ["é-name", "bfloat16", [], 1]],
        "contexts": [["zero"], ["rans", 2, None, 2, 4, 0, [2, 6, 6, 2]], ["packed", 3, 0]],
        "sections": [["blocks", 4, "none", 4], ["scales", 4, "zstd", 9]],
        "codebooks": [b"\x00" * 32],
        "meta": {"a": 1.5, "b": b"x", "c": None, "d": True, "e": -3, "f": 2**40, "g": -(2**40)},
        "critical": ["tensors"],
    },
    {"x": [[[[1, {"k": [2, 3]}]]]], "s": "é" * 40, "n": list(range(300)), "m": {}, "e": [], "big": "y" * 70000},
]


def _class_of(call):
    try:
        call()
    except DecodeError as exc:
        return type(exc)
    return None


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.5 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif op < 0.7 and out:
            start = rng.randrange(len(out))
            del out[start : start + rng.randint(1, 5)]
        elif op < 0.85:
            out.insert(rng.randrange(len(out) + 1), rng.randrange(256))
        else:
            out = out[: rng.randrange(len(out) + 1)]
    return bytes(out)


@pytest.mark.parametrize("limits", [DEFAULT_LIMITS, Limits(max_tensors=1, max_contexts=1)], ids=["default", "small"])
def test_fast_parse_and_byte_order_scan_agree(limits):
    """Whatever msgpack-python accepts, the scan accepts, and the error class is always the scan's."""
    rng = random.Random(20261201)
    seeds = [msgpack.packb(h, use_bin_type=True) for h in SEED_HEADERS]
    for _ in range(3000):
        data = _mutate(rng.choice(seeds), rng)
        assert _class_of(lambda: container.unpack_header(data, 0, limits)) is _class_of(lambda: msgpack_subset.scan(data, limits)), data.hex()


def test_depth_16_is_accepted_and_17_rejected():
    for depth, expected in ((16, None), (17, BadFormatError)):
        data = b"\x81\xa1x" + b"\x91" * (depth - 2) + b"\x90"  # the map at depth 1, arrays at 2 .. depth
        assert _class_of(lambda: container.unpack_header(data, 0, DEFAULT_LIMITS)) is expected
        assert _class_of(lambda: msgpack_subset.scan(data, DEFAULT_LIMITS)) is expected


def test_scan_reports_in_byte_order():
    budget = msgpack_subset.container_budget(DEFAULT_LIMITS)
    # Declared length past the end at the array header, before its many empty arrays are counted.
    past_end = b"\x81\xa1x\xdd" + (budget + 2).to_bytes(4, "big") + b"\x90" * (budget + 1)
    assert _class_of(lambda: msgpack_subset.scan(past_end, DEFAULT_LIMITS)) is BadFormatError
    # Counted when read: the container past the bound comes before the bad UTF-8 inside it.
    counted = b"\x81\xa1x\xdd" + (budget - 1).to_bytes(4, "big") + b"\x90" * (budget - 2) + b"\x91\xa1\xff"
    assert _class_of(lambda: msgpack_subset.scan(counted, DEFAULT_LIMITS)) is LimitExceededError
    assert _class_of(lambda: msgpack_subset.scan(b"\x80\xc0", DEFAULT_LIMITS)) is TrailingDataError
    assert _class_of(lambda: msgpack_subset.scan(b"\x93\x01\x02\x03\xc0", DEFAULT_LIMITS)) is BadFormatError


@pytest.mark.parametrize("level", [1, 3, 19])
@pytest.mark.parametrize("checksum", [False, True])
def test_zstd_walk_accepts_libzstd_frames(level, checksum):
    rng = random.Random(level)
    for size in (0, 1, 300, 131072, 131073, 400_000):
        payload = bytes(rng.randrange(4) for _ in range(size))
        frame = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=checksum).compress(payload)
        assert zstd_frame.frame_length(frame, size, "test", 0) == len(frame)
        assert zstd_frame.decompress_exact(frame, size, "test", 0) == payload


def test_zstd_walk_cut_anywhere_after_the_magic_is_truncated():
    frame = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=True).compress(b"abc" * 1000)
    for cut in range(len(frame)):
        expected = BadFormatError if cut < 4 else TruncatedError
        assert _class_of(lambda: zstd_frame.decompress_exact(frame[:cut], 3000, "test", 0)) is expected, cut
    assert _class_of(lambda: zstd_frame.decompress_exact(frame + b"\x00", 3000, "test", 0)) is TrailingDataError


@pytest.mark.skipif(not NATIVE, reason="the C accelerator is not built")
def test_native_scan_matches_the_python_scan():
    """The C walks (used by default) report exactly what the Python reference walks report."""
    rng = random.Random(7)
    seeds = [msgpack.packb(h, use_bin_type=True) for h in SEED_HEADERS]
    small = Limits(max_tensors=1, max_contexts=1)
    for _ in range(3000):
        data = _mutate(rng.choice(seeds), rng)
        for limits in (DEFAULT_LIMITS, small):
            assert _class_of(lambda: msgpack_subset.scan(data, limits)) is _class_of(lambda: msgpack_subset.scan_python(data, limits)), data.hex()


@pytest.mark.skipif(not NATIVE, reason="the C accelerator is not built")
def test_native_zstd_walk_matches_the_python_walk():
    rng = random.Random(11)
    seeds = [
        zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=c).compress(bytes(rng.randrange(3) for _ in range(n)))
        for c, n in ((False, 0), (True, 40), (False, 5000), (True, 300_000))
    ]
    seeds.append(b"\x28\xb5\x2f\xfd\x80\x68" + (16).to_bytes(4, "little") + (1 | (16 << 3)).to_bytes(3, "little") + bytes(16))
    for _ in range(4000):
        seed = rng.choice(seeds)
        data = _mutate(seed[:64], rng) + seed[64:] if rng.random() < 0.7 else _mutate(seed, rng)
        declared = zstandard.frame_content_size(seed) if seed[4] != 0x80 else 16
        native = _class_of(lambda: zstd_frame.frame_length(data, declared, "t", 0))
        python = _class_of(lambda: zstd_frame.frame_length_python(data, declared, "t", 0))
        assert native is python, data[:80].hex()
        if native is None:
            assert zstd_frame.frame_length(data, declared, "t", 0) == zstd_frame.frame_length_python(data, declared, "t", 0)
