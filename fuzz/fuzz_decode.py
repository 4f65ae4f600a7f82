"""Fuzz target: ``fstqcodec.decode`` on arbitrary bytes must return valid arrays or raise a
``DecodeError`` subclass, nothing else (see ``fuzz/README.md``).

Run: ``python fuzz/fuzz_decode.py fuzz/corpus/fuzz_decode -max_total_time=60``.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fstqcodec  # noqa: E402
from fuzzlib import FUZZ_LIMITS, FUZZ_SCHEMAS, message_from_input, run_fuzzer  # noqa: E402

_OUTPUT_DTYPES = (np.dtype("float16"), np.dtype("float32"), np.dtype("float64"))


def check_decoded(decoded) -> None:
    """Invariants of a successful decode (an AssertionError here is a crash)."""
    assert isinstance(decoded, dict)
    total = 0
    for name, array in decoded.items():
        assert isinstance(name, str) and name
        assert isinstance(array, np.ndarray)
        assert array.dtype in _OUTPUT_DTYPES, array.dtype
        assert np.all(np.isfinite(array)), f"decode returned non-finite values in {name!r}"
        total += array.nbytes
    assert total <= FUZZ_LIMITS.max_output_size


def test_one_input(data: bytes) -> None:
    message = message_from_input(data)
    try:
        decoded = fstqcodec.decode(message, limits=FUZZ_LIMITS, schemas=FUZZ_SCHEMAS)
    except fstqcodec.DecodeError:
        return
    check_decoded(decoded)
    # What decoded must survive a lossless round trip bit for bit.
    again = fstqcodec.decode(fstqcodec.encode(decoded))
    assert list(again) == list(decoded)
    for name, array in decoded.items():
        assert again[name].dtype == array.dtype and again[name].shape == array.shape
        assert again[name].tobytes() == array.tobytes(), f"lossless re-encode of {name!r} differs"


def main() -> None:
    run_fuzzer(test_one_input)


if __name__ == "__main__":
    main()
