"""The budget loop: allocate, assemble, and correct the allocation's target from the real
message size until the message fills the budget."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..errors import BudgetError, EncodeError
from ..policy.allocation import BlockStats, evaluator, shape_sample
from ..policy.fisher import DeferredWeights
from ..stages import rans as _rans
from ..wire.header import DTYPES
from . import moments
from .assembly import assemble
from .plans import Plan, dtype_max_rows, lossless_plan, rd_plan
from .source import Input
from .unbiased import unbiased_plan

__all__ = ["encode_to_budget", "block_stats", "LOW_WATER"]

#: The size loop accepts a message in [LOW_WATER * budget, budget] ...
LOW_WATER = 0.96
#: ... and aims at least this far into the budget (else the middle of that window), so that
#: the first try usually lands inside.
_AIM = 0.985
#: With the measured rate model (messages of 16,384+ elements) the loop keeps trying until this
#: fill: there the real size follows the target closely, and on a near-binary update at 1
#: bit/param the last 3% of the budget is worth 3% of the error.
_LOW_WATER_MEASURED = 0.985
_MAX_SIZE_ITERATIONS = 8


def block_stats(source: Input, weights, *, sign: bool = False) -> BlockStats:
    """Per-block statistics for the allocation (float64 sums in a fixed order, :mod:`.moments`).
    ``weights``: from :func:`fstqcodec.policy.fisher.normalize_fisher` (deferred or not).
    ``sign``: whether the two-level sign quantizer is a candidate (it needs centroid codebooks,
    so nearest rounding)."""
    n = source.counts
    sums = moments.block_sums(source, weights)
    absmax, sum_abs, energy, weighted_abs, weight_sum = (
        sums.absmax, sums.magnitudes, sums.weighted_squares, sums.weighted_magnitudes, sums.weights)
    mean_square = sums.squares / np.maximum(n, 1)
    weight = weight_sum / np.maximum(n, 1)
    raw_bits = np.array([16 if s.dtype == "bfloat16" else 8 * DTYPES[s.dtype].itemsize for s in source.specs], dtype=np.int64)
    stats = BlockStats(
        count=n, weight=weight, mean_square=mean_square, weighted_energy=energy, absmax=absmax,
        raw_bits=raw_bits[source.block_tensor], shape_sample=shape_sample(source.matrix, n, mean_square),
    )
    if sign and stats.shape_sample is not None:
        # Sign blocks' scales: the block's own mean |x|, or its tensor's (equal scales cost
        # almost nothing after zstd). Error sum w (|x| - s)**2 = E - 2 s sum w|x| + s**2 sum w.
        stats.mean_abs = sum_abs / np.maximum(n, 1)
        tensor_abs = np.bincount(source.block_tensor, sum_abs, len(source.specs))
        tensor_size = np.maximum([spec.size for spec in source.specs], 1)
        stats.tensor_mean_abs = (tensor_abs / tensor_size)[source.block_tensor]
        # A sign block decodes to its context's centroids times its scale, which can exceed the
        # block's largest |x|: keep blocks near their dtype's largest value off the sign quantizer.
        near_limit = absmax > dtype_max_rows(source, np.arange(len(n))) / 4
        native = getattr(_rans._speedups, "sign_errors", None)
        errors = []
        for s in (stats.mean_abs, stats.tensor_mean_abs):
            if native is not None:  # the same operations in one C pass
                error = np.empty(len(n))
                native(energy, weighted_abs, weight_sum, np.ascontiguousarray(s), near_limit.view(np.uint8), error)
            else:
                error = np.maximum(energy - 2 * s * weighted_abs + s * s * weight_sum, 0.0)
                error = np.where(near_limit, np.inf, error)
            errors.append(error)
        stats.sign_distortion, stats.shared_sign_distortion = errors
    return stats


def encode_to_budget(source: Input, weights, limit: int, *, rounding: str, seed: int, unbiased: bool = False,
                     **options) -> bytes:
    """The best message the allocation finds within ``limit`` bytes (``unbiased``: the best
    message of :func:`.unbiased.unbiased_plan`, whose decoded value is unbiased). ``weights``:
    from :func:`fstqcodec.policy.fisher.normalize_fisher`, deferred or not.

    Raises
    ------
    BudgetError
        If even the smallest message (every block dropped) exceeds ``limit``.
    EncodeError
        Values lossy coding cannot hold, or a deferred Fisher array's bad values.
    """
    smallest = assemble(source, Plan.dropped(len(source.counts)), **options)
    if len(smallest) > limit:
        _checked(weights)  # a bad Fisher is reported first, as when it was checked up front
        raise BudgetError(
            f"budget of {limit} bytes is below the smallest message for these tensors ({len(smallest)} bytes: "
            "header, names and block table); raise the budget or send fewer tensors",
            budget=limit,
            minimum=len(smallest),
        )
    if limit >= source.raw_bytes // 2:
        lossless = assemble(source, lossless_plan(source), **options)
        if len(lossless) <= limit:
            _checked(weights)
            return lossless
    try:
        source.check_quantizable()
    except EncodeError:
        _checked(weights)
        raise
    if unbiased:
        stats = block_stats(source, weights)
        return _fill_budget(source, lambda target: unbiased_plan(source, stats, target, seed=seed), limit, smallest,
                            LOW_WATER, **options)
    stats = block_stats(source, weights, sign=rounding == "nearest")
    low_water = LOW_WATER if stats.shape_sample is None else _LOW_WATER_MEASURED
    best = _fill_budget(source, _rd_plans(source, stats, rounding, seed), limit, smallest, low_water, **options)
    if len(best) < LOW_WATER * limit and stats.sign_distortion is not None:
        # A sign context's own table and codebook can cost more than a tiny budget has left, a
        # step the model does not see: try again without sign blocks, keep the fuller message.
        stats.sign_distortion = stats.shared_sign_distortion = None
        retry = _fill_budget(source, _rd_plans(source, stats, rounding, seed), limit, smallest, low_water, **options)
        best = retry if len(retry) > len(best) else best
    return best


def _checked(weights):
    """``weights`` with the checks a :class:`DeferredWeights` left to the block sums done now,
    for the paths that never sum them (raises the EncodeError those checks raise)."""
    return weights.check() if isinstance(weights, DeferredWeights) else weights


def _rd_plans(source: Input, stats: BlockStats, rounding: str, seed: int) -> Callable[[float], Plan]:
    """The Fisher-weighted allocation's plan per model target (its evaluator built once)."""
    terms = evaluator(stats)
    return lambda target: rd_plan(source, stats, target, rounding=rounding, rng=np.random.default_rng(seed), evaluator=terms)


def _fill_budget(source: Input, plan_for: Callable[[float], Plan], limit: int, smallest: bytes, low_water: float,
                 **options) -> bytes:
    """The size loop: the fullest message within ``limit`` it finds (``smallest`` if none), over
    the plans ``plan_for(target)`` gives for a model cost of ``target`` bits.

    Each plan is first sized by ``assemble(..., estimate=True)`` (every part of the message but
    the code streams, whose lengths come from the plan's code statistics: within about 0.05% of
    the real size), and only a plan whose estimate lands in ``[low_water, 1] * limit`` is built
    in full; the real size then decides, as the estimate does for the plans that are not built.
    """
    aim = max(_AIM, (1.0 + low_water) / 2)  # the middle of the window, which the estimate can hit
    fixed_bits = 8.0 * len(smallest)
    target = max(8.0 * limit * aim - fixed_bits, 0.0)
    best, best_size = smallest, len(smallest)
    # The target of the fullest plan estimated to fit but not built (not the plan: its codes
    # would be held while the next plan is built).
    fallback, fallback_size = None, best_size
    fits, overshoots = 0.0, math.inf  # bracket on the model target
    for _ in range(_MAX_SIZE_ITERATIONS):
        plan = plan_for(target)
        size = len(assemble(source, plan, estimate=True, **options))
        if low_water * limit <= size <= limit:
            message = assemble(source, plan, **options)
            size = len(message)
            if best_size < size <= limit:
                best, best_size = message, size
            if low_water * limit <= size <= limit:
                break
        elif fallback_size < size <= limit:
            fallback, fallback_size = target, size
        del plan  # its codes: not held while the next plan is built
        if size <= limit:
            fits = max(fits, target)
        else:
            overshoots = min(overshoots, target)
        # Scale the target by how far the size is from the aim, kept inside the bracket.
        proposal = target * (8.0 * limit * aim - fixed_bits) / max(8.0 * size - fixed_bits, 1.0)
        if not fits < proposal < overshoots:
            proposal = 0.5 * (fits + overshoots) if math.isfinite(overshoots) else 2 * max(target, 1.0)
        target = proposal
    if fallback is not None and fallback_size > best_size:
        message = assemble(source, plan_for(fallback), **options)
        if best_size < len(message) <= limit:
            best = message
    return best
