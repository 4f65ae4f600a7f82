"""Context grouping and coder choice: which quantized blocks share a code table, and whether
each such context is coded with rANS or packed."""

from __future__ import annotations

import math

import numpy as np

from ..stages import rans
from .plans import Plan

__all__ = ["group_classes", "centroid_levels"]


def _msgpack_int_bytes(values: np.ndarray) -> int:
    """Bytes of non-negative ints < 2**16 in msgpack: 1 below 128, 2 below 256, else 3."""
    return len(values) + int(np.count_nonzero(values >= 128)) + int(np.count_nonzero(values >= 256))


def _context_choice(counts: np.ndarray, width: int) -> tuple[float, dict]:
    """Bits for coding a histogram ``counts`` (over symbols 0..2**width-1), best of rANS and packed."""
    total = int(counts.sum())
    packed_bits = float(total * width)
    present = np.flatnonzero(counts)
    if total == 0 or len(present) == 0:
        return packed_bits, {"kind": "packed"}
    prob_bits = int(min(14, max(4, math.ceil(math.log2(total + 1)), math.ceil(math.log2(len(present))) + 1)))
    freqs = rans.normalize_frequencies(counts, prob_bits)
    first, last = int(present[0]), int(present[-1])
    table_bytes = _msgpack_int_bytes(freqs[first : last + 1]) + 12
    lanes = rans.choose_lanes(total)
    rans_bits = rans.estimate_bits(counts, freqs, prob_bits) + 8 * table_bytes + 16 * lanes + 16
    if rans_bits < packed_bits:
        return rans_bits, {"kind": "rans", "prob_bits": prob_bits, "freqs": freqs, "first": first, "last": last, "lanes": lanes}
    return packed_bits, {"kind": "packed"}


def _window(hist: np.ndarray, width: int) -> np.ndarray:
    """Signed-code histogram (offset 128) as symbol counts for a context of ``width`` bits."""
    offset = 128 - (1 << (width - 1))
    return hist[offset : offset + (1 << width)]


def group_classes(plan: Plan) -> tuple[np.ndarray, list]:
    """Merge neighbouring classes into contexts where a shared table is cheaper.

    Returns (group index per class, list of (width, symbol counts, coder choice, classes)).
    """
    class_count = len(plan.class_width)
    if plan.codebook is not None or plan.force_packed:
        # Fixed-rate plans: one context per width, codes packed.
        groups = {}
        for c in range(class_count):
            groups.setdefault(int(plan.class_width[c]), []).append(c)
        members = list(groups.values())
    else:
        members = [[c] for c in range(class_count)]
    hists = [plan.class_hist[m].sum(axis=0) for m in members]
    widths = [int(plan.class_width[m].max()) for m in members]

    def symbols(hist, width):
        return hist[: 1 << width] if plan.codebook is not None else _window(hist, width)

    chosen = None  # per group: (bits, coder choice), where the merge computed them
    if not (plan.codebook is not None or plan.force_packed):
        chosen = [_context_choice(symbols(h, w), w) for h, w in zip(hists, widths)]

        def merged(i):
            """(histogram, width, (bits, choice)) of neighbours i and i + 1 as one context, or None where
            they may not share one: sign codes (width 1) mean nothing on a uniform grid."""
            if (widths[i] == 1) != (widths[i + 1] == 1):
                return None
            hist, width = hists[i] + hists[i + 1], max(widths[i], widths[i + 1])
            return hist, width, _context_choice(symbols(hist, width), width)

        # Greedy merge of neighbours (classes are ordered by spread) while it saves bits. A merge
        # changes only the pairs beside it: the others keep their (deterministic) costs.
        pairs = [merged(i) for i in range(len(members) - 1)]
        while len(members) > 1:
            best_gain, best_index = 0.0, -1
            for i, pair in enumerate(pairs):
                if pair is None:
                    continue
                gain = chosen[i][0] + chosen[i + 1][0] - pair[2][0]
                if gain > best_gain:
                    best_gain, best_index = gain, i
            if best_index < 0:
                break
            i = best_index
            hist, width, choice = pairs[i]
            members[i : i + 2] = [members[i] + members[i + 1]]
            hists[i : i + 2] = [hist]
            widths[i : i + 2] = [width]
            chosen[i : i + 2] = [choice]
            del pairs[i]
            if i > 0:
                pairs[i - 1] = merged(i - 1)
            if i < len(pairs):
                pairs[i] = merged(i)
    group_of_class = np.empty(class_count, dtype=np.int64)
    contexts = []
    for g, m in enumerate(members):
        group_of_class[m] = g
        counts = symbols(hists[g], widths[g])
        if plan.force_packed:
            choice = {"kind": "packed"}
        else:
            choice = chosen[g][1] if chosen is not None else _context_choice(counts, widths[g])[1]
        contexts.append((widths[g], counts, choice, m))
    return group_of_class, contexts


def centroid_levels(plan: Plan, classes: list, width: int) -> np.ndarray:
    """Mean of x / step per symbol over ``classes`` (the grid value where a symbol is unused)."""
    counts = _window(plan.class_sampled[classes].sum(axis=0), width)
    sums = _window(plan.class_sums[classes].sum(axis=0), width)
    grid = np.arange(1 << width, dtype=np.float64) - (1 << (width - 1))
    levels = np.where(counts > 0, sums / np.maximum(counts, 1), grid)
    return levels.astype(np.float32)

