"""Fisher-weighted rate-distortion allocation over blocks (encoder side, not normative).

The loss increase from perturbing an update by ``d`` is about ``1/2 sum_i F_i d_i**2``, so the
encoder minimises the Fisher-weighted squared error ``sum_i F_i (x_i - xhat_i)**2`` under a byte
budget. Per block ``j`` (``n_j`` elements, mean Fisher ``w_j``, mean square ``s_j**2``) the choices
are: drop it (distortion ``sum F x**2``, no codes), quantize it with an entropy-coded uniform
quantizer of step ``Delta_j``, send its signs with one scale (``SIGN``: one bit per element,
distortion ``sum F (|x| - mean|x|)**2``), or send it raw (lossless at its own dtype).

For entropy-coded uniform quantization the per-element Lagrangian cost at step ``Delta`` is
``w s**2 D(r) + lambda H(r)`` with ``r = s / Delta``, where ``D(r)`` (relative MSE) and ``H(r)``
(bits of entropy per element) are tabulated once: measured on the blocks' own normalised values
``x / s`` when there are enough of them (:func:`empirical_tables`), else for a Gaussian
(:func:`gaussian_tables`). Dividing by ``lambda`` leaves a function of ``u = w s**2 / lambda``
alone, so the best ``r`` and its cost are tabulated against ``u`` too, and one evaluation for a
given ``lambda`` is a few vectorised look-ups over the blocks. A search on ``lambda`` meets a
target number of bits (filling the last bits block by block, :func:`allocate`); the codec then
corrects the target from the real message size (the model is only a model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import numpy as np

from .. import _threads
from ..stages import rans as _rans

__all__ = [
    "BlockStats", "Allocation", "gaussian_tables", "empirical_tables", "shape_sample", "allocate", "evaluator",
    "DROP", "QUANTIZE", "RAW_EXACT", "SIGN", "SIGN_SHARED",
]

#: SIGN: one bit per element (its sign) and one scale, about the block's mean |x|: the least-squares
#: two-level quantizer, which a uniform grid with a zero level cannot be (it is sent as a width-1
#: context with a two-level codebook).
#: SIGN_SHARED: the same with the tensor's mean |x| as the scale (equal scales cost almost nothing).
DROP, QUANTIZE, RAW_EXACT, SIGN, SIGN_SHARED = 0, 1, 3, 4, 5

#: Largest code magnitude of the widest (8-bit) uniform grid: codes span [-128, 127].
MAX_CODE = 127

_LOG2_R = np.arange(-8.0, 8.0 + 1e-9, 1.0 / 16)  # r = s / Delta from 1/256 to 256
_LOG2_U = np.arange(-12.0, 48.0 + 1e-9, 1.0 / 16)
#: Dead-zone rounding offsets the encoder may use: c = sign(v) floor(|v| + 1/2 - tau).
DEADZONES = np.array([0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35])
_HIGH_RATE_R = 16.0


def _erf(values: np.ndarray) -> np.ndarray:
    """erf to about 1e-7 (Abramowitz and Stegun 7.1.26): plenty for model tables, and vectorised."""
    sign = np.sign(values)
    x = np.abs(values)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-x * x))


def _quantizer_moments(r: float, tau: float):
    """(entropy bits, relative MSE with centroid reconstruction) of a unit Gaussian under the
    dead-zone quantizer of step 1/r and offset tau."""
    step = 1.0 / r
    top = int(math.ceil(9.0 / step)) + 2
    k = np.arange(1, top + 1, dtype=np.float64)
    edges = np.concatenate([[0.0], (k - 0.5 + tau) * step, [np.inf]])  # |x| bin edges, bin 0 first
    cdf = 0.5 * (1.0 + _erf(edges / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * np.minimum(edges, 40.0) ** 2) / math.sqrt(2 * math.pi)
    pdf[-1] = 0.0
    mass = cdf[1:] - cdf[:-1]  # on one side (x >= 0)
    first = pdf[:-1] - pdf[1:]  # integral of x phi(x)
    # Bin 0 is symmetric: its centroid is 0, its mass is counted on both sides.
    total_mass = np.concatenate([[2 * mass[0]], mass[1:], mass[1:]])
    used = total_mass > 1e-300
    entropy = float(-np.sum(total_mass[used] * np.log2(total_mass[used])))
    with np.errstate(divide="ignore", invalid="ignore"):
        centroid_sq = np.where(mass[1:] > 1e-300, first[1:] ** 2 / mass[1:], 0.0)
    distortion = 1.0 - 2.0 * float(np.sum(centroid_sq))
    return entropy, max(distortion, 0.0)


@functools.lru_cache(maxsize=1)
def gaussian_tables():
    """Model of the encoder's quantizer on a unit Gaussian, and the best choice per ``u``.

    For each ``r`` (std / step) and dead-zone offset ``tau``: entropy ``H`` in bits per element
    and relative MSE ``D`` with centroid reconstruction (the encoder sends centroids as the
    context's codebook). Then, for each ``u``, the ``(r, tau)`` minimising ``u D + H`` and that
    minimum ``G(u)``. ``H0``/``D0`` are the ``tau = 0`` curves, used where the step is pinned.
    """
    entropy = np.empty((len(_LOG2_R), len(DEADZONES)))
    distortion = np.empty_like(entropy)
    for i, log2_r in enumerate(_LOG2_R):
        r = 2.0**log2_r
        for j, tau in enumerate(DEADZONES):
            if r >= _HIGH_RATE_R:
                entropy[i, j] = math.log2(r) + 0.5 * math.log2(2 * math.pi * math.e)
                distortion[i, j] = 1.0 / (12.0 * r * r)
            else:
                entropy[i, j], distortion[i, j] = _quantizer_moments(r, tau)
    return _best_per_u(entropy, distortion)


def _best_per_u(entropy: np.ndarray, distortion: np.ndarray) -> dict:
    """The tables of :func:`gaussian_tables` from per-(r, tau) entropy and distortion."""
    flat_h, flat_d = entropy.ravel(), distortion.ravel()
    u = 2.0 ** _LOG2_U[:, None]
    best = np.empty(len(_LOG2_U), dtype=np.intp)
    least = np.empty(len(_LOG2_U))
    native = getattr(_rans._speedups, "best_per_u", None)
    if native is not None:
        native(np.ascontiguousarray(u[:, 0]), np.ascontiguousarray(flat_d, dtype=np.float64),
               np.ascontiguousarray(flat_h, dtype=np.float64), best, least)
    else:
        # In slices of u: the whole (u, r, tau) cost table would be 16 MB, for every encode.
        for lo in range(0, len(_LOG2_U), 64):
            cost = u[lo : lo + 64] * flat_d[None, :] + flat_h[None, :]
            best[lo : lo + 64] = np.argmin(cost, axis=1)
            least[lo : lo + 64] = cost[np.arange(len(cost)), best[lo : lo + 64]]
    best_r, best_tau = np.unravel_index(best, entropy.shape)
    return {
        "log2_r": _LOG2_R,
        "H0": entropy[:, 0],
        "D0": distortion[:, 0],
        "log2_u": _LOG2_U,
        "G": least,
        "log2_r_best": _LOG2_R[best_r],
        "tau_best": DEADZONES[best_tau],
        "H_best": flat_h[best],
        "D_best": flat_d[best],
    }


#: Below this many elements the Gaussian model is used (and SIGN is no candidate): the measured
#: tables' entropies at fine steps need many values, and on small messages the size loop cannot
#: fill the budget across the jumps a sign context's own table and codebook make.
EMPIRICAL_MIN_ELEMENTS = 16384
#: Largest code magnitude of a context of width 4, the widest that carries centroid codebooks
#: (encoder.assembly): wider contexts decode to grid points, which the measured tables account for.
CENTROID_TOP_CODE = 7.5
#: The measured tables come from at most about this many elements (a fixed stride over the blocks).
EMPIRICAL_SAMPLE_ELEMENTS = 1 << 18


def shape_sample(matrix: np.ndarray, counts: np.ndarray, mean_square: np.ndarray) -> np.ndarray | None:
    """Sorted ``|x| / rms(block)`` over a fixed stride of the non-empty blocks (padding left out),
    the sample :func:`empirical_tables` measures; None when there are too few elements."""
    rows = np.flatnonzero(mean_square > 0)
    if int(counts[rows].sum()) < EMPIRICAL_MIN_ELEMENTS:
        return None
    block_size = matrix.shape[1]
    stride = max(1, -(-len(rows) * block_size // EMPIRICAL_SAMPLE_ELEMENTS))
    rows = rows[::stride]
    z = np.abs(matrix[rows].astype(np.float64)) / np.sqrt(mean_square[rows])[:, None]
    valid = np.arange(block_size)[None, :] < counts[rows][:, None]
    return np.sort(z[valid])


def empirical_tables(sample: np.ndarray) -> dict:
    """The tables of :func:`gaussian_tables`, measured on ``sample`` (sorted ``|x| / rms``)
    instead of derived for a Gaussian.

    Real updates are not Gaussian: after a few Adam steps every coordinate moved by about the
    learning rate, a block's values sit near +-rms with no tails, and a Gaussian model promises
    rate at coarse steps (its tails) where every code of such a block is zero. Measuring the
    dead-zone quantizer on the blocks' own normalised values gives the rate (entropy of the codes,
    one bit for each non-zero code's sign) and the distortion they get (centroid reconstruction
    where codes fit 4 bits, grid points beyond, as the encoder decodes them).
    Above ``r = 16`` the high-rate forms hold: rate grows by log2 r, distortion is 1 / (12 r**2).
    """
    values = np.asarray(sample, dtype=np.float64)
    first = np.concatenate([[0.0], np.cumsum(values)])
    second = np.concatenate([[0.0], np.cumsum(values * values)])
    total, energy = len(values), second[-1]
    # A typical block's largest |x| / rms: its largest code is about r times this.
    top_value = float(values[min(total - 1, int(0.999 * total))])
    measured = _LOG2_R < math.log2(_HIGH_RATE_R)
    r = 2.0 ** _LOG2_R[measured]
    top = int(math.ceil(float(values[-1]) * r[-1])) + 2
    k = np.arange(1, top + 1, dtype=np.float64)
    entropy = np.empty((len(_LOG2_R), len(DEADZONES)))
    distortion = np.empty_like(entropy)
    for j, tau in enumerate(DEADZONES):
        edges = (k[None, :] - 0.5 + tau) / r[:, None]  # |x| where code k starts, per r
        index = np.concatenate([np.zeros((len(r), 1), np.intp), np.searchsorted(values, edges), np.full((len(r), 1), total)], axis=1)
        count = np.diff(index, axis=1).astype(np.float64)
        s1, s2 = np.diff(first[index], axis=1), np.diff(second[index], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            within = np.where(count > 0, s2 - s1 * s1 / np.maximum(count, 1), 0.0)
            p = count / total
            bits = -np.sum(np.where(count > 0, p * np.log2(np.where(count > 0, p, 1.0)), 0.0), axis=1)
        entropy[measured, j] = bits + (1.0 - p[:, 0])  # a sign bit per non-zero code
        # Codes wider than the centroid codebooks' 4 bits decode to the grid point k / r.
        level = k[None, : count.shape[1] - 1] / r[:, None]
        on_grid = s2[:, 1:] - 2 * level * s1[:, 1:] + level * level * count[:, 1:]
        centroids = r * top_value <= CENTROID_TOP_CODE
        off_zero = np.where(centroids[:, None], within[:, 1:], on_grid)
        distortion[measured, j] = (s2[:, 0] + np.sum(off_zero, axis=1)) / energy
    last = int(np.flatnonzero(measured)[-1])
    high = ~measured
    differential = entropy[last, 0] - _LOG2_R[last]
    entropy[high, :] = (_LOG2_R[high] + differential)[:, None]
    distortion[high, :] = (1.0 / (12.0 * 4.0 ** _LOG2_R[high]))[:, None]
    return _best_per_u(entropy, np.maximum(distortion, 0.0))


@dataclasses.dataclass
class BlockStats:
    """Per-block statistics the allocation needs (arrays over all blocks of a message).

    Attributes
    ----------
    count : int64 array
        Elements in the block.
    weight : float64 array
        Mean Fisher weight over the block.
    mean_square : float64 array
        Mean of ``x**2`` over the block.
    weighted_energy : float64 array
        ``sum F x**2``: the distortion of dropping the block.
    absmax : float64 array
        Largest ``|x|`` in the block.
    raw_bits : int64 array
        Bits per element of the block's tensor dtype (its lossless raw size).
    shape_sample : float64 array or None
        Sorted ``|x| / rms`` of sampled blocks (:func:`shape_sample`): the quantizer's rate and
        distortion are measured on it. None: the Gaussian model.
    mean_abs : float64 array or None
        Mean of ``|x|`` over the block (a SIGN block's scale).
    sign_distortion : float64 array or None
        ``sum F (|x| - mean|x|)**2`` when SIGN is a candidate (inf where it may not be), else None.
    tensor_mean_abs, shared_sign_distortion : float64 arrays or None
        The same with the mean |x| of the block's tensor (SIGN_SHARED).
    """

    count: np.ndarray
    weight: np.ndarray
    mean_square: np.ndarray
    weighted_energy: np.ndarray
    absmax: np.ndarray
    raw_bits: np.ndarray
    shape_sample: np.ndarray | None = None
    mean_abs: np.ndarray | None = None
    sign_distortion: np.ndarray | None = None
    tensor_mean_abs: np.ndarray | None = None
    shared_sign_distortion: np.ndarray | None = None


@dataclasses.dataclass
class Allocation:
    """The choice per block: ``mode`` (DROP, QUANTIZE, RAW_EXACT, SIGN, SIGN_SHARED) and, for QUANTIZE, the
    target step ``step`` and dead-zone offset ``deadzone``; ``model_bits`` is what the model
    expects the blocks to cost, ``lam`` the Lagrange multiplier (distortion per bit)."""

    mode: np.ndarray
    step: np.ndarray
    deadzone: np.ndarray
    model_bits: float
    lam: float


#: The first search of a size loop runs on every this-many-th block, to bracket the full one.
_SAMPLE_STRIDE = 16

#: Model cost of a quantized block's side information: its bfloat16 scale after zstd and its
#: context id (bits). Measured on typical messages; the size loop corrects any error.
SCALE_BITS = 10.0
#: Model cost of a SIGN_SHARED block's scale, one of a run of equal values after zstd (bits).
SHARED_SCALE_BITS = 1.0
#: Model cost of a dropped block's context id after zstd (bits).
DROP_BITS = 0.3


class _Evaluator:
    """Evaluates the best choice per block for a given multiplier, with the per-block parts that
    do not depend on it computed once. Look-ups index the tables directly (uniform grids), which
    is several times faster than interpolating.

    The C accelerator evaluates the blocks with the same operations in the same order as
    :meth:`_evaluate`, the reference. The blocks whose best step the widest grid caps need
    ``exp2``, which numpy and a C library may round differently: numpy computes it for them, and
    C finishes their evaluation with its values.
    """

    def __init__(self, stats: BlockStats):
        sample = stats.shape_sample
        self.tables = gaussian_tables() if sample is None else empirical_tables(sample)
        self.stats = stats
        self.n = stats.count.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.log2_energy = np.log2(stats.weight * stats.mean_square)
            # The widest grid holds |code| <= 127: a step below absmax / 127.5 would clip.
            self.log2_r_cap = np.log2((MAX_CODE + 0.5) * np.sqrt(stats.mean_square) / stats.absmax)
        self.empty = stats.mean_square <= 0
        self.exact_bits = (stats.raw_bits * self.n + 1).astype(np.float64)
        self.drop_energy = np.ascontiguousarray(stats.weighted_energy, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            self.energy = np.nan_to_num(stats.weight * stats.mean_square * self.n)
        names = ("G", "log2_r_best", "tau_best", "H_best", "D_best")
        self.packed_tables = np.ascontiguousarray(np.stack([self.tables[k] for k in names]), dtype=np.float64)
        self.packed_r_tables = np.ascontiguousarray(np.stack([self.tables["D0"], self.tables["H0"]]), dtype=np.float64)
        self._totals = {}
        self._choices, self._holding = {}, False

    def _u_index(self, log2_u):
        grid = self.tables["log2_u"]
        return self._grid_index(log2_u, grid)

    def _r_index(self, log2_r):
        grid = self.tables["log2_r"]
        return self._grid_index(log2_r, grid)

    @staticmethod
    def _grid_index(log2_value, grid):
        """Nearest index into a 1/16-octave grid, clamped; NaN and -inf go to 0, +inf to the end.
        (fmax/fmin drop NaN, which is what makes this cheaper than nan_to_num + clip.)"""
        index = np.rint((log2_value - grid[0]) * 16)
        return np.fmin(np.fmax(index, 0.0), float(len(grid) - 1)).astype(np.intp)

    def __call__(self, lam: float) -> "_Choice":
        """The best choice per block at multiplier ``lam``."""
        if lam in self._choices:
            return self._choices[lam]
        count = len(self.n)
        choice = _Choice(np.zeros(count, dtype=np.int8), np.empty(count), np.empty(count), np.empty(count), np.empty(count), lam)
        self._run(lam, choice.bits, choice)
        return choice

    def total(self, lam: float) -> float:
        """The model bits of the best choice at ``lam`` (remembered: every search of the size
        loop starts from the same bracket), computing no more than the bits per block, or the
        whole choice while :meth:`holding` (kept for the search's end)."""
        if lam not in self._totals:
            if self._holding:
                choice = self(lam)
                self._choices[lam] = choice
                self._totals[lam] = choice.total
            else:
                bits = np.empty(len(self.n))
                self._run(lam, bits, None)
                self._totals[lam] = float(bits.sum())
        return self._totals[lam]

    @contextlib.contextmanager
    def holding(self):
        """Within: :meth:`total` evaluates whole choices and keeps them until :meth:`keep_only`
        lets them go (a search ends with two of the choices it evaluated: evaluating them again
        costs two passes over every block). All are let go at the end."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            self._choices = {}

    def keep_only(self, *lams: float) -> None:
        """Let go of the kept choices but those at ``lams``."""
        self._choices = {lam: choice for lam, choice in self._choices.items() if lam in lams}

    def bracket(self, target_bits: float, low: float, high: float) -> tuple[float, float]:
        """A narrower ``(low, high)`` on log2(lambda) with the model over ``target_bits`` at
        ``low`` and within it at ``high``, from the totals already computed (the size loop's
        earlier searches) or else from a search on every ``_SAMPLE_STRIDE``-th block: the full
        search then needs a few evaluations instead of a dozen."""
        if not self._totals and len(self.n) >= 4 * _SAMPLE_STRIDE:
            sample = self._sample()
            found = _search(sample, target_bits * len(sample.n) / len(self.n), low, high, 12, 0.01)
            for step in (0.125, 0.5, 2.0, 8.0):  # widen until the full model brackets the target
                lower, upper = max(low, found - step), min(high, found + step)
                if self.total(2.0**lower) > target_bits and self.total(2.0**upper) <= target_bits:
                    return lower, upper
        over = [math.log2(lam) for lam, total in self._totals.items() if total > target_bits and low < math.log2(lam) < high]
        under = [math.log2(lam) for lam, total in self._totals.items() if total <= target_bits and low < math.log2(lam) < high]
        low = max(over, default=low)
        high = min([h for h in under if h > low], default=high)
        return low, high

    def _sample(self) -> "_Evaluator":
        """This evaluator on every ``_SAMPLE_STRIDE``-th block (the same tables)."""
        part = slice(None, None, _SAMPLE_STRIDE)
        sample = object.__new__(_Evaluator)
        sample.__dict__.update(self.__dict__)
        for name in ("n", "log2_energy", "log2_r_cap", "empty", "exact_bits", "drop_energy", "energy"):
            setattr(sample, name, np.ascontiguousarray(getattr(self, name)[part]))
        sample.stats = dataclasses.replace(self.stats, **{
            name: np.ascontiguousarray(getattr(self.stats, name)[part])
            for name in ("sign_distortion", "shared_sign_distortion") if getattr(self.stats, name) is not None})
        sample._totals = {}
        sample._choices, sample._holding = {}, False
        return sample

    def _run(self, lam: float, bits: np.ndarray, choice: "_Choice | None") -> None:
        native = getattr(_rans._speedups, "evaluate_blocks", None)
        if native is None:
            full = choice if choice is not None else _Choice(*(np.empty(len(self.n)) for _ in range(5)), lam)
            full.mode = np.zeros(len(self.n), dtype=np.int8)
            self._evaluate(lam, slice(None), full)
            bits[:] = full.bits
            return
        stats = self.stats
        outputs = (None, None, None, bits, None) if choice is None else (choice.mode, choice.log2_r, choice.tau, bits, choice.distortion)
        inputs = (self.log2_energy, self.log2_r_cap, self.n, self.drop_energy, self.energy, self.exact_bits,
                  self.empty.view(np.uint8), stats.sign_distortion, stats.shared_sign_distortion)
        capped = np.empty(len(self.n), dtype=np.int64)
        found = []

        def blocks(lo, hi):
            part = [None if a is None else a[lo:hi] for a in inputs]
            count = native(
                *part, self.packed_tables, float(self.tables["log2_u"][0]), lam, math.log2(lam),
                (DROP_BITS, SCALE_BITS, SHARED_SCALE_BITS), *(None if a is None else a[lo:hi] for a in outputs),
                capped[lo:hi],
            )
            found.append(capped[lo : lo + count] + lo)

        _threads.map_ranges(len(self.n), blocks)
        rows = np.sort(np.concatenate(found)) if len(found) > 1 else found[0]
        if not len(rows):
            return
        # The capped blocks' u = exp2(log2 u) from numpy, as the reference computes it.
        exp_u = np.exp2(self.log2_energy[rows] - math.log2(lam))
        native(
            *inputs, self.packed_tables, float(self.tables["log2_u"][0]), lam, math.log2(lam),
            (DROP_BITS, SCALE_BITS, SHARED_SCALE_BITS), *outputs, np.ascontiguousarray(rows, dtype=np.int64),
            exp_u, self.packed_r_tables, float(self.tables["log2_r"][0]),
        )

    def _evaluate(self, lam: float, rows, choice: "_Choice") -> None:
        """The numpy reference: the best choice at ``lam`` of blocks ``rows``, into ``choice``."""
        tables, n = self.tables, self.n[rows]
        log2_u = self.log2_energy[rows] - math.log2(lam)
        ui = self._u_index(log2_u)
        cost_per_element = tables["G"][ui]
        log2_r = tables["log2_r_best"][ui]
        tau = tables["tau_best"][ui]
        entropy = tables["H_best"][ui]
        relative = tables["D_best"][ui]
        log2_r_cap = self.log2_r_cap[rows]
        capped = log2_r > log2_r_cap
        if capped.any():
            ri = self._r_index(log2_r_cap[capped])
            d, h = tables["D0"][ri], tables["H0"][ri]
            log2_r[capped] = log2_r_cap[capped]
            cost_per_element[capped] = np.exp2(log2_u[capped]) * d + h
            entropy[capped] = h
            tau[capped] = 0.0
            relative[capped] = d
        drop_energy = self.drop_energy[rows]
        best_cost = drop_energy / lam + DROP_BITS
        mode = np.zeros(len(n), dtype=np.int8)
        bits = np.full(len(n), DROP_BITS)
        distortion = drop_energy.astype(np.float64, copy=True)
        candidates = [(QUANTIZE, n * cost_per_element + SCALE_BITS, n * entropy + SCALE_BITS, self.energy[rows] * relative)]
        if self.stats.sign_distortion is not None:
            sign, sign_bits = self.stats.sign_distortion[rows], n + SCALE_BITS
            candidates.append((SIGN, sign / lam + sign_bits, sign_bits, sign))
            shared, shared_bits = self.stats.shared_sign_distortion[rows], n + SHARED_SCALE_BITS
            candidates.append((SIGN_SHARED, shared / lam + shared_bits, shared_bits, shared))
        exact_bits = self.exact_bits[rows]
        candidates.append((RAW_EXACT, exact_bits, exact_bits, np.zeros(len(n))))
        for candidate, cost, candidate_bits, candidate_distortion in candidates:
            better = cost < best_cost
            best_cost = np.where(better, cost, best_cost)
            mode[better] = candidate
            bits = np.where(better, candidate_bits, bits)
            distortion = np.where(better, candidate_distortion, distortion)
        # Blocks with no energy are exactly zero: always dropped, whatever lambda says.
        empty = self.empty[rows]
        mode[empty] = DROP
        bits[empty] = DROP_BITS
        distortion[empty] = 0.0
        choice.mode[rows], choice.log2_r[rows], choice.tau[rows] = mode, log2_r, tau
        choice.bits[rows], choice.distortion[rows] = bits, distortion


@dataclasses.dataclass
class _Choice:
    """One evaluation of the allocation: per block mode, log2 r, tau, model bits and distortion."""

    mode: np.ndarray
    log2_r: np.ndarray
    tau: np.ndarray
    bits: np.ndarray
    distortion: np.ndarray
    lam: float

    @functools.cached_property
    def total(self) -> float:
        return float(self.bits.sum())


def allocate(stats: BlockStats, target_bits: float, *, iterations: int = 40, tolerance: float = 0.002,
             evaluator: "_Evaluator | None" = None) -> Allocation:
    """Choose per block to minimise Fisher-weighted error with about ``target_bits`` in all.

    The model's bits fall as ``lambda`` rises, so ``lambda`` is bracketed and searched on its
    logarithm. Bits are not a continuous function of ``lambda``: blocks of about the same value
    (real updates: every block near the same rms) change their choice at the same multiplier, and
    the model total jumps over the target. The search ends with the bracket's two choices, one
    under and one over the target, and :func:`_fill` moves the blocks on which they differ to the
    richer choice, best distortion saved per bit first, while the target holds.

    Parameters
    ----------
    stats : BlockStats
    target_bits : float
        Bits the blocks may cost, by the model (the caller subtracts header and framing).
    evaluator : optional
        From :func:`evaluator` for these ``stats``: the size loop allocates several times on the
        same statistics, and the tables and per-block terms need computing only once.
    """
    evaluate = evaluator if evaluator is not None else _Evaluator(stats)
    positive = stats.weight * stats.mean_square
    positive = positive[positive > 0]
    if positive.size == 0:
        mode = np.zeros(len(stats.count), dtype=np.int8)
        zeros = np.zeros(len(stats.count))
        return Allocation(mode, zeros, zeros, float(DROP_BITS * len(stats.count)), math.inf)
    # lambda spans the range where the most and least valuable blocks change their minds. The
    # model's bits fall monotonically as lambda rises: bracket, then regula falsi (Illinois) on
    # log2(lambda), which needs far fewer evaluations than bisection on this smooth curve.
    low = math.log2(float(positive.min())) - 50.0
    high = math.log2(float(positive.max())) + 20.0
    low, high = evaluate.bracket(target_bits, low, high)
    lam_over, lam_under = 2.0**low, 2.0**high
    over_total = evaluate.total(lam_over)  # the richest choice: over the target unless everything fits
    under_total = evaluate.total(lam_under)
    f_low, f_high = over_total - target_bits, under_total - target_bits
    if f_low <= 0:  # even the smallest lambda fits: spend everything
        return _allocation(stats, evaluate(lam_over))
    # The bracket needs only the model totals. The search ends with two of the choices it
    # evaluates: those of the current bracket are kept (no more), not evaluated again.
    with evaluate.holding():
        side = 0
        for _ in range(iterations):
            if under_total <= target_bits and under_total >= target_bits * (1 - tolerance):
                break
            middle = (low * f_high - high * f_low) / (f_high - f_low) if f_high != f_low else 0.5 * (low + high)
            if not low < middle < high:
                middle = 0.5 * (low + high)
            lam = 2.0**middle
            total = evaluate.total(lam)
            value = total - target_bits
            if value > 0:
                low, f_low, lam_over, over_total = middle, value, lam, total
                if side == -1:
                    f_high *= 0.5
                side = -1
            else:
                high, f_high = middle, value
                # The model's total is monotone in lambda only up to its grids: keep the fullest.
                if under_total > target_bits or total > under_total:
                    lam_under, under_total = lam, total
                if side == 1:
                    f_low *= 0.5
                side = 1
            evaluate.keep_only(lam_over, lam_under)
        under = evaluate(lam_under)
        if under_total > target_bits or under_total >= target_bits * (1 - tolerance):
            return _allocation(stats, under)  # nothing fits the target, or the search met it
        return _allocation(stats, _fill(under, evaluate(lam_over), target_bits))


def _search(evaluate: _Evaluator, target_bits: float, low: float, high: float, iterations: int, tolerance: float) -> float:
    """log2(lambda) where the model meets ``target_bits`` within ``tolerance`` (Illinois on the
    bracket ``(low, high)``, as :func:`allocate` searches), for a first bracket."""
    f_low, f_high = evaluate.total(2.0**low) - target_bits, evaluate.total(2.0**high) - target_bits
    if f_low <= 0 or f_high > 0:
        return low if f_low <= 0 else high
    side = 0
    for _ in range(iterations):
        middle = (low * f_high - high * f_low) / (f_high - f_low) if f_high != f_low else 0.5 * (low + high)
        if not low < middle < high:
            middle = 0.5 * (low + high)
        value = evaluate.total(2.0**middle) - target_bits
        if value > 0:
            low, f_low = middle, value
            if side == -1:
                f_high *= 0.5
            side = -1
        else:
            high, f_high = middle, value
            if value >= -tolerance * target_bits:
                return middle
            if side == 1:
                f_low *= 0.5
            side = 1
    return high


def _fill(under: _Choice, over: _Choice, target_bits: float) -> _Choice:
    """``under`` with some blocks moved to their choice in ``over``, best distortion saved per
    extra bit first, while the total stays within ``target_bits`` (in block order on ties)."""
    differ = np.flatnonzero((under.mode != over.mode) | (under.log2_r != over.log2_r) | (under.tau != over.tau))
    extra = over.bits[differ] - under.bits[differ]
    saved = under.distortion[differ] - over.distortion[differ]
    useful = (saved > 0) | (extra < 0) & (saved >= 0)
    differ, extra, saved = differ[useful], extra[useful], saved[useful]
    if not len(differ):
        return under
    free = extra <= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(free, np.inf, saved / np.where(free, 1.0, extra))
    order = np.lexsort((differ, -value))  # best value first; ties in block order
    spend = np.cumsum(np.maximum(extra[order], 0.0))
    room = target_bits - under.total
    take = differ[order[spend <= room]]
    mode, log2_r, tau, bits, distortion = (a.copy() for a in (under.mode, under.log2_r, under.tau, under.bits, under.distortion))
    for array, source in ((mode, over.mode), (log2_r, over.log2_r), (tau, over.tau), (bits, over.bits), (distortion, over.distortion)):
        array[take] = source[take]
    return _Choice(mode, log2_r, tau, bits, distortion, under.lam)


def evaluator(stats: BlockStats) -> _Evaluator:
    """The per-block terms of the allocation for ``stats``, to pass to :func:`allocate`."""
    return _Evaluator(stats)


def _allocation(stats: BlockStats, choice: _Choice) -> Allocation:
    # Steps of the quantized blocks only (often under half of them): the same values elementwise.
    rows = np.flatnonzero(choice.mode == QUANTIZE)
    step, deadzone = np.zeros(len(choice.mode)), np.zeros(len(choice.mode))
    with np.errstate(divide="ignore"):
        step[rows] = np.sqrt(stats.mean_square[rows]) / np.exp2(choice.log2_r[rows])
    deadzone[rows] = choice.tau[rows]
    return Allocation(mode=choice.mode, step=step, deadzone=deadzone, model_bits=choice.total, lam=choice.lam)
