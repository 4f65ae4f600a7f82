"""Bit packing: the encoder's row packer against packing the gathered codes (C and numpy)."""

import numpy as np
import pytest

from fstqcodec.stages import rans
from fstqcodec.stages.bitpack import pack, pack_rows, unpack


@pytest.mark.parametrize("width", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("block_size", [1, 7, 64])
def test_pack_rows_packs_the_rows_in_place(width, block_size, monkeypatch):
    # Codes of some rows of a matrix, offset into symbols and packed where they lie: the same
    # bytes as packing the gathered symbols, with the accelerator and without.
    rng = np.random.default_rng(width * 100 + block_size)
    offset = 1 << (width - 1)
    symbols = rng.integers(0, 1 << width, size=(41, block_size)).astype(np.uint8)
    matrix = (symbols.astype(np.int16) - offset).astype(np.int8)
    rows = np.array([0, 1, 5, 6, 7, 20, 40], dtype=np.int64)
    expected = pack(symbols[rows].reshape(-1), width)
    assert np.array_equal(unpack(expected, width, len(rows) * block_size), symbols[rows].reshape(-1))
    assert pack_rows(matrix, rows, offset, width) == expected
    monkeypatch.setattr(rans, "_speedups", None)
    assert pack_rows(matrix, rows, offset, width) == expected
