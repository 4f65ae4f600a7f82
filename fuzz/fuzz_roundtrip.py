"""Fuzz target: encode small arrays with options drawn from the fuzz input, decode, and check
the codec's promises (see ``fuzz/README.md``).

Checked on every input: encode raises only ``EncodeError`` and only for a reason the input
gives (non-finite values under ``nonfinite='error'``, naming the tensor; a budget below the
minimum); the same call gives the same bytes; a budget is never exceeded; decode gives back the
names, shapes and dtypes; lossless is bit-exact; fixed-rate codes stay within half a step
(a whole step with stochastic rounding); a budgeted message is never worse than sending zeros.

Run: ``python fuzz/fuzz_roundtrip.py fuzz/corpus/fuzz_roundtrip -max_total_time=60``.
Set ``FSTQ_FUZZ_SKIP_KNOWN=1`` to skip inputs that hit the open bugs listed in ``KNOWN_BUGS``
(so a long run explores past them); replay never skips.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fstqcodec  # noqa: E402
from fuzzlib import ByteReader, run_fuzzer  # noqa: E402

_DTYPES = (np.dtype("float16"), np.dtype("float32"), np.dtype("float64"))
_BLOCK_SIZES = (1, 2, 3, 7, 16, 33, 64, 100, 256)
_MODES = ("lossless", "bits", "nf4", "bits_per_param", "max_bytes", "ratio")
_NF4_HALF_GAP = 0.1520  # the widest gap between NF4 levels is 1 - 0.6962; half of it
_MAX_ELEMENTS = 1200

#: Open bugs whose inputs a long run may skip (FSTQ_FUZZ_SKIP_KNOWN=1): name -> description, with
#: a predicate in _hits_known_bug. Each has a failing reproducer in tests/ and, once the fuzzer
#: finds it, a file under fuzz/crashes/. None are open now; the last one (fixed-rate codes near a
#: dtype's maximum decoding to inf, fixed in 48be088) is fuzz/crashes/fuzz_roundtrip/fixed-rate-overflow-*.
KNOWN_BUGS: dict = {}
SKIP_KNOWN = os.environ.get("FSTQ_FUZZ_SKIP_KNOWN") == "1"


def _hits_known_bug(tensors: dict, fisher) -> bool:
    """True for inputs that would hit an open bug in KNOWN_BUGS (none at present; the last, per-element
    Fisher weights for zero-size tensors, was fixed in e3a2708)."""
    return False


def _draw_tensors(reader: ByteReader) -> dict:
    tensors = {}
    budget_left = _MAX_ELEMENTS
    for index in range(reader.int_in(0, 3)):
        dtype = reader.choice(_DTYPES)
        ndim = reader.int_in(0, 3)
        shape = tuple(reader.int_in(0, 12) for _ in range(ndim))
        size = int(np.prod(shape, dtype=np.int64))
        if size > budget_left:
            shape, size = (budget_left,), budget_left
        budget_left -= size
        name = f"{index}" + reader.take(reader.int_in(0, 8)).decode("utf-8", "replace")
        if reader.flag():
            # Arbitrary bit patterns: NaN, inf, -0.0, subnormals, extremes.
            raw = reader.take(size * dtype.itemsize)
            values = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
        else:
            rng = np.random.default_rng(reader.uint(4))
            magnitude = 10.0 ** reader.int_in(-30, 30)
            values = (rng.standard_normal(size) * magnitude).astype(dtype).reshape(shape)
            with np.errstate(over="ignore"):
                values = values.astype(dtype)
        tensors[name] = values
    return tensors


def _draw_fisher(reader: ByteReader, tensors: dict):
    kind = reader.int_in(0, 2)
    if kind == 0:
        return None
    rng = np.random.default_rng(reader.uint(2))
    if kind == 1:
        return {name: float(rng.exponential()) * (reader.int_in(0, 4) > 0) for name in tensors}
    fisher = {}
    for name, array in tensors.items():
        weights = rng.exponential(size=array.shape) * (rng.random(array.shape) > 0.2)
        fisher[name] = weights.astype(np.float32)
    return fisher


def _first_nonfinite(tensors: dict):
    for name, array in tensors.items():
        if not np.all(np.isfinite(array)):
            return name
    return None


def _first_beyond_float32(tensors: dict):
    """The first float64 tensor with a finite value beyond float32's range (lossy coding refuses it)."""
    limit = float(np.finfo(np.float32).max)
    for name, array in tensors.items():
        if array.dtype == np.float64:
            finite = array[np.isfinite(array)]
            if finite.size and float(np.max(np.abs(finite))) > limit:
                return name
    return None


def _sanitized(array: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(array), array, 0).astype(array.dtype)


def _fixed_rate_tolerance(array: np.ndarray, block_size: int, bits, stochastic: bool) -> np.ndarray:
    """Per-element bound on |x - decoded| for absmax fixed-rate coding."""
    flat = array.reshape(-1).astype(np.float32).astype(np.float64)
    pad = (-flat.size) % block_size
    blocks = np.abs(np.pad(flat, (0, pad))).reshape(-1, block_size)
    absmax = blocks.max(axis=1) if blocks.size else np.zeros(0)
    top = 1.0 if bits is None else float((1 << (bits - 1)) - 1)
    # The scale is absmax / top rounded up to bfloat16 (8 significant bits), at least 2**-133.
    scale = np.maximum(absmax / top * (1 + 2.0**-7), 2.0**-133)
    step_fraction = _NF4_HALF_GAP if bits is None else (1.0 if stochastic else 0.5)
    per_block = scale * step_fraction * (1 + 2.0**-10)
    # Where top x that scale would overflow the dtype, the encoder rounds the scale down instead
    # (spec section 19): the block's largest values may then clip by up to 2**-7 of absmax.
    dtype_max = float(np.finfo(np.float16 if array.dtype == np.float16 else np.float32).max)
    per_block = per_block + np.where(top * scale > dtype_max, absmax * 2.0**-7, 0.0)
    bound = np.repeat(per_block, block_size)[: flat.size]
    # float32 arithmetic on float64 input, and the cast back to a float16 output.
    relative = 2.0**-10 if array.dtype == np.float16 else 2.0**-22
    return bound + relative * np.abs(flat) + 2.0**-24 + 1e-300


def test_one_input(data: bytes) -> None:
    reader = ByteReader(data)
    tensors = _draw_tensors(reader)
    block_size = reader.choice(_BLOCK_SIZES)
    nonfinite = reader.choice(("error", "zero"))
    mode = reader.choice(_MODES)
    rounding = reader.choice(("nearest", "stochastic"))
    seed = reader.uint(4)
    fisher = _draw_fisher(reader, tensors)
    meta = {"round": reader.uint(2)} if reader.flag() else None
    options = dict(block_size=block_size, nonfinite=nonfinite, rounding=rounding, seed=seed, fisher=fisher, meta=meta)
    bits = None
    budget = None
    if mode == "bits":
        bits = reader.int_in(2, 8)
        options["bits"] = bits
    elif mode == "nf4":
        options["codebook"] = "nf4"
        options["rounding"] = rounding = "nearest"
    elif mode == "bits_per_param":
        budget = fstqcodec.Budget(bits_per_param=reader.choice((0.25, 0.5, 1, 2, 3, 4, 8, 16, 40)))
    elif mode == "max_bytes":
        budget = fstqcodec.Budget(max_bytes=reader.int_in(1, 6000))
    elif mode == "ratio":
        budget = fstqcodec.Budget(ratio=reader.choice((1.0, 1.5, 2.0, 4.0, 8.0, 32.0)))
    if budget is not None:
        options["budget"] = budget
    # Drawn last, so inputs recorded before this option keep their meaning.
    schema = fstqcodec.Schema.of(tensors, block_size=block_size) if reader.flag() else None
    if schema is not None:
        options["schema"] = schema
    if SKIP_KNOWN and _hits_known_bug(tensors, fisher):
        return

    bad_tensor = _first_nonfinite(tensors)
    beyond = _first_beyond_float32(tensors) if mode != "lossless" else None
    try:
        message = fstqcodec.encode(tensors, **options)
    except fstqcodec.BudgetError as exc:
        assert budget is not None, "BudgetError without a budget"
        assert exc.minimum > exc.budget
        return
    except fstqcodec.EncodeError as exc:
        if nonfinite == "error" and bad_tensor is not None:
            assert exc.tensor == bad_tensor, (exc.tensor, bad_tensor)
        else:
            assert beyond is not None, f"unexpected EncodeError: {exc}"
            assert exc.tensor == beyond, (exc.tensor, beyond)
        return
    assert not (nonfinite == "error" and bad_tensor is not None), "non-finite input was accepted"
    assert fstqcodec.encode(tensors, **options) == message, "encode is not deterministic"

    elements = sum(a.size for a in tensors.values())
    if budget is not None:
        limit = budget.resolve(elements=elements, raw_bytes=sum(a.nbytes for a in tensors.values()))
        assert len(message) <= limit, f"message of {len(message)} bytes over a budget of {limit}"

    decoded = fstqcodec.decode(message, schemas=schema)
    assert list(decoded) == list(tensors)
    report = fstqcodec.inspect(message, schemas=schema)
    assert report["elements"] == elements and report["size"] == len(message)
    for name, original in tensors.items():
        out = decoded[name]
        assert out.dtype == original.dtype and out.shape == original.shape, (name, out.dtype, out.shape)
        assert np.all(np.isfinite(out))
        expected = _sanitized(original)
        if mode == "lossless":
            assert out.tobytes() == expected.tobytes(), f"lossless round trip of {name!r} is not bit-exact"
        elif mode in ("bits", "nf4"):
            error = np.abs(expected.astype(np.float64) - out.astype(np.float64)).reshape(-1)
            bound = _fixed_rate_tolerance(expected, block_size, bits, rounding == "stochastic")
            worst = int(np.argmax(error - bound)) if error.size else 0
            assert np.all(error <= bound), f"{name!r}: error {error[worst]} > bound {bound[worst]} at {worst}"
    if budget is not None and rounding == "nearest":
        # Dropping every block is always a candidate: the encoder must not do worse than that.
        weighted_error = weighted_drop = 0.0
        with np.errstate(over="ignore", invalid="ignore"):
            for name, original in tensors.items():
                x = _sanitized(original).astype(np.float64)
                weight = 1.0 if fisher is None else np.asarray(fisher[name], dtype=np.float64)
                weighted_error += float(np.sum(weight * (x - decoded[name].astype(np.float64)) ** 2))
                weighted_drop += float(np.sum(weight * x**2))
        if np.isfinite(weighted_drop):  # squares of float64 values near 1e308 overflow
            assert weighted_error <= weighted_drop * (1 + 1e-6) + 1e-30, (weighted_error, weighted_drop)


def main() -> None:
    run_fuzzer(test_one_input)


if __name__ == "__main__":
    main()
