"""The rANS stage: round trips, the C accelerator against the numpy reference, stream checks."""

import os

import numpy as np
import pytest

from fstqcodec.errors import BadFormatError, TrailingDataError
from fstqcodec.stages import rans

CASES = [(n, width) for n in (0, 1, 7, 1000, 100_003) for width in (1, 2, 4, 8)]


def _stream(n, width, seed=0, prob_bits=12):
    rng = np.random.default_rng(seed)
    spread = max(1, 1 << max(0, width - 2))
    symbols = np.clip(np.rint(rng.standard_normal(n) * spread), -(1 << (width - 1)), (1 << (width - 1)) - 1)
    symbols = (symbols + (1 << (width - 1))).astype(np.uint8)
    counts = np.bincount(symbols, minlength=1 << width)
    if n == 0:
        counts[0] = 1
    freqs = rans.normalize_frequencies(counts, prob_bits)
    return symbols, freqs, prob_bits, rans.choose_lanes(n)


@pytest.mark.parametrize("n,width", CASES)
def test_round_trip_and_reference_agree(n, width):
    symbols, freqs, prob_bits, lanes = _stream(n, width)
    reference = rans.encode_numpy(symbols, freqs, prob_bits, lanes)
    assert rans.encode(symbols, freqs, prob_bits, lanes) == reference
    assert np.array_equal(rans.decode(reference, n, freqs, prob_bits, lanes), symbols)
    assert np.array_equal(rans.decode_numpy(reference, n, freqs, prob_bits, lanes), symbols)


@pytest.mark.skipif(bool(os.environ.get("FSTQ_PURE_PYTHON")), reason="fallback forced by FSTQ_PURE_PYTHON")
def test_accelerator_is_built_here():
    # The project's machines have a compiler; a silent fallback would hide a broken build.
    assert rans.ACCELERATED


@pytest.mark.parametrize("lanes", [1, 3, 64])
@pytest.mark.parametrize("block_size", [1, 7, 64])
def test_encode_rows_codes_the_rows_in_place(lanes, block_size):
    # The encoder's path: signed codes of some rows of a matrix, offset into symbols, coded where
    # they lie; the same stream as coding the gathered symbols (C and numpy).
    symbols, freqs, prob_bits, _ = _stream(6 * block_size * 50, 3, seed=block_size)
    offset = 4
    matrix = (symbols.astype(np.int16) - offset).astype(np.int8).reshape(-1, block_size)
    rows = np.array([0, 2, 3, 7, 8, 9] + list(range(11, len(matrix), 3)), dtype=np.int64)
    expected = rans.encode_numpy(symbols.reshape(-1, block_size)[rows].reshape(-1), freqs, prob_bits, lanes)
    assert rans.encode_rows(matrix, rows, offset, freqs, prob_bits, lanes) == expected
    saved, rans._speedups = rans._speedups, None
    try:
        assert rans.encode_rows(matrix, rows, offset, freqs, prob_bits, lanes) == expected
    finally:
        rans._speedups = saved


def test_many_lanes_and_a_partial_last_step():
    symbols, freqs, prob_bits, _ = _stream(10_007, 3)
    for lanes in (1, 2, 3, 64, 10_007):
        stream = rans.encode(symbols, freqs, prob_bits, lanes)
        assert stream == rans.encode_numpy(symbols, freqs, prob_bits, lanes)
        assert np.array_equal(rans.decode(stream, len(symbols), freqs, prob_bits, lanes), symbols)


def test_close_to_entropy():
    symbols, freqs, prob_bits, lanes = _stream(1_000_000, 3, prob_bits=14)
    counts = np.bincount(symbols)
    p = counts[counts > 0] / len(symbols)
    entropy_bits = -np.sum(p * np.log2(p)) * len(symbols)
    assert 8 * len(rans.encode(symbols, freqs, prob_bits, lanes)) < entropy_bits * 1.01


@pytest.mark.parametrize("decode", [rans.decode, rans.decode_numpy])
def test_corrupt_streams_raise_named_errors(decode):
    symbols, freqs, prob_bits, lanes = _stream(5000, 4)
    stream = rans.encode(symbols, freqs, prob_bits, lanes)
    with pytest.raises(TrailingDataError):
        decode(stream + b"\x00\x00", len(symbols), freqs, prob_bits, lanes)
    with pytest.raises(BadFormatError):
        decode(stream[:-2], len(symbols), freqs, prob_bits, lanes)
    with pytest.raises(BadFormatError):
        decode(stream[:-1], len(symbols), freqs, prob_bits, lanes)
    low_state = b"\x00\x00\x00\x00" + stream[4:]
    with pytest.raises(BadFormatError):
        decode(low_state, len(symbols), freqs, prob_bits, lanes)
    flipped = bytearray(stream)
    flipped[len(flipped) // 2] ^= 0x40
    with pytest.raises((BadFormatError, TrailingDataError)):
        decode(bytes(flipped), len(symbols), freqs, prob_bits, lanes)
