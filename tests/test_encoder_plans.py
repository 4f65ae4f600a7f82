"""The invariants that ``fstqcodec.encoder.Plan``'s docstring states, checked on every plan builder."""

from __future__ import annotations

import numpy as np
import pytest

from fstqcodec import encoder
from fstqcodec.encoder.budget import block_stats
from fstqcodec.encoder.plans import rd_plan
from fstqcodec.policy.allocation import DROP, QUANTIZE, RAW_EXACT
from fstqcodec.policy.fisher import normalize_fisher

from common import load_real_update


def _source(seed: int, block_size: int = 64) -> encoder.Input:
    """Tensors whose sizes are not multiples of the block size (padding), of three dtypes, with
    block scales over four orders of magnitude and an all-zero tensor."""
    rng = np.random.default_rng(seed)
    scale = np.exp(3 * rng.standard_normal((40, 1)))
    tensors = {
        "a": (rng.standard_normal((40, 100)) * scale).astype(np.float32),
        "b": rng.standard_normal(333).astype(np.float16),
        "c": rng.standard_normal((7, 9)) * 1e-3,
        "zero": np.zeros(130, np.float32),
    }
    return encoder.Input(tensors, block_size, "error")


def check_plan_invariants(plan: encoder.Plan, source: encoder.Input) -> None:
    """Assert every invariant of the Plan docstring (a lazy plan's codes filled first)."""
    plan.complete()
    assert plan.mode.shape == (len(source.counts),)
    assert set(np.unique(plan.mode)) <= {DROP, QUANTIZE, RAW_EXACT}
    rows = plan.quantized_rows
    assert np.array_equal(rows, np.flatnonzero(plan.mode == QUANTIZE))
    assert plan.codes.shape == (len(rows), source.block_size) or len(rows) == 0
    scales = (plan.scale_bits.astype(np.uint32) << 16).view(np.float32)
    assert np.all(np.isfinite(scales)) and np.all(scales > 0)
    if not len(rows):
        return
    width = plan.class_width[plan.row_class]
    # Width 1 only for rd_plan's sign class: class 0, decoded through centroids.
    sign = width == 1
    assert np.all((width >= 2) & (width <= 8) | sign)
    assert np.all(plan.row_class[sign] == 0) and (not sign.any() or plan.class_sums is not None)
    padding = np.arange(source.block_size)[None, :] >= source.counts[rows][:, None]
    if plan.codebook is None:
        codes = plan.codes.astype(np.int64)
        low, high = -(1 << (width - 1)), (1 << (width - 1)) - 1
        assert np.all((codes >= low[:, None]) & (codes <= high[:, None]))
        assert np.all(codes[padding] == 0)
        index = codes + 128
    else:
        levels = plan.codebook
        assert len(levels) == 1 << int(round(np.log2(len(levels)))) and np.all(np.diff(levels) > 0)
        index = plan.codes.view(np.uint8).astype(np.int64)
        assert np.all(index < (1 << width)[:, None])
        assert np.all(index[padding] == int(np.argmin(np.abs(levels))))
    occurring = np.zeros_like(plan.class_hist, dtype=bool)
    occurring[np.repeat(plan.row_class, source.block_size)[~padding.reshape(-1)], index[~padding]] = True
    assert np.all(plan.class_hist[occurring] > 0), "a code that occurs has a count"
    if not plan.force_packed:
        return
    # Fixed-rate plans count exactly, padding excluded.
    exact = np.zeros_like(plan.class_hist)
    np.add.at(exact, (np.repeat(plan.row_class, source.block_size)[~padding.reshape(-1)], index[~padding]), 1)
    assert np.array_equal(plan.class_hist, exact)
    assert (plan.class_sums is None) == (plan.class_sampled is None)


def test_lossless_plan_invariants():
    source = _source(0)
    plan = encoder.lossless_plan(source)
    check_plan_invariants(plan, source)
    assert not np.any(source.matrix[plan.mode == DROP].view(np.uint32))  # only all-zero blocks drop
    assert not np.any(plan.mode == QUANTIZE)


@pytest.mark.parametrize("options", [{"bits": 2}, {"bits": 8}, {"codebook": "nf4"}, {"codebook": np.linspace(-1, 1, 256)}])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fixed_plan_invariants(options, rounding):
    source = _source(1)
    bits = options.get("bits")
    plan = encoder.fixed_plan(source, bits=bits, codebook=options.get("codebook"), rounding=rounding,
                              rng=np.random.default_rng(0))
    check_plan_invariants(plan, source)
    assert plan.force_packed and len(plan.quantized_rows) == np.count_nonzero(source.block_tensor != 3)


@pytest.mark.parametrize("target_bits_per_element", [0.05, 0.5, 2.0, 6.0])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_rd_plan_invariants(target_bits_per_element, rounding):
    source = _source(2)
    weights = normalize_fisher(None, source.names, {s.name: s.shape for s in source.specs}, 1.0)
    stats = block_stats(source, weights)
    plan = rd_plan(source, stats, target_bits_per_element * source.elements, rounding=rounding,
                   rng=np.random.default_rng(0))
    check_plan_invariants(plan, source)
    assert len(plan.quantized_rows) > 0 and len(plan.class_width) > 1  # something to check
    assert (plan.class_sums is not None) == (rounding == "nearest" and len(plan.quantized_rows) > 0)
    assert encoder.assemble(source, plan, meta=None, compress_header=True)  # the plan assembles


@pytest.mark.parametrize("target_bits_per_element", [0.25, 1.0, 3.0])
def test_rd_plan_invariants_with_sign_blocks(target_bits_per_element):
    # An Adam-like update (|x| about the same everywhere) large enough for the measured rate model:
    # the allocation sends some blocks as signs (class 0, width 1) beside grid blocks.
    rng = np.random.default_rng(3)
    x = (np.sign(rng.standard_normal((300, 100))) * (1 + 0.2 * rng.standard_normal((300, 100)))
         * np.exp(rng.standard_normal((300, 1)))).astype(np.float32)
    source = encoder.Input({"x": x, "pad": rng.standard_normal(77).astype(np.float32)}, 64, "error")
    weights = normalize_fisher(None, source.names, {s.name: s.shape for s in source.specs}, 1.0)
    stats = block_stats(source, weights, sign=True)
    plan = rd_plan(source, stats, target_bits_per_element * source.elements, rounding="nearest",
                   rng=np.random.default_rng(0))
    check_plan_invariants(plan, source)
    assert plan.class_width[0] == 1 and np.count_nonzero(plan.row_class == 0) > 0
    assert encoder.assemble(source, plan, meta=None, compress_header=True)


def _large_plan(target_bits_per_element: float = 2.0):
    """A LoRA-shaped input of 2**22 elements with per-element Fisher: enough rows that the code
    statistics sample every other row, so that an rd_plan leaves codes for later."""
    rng = np.random.default_rng(5)
    tensors = {f"t{i}": (rng.standard_normal((16, 4096)) * np.exp(rng.normal(-6, 0.5))).astype(np.float32) for i in range(64)}
    fisher = {name: (rng.standard_normal(t.shape).astype(np.float32) * np.float32(np.exp(rng.normal()))) ** 2
              for name, t in tensors.items()}
    source = encoder.Input(tensors, 64, "error")
    weights = normalize_fisher(fisher, source.names, {s.name: s.shape for s in source.specs}, 1.0)
    stats = block_stats(source, weights, sign=True)
    return source, lambda: rd_plan(source, stats, target_bits_per_element * source.elements, rounding="nearest",
                                   rng=np.random.default_rng(0))


def test_lazy_plan_fills_the_codes_it_would_have_had_at_once():
    source, plan_for = _large_plan()
    plan = plan_for()
    assert plan.pending is not None and not plan.memo["filled"].all()  # something left for later
    plan.complete(np.arange(0, len(plan.quantized_rows), 3))  # in two steps, as assemble's estimate does
    plan.complete()
    at_once = plan_for()
    at_once.complete()
    assert np.array_equal(plan.codes, at_once.codes)
    check_plan_invariants(plan, source)


@pytest.mark.parametrize("which", ["lora", "real_update_bbc.npz"])
def test_size_estimate_is_close_to_the_message(which):
    """The size loop trusts ``assemble(..., estimate=True)`` to within a fraction of its window."""
    if which == "lora":
        source, plan_for = _large_plan()
        plan = plan_for()
    else:  # sign blocks in packed contexts, whose zstd gain the estimate must see
        update, fisher = load_real_update(which)
        source = encoder.Input(update, 64, "error")
        weights = normalize_fisher(fisher, source.names, {s.name: s.shape for s in source.specs}, 0.5)
        plan = rd_plan(source, block_stats(source, weights, sign=True), 0.5 * source.elements, rounding="nearest",
                       rng=np.random.default_rng(0))
    estimate = len(encoder.assemble(source, plan, meta=None, compress_header=True, estimate=True))
    message = encoder.assemble(source, plan, meta=None, compress_header=True)
    assert abs(estimate / len(message) - 1) < 0.002
