"""The codec's promises on valid input: lossless round trips, budgets, determinism, stochastic
rounding, Fisher weights, non-finite input, fixed-rate modes, error feedback, inspect.

Torch-free: only numpy, msgpack, zstandard (and hypothesis).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fstqcodec
from fstqcodec.stages.codebooks import NF4
from fstqcodec.stages.scales import from_bf16_bits, to_bf16_bits
from common import (
    bits_of,
    budget_bytes,
    check_budget,
    check_deterministic,
    check_round_trip,
    reframe,
    split,
    weighted_error,
)

FLOAT_DTYPES = (np.float16, np.float32, np.float64)
NF4_HALF_GAP = 0.1520  # half the widest gap between NF4 levels (1 - 0.6962)


def special_values(dtype) -> np.ndarray:
    """-0.0, the smallest subnormal, the largest subnormal, the smallest normal, max, lowest, eps."""
    info = np.finfo(dtype)
    smallest_subnormal = np.array(1, dtype=info.dtype.newbyteorder("=").str.replace("f", "u")).view(dtype)
    largest_subnormal = np.array(info.smallest_normal, dtype) - smallest_subnormal
    values = [
        0.0, -0.0, smallest_subnormal, -smallest_subnormal, largest_subnormal, -largest_subnormal,
        info.smallest_normal, -info.smallest_normal, info.max, info.min, info.eps, 1.0, -1.0, 1 / 3,
    ]
    return np.array(values, dtype=dtype)


def lora_update(rng, shape=(1024, 1024), block_size=64) -> np.ndarray:
    """Gaussian elements whose scale varies from block to block, like a LoRA update."""
    n = math.prod(shape)
    block_std = np.exp(rng.standard_normal((n // block_size, 1)))
    return (rng.standard_normal((n // block_size, block_size)) * block_std * 1e-3).astype(np.float32).reshape(shape)


# ------------------------------------------------------------------------------------------
# Lossless


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_lossless_special_values_bit_exact(dtype):
    values = special_values(dtype)
    assert bits_of(values[1:2]) != bits_of(values[0:1]), "-0.0 must differ from 0.0 in the fixture"
    assert values[2] != 0, "the fixture's subnormal must not flush to zero"
    check_round_trip({"special": values, "tiled": np.tile(values, 11)[:150].reshape(10, 15)})


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_lossless_negative_zero_blocks(dtype):
    # A block of -0.0 must not be mistaken for an all-zero block and come back as +0.0.
    tensors = {"neg": np.full(128, -0.0, dtype), "pos": np.zeros(128, dtype), "mix": np.array([0.0, -0.0] * 64, dtype)}
    check_round_trip(tensors)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "shape", [(), (0,), (0, 3), (3, 0, 2), (1,), (7,), (63,), (64,), (65,), (3, 5, 7), (2, 1, 1, 1, 3), (129, 3)]
)
def test_lossless_shapes(dtype, shape):
    rng = np.random.default_rng(len(shape) + sum(shape))
    values = rng.standard_normal(shape).astype(dtype)
    check_round_trip({"t": values})


def test_lossless_scalar_and_zero_size_mixed():
    tensors = {
        "scalar": np.float32(-2.5),
        "empty": np.zeros((0,), np.float16),
        "empty2d": np.zeros((4, 0), np.float64),
        "small": np.array([1e-30, -7.0], np.float32),
    }
    message, decoded = check_round_trip(tensors)
    assert decoded["scalar"].shape == ()
    assert fstqcodec.inspect(message)["elements"] == 3


def test_lossless_empty_message():
    message, decoded = check_round_trip({})
    assert decoded == {}
    assert fstqcodec.inspect(message)["bits_per_element"] is None


@pytest.mark.parametrize("block_size", [1, 3, 64, 1000, 65536])
def test_lossless_block_sizes(block_size):
    rng = np.random.default_rng(block_size)
    tensors = {"a": rng.standard_normal(777).astype(np.float32), "b": rng.standard_normal((5, 3)).astype(np.float16)}
    check_round_trip(tensors, block_size=block_size)


def test_lossless_many_tensors_keep_names_and_order():
    rng = np.random.default_rng(1)
    names = [f"model.layers.{i}.{kind}" for i in range(150) for kind in ("lora_A", "lora_B")]
    rng.shuffle(names)
    tensors = {}
    for index, name in enumerate(names):
        dtype = FLOAT_DTYPES[index % 3]
        tensors[name] = rng.standard_normal(int(rng.integers(0, 40))).astype(dtype)
    tensors["ünïcødé/名前 \x00"] = np.float16(1.0)
    check_round_trip(tensors)


def test_lossless_non_contiguous_input():
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    check_round_trip({"transposed": base.T, "strided": base[::2, ::3], "fortran": np.asfortranarray(base)})


def test_lossless_python_floats_are_float64():
    _, decoded = check_round_trip({"list": np.asarray([0.1, -0.0, 1e-310])})
    assert decoded["list"].dtype == np.float64


def test_lossless_big_endian_input():
    values = np.array([1.5, -0.0, 3e-39], dtype=">f4")
    decoded = fstqcodec.decode(fstqcodec.encode({"be": values}))
    assert decoded["be"].dtype == np.float32
    assert bits_of(decoded["be"]) == bits_of(values.astype(np.float32))


finite_arrays = st.sampled_from(FLOAT_DTYPES).flatmap(
    lambda dtype: hnp.arrays(
        dtype,
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9),
        elements=st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True, width=np.dtype(dtype).itemsize * 8),
    )
)


@given(
    tensors=st.dictionaries(st.text(min_size=1, max_size=8), finite_arrays, max_size=4),
    block_size=st.sampled_from([1, 2, 5, 64, 256]),
)
def test_lossless_property(tensors, block_size):
    check_round_trip(tensors, block_size=block_size)


@given(array=hnp.arrays(np.float32, st.integers(0, 200), elements=st.floats(width=32)))
def test_nonfinite_zero_property(array):
    """nonfinite='zero' replaces exactly the NaN and inf elements with +0.0."""
    decoded = fstqcodec.decode(fstqcodec.encode({"x": array}, nonfinite="zero"))["x"]
    expected = np.where(np.isfinite(array), array, np.float32(0))
    assert bits_of(decoded) == bits_of(expected)


# ------------------------------------------------------------------------------------------
# Budgets


@pytest.fixture(scope="module")
def million_update():
    return {"w": lora_update(np.random.default_rng(2026))}


@pytest.mark.parametrize("bits_per_param", [0.25, 0.5, 1, 2, 4])
def test_budget_bits_per_param_one_million(million_update, bits_per_param):
    n = million_update["w"].size
    assert n == 1 << 20
    message, decoded = check_budget(million_update, fstqcodec.Budget(bits_per_param=bits_per_param))
    rate = 8 * len(message) / n
    assert 0.95 * bits_per_param <= rate <= bits_per_param
    # More bits must buy a better reconstruction than sending nothing.
    assert weighted_error(million_update, decoded) < weighted_error(million_update, {"w": np.zeros_like(million_update["w"])})


def test_budget_error_falls_with_rate(million_update):
    errors = []
    for bits_per_param in (0.5, 1, 2, 4):
        decoded = fstqcodec.decode(fstqcodec.encode(million_update, budget=fstqcodec.Budget(bits_per_param=bits_per_param)))
        errors.append(weighted_error(million_update, decoded))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("max_bytes", [2_000, 10_000, 50_000])
def test_budget_max_bytes(max_bytes):
    tensors = {"a": lora_update(np.random.default_rng(3), (256, 256)), "b": lora_update(np.random.default_rng(4), (64, 64))}
    message, _ = check_budget(tensors, fstqcodec.Budget(max_bytes=max_bytes))
    # An int budget is a number of bytes, the same as Budget(max_bytes=...).
    assert fstqcodec.encode(tensors, budget=max_bytes) == message


@pytest.mark.parametrize("ratio", [8.0, 16.0, 64.0])
def test_budget_ratio(ratio):
    tensors = {"a": lora_update(np.random.default_rng(5), (256, 256))}
    limit = budget_bytes(tensors, fstqcodec.Budget(ratio=ratio))
    assert limit == (256 * 256 * 4) // int(ratio)
    check_budget(tensors, fstqcodec.Budget(ratio=ratio))


def test_budget_ratio_counts_raw_bytes_at_own_dtype():
    tensors = {"h": lora_update(np.random.default_rng(6), (128, 128)).astype(np.float16)}
    assert budget_bytes(tensors, fstqcodec.Budget(ratio=4.0)) == 128 * 128 * 2 // 4
    check_budget(tensors, fstqcodec.Budget(ratio=4.0))


def test_budget_large_enough_is_lossless():
    tensors = {"a": np.random.default_rng(7).standard_normal(1000).astype(np.float32)}
    message = fstqcodec.encode(tensors, budget=fstqcodec.Budget(bits_per_param=40))
    assert len(message) <= 40 * 1000 // 8
    assert bits_of(fstqcodec.decode(message)["a"]) == bits_of(tensors["a"])


def test_budget_below_minimum_raises_budget_error():
    tensors = {"a": np.ones(1000, np.float32), "b": np.ones((3, 3), np.float32)}
    with pytest.raises(fstqcodec.BudgetError) as info:
        fstqcodec.encode(tensors, budget=fstqcodec.Budget(max_bytes=20))
    error = info.value
    assert isinstance(error, fstqcodec.EncodeError)
    assert error.budget == 20 and error.minimum > 20
    # The minimum it reports is a budget that works.
    message = fstqcodec.encode(tensors, budget=fstqcodec.Budget(max_bytes=error.minimum))
    assert len(message) <= error.minimum
    assert set(fstqcodec.decode(message)) == {"a", "b"}
    with pytest.raises(fstqcodec.BudgetError):
        fstqcodec.encode(tensors, budget=fstqcodec.Budget(max_bytes=error.minimum - 1))


def test_budget_zero_size_tensors():
    tensors = {"empty": np.zeros((0, 4), np.float32)}
    with pytest.raises(fstqcodec.BudgetError):
        fstqcodec.encode(tensors, budget=fstqcodec.Budget(bits_per_param=4))  # 0 bytes for 0 elements
    message = fstqcodec.encode(tensors, budget=fstqcodec.Budget(max_bytes=4096))
    assert fstqcodec.decode(message)["empty"].shape == (0, 4)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({}, TypeError),
        ({"bits_per_param": 1, "max_bytes": 10}, TypeError),
        ({"bits_per_param": 0}, ValueError),
        ({"bits_per_param": -1}, ValueError),
        ({"bits_per_param": float("nan")}, ValueError),
        ({"max_bytes": 0}, ValueError),
        ({"max_bytes": 1.5}, ValueError),
        ({"ratio": float("inf")}, ValueError),
    ],
)
def test_budget_arguments(kwargs, error):
    with pytest.raises(error):
        fstqcodec.Budget(**kwargs)


def test_budget_equality_and_repr():
    assert fstqcodec.Budget(bits_per_param=1) == fstqcodec.Budget(bits_per_param=1)
    assert fstqcodec.Budget(bits_per_param=1) != fstqcodec.Budget(max_bytes=1)
    assert repr(fstqcodec.Budget(ratio=8.0)) == "Budget(ratio=8.0)"


@given(
    size=st.integers(1, 1500),
    dtype=st.sampled_from(FLOAT_DTYPES),
    max_bytes=st.integers(1, 10_000),
    block_size=st.sampled_from([1, 16, 64, 100]),
    seed=st.integers(0, 2**32 - 1),
    # Stochastic rounding is left out until test_budget_stochastic_zero_frequency_symbol passes:
    # shrinking that known failure takes minutes.
    rounding=st.sampled_from(["nearest"]),
)
def test_budget_never_exceeded_property(size, dtype, max_bytes, block_size, seed, rounding):
    exponent = seed % 13 - 6 if dtype != np.float16 else seed % 7 - 4  # stay inside float16's range
    values = (np.random.default_rng(seed).standard_normal(size) * 10.0**exponent).astype(dtype)
    try:
        message = fstqcodec.encode({"x": values}, budget=max_bytes, block_size=block_size, rounding=rounding, seed=seed)
    except fstqcodec.BudgetError as exc:
        assert exc.minimum > max_bytes
        return
    assert len(message) <= max_bytes
    decoded = fstqcodec.decode(message)["x"]
    assert decoded.dtype == values.dtype and decoded.shape == values.shape and np.all(np.isfinite(decoded))


def test_budget_stochastic_zero_frequency_symbol():
    # Found by test_budget_never_exceeded_property. With the native rANS coder encode raises
    # ValueError('format', 'symbol with zero frequency'); the pure-Python coder divides by zero
    # and writes a stream that does not decode to the codes.
    x = (np.random.default_rng(2950).standard_normal(2195) * 1e6).astype(np.float32)
    message = fstqcodec.encode({"x": x}, budget=2083, rounding="stochastic", seed=2950)
    assert len(message) <= 2083
    decoded = fstqcodec.decode(message)["x"]
    assert weighted_error({"x": x}, {"x": decoded}) < weighted_error({"x": x}, {"x": np.zeros_like(x)})


def _relative_error(x, decoded, weight=1.0) -> float:
    x = np.asarray(x, np.float64)
    return float(np.sum(weight * (x - decoded.astype(np.float64)) ** 2) / np.sum(weight * x**2))


@pytest.mark.parametrize(
    "exponent",
    [-30, -20, -10, 0, 10, 20, 30],
)
def test_budget_value_scale_invariance(exponent):
    """Scaling the update scales the error and changes nothing else: the allocation is the same."""
    rng = np.random.default_rng(22)
    x = rng.standard_normal((64, 64)) * np.exp(rng.standard_normal((64, 1)))
    budget = fstqcodec.Budget(bits_per_param=1)
    reference = _relative_error(x.astype(np.float32), fstqcodec.decode(fstqcodec.encode({"x": x.astype(np.float32)}, budget=budget))["x"])
    scaled = (x * 10.0**exponent).astype(np.float32)
    message = fstqcodec.encode({"x": scaled}, budget=budget)
    assert len(message) >= 0.95 * budget_bytes({"x": scaled}, budget)
    assert _relative_error(scaled, fstqcodec.decode(message)["x"]) < 1.25 * reference


@pytest.mark.parametrize(
    "exponent",
    [-300, -100, -20, 0, 20, 100, 300],
)
def test_budget_fisher_scale_invariance(exponent):
    """Only the ratios of Fisher weights matter: multiplying them all by a constant is a no-op."""
    rng = np.random.default_rng(23)
    x = (rng.standard_normal((64, 64)) * np.exp(rng.standard_normal((64, 1)))).astype(np.float32)
    weight = np.exp(rng.standard_normal((64, 64)))
    budget = fstqcodec.Budget(bits_per_param=1)
    reference = fstqcodec.decode(fstqcodec.encode({"x": x}, budget=budget, fisher={"x": weight}))["x"]
    decoded = fstqcodec.decode(fstqcodec.encode({"x": x}, budget=budget, fisher={"x": weight * 10.0**exponent}))["x"]
    assert _relative_error(x, decoded, weight) < 1.25 * _relative_error(x, reference, weight)


@pytest.mark.parametrize("weight", [5e-324, 1e-320], ids=["min-subnormal", "subnormal"])
def test_budget_subnormal_fisher_weights(weight):
    x = np.random.default_rng(24).standard_normal(4096).astype(np.float32)
    message = fstqcodec.encode({"x": x}, budget=fstqcodec.Budget(bits_per_param=1), fisher={"x": weight})
    assert len(message) <= 512


# ------------------------------------------------------------------------------------------
# Determinism and stochastic rounding


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bits": 3},
        {"codebook": "nf4"},
        {"budget": fstqcodec.Budget(bits_per_param=1)},
        {"budget": fstqcodec.Budget(bits_per_param=2), "rounding": "stochastic", "seed": 11},
        {"bits": 2, "rounding": "stochastic", "seed": 12},
        {"budget": fstqcodec.Budget(bits_per_param=1), "fisher": {"a": 2.0, "b": 0.5}},
    ],
    ids=lambda options: ",".join(sorted(options)) or "lossless",
)
def test_deterministic(options):
    rng = np.random.default_rng(8)
    tensors = {"a": lora_update(rng, (128, 64)), "b": lora_update(rng, (64, 64))}
    check_deterministic(tensors, **options)


@pytest.mark.parametrize("options", [{"bits": 2}, {"budget": fstqcodec.Budget(bits_per_param=2)}], ids=["bits", "budget"])
def test_stochastic_seed_changes_bytes(options):
    tensors = {"a": lora_update(np.random.default_rng(9), (64, 64))}
    first = fstqcodec.encode(tensors, rounding="stochastic", seed=1, **options)
    assert fstqcodec.encode(tensors, rounding="stochastic", seed=1, **options) == first
    assert fstqcodec.encode(tensors, rounding="stochastic", seed=2, **options) != first


def test_stochastic_rounding_is_unbiased():
    rng = np.random.default_rng(10)
    x = rng.uniform(-1, 1, 1024).astype(np.float32)
    x[::64] = 1.0  # every block has absmax 1: the step is the same in every block
    step = 1.0  # bits=2: codes -1, 0, 1 with scale absmax / 1
    draws = 300
    total = np.zeros(x.size, np.float64)
    for seed in range(draws):
        decoded = fstqcodec.decode(fstqcodec.encode({"x": x}, bits=2, rounding="stochastic", seed=seed))["x"]
        assert np.all(np.abs(decoded - x) <= step * (1 + 2**-7))
        total += decoded
    mean = total / draws
    # Per element the decoded value has variance <= step**2 / 4.
    per_element_sd = step / 2 / math.sqrt(draws)
    assert np.max(np.abs(mean - x)) < 6 * per_element_sd
    assert abs(float(np.mean(mean - x))) < 6 * per_element_sd / math.sqrt(x.size)
    # Nearest rounding, by contrast, is biased on the same input.
    nearest = fstqcodec.decode(fstqcodec.encode({"x": x}, bits=2))["x"]
    assert np.max(np.abs(nearest - x)) > 0.4


# ------------------------------------------------------------------------------------------
# Fisher weights


def test_fisher_per_tensor_weights_steer_bits():
    rng = np.random.default_rng(11)
    tensors = {"important": lora_update(rng, (256, 64)), "unimportant": lora_update(rng, (256, 64))}
    tensors["unimportant"] = tensors["important"].copy()  # identical statistics: only Fisher differs
    budget = fstqcodec.Budget(bits_per_param=1)
    decoded = fstqcodec.decode(fstqcodec.encode(tensors, budget=budget, fisher={"important": 100.0, "unimportant": 1.0}))
    error_important = weighted_error({"important": tensors["important"]}, decoded)
    error_unimportant = weighted_error({"unimportant": tensors["unimportant"]}, decoded)
    assert error_important < 0.25 * error_unimportant


def test_fisher_per_element_weights_lower_weighted_error():
    rng = np.random.default_rng(12)
    x = lora_update(rng, (512, 64))
    fisher = np.exp(3 * rng.standard_normal((512, 1))).repeat(64, axis=1).astype(np.float32)
    budget = fstqcodec.Budget(bits_per_param=1)
    with_fisher = fstqcodec.decode(fstqcodec.encode({"x": x}, budget=budget, fisher={"x": fisher}))
    uniform = fstqcodec.decode(fstqcodec.encode({"x": x}, budget=budget))
    assert weighted_error({"x": x}, with_fisher, {"x": fisher}) < 0.5 * weighted_error({"x": x}, uniform, {"x": fisher})


def test_fisher_zero_weights_accepted():
    x = {"x": np.ones((4, 64), np.float32)}
    message = fstqcodec.encode(x, budget=fstqcodec.Budget(max_bytes=400), fisher={"x": np.zeros((4, 64))})
    assert len(message) <= 400


@pytest.mark.parametrize(
    "fisher, tensor",
    [
        ({"a": np.ones(10), "b": 1.0}, "a"),  # shape mismatch
        ({"a": np.ones((4, 8)), "b": -1.0}, "b"),  # negative per-tensor weight
        ({"a": -np.ones((4, 8)), "b": 1.0}, "a"),  # negative per-element weights
        ({"a": np.full((4, 8), np.nan), "b": 1.0}, "a"),  # NaN weights
        ({"a": np.ones((4, 8)), "b": float("nan")}, "b"),
        ({"a": np.ones((4, 8)), "b": float("inf")}, "b"),
        ({"a": np.ones((4, 8))}, "b"),  # missing tensor
    ],
)
def test_fisher_invalid_raises_encode_error(fisher, tensor):
    tensors = {"a": np.ones((4, 8), np.float32), "b": np.ones(3, np.float32)}
    with pytest.raises(fstqcodec.EncodeError) as info:
        fstqcodec.encode(tensors, fisher=fisher, budget=fstqcodec.Budget(bits_per_param=2))
    assert info.value.tensor == tensor


@pytest.mark.parametrize("options", [{}, {"bits": 4}, {"budget": 1000}], ids=["lossless", "bits", "budget"])
def test_fisher_zero_size_tensors(options):
    # Found by replaying the fuzz_roundtrip corpus.
    tensors = {"empty": np.zeros((0, 3), np.float32)}
    message = fstqcodec.encode(tensors, fisher={"empty": np.zeros((0, 3))}, **options)
    assert fstqcodec.decode(message)["empty"].shape == (0, 3)


def test_fisher_unknown_name_and_wrong_type():
    tensors = {"a": np.ones(8, np.float32)}
    with pytest.raises(fstqcodec.EncodeError):
        fstqcodec.encode(tensors, fisher={"a": 1.0, "ghost": 1.0}, budget=100)
    with pytest.raises(TypeError):
        fstqcodec.encode(tensors, fisher=[1.0], budget=100)


# ------------------------------------------------------------------------------------------
# Non-finite input and other bad input


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "options", [{}, {"bits": 4}, {"codebook": "nf4"}, {"budget": fstqcodec.Budget(bits_per_param=2)}], ids=["lossless", "bits", "nf4", "budget"]
)
def test_nonfinite_input_raises_naming_tensor(bad, options):
    tensors = {"fine": np.ones(100, np.float32), "layer.7.lora_B": np.ones(100, np.float16)}
    tensors["layer.7.lora_B"][42] = bad
    with pytest.raises(fstqcodec.EncodeError) as info:
        fstqcodec.encode(tensors, **options)
    assert info.value.tensor == "layer.7.lora_B"
    assert "layer.7.lora_B" in str(info.value)


def test_nonfinite_zero_sanitises():
    x = np.arange(10, dtype=np.float64)
    x[[1, 4, 7]] = [np.nan, np.inf, -np.inf]
    decoded = fstqcodec.decode(fstqcodec.encode({"x": x}, nonfinite="zero"))["x"]
    np.testing.assert_array_equal(decoded, [0, 0, 2, 3, 0, 5, 6, 0, 8, 9])
    decoded = fstqcodec.decode(fstqcodec.encode({"x": x}, nonfinite="zero", bits=8))["x"]
    assert decoded[1] == decoded[4] == decoded[7] == 0 and np.all(np.isfinite(decoded))


@pytest.mark.parametrize(
    "tensors, error",
    [
        ([np.ones(3)], TypeError),
        ({"i": np.arange(4)}, fstqcodec.EncodeError),
        ({"c": np.ones(4, np.complex64)}, fstqcodec.EncodeError),
        ({"": np.ones(4, np.float32)}, fstqcodec.EncodeError),
        ({3: np.ones(4, np.float32)}, fstqcodec.EncodeError),
    ],
)
def test_bad_tensors(tensors, error):
    with pytest.raises(error):
        fstqcodec.encode(tensors)


@pytest.mark.parametrize(
    "options, error",
    [
        ({"block_size": 0}, ValueError),
        ({"block_size": 65537}, ValueError),
        ({"rounding": "up"}, ValueError),
        ({"nonfinite": "ignore"}, ValueError),
        ({"bits": 1}, ValueError),
        ({"bits": 9}, ValueError),
        ({"bits": True}, ValueError),
        ({"bits": 4, "budget": 1000}, TypeError),
        ({"bits": 4, "codebook": "nf4"}, TypeError),
        ({"codebook": "nf3"}, ValueError),
        ({"codebook": [0.0, 1.0, 0.5]}, ValueError),
        ({"budget": "1kB"}, TypeError),
        ({"meta": [1]}, TypeError),
    ],
)
def test_bad_options(options, error):
    with pytest.raises(error):
        fstqcodec.encode({"x": np.ones(8, np.float32)}, **options)


# ------------------------------------------------------------------------------------------
# Fixed-rate modes


def fixed_rate_bound(x: np.ndarray, block_size: int, step_fraction: float, top: float) -> np.ndarray:
    """Per element: ``step_fraction`` of the block's scale (absmax / top, rounded up to bfloat16)."""
    flat = np.abs(x.astype(np.float64)).reshape(-1)
    absmax = np.pad(flat, (0, (-flat.size) % block_size)).reshape(-1, block_size).max(axis=1)
    scale = absmax / top * (1 + 2**-7)
    relative = 2**-10 if x.dtype == np.float16 else 2**-22
    return np.repeat(scale * step_fraction, block_size)[: flat.size] + relative * flat + 1e-30


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fixed_bits_within_half_step(bits, dtype):
    rng = np.random.default_rng(bits)
    x = (lora_update(rng, (40, 64)) * 1000).astype(dtype)
    x[0, :3] = [0.0, -0.0, 0.0]
    message = fstqcodec.encode({"x": x}, bits=bits)
    decoded = fstqcodec.decode(message)["x"]
    assert decoded.dtype == x.dtype and decoded.shape == x.shape
    error = np.abs(decoded.astype(np.float64) - x.astype(np.float64)).reshape(-1)
    assert np.all(error <= fixed_rate_bound(x, 64, 0.5, 2 ** (bits - 1) - 1))
    report = fstqcodec.inspect(message)
    assert report["width_histogram"] == {bits: 40}
    # Fixed-length codes: about bits per element plus a 16-bit scale per block.
    assert 8 * len(message) / x.size < bits + 16 / 64 + 2


def test_fixed_bits_error_falls_with_width():
    x = lora_update(np.random.default_rng(13), (64, 64))
    errors = [weighted_error({"x": x}, fstqcodec.decode(fstqcodec.encode({"x": x}, bits=bits))) for bits in range(2, 9)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fixed_bits_stochastic_within_one_step(bits):
    x = lora_update(np.random.default_rng(14), (32, 64))
    decoded = fstqcodec.decode(fstqcodec.encode({"x": x}, bits=bits, rounding="stochastic", seed=3))["x"]
    error = np.abs(decoded.astype(np.float64) - x).reshape(-1)
    assert np.all(error <= fixed_rate_bound(x, 64, 1.0, 2 ** (bits - 1) - 1))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nf4_within_half_gap(dtype):
    x = lora_update(np.random.default_rng(15), (48, 64)).astype(dtype)
    message = fstqcodec.encode({"x": x}, codebook="nf4", block_size=64)
    decoded = fstqcodec.decode(message)["x"]
    error = np.abs(decoded.astype(np.float64) - x.astype(np.float64)).reshape(-1)
    assert np.all(error <= fixed_rate_bound(x, 64, NF4_HALF_GAP, 1.0))
    report = fstqcodec.inspect(message)
    assert report["width_histogram"] == {4: 48}
    # The levels travel in the message: every decoded value is an NF4 level times its block's scale.
    if dtype != np.float16:
        levels = NF4
        blocks = decoded.reshape(-1, 64).astype(np.float64)
        scales = np.abs(blocks).max(axis=1, keepdims=True)
        normalized = blocks / scales
        assert np.all(np.min(np.abs(normalized[..., None] - levels[None, None, :]), axis=-1) < 1e-6)


def test_custom_codebook():
    levels = np.array([-1.0, -0.25, 0.25, 1.0], np.float32)
    x = lora_update(np.random.default_rng(16), (16, 64))
    decoded = fstqcodec.decode(fstqcodec.encode({"x": x}, codebook=levels))["x"]
    error = np.abs(decoded.astype(np.float64) - x).reshape(-1)
    assert np.all(error <= fixed_rate_bound(x, 64, 0.375, 1.0))


@pytest.mark.parametrize("count", [128, 256])
def test_codebook_of_up_to_256_levels_round_trips(count):
    # Level indices above 127 do not fit an int8: 256 levels once failed with a bare ValueError.
    levels = np.linspace(-1, 1, count)
    x = lora_update(np.random.default_rng(count), (32, 64))
    message = fstqcodec.encode({"x": x}, codebook=levels)
    assert fstqcodec.inspect(message)["width_histogram"] == {int(np.log2(count)): 32}
    decoded = fstqcodec.decode(message)["x"]
    error = np.abs(decoded.astype(np.float64) - x).reshape(-1)
    assert np.all(error <= fixed_rate_bound(x, 64, 1 / (count - 1), 1.0))
    # Every decoded value is a level times its block's scale (absmax rounded up to bfloat16),
    # and the levels at both ends, indices 0 and count - 1, are used.
    scale_bits = to_bf16_bits(np.abs(x).reshape(-1, 64).max(axis=1).astype(np.float32), mode="up")
    normalized = decoded.reshape(-1, 64).astype(np.float64) / from_bf16_bits(scale_bits).astype(np.float64)[:, None]
    index = np.argmin(np.abs(normalized[..., None] - levels.astype(np.float32)[None, None, :]), axis=-1)
    np.testing.assert_allclose(normalized, levels.astype(np.float32)[index], rtol=0, atol=1e-6)
    assert index.max() == count - 1 and index.min() == 0
    assert fstqcodec.open(message).dtypes == {"x": "float32"}


@pytest.mark.parametrize("options", [{"bits": 2}, {"bits": 8}, {"codebook": "nf4"}], ids=["bits2", "bits8", "nf4"])
def test_fixed_rate_float16_near_max(options):
    x = np.array([65504, -65504, 1, 0.5] * 16, np.float16)
    decoded = fstqcodec.decode(fstqcodec.encode({"x": x}, **options))["x"]
    assert np.all(np.isfinite(decoded))
    # The scale is rounded down to stay finite (spec section 19): the top values clip, by at most
    # 2**-7 of their magnitude (found by fuzz_roundtrip: a lone -65472 decoded to -65024).
    np.testing.assert_allclose(decoded[:2], x[:2], rtol=2.0**-7)
    lone = np.array([-65472], np.float16)
    decoded = fstqcodec.decode(fstqcodec.encode({"x": lone}, block_size=1, **options))["x"]
    assert np.isfinite(decoded[0]) and abs(float(decoded[0]) - float(lone[0])) <= 65472 * 2.0**-7


def test_fixed_rate_float32_near_max():
    x = np.full(100, 3.4e38, np.float32)
    decoded = fstqcodec.decode(fstqcodec.encode({"x": x}, bits=4))["x"]
    np.testing.assert_allclose(decoded, x, rtol=0.2)


@pytest.mark.parametrize("options", [{"bits": 4}, {"codebook": "nf4"}, {"budget": fstqcodec.Budget(bits_per_param=2)}], ids=["bits", "nf4", "budget"])
def test_float64_beyond_float32_range(options):
    # Lossy coding works in float32: such values must be refused by name, not dropped or overflowed.
    x = np.tile(np.array([1e300, -1e300, 1.0, 2.0]), 1600)
    try:
        message = fstqcodec.encode({"small": np.ones(3), "huge": x}, **options)
    except fstqcodec.EncodeError as exc:
        assert exc.tensor == "huge" and "huge" in str(exc)
        return
    decoded = fstqcodec.decode(message)["huge"]
    # Dropping every block costs 1e600 per element: any quantized block is far better.
    assert weighted_error({"x": x}, {"x": decoded}) < 0.5 * weighted_error({"x": x}, {"x": np.zeros_like(x)})
    assert fstqcodec.decode(fstqcodec.encode({"huge": x}))["huge"].tobytes() == x.tobytes()  # lossless still works


# ------------------------------------------------------------------------------------------
# Error feedback


def test_error_feedback_residual_is_corrected_minus_decoded():
    rng = np.random.default_rng(17)
    ef = fstqcodec.ErrorFeedback()
    budget = fstqcodec.Budget(bits_per_param=1)
    update1 = {"w": lora_update(rng, (64, 64)), "h": rng.standard_normal((8, 8)).astype(np.float16)}
    message1 = ef.encode(update1, budget=budget)
    decoded1 = fstqcodec.decode(message1)
    for name in update1:
        expected = update1[name].astype(np.float32) - decoded1[name].astype(np.float32)
        np.testing.assert_array_equal(ef.residual[name], expected)
    assert any(np.any(r != 0) for r in ef.residual.values()), "a 1-bit message must lose something"
    update2 = {"w": lora_update(rng, (64, 64)), "h": rng.standard_normal((8, 8)).astype(np.float16)}
    corrected = {name: update2[name].astype(np.float32) + ef.residual[name] for name in update2}
    message2 = ef.encode(update2, budget=budget)
    assert message2 == fstqcodec.encode(corrected, budget=budget), "the message must carry update + residual"
    decoded2 = fstqcodec.decode(message2)
    for name in update2:
        np.testing.assert_array_equal(ef.residual[name], corrected[name] - decoded2[name])


def test_error_feedback_message_lost_keeps_everything():
    rng = np.random.default_rng(18)
    ef = fstqcodec.ErrorFeedback()
    budget = fstqcodec.Budget(bits_per_param=1)
    first = {"w": lora_update(rng, (32, 64))}
    ef.encode(first, budget=budget)
    residual = ef.residual["w"].copy()
    second = {"w": lora_update(rng, (32, 64))}
    ef.encode(second, budget=budget)
    ef.message_lost()
    np.testing.assert_array_equal(ef.residual["w"], second["w"] + residual)
    ef.message_lost()  # a second call changes nothing
    np.testing.assert_array_equal(ef.residual["w"], second["w"] + residual)


def test_error_feedback_sum_of_messages_tracks_sum_of_updates():
    rng = np.random.default_rng(19)
    budget = fstqcodec.Budget(bits_per_param=1)
    ef = fstqcodec.ErrorFeedback()
    direction = lora_update(rng, (64, 64))  # a consistent drift, the case where plain compression loses most
    sent = np.zeros_like(direction, np.float64)
    sent_without = np.zeros_like(direction, np.float64)
    total = np.zeros_like(direction, np.float64)
    rounds = 30
    for round_index in range(rounds):
        update = {"w": (direction + 0.3 * lora_update(rng, (64, 64))).astype(np.float32)}
        total += update["w"]
        message = ef.encode(update, budget=budget)
        if round_index == 7:  # a lost message: it must come back later, not vanish
            ef.message_lost()
        else:
            sent += fstqcodec.decode(message)["w"]
        sent_without += fstqcodec.decode(fstqcodec.encode(update, budget=budget))["w"]
    # Telescoping: what was delivered plus what is still held is exactly what was sent in.
    np.testing.assert_allclose(sent + ef.residual["w"], total, rtol=0, atol=1e-4 * np.abs(total).max())
    error_with = np.linalg.norm(total - sent)
    error_without = np.linalg.norm(total - sent_without)
    assert error_with < 0.35 * error_without, (error_with, error_without)
    # The residual stays bounded (a few rounds' worth, the lost one included), not growing with
    # the rounds as the error without feedback does (about 30 rounds' worth here).
    assert np.linalg.norm(ef.residual["w"]) < 5 * np.linalg.norm(direction)


def test_error_feedback_encode_error_leaves_residual():
    ef = fstqcodec.ErrorFeedback()
    budget = fstqcodec.Budget(bits_per_param=1)
    ef.encode({"w": np.linspace(-1, 1, 4096, dtype=np.float32)}, budget=budget)
    before = ef.residual["w"].copy()
    assert np.any(before != 0)
    bad = np.ones(4096, np.float32)
    bad[3] = np.nan
    with pytest.raises(fstqcodec.EncodeError):
        ef.encode({"w": bad}, budget=budget)
    np.testing.assert_array_equal(ef.residual["w"], before)
    with pytest.raises(ValueError):
        ef.encode({"w": np.ones(10, np.float32)}, budget=budget)  # shape changed
    ef.reset()
    assert ef.residual == {}
    ef.encode({"w": np.ones(10, np.float32)})


@given(
    rounds=st.lists(
        st.tuples(
            st.sampled_from([1e-6, 1e-3, 1.0, 1e3]),  # the round's update scale
            st.booleans(),  # the message was lost
            st.sampled_from([{"bits": 2}, {"bits": 8}, {"codebook": "nf4"}, {"budget": fstqcodec.Budget(bits_per_param=2)},
                             {"budget": fstqcodec.Budget(bits_per_param=0.5)}, {"budget": fstqcodec.Budget(bits_per_param=2), "rounding": "stochastic"}]),
        ),
        min_size=1,
        max_size=6,
    ),
    seed=st.integers(0, 2**16),
)
def test_error_feedback_conserves_the_sum_property(rounds, seed):
    """Whatever the compression and losses: delivered + residual == sum of updates (nothing vanishes)."""
    rng = np.random.default_rng(seed)
    ef = fstqcodec.ErrorFeedback()
    delivered = np.zeros(4096)
    total = np.zeros(4096)
    for scale, lost, options in rounds:
        update = (rng.standard_normal(4096) * scale).astype(np.float32)
        total += update
        message = ef.encode({"w": update}, seed=seed, **options)
        if lost:
            ef.message_lost()
        else:
            delivered += fstqcodec.decode(message)["w"]
        np.testing.assert_allclose(delivered + ef.residual["w"], total, rtol=0, atol=1e-5 * np.abs(total).max() * len(rounds) + 1e-30)


def test_error_feedback_keeps_residual_of_absent_tensor():
    ef = fstqcodec.ErrorFeedback()
    budget = fstqcodec.Budget(bits_per_param=2)
    a = np.random.default_rng(25).standard_normal(4096).astype(np.float32)
    ef.encode({"a": a, "b": a.copy()}, budget=budget)
    held = ef.residual["b"].copy()
    assert np.any(held != 0)
    ef.encode({"a": a}, budget=budget)  # this round's update does not touch "b"
    assert "b" in ef.residual, "the error owed on 'b' was thrown away"
    np.testing.assert_array_equal(ef.residual["b"], held)


def test_error_feedback_nonfinite_zero_keeps_residual_finite():
    ef = fstqcodec.ErrorFeedback()
    x = np.random.default_rng(26).standard_normal(4096).astype(np.float32)
    x[[0, 5]] = [np.nan, np.inf]
    ef.encode({"a": x}, bits=4, nonfinite="zero")
    assert np.all(np.isfinite(ef.residual["a"]))
    # The next, clean update must encode under the default nonfinite='error'.
    ef.encode({"a": np.ones(4096, np.float32)}, bits=4)


# ------------------------------------------------------------------------------------------
# inspect


def test_inspect_fields():
    rng = np.random.default_rng(20)
    tensors = {"a": lora_update(rng, (64, 64)), "b": rng.standard_normal((3, 5)).astype(np.float16), "z": np.zeros(64, np.float32)}
    message = fstqcodec.encode(tensors, meta={"round": 7, "client": "c1"})
    report = fstqcodec.inspect(message)
    assert report["version"] == "1.0"
    assert report["size"] == len(message)
    assert report["framing_size"] + report["header_size"] + sum(s["stored"] for s in report["sections"]) == len(message)
    assert [s["kind"] for s in report["sections"]][:2] == ["blocks", "scales"]
    assert all(s["kind"] == "codes" for s in report["sections"][2:])
    assert len(report["sections"]) == 2 + len(report["contexts"])
    assert report["tensors"] == [
        {"name": "a", "dtype": "float32", "shape": [64, 64], "block_size": 64, "blocks": 64},
        {"name": "b", "dtype": "float16", "shape": [3, 5], "block_size": 64, "blocks": 1},
        {"name": "z", "dtype": "float32", "shape": [64], "block_size": 64, "blocks": 1},
    ]
    # Lossless: exact raw blocks at each tensor's width; the all-zero block costs nothing.
    assert report["width_histogram"] == {0: 1, 16: 1, 32: 64}
    assert report["elements"] == 64 * 64 + 15 + 64
    assert report["bits_per_element"] == pytest.approx(8 * len(message) / report["elements"])
    assert report["meta"] == {"round": 7, "client": "c1"}


def test_inspect_budget_message_histogram():
    x = {"x": lora_update(np.random.default_rng(21), (256, 64))}
    message = fstqcodec.encode(x, budget=fstqcodec.Budget(bits_per_param=1))
    report = fstqcodec.inspect(message)
    assert sum(report["width_histogram"].values()) == 256
    assert set(report["width_histogram"]) <= {0, 1, 2, 3, 4, 5, 6, 7, 8, 16, 32}
    assert report["bits_per_element"] <= 1


def test_inspect_does_not_decode_codes():
    # A packed codes section with a padding bit set: decode refuses it, inspect never reads it.
    x = {"x": np.linspace(-1, 1, 63, dtype=np.float32)}
    header, body = split(fstqcodec.encode(x, bits=3, compress_header=False))
    assert header["sections"][-1][2] == "none"
    body = bytearray(body)
    body[-1] |= 0x80  # 63 * 3 = 189 bits: the last 3 bits of the last byte are padding
    message = reframe(header, bytes(body))
    with pytest.raises(fstqcodec.BadFormatError):
        fstqcodec.decode(message)
    assert fstqcodec.inspect(message)["tensors"][0]["name"] == "x"


@pytest.mark.parametrize("meta", [{"a": {"b": 1}}, {"a": [1, 2]}, {1: 2}], ids=["nested-map", "array", "int-key"])
def test_meta_encode_refuses_what_decode_refuses(meta):
    try:
        message = fstqcodec.encode({"x": np.ones(4, np.float32)}, meta=meta)
    except (TypeError, ValueError):
        return  # refused at encode time: fine
    assert fstqcodec.inspect(message)["meta"] == meta  # else it must decode


def test_meta_scalars_round_trip():
    meta = {"round": 3, "client": "c-7", "lr": 0.5, "ok": True, "none": None, "raw": b"\x00\xff", "big": 2**63}
    message = fstqcodec.encode({"x": np.ones(4, np.float32)}, meta=meta)
    assert fstqcodec.inspect(message)["meta"] == meta


@pytest.mark.parametrize("options", [{}, {"bits": 4}, {"budget": 300}], ids=["lossless", "bits", "budget"])
def test_decoded_arrays_are_independent_and_writeable(options):
    tensors = {"a": np.arange(256, dtype=np.float32), "b": np.linspace(-1, 1, 64, dtype=np.float16)}
    message = fstqcodec.encode(tensors, **options)
    first = fstqcodec.decode(message)
    expected = {name: array.copy() for name, array in first.items()}
    for array in first.values():
        assert array.flags.writeable
        array[...] = 7
    second = fstqcodec.decode(message)
    for name in tensors:
        assert bits_of(second[name]) == bits_of(expected[name]), "decoding twice must not share buffers"


def test_limits_arguments():
    with pytest.raises(ValueError):
        fstqcodec.Limits(max_tensors=0)
    with pytest.raises(TypeError):
        fstqcodec.Limits(max_tensors=1.5)
    with pytest.raises(TypeError):
        fstqcodec.decode(fstqcodec.encode({}), limits={"max_tensors": 4})
    with pytest.raises(TypeError):
        fstqcodec.decode("not bytes")
    message = fstqcodec.encode({"x": np.ones(10, np.float32)})
    assert fstqcodec.decode(bytearray(message))["x"].shape == (10,)
    assert fstqcodec.decode(memoryview(message))["x"].shape == (10,)


@pytest.mark.parametrize(
    "tensors",
    [
        {"x" * 1100: np.ones(2, np.float32)},
        {"a\ud800": np.ones(2, np.float32)},
        {"a": np.ones((1,) * 33, np.float32)},
    ],
    ids=["long-name", "surrogate", "33-dims"],
)
def test_encoder_refuses_what_the_default_decoder_refuses(tensors):
    with pytest.raises(fstqcodec.EncodeError):
        fstqcodec.encode(tensors)


@pytest.mark.parametrize("weight", ["1", True, b"\x01"])
def test_fisher_weights_must_be_numbers(weight):
    with pytest.raises(fstqcodec.EncodeError):
        fstqcodec.encode({"a": np.ones(100, np.float32)}, fisher={"a": weight}, budget=100)


def test_numpy_integer_block_size():
    tensors = {"a": np.arange(100, dtype=np.float32)}
    assert fstqcodec.encode(tensors, block_size=np.int64(32)) == fstqcodec.encode(tensors, block_size=32)


def test_fisher_power_reweights_the_importance():
    rng = np.random.default_rng(3)
    x = {"a": rng.standard_normal(4096).astype(np.float32), "b": rng.standard_normal((64, 32)).astype(np.float32)}
    fisher = {"a": rng.gamma(0.3, size=4096), "b": 5.0}
    budget = fstqcodec.Budget(bits_per_param=1)
    # power 0 is uniform importance; power p on F is power 1 on F**p.
    assert fstqcodec.encode(x, fisher=fisher, fisher_power=0, budget=budget) == fstqcodec.encode(x, budget=budget)
    squared = {"a": fisher["a"] ** 2, "b": 25.0}
    assert fstqcodec.encode(x, fisher=fisher, fisher_power=2, budget=budget) == fstqcodec.encode(x, fisher=squared, budget=budget)
    assert fstqcodec.encode(x, fisher=fisher, fisher_power=0.5, budget=budget) != fstqcodec.encode(x, fisher=fisher, budget=budget)


@pytest.mark.parametrize("power", [-1, float("nan"), float("inf"), True, "1"])
def test_fisher_power_must_be_a_finite_non_negative_number(power):
    with pytest.raises(ValueError, match="fisher_power"):
        fstqcodec.encode({"a": np.ones(64, np.float32)}, fisher={"a": 1.0}, fisher_power=power, budget=64)
