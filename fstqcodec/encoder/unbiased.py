"""The unbiased plan: every block sent with a probability, scaled by its inverse, rounded at random.

The budget plan (:func:`.plans.rd_plan`) minimises the error of *one* message, and gets there by
shrinking: dropped blocks and centroids inside their bins pull every element toward zero. When a
server averages many clients' messages, a bias survives the average and noise does not; this plan
trades a larger error for none of the bias. For each block ``b`` the encoder chooses a quantizer
``q`` and a probability ``p_b``, sends the block with probability ``p_b`` (a seeded draw) and, when
it does, codes ``x_b / p_b`` with unbiased stochastic rounding on the quantizer's levels. Then
``E[xhat] = x`` exactly (over the encoder's draws, for the bfloat16 scales actually written), and the
Fisher-weighted variance of block ``b`` is ``A_bq / p_b - W_b`` with ``W_b = sum F x**2`` and
``A_bq = W_b + (the quantizer's weighted rounding variance at p = 1)``.

The allocation minimises the total ``sum_b (A_bq / p_b - W_b)`` subject to the expected cost
``sum_b p_b c_bq`` meeting the target (a Lagrange multiplier ``mu``): ``p_b = min(1, sqrt(A / (mu c)))``,
and each block takes the quantizer of least Lagrangian. Quantizers: two levels ``+-absmax / p``
(one bit per element, decoded through a ``[-1, +1]`` codebook) or the uniform grid of width 2..8
with ``absmax / p`` at its top level. Everything is expressible in format 1.0: a dropped block is a
``zero`` context, a sign block a width-1 context with an explicit codebook.

Not exact: the costs are estimates (the size loop corrects the total), the rounding variance of a
grid is taken as ``step**2 / 6`` per element (a uniform fractional part), and the size loop, which
keeps the fullest message within the budget, picks the multiplier after seeing the draws' sizes, a
dependence of ``p`` on the draws that the unbiasedness argument above does not cover (measured:
``tests/test_unbiased.py`` averages many seeds).
"""

from __future__ import annotations

import math

import numpy as np

from ..policy.allocation import DROP, QUANTIZE, BlockStats
from ..stages.scales import from_bf16_bits, to_bf16_bits
from .plans import Plan, dtype_max_rows
from .source import Input

__all__ = ["unbiased_plan", "GRID_WIDTHS"]

#: Grid widths the plan may choose besides the two-level (sign) quantizer.
GRID_WIDTHS = tuple(range(2, 9))
#: Bits per block besides its codes: a bfloat16 scale and its context index, before zstd.
_BLOCK_OVERHEAD_BITS = 24.0
#: Scales of blocks sent with p < 1 are snapped to this many values per octave (see ``_scales``).
_SCALE_GRID_PER_OCTAVE = 4
#: The multiplier search: bisection steps over log(mu).
_SEARCH_STEPS = 60


#: Top level per quantizer column: the sign quantizer's +-1, then each grid width's 2**(w-1) - 1.
_TOPS = np.array([1.0] + [float((1 << (w - 1)) - 1) for w in GRID_WIDTHS])


def _quantizer_terms(stats: BlockStats) -> tuple[np.ndarray, np.ndarray]:
    """Per block (rows) and quantizer (columns: sign, then each grid width): ``A`` (weighted
    second moment of the coded value at p = 1) and ``c`` (estimated bits when sent)."""
    n = stats.count.astype(np.float64)
    weight_sum = stats.weight * n
    absmax_sq = stats.absmax.astype(np.float64) ** 2
    tops = _TOPS
    a = np.empty((len(n), len(tops)))
    c = np.empty_like(a)
    # Two levels +-absmax: E[xhat**2] = absmax**2 per element whatever x is.
    a[:, 0] = absmax_sq * weight_sum
    c[:, 0] = n + _BLOCK_OVERHEAD_BITS
    spread = np.sqrt(stats.mean_square) / np.maximum(stats.absmax, 1e-300)  # rms / absmax, in (0, 1]
    for column, top in enumerate(tops[1:], 1):
        step_sq = absmax_sq / top**2
        a[:, column] = stats.weighted_energy + weight_sum * step_sq / 6.0
        # Entropy of the codes: about a Gaussian's at this spread on the grid, at most log2 of the
        # levels used (2 top + 1), and at least one bit.
        rms_in_steps = spread * top
        entropy = 0.5 * np.log2(2 * math.pi * math.e * (rms_in_steps**2 + 1.0 / 6.0))
        c[:, column] = n * np.clip(entropy, 1.0, math.log2(2 * top + 1)) + _BLOCK_OVERHEAD_BITS
    return a, c


def _choose(a: np.ndarray, c: np.ndarray, energy: np.ndarray, mu: float):
    """Each block's quantizer, probability and expected cost at multiplier ``mu``."""
    p = np.minimum(1.0, np.sqrt(a / (mu * c)))
    lagrangian = a / p - energy[:, None] + mu * p * c
    choice = np.argmin(lagrangian, axis=1)
    rows = np.arange(len(a))
    chosen_p = p[rows, choice]
    return choice, chosen_p, float(np.sum(chosen_p * c[rows, choice]))


def allocate_unbiased(stats: BlockStats, target_bits: float) -> tuple[np.ndarray, np.ndarray]:
    """(quantizer column per block, probability per block) whose expected cost meets ``target_bits``.

    Blocks whose values are all zero (or whose weight is zero) get probability 0."""
    live = (stats.absmax > 0) & (stats.weight > 0)
    choice = np.zeros(len(live), dtype=np.int64)
    probability = np.zeros(len(live))
    if not live.any() or target_bits <= 0:
        return choice, probability
    a, c = _quantizer_terms(stats)
    a, c, energy = a[live], c[live], stats.weighted_energy[live]
    # Bracket log(mu): at mu_high every p is tiny, at mu_low every block is sent at its best width.
    ratio = a / c
    low, high = math.log(ratio.min()) - 40.0, math.log(ratio.max()) + 40.0
    for _ in range(_SEARCH_STEPS):
        middle = 0.5 * (low + high)
        if _choose(a, c, energy, math.exp(middle))[2] > target_bits:
            low = middle
        else:
            high = middle
    live_choice, live_p, _ = _choose(a, c, energy, math.exp(high))
    choice[live], probability[live] = live_choice, live_p
    return choice, probability


def unbiased_plan(source: Input, stats: BlockStats, target_bits: float, *, seed: int) -> Plan:
    """The unbiased plan for an expected model cost of ``target_bits`` (draws from ``seed``: the
    same arguments give the same plan)."""
    rng = np.random.default_rng(seed)
    draws = rng.random(len(stats.count))  # one per block, whatever the target
    choice, probability = allocate_unbiased(stats, target_bits)
    # A block's scale absmax / (p top) must stay within its dtype's range: raise such p.
    top = _TOPS[choice]
    limit = dtype_max_rows(source, np.arange(len(choice)))
    floor_p = np.minimum(1.0, stats.absmax * 2.0 / np.maximum(limit, 1e-300))
    probability = np.where(probability > 0, np.maximum(probability, floor_p), 0.0)
    scale_bits, probability = _scales(stats.absmax, probability, top)
    sent = draws < probability
    mode = np.where(sent, QUANTIZE, DROP).astype(np.int8)
    rows = np.flatnonzero(sent)
    if not len(rows):
        return Plan(mode=mode)
    kinds = choice[rows]  # 0: sign; k >= 1: grid width GRID_WIDTHS[k - 1]
    classes, row_class = np.unique(kinds, return_inverse=True)
    class_width = np.array([1 if k == 0 else GRID_WIDTHS[k - 1] for k in classes], dtype=np.int64)
    scale_bits = scale_bits[rows]
    codes = _stochastic_codes(source, rows, probability[rows] * from_bf16_bits(scale_bits), top[rows], kinds == 0, rng)
    hist, sums = _class_tables(source, rows, codes, row_class.astype(np.int64), class_width)
    return Plan(mode=mode, quantized_rows=rows, scale_bits=scale_bits, codes=codes, row_class=row_class.astype(np.int64),
                class_width=class_width, class_hist=hist, class_sums=sums, class_sampled=hist.copy(),
                grid_centroids=False)


def _scales(absmax: np.ndarray, probability: np.ndarray, top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each block's bfloat16 scale bits and the probability that goes with it (0 stays 0).

    A block sent always (p = 1) takes ``absmax / top`` rounded up. A block sent with p < 1 takes
    ``absmax / (p top)`` snapped to a grid of a few values per octave, and then the p at which that
    scale is exactly large enough, ``absmax / (top scale)``: blocks of a tensor with equal
    importance then share a few scale values, which zstd stores in a few bits each instead of 16
    (p moves by up to 9%, a second-order change of the Lagrangian the allocation minimised).
    """
    sampled = (probability > 0) & (probability < 1)
    wanted = np.where(probability > 0, absmax / (np.where(sampled, probability, 1.0) * top), 1.0)  # 1: unused
    snapped = np.exp2(np.round(np.log2(np.maximum(wanted, 1e-38)) * _SCALE_GRID_PER_OCTAVE) / _SCALE_GRID_PER_OCTAVE)
    bits = to_bf16_bits(np.where(sampled, snapped, wanted).astype(np.float32), mode="up")
    adjusted = absmax / (top * from_bf16_bits(bits).astype(np.float64))
    full = (probability >= 1) | (sampled & (adjusted >= 1))
    if np.any(full & sampled):  # snapping asked for p >= 1: send it always, at its own scale
        rows = full & sampled
        bits[rows] = to_bf16_bits((absmax[rows] / top[rows]).astype(np.float32), mode="up")
    probability = np.where(full, 1.0, np.where(sampled, adjusted, 0.0))
    return bits, probability


def _stochastic_codes(source: Input, rows, divisors, tops, sign, rng) -> np.ndarray:
    """Codes of ``rows``: unbiased stochastic rounding of ``x / divisor`` (``p`` times the scale;
    the value lies in ``[-top, top]``) to the grid, or to the levels -1 (code -1) and +1 (code 0)
    for sign rows. A sent block decodes to ``x / p`` in expectation."""
    values = source.matrix[rows] / divisors[:, None]
    uniform = rng.random(values.shape, dtype=np.float32)
    codes = np.empty(values.shape, dtype=np.int8)
    # Two levels: +1 with probability (1 + v) / 2.
    codes[sign] = np.where(uniform[sign] < (1.0 + np.clip(values[sign], -1.0, 1.0)) * 0.5, 0, -1)
    grid = ~sign
    limit = tops[grid][:, None]
    codes[grid] = np.clip(np.floor(values[grid] + uniform[grid]), -limit, limit)
    return codes


def _class_tables(source: Input, rows, codes, row_class, class_width) -> tuple[np.ndarray, np.ndarray]:
    """Exact code histograms per class (offset 128, padding excluded) and the sums that make every
    level decode to itself: a sign class's two codes to -1 and +1, a grid's codes to their value."""
    class_count = len(class_width)
    index = (row_class[:, None] * 256 + 128 + codes.astype(np.int64))
    valid = np.arange(source.block_size)[None, :] < source.counts[rows][:, None]
    hist = np.bincount(index[valid], minlength=class_count * 256).reshape(class_count, 256).astype(np.float64)
    level = np.arange(256, dtype=np.float64) - 128
    sums = hist * level[None, :]
    # Sign classes (width 1): code -1 is level -1, code 0 is level +1.
    sign = class_width == 1
    sums[sign, 128] = hist[sign, 128]
    return hist, sums
