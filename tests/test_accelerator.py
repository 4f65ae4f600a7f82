"""The C accelerator's encoder passes give exactly what the numpy reference gives.

Each test runs the same thing twice, with the accelerator (fstqcodec._speedups) and with
``rans._speedups`` set to None, which sends every pass to its numpy reference, and asserts equal
arrays or equal message bytes. Inputs include the benchmark's (LoRA-shaped Gaussian tensors with
per-element Fisher at powers 1 and 0.5, large enough for the measured rate model and sign blocks)
and the captured real updates.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import fstqcodec
from fstqcodec import encoder
from fstqcodec.policy import allocation
from fstqcodec.policy.fisher import normalize_fisher
from fstqcodec.stages import rans

from common import load_real_update


pytestmark = pytest.mark.skipif(rans._speedups is None, reason="the C accelerator is not built")


def _both(function, monkeypatch):
    """(result with the accelerator, result with the numpy reference)."""
    native = function()
    with monkeypatch.context() as patch:
        patch.setattr(rans, "_speedups", None)
        reference = function()
    return native, reference


def _lora(seed: int, pairs: int = 4, width: int = 1024) -> tuple[dict, dict]:
    """LoRA-shaped tensors (rank 16) with per-tensor scales, and a Fisher whose per-tensor scales
    differ by e**N(0, 1): the throughput benchmark's input, smaller."""
    rng = np.random.default_rng(seed)
    tensors, fisher = {}, {}
    for layer in range(pairs):
        scale = float(np.exp(rng.normal(-6, 0.5)))
        for name, shape, factor in (("A", (16, width), 1.0), ("B", (width, 16), 0.3)):
            key = f"layers.{layer}.lora_{name}"
            tensors[key] = (rng.standard_normal(shape) * scale * factor).astype(np.float32)
            fisher[key] = (rng.standard_normal(shape).astype(np.float32) * np.float32(np.exp(rng.normal()))) ** 2
    return tensors, fisher


def _ragged(seed: int) -> tuple[dict, dict]:
    """Sizes that are not multiples of the block size, three dtypes, float64 Fisher of extreme scale."""
    rng = np.random.default_rng(seed)
    tensors = {
        "a": (rng.standard_normal((40, 1000)) * np.exp(3 * rng.standard_normal((40, 1)))).astype(np.float32),
        "b": rng.standard_normal(3333).astype(np.float16),
        "c": rng.standard_normal((70, 90)) * 1e-3,
        "zero": np.zeros(130, np.float32),
    }
    fisher = {
        "a": rng.random((40, 1000)).astype(np.float32),
        "b": 2.5,
        "c": rng.random((70, 90)) * 1e250,
        "zero": np.zeros(130),
    }
    return tensors, fisher


INPUTS = {
    "lora": lambda: _lora(1),
    "bbc": lambda: load_real_update("real_update_bbc.npz"),
    "drugreview": lambda: load_real_update("real_update_drugreview.npz"),
    "ragged": lambda: _ragged(2),
}


@pytest.mark.parametrize("block_size", [1, 16, 64, 100, 256])
@pytest.mark.parametrize("power", [1.0, 0.5, 0.3, 0.0])
def test_block_statistics_are_identical(block_size, power, monkeypatch):
    tensors, fisher = _ragged(3)
    source = encoder.Input(tensors, block_size, "error")
    weights = normalize_fisher(fisher, source.names, {s.name: s.shape for s in source.specs}, power)
    native, reference = _both(lambda: encoder.budget.block_stats(source, weights, sign=True), monkeypatch)
    for field in ("weight", "mean_square", "weighted_energy", "absmax", "mean_abs", "sign_distortion", "shared_sign_distortion"):
        assert np.array_equal(getattr(native, field), getattr(reference, field)), field


def _extreme_float32(seed: int) -> tuple[dict, dict]:
    """float32 values and a float32 Fisher spanning float32's whole range (subnormals to 3e38,
    -0.0, exact zeros), a ragged tail, a scalar weight and an empty tensor."""
    rng = np.random.default_rng(seed)
    fisher_a = (rng.random(5000) * np.exp2(rng.integers(-149, 128, 5000).astype(np.float64))).astype(np.float32)
    fisher_a[:3] = [np.float32(3.4e38), np.float32(1e-45), np.float32(-0.0)]
    tensors = {
        "a": (rng.standard_normal(5000) * np.exp2(rng.integers(-60, 60, 5000))).astype(np.float32),
        "b": rng.standard_normal((30, 7)).astype(np.float32),
        "s": rng.standard_normal(300).astype(np.float32),
        "empty": np.zeros(0, np.float32),
    }
    fisher = {"a": fisher_a, "b": rng.random((30, 7)).astype(np.float32) * np.float32(1e-30), "s": 1e37,
              "empty": np.zeros(0, np.float32)}
    return tensors, fisher


@pytest.mark.parametrize("which", ["lora", "ragged", "extreme"])
@pytest.mark.parametrize("block_size", [16, 64, 100])
@pytest.mark.parametrize("power", [1.0, 0.5])
def test_deferred_fisher_checks_give_the_same_statistics(which, block_size, power, monkeypatch):
    # The checks and largest value of float32 Fisher arrays taken in the block-sum pass, the sums
    # divided by the largest weight afterwards: the same bits as checking and scaling first.
    tensors, fisher = _extreme_float32(3) if which == "extreme" else INPUTS[which]()
    source = encoder.Input(tensors, block_size, "error")
    shapes = {s.name: s.shape for s in source.specs}
    eager = normalize_fisher(fisher, source.names, shapes, power)

    def stats(defer):
        weights = normalize_fisher(fisher, source.names, shapes, power, defer=defer)
        assert not defer or weights.unchecked  # the deferred path is the one taken
        return encoder.budget.block_stats(source, weights, sign=True)

    expected = encoder.budget.block_stats(source, eager, sign=True)
    native, reference = _both(lambda: stats(True), monkeypatch)
    for field in ("weight", "mean_square", "weighted_energy", "absmax", "mean_abs", "sign_distortion", "shared_sign_distortion"):
        for got in (native, reference):
            assert np.array_equal(getattr(got, field), getattr(expected, field)), field


@pytest.mark.parametrize("which", ["lora", "ragged"])
@pytest.mark.parametrize("with_fisher", [True, False])
def test_block_sums_build_the_matrix(which, with_fisher, monkeypatch):
    # The block-sum pass copies the tensors into the encoder's matrix as it reads them: the same
    # matrix as concatenating them (padding zero), and the same statistics, C and numpy.
    tensors, fisher = INPUTS[which]()
    expected_source = encoder.Input(tensors, 64, "error")
    expected = expected_source.matrix.copy()

    def sums():
        source = encoder.Input(tensors, 64, "error")
        assert source.matrix_rows_to_fill() is not None  # not built yet: the pass builds it
        shapes = {s.name: s.shape for s in source.specs}
        weights = normalize_fisher(fisher if with_fisher else None, source.names, shapes, 1.0, defer=True)
        stats = encoder.budget.block_stats(source, weights, sign=True)
        assert source.matrix_rows_to_fill() is None
        return source.matrix, stats

    (native, native_stats), (reference, reference_stats) = _both(sums, monkeypatch)
    assert np.array_equal(native.view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(reference.view(np.uint32), expected.view(np.uint32))
    for field in ("weight", "mean_square", "weighted_energy", "absmax", "sign_distortion"):
        assert np.array_equal(getattr(native_stats, field), getattr(reference_stats, field)), field


@pytest.mark.parametrize("budget", [fstqcodec.Budget(bits_per_param=2), fstqcodec.Budget(max_bytes=10),
                                    fstqcodec.Budget(bits_per_param=32)], ids=["budget", "too-small", "lossless"])
@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_deferred_fisher_checks_name_the_tensor(budget, bad, monkeypatch):
    # Every budgeted path reports a bad float32 Fisher as the up-front check did: the block sums
    # (C and numpy), and the paths that never sum the weights (the lossless shortcut, a budget
    # below the smallest message).
    tensors = {"a": np.ones((4, 8), np.float32), "b": np.ones(300, np.float32), "c": np.ones(3, np.float32)}
    fisher = {"a": np.ones((4, 8), np.float32), "b": np.ones(300, np.float32), "c": np.ones(3, np.float32)}
    fisher["b"][200] = bad

    def refused():
        with pytest.raises(fstqcodec.EncodeError) as info:
            fstqcodec.encode(tensors, fisher=fisher, budget=budget)
        return info.value.tensor, str(info.value)

    native, reference = _both(refused, monkeypatch)
    assert native == reference == ("b", "fisher for 'b' holds negative or non-finite weights")


def test_sign_errors_match_numpy():
    # block_stats' sign-block errors in one C pass: numpy's operations, including its maximum's
    # NaN and -0.0 cases, infinities, and the blocks near the dtype's limit.
    rng = np.random.default_rng(5)
    count = 4000
    energy, weighted_abs, weight_sum, scale = (rng.standard_normal(count) * 1e3 for _ in range(4))
    energy[:6] = [np.inf, np.nan, -0.0, 0.0, np.inf, 1e308]
    weight_sum[:6] = [np.inf, 1.0, 0.0, -0.0, 1.0, 1e308]
    scale[:6] = [1.0, 1.0, 0.0, 0.0, np.inf, 1e300]
    near_limit = rng.random(count) < 0.1
    with np.errstate(all="ignore"):
        expected = np.where(near_limit, np.inf, np.maximum(energy - 2 * scale * weighted_abs + scale * scale * weight_sum, 0.0))
    got = np.empty(count)
    rans._speedups.sign_errors(energy, weighted_abs, weight_sum, scale, near_limit.view(np.uint8), got)
    assert np.array_equal(got.view(np.uint64), expected.view(np.uint64))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fisher_checks_agree(dtype, monkeypatch):
    shapes = {"w": (5,)}
    for values, ok in (([0.0, 1.0, 3.5, 2.0, 0.0], True), ([-0.0, 1.0, 2.0, 0.0, 0.0], True),
                       ([1.0, -1e-30, 2.0, 0.0, 0.0], False), ([1.0, np.nan, 2.0, 0.0, 0.0], False),
                       ([1.0, np.inf, 2.0, 0.0, 0.0], False), ([1.0, -np.inf, 2.0, 0.0, 0.0], False)):
        fisher = {"w": np.array(values, dtype=dtype)}

        def normalize():
            try:
                return normalize_fisher(fisher, ["w"], shapes)["w"].top
            except fstqcodec.EncodeError:
                return "refused"

        native, reference = _both(normalize, monkeypatch)
        assert native == reference
        assert (native != "refused") == ok


@pytest.mark.parametrize("which", sorted(INPUTS))
@pytest.mark.parametrize("power", [1.0, 0.5])
def test_allocation_evaluations_are_identical(which, power, monkeypatch):
    tensors, fisher = INPUTS[which]()
    source = encoder.Input(tensors, 64, "error")
    weights = normalize_fisher(fisher, source.names, {s.name: s.shape for s in source.specs}, power)
    stats = encoder.budget.block_stats(source, weights, sign=True)
    terms = allocation.evaluator(stats)
    positive = stats.weight * stats.mean_square
    positive = positive[positive > 0]
    # From the richest choice (every step capped) to the poorest, as the search visits them.
    for log2_lam in np.linspace(np.log2(positive.min()) - 50, np.log2(positive.max()) + 20, 25):
        native, reference = _both(lambda: terms(float(2.0**log2_lam)), monkeypatch)
        for field in ("mode", "log2_r", "tau", "bits", "distortion"):
            assert np.array_equal(getattr(native, field), getattr(reference, field)), (log2_lam, field)
        # The search's bits-only evaluations give the full evaluation's total.
        total, total_reference = _both(lambda: allocation.evaluator(stats).total(float(2.0**log2_lam)), monkeypatch)
        assert total == total_reference == native.total


def _digest(tensors, **options) -> str:
    return hashlib.sha256(fstqcodec.encode(tensors, **options)).hexdigest()


@pytest.mark.parametrize("which", sorted(INPUTS))
@pytest.mark.parametrize(
    "options",
    [
        {"fisher_power": 1.0, "bits_per_param": 1},
        {"fisher_power": 0.5, "bits_per_param": 1},
        {"fisher_power": 0.5, "bits_per_param": 0.25},
        {"fisher_power": 1.0, "bits_per_param": 4},
        {"fisher_power": None, "bits_per_param": 1},
        {"fisher_power": None, "bits_per_param": 2, "rounding": "stochastic"},
        {"fisher_power": None, "bits": 4},
        {"fisher_power": None},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_messages_are_identical(which, options, monkeypatch):
    tensors, fisher = INPUTS[which]()
    kwargs = {k: v for k, v in options.items() if k not in ("fisher_power", "bits_per_param")}
    if options["fisher_power"] is not None:
        kwargs.update(fisher=fisher, fisher_power=options["fisher_power"])
    if "bits_per_param" in options:
        kwargs["budget"] = fstqcodec.Budget(bits_per_param=options["bits_per_param"])
    native, reference = _both(lambda: _digest(tensors, **kwargs), monkeypatch)
    assert native == reference


@pytest.mark.parametrize("power", [1.0, None])
def test_large_messages_are_identical(power, monkeypatch):
    """Enough elements (3M) that the code statistics sample every other row, so the size loop
    sizes plans whose other codes are filled only for the message (Plan.pending)."""
    tensors, fisher = _lora(7, pairs=24, width=4096)
    kwargs = {"budget": fstqcodec.Budget(bits_per_param=1)}
    if power is not None:
        kwargs.update(fisher=fisher, fisher_power=power)
    native, reference = _both(lambda: _digest(tensors, **kwargs), monkeypatch)
    assert native == reference


@pytest.mark.parametrize("which", ["bbc", "lora"])
def test_rate_model_tables_are_identical(which, monkeypatch):
    tensors, _ = INPUTS[which]()
    source = encoder.Input(tensors, 64, "error")
    stats = encoder.budget.block_stats(source, {n: 1.0 for n in source.names})
    native, reference = _both(lambda: allocation.empirical_tables(stats.shape_sample), monkeypatch)
    assert native.keys() == reference.keys()
    for key in native:
        assert np.array_equal(native[key], reference[key]), key


def test_threads_give_the_same_bytes():
    tensors, fisher = _lora(4)
    budget = fstqcodec.Budget(bits_per_param=1)
    for options in ({"fisher": fisher, "budget": budget}, {"budget": budget}, {"bits": 3}, {}):
        single = fstqcodec.encode(tensors, **options)
        assert fstqcodec.encode(tensors, threads=3, **options) == single
        decoded, threaded = fstqcodec.decode(single), fstqcodec.decode(single, threads=3)
        assert all(np.array_equal(decoded[name], threaded[name]) for name in decoded)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_threads_are_refused(threads):
    with pytest.raises(ValueError, match="threads"):
        fstqcodec.encode({"w": np.ones(4, np.float32)}, threads=threads)
    with pytest.raises(ValueError, match="threads"):
        fstqcodec.decode(fstqcodec.encode({"w": np.ones(4, np.float32)}), threads=threads)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_nonfinite_values_are_found_by_both(dtype, bad, monkeypatch):
    values = np.linspace(-1, 1, 5000).astype(dtype)
    values[4321] = bad

    def outcome():
        try:
            fstqcodec.encode({"w": values})
        except fstqcodec.EncodeError as error:
            refused = str(error)
        return refused, hashlib.sha256(fstqcodec.encode({"w": values}, nonfinite="zero")).hexdigest()

    native, reference = _both(outcome, monkeypatch)
    assert native == reference and "non-finite" in native[0]


@pytest.mark.parametrize("which", sorted(INPUTS))
@pytest.mark.parametrize("options", [{"budget": 1.0}, {"budget": 0.3}, {"bits": 4}, {"codebook": "nf4"}],
                         ids=["bpp1", "bpp0.3", "bits4", "nf4"])
def test_decodes_are_identical(which, options, monkeypatch):
    tensors, fisher = INPUTS[which]()
    if "budget" in options:
        options = {"budget": fstqcodec.Budget(bits_per_param=options["budget"]), "fisher": fisher}
    message = fstqcodec.encode(tensors, **options)
    native, reference = _both(lambda: fstqcodec.decode(message), monkeypatch)
    for name in tensors:
        assert native[name].dtype == reference[name].dtype
        assert np.array_equal(native[name], reference[name], equal_nan=False), name


def test_rate_model_argmin_keeps_numpy_ties(monkeypatch):
    rng = np.random.default_rng(8)
    entropy = np.round(rng.random((257, 8)) * 4, 1)  # few distinct values: many exact ties
    distortion = np.round(rng.random((257, 8)), 1)
    native, reference = _both(lambda: allocation._best_per_u(entropy, distortion), monkeypatch)
    for key in native:
        assert np.array_equal(native[key], reference[key]), key
