"""Seeded masks (spec section 5.9): which elements of a tensor a message carries.

A mask is a seed, a keep probability, a granularity (``"element"``, ``"row"``, ``"column"``) and a
generator id. Generator 1 draws SplitMix64 outputs for unit indices 0, 1, ... and keeps a unit
when its draw is below ``floor(keep * 2**64)``. Everything is exact integer arithmetic, so any
implementation of the spec regenerates the same masks bit for bit; the message carries no index
bytes. A tensor may carry several masks: an element is visible when every mask keeps it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import BadFormatError, BadMaskError

__all__ = ["Mask", "GENERATORS", "GRANULARITIES", "MAX_MASKS_PER_TENSOR", "keep_threshold", "splitmix64", "parse_masks"]

#: Generator ids a message may name (spec 5.9). 1: SplitMix64 of (seed, unit index).
GENERATORS = {1: "splitmix64"}
GRANULARITIES = ("element", "row", "column")
#: A tensor carries at most this many masks: each costs a pass over the tensor when decoding.
MAX_MASKS_PER_TENSOR = 4

_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
#: Units drawn per step: bounds the uint64 temporaries to a few MiB whatever the tensor size.
_CHUNK_UNITS = 1 << 20


def keep_threshold(keep: float) -> int:
    """``floor(keep * 2**64)``, exact (a binary64 value is a dyadic rational)."""
    numerator, denominator = float(keep).as_integer_ratio()
    return (numerator << 64) // denominator


def splitmix64(seed: int, start: int, count: int) -> np.ndarray:
    """SplitMix64 outputs for unit indices ``start .. start+count-1`` of ``seed`` (uint64).

    Output ``n`` is the mix of ``(seed + (n + 1) * 0x9E3779B97F4A7C15) mod 2**64``.
    """
    index = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    z = np.uint64(seed) + index * np.uint64(_GAMMA)  # uint64 arrays wrap modulo 2**64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


@dataclasses.dataclass(frozen=True)
class Mask:
    """A seeded mask over a tensor's elements, rows or columns.

    Parameters
    ----------
    seed : int
        In ``[0, 2**64)``.
    keep : float
        Probability that a unit is kept (visible), in ``(0, 1]``.
    granularity : {"element", "row", "column"}
        The unit a draw decides: one element (flat C-order index), one row (first index of a
        2-D tensor) or one column (second index of a 2-D tensor).
    generator : int
        Generator id (1: SplitMix64, the only one defined).

    Raises
    ------
    ValueError
        If a parameter is out of range.
    """

    seed: int
    keep: float
    granularity: str = "element"
    generator: int = 1

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or not 0 <= int(self.seed) < 1 << 64:
            raise ValueError(f"mask seed must be an integer in [0, 2**64), got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        keep = float(self.keep)
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"mask keep probability must be in (0, 1], got {self.keep!r}")
        object.__setattr__(self, "keep", keep)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"mask granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if isinstance(self.generator, bool) or self.generator not in GENERATORS:
            raise ValueError(f"mask generator must be one of {sorted(GENERATORS)}, got {self.generator!r}")
        object.__setattr__(self, "generator", int(self.generator))

    def fits(self, shape: tuple) -> bool:
        """Whether the granularity applies to a tensor of this shape (row/column need 2-D)."""
        return self.granularity == "element" or len(shape) == 2

    def units(self, shape: tuple) -> int:
        """How many draws the mask makes over a tensor of this shape."""
        if self.granularity == "element":
            return math.prod(shape)
        return shape[0] if self.granularity == "row" else shape[1]

    def keep_units(self, count: int) -> np.ndarray:
        """Boolean keep decision of units ``0 .. count-1``."""
        threshold = keep_threshold(self.keep)
        if threshold >= 1 << 64:
            return np.ones(count, dtype=bool)
        kept = np.empty(count, dtype=bool)
        for lo in range(0, count, _CHUNK_UNITS):
            hi = min(count, lo + _CHUNK_UNITS)
            kept[lo:hi] = splitmix64(self.seed, lo, hi - lo) < np.uint64(threshold)
        return kept

    def visible(self, shape: tuple) -> np.ndarray:
        """Boolean array of ``shape``: True where this mask keeps the element.

        Raises
        ------
        ValueError
            If the granularity does not fit the shape.
        """
        shape = tuple(int(d) for d in shape)
        if not self.fits(shape):
            raise ValueError(f"a {self.granularity} mask needs a 2-D tensor, got shape {shape}")
        kept = self.keep_units(self.units(shape))
        if self.granularity == "element":
            return kept.reshape(shape)
        if self.granularity == "row":
            return np.broadcast_to(kept[:, None], shape).copy()
        return np.broadcast_to(kept[None, :], shape).copy()

    def to_wire(self, tensor_index: int) -> list:
        return [tensor_index, self.generator, self.seed, self.keep, self.granularity]


def visibility(shape: tuple, masks) -> np.ndarray:
    """Elements every mask of ``masks`` keeps (all True for no masks)."""
    visible = np.ones(tuple(shape), dtype=bool)
    for mask in masks:
        visible &= mask.visible(shape)
    return visible


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(entry, index: int, tensors: list) -> tuple[int, Mask]:
    what = f"mask #{index}"
    if not isinstance(entry, list) or len(entry) != 5:
        raise BadFormatError(f"header: {what} must be [tensor, generator, seed, keep, granularity]")
    tensor, generator, seed, keep, granularity = entry
    if not (_is_int(tensor) and _is_int(generator) and _is_int(seed) and isinstance(keep, float) and isinstance(granularity, str)):
        raise BadFormatError(f"header: {what} must be [int, int, int, float, str]")
    if not 0 <= tensor < len(tensors):
        raise BadMaskError(f"{what} names tensor #{tensor}, the message has {len(tensors)}")
    if generator not in GENERATORS:
        raise BadMaskError(f"{what}: unknown generator id {generator}; known: {sorted(GENERATORS)}")
    if not 0 <= seed < 1 << 64:
        raise BadMaskError(f"{what}: seed {seed} is outside [0, 2**64)")
    if not 0.0 < keep <= 1.0:
        raise BadMaskError(f"{what}: keep probability {keep!r} is outside (0, 1]")
    if granularity not in GRANULARITIES:
        raise BadMaskError(f"{what}: unknown granularity {granularity!r}; known: {list(GRANULARITIES)}")
    mask = Mask(seed, keep, granularity, generator)
    spec = tensors[tensor]
    if not mask.fits(spec.shape):
        raise BadMaskError(f"{what}: a {granularity} mask does not fit tensor {spec.name!r} of shape {list(spec.shape)} (needs 2-D)")
    return tensor, mask


def parse_masks(raw, tensors: list) -> dict:
    """Validate an untrusted ``masks`` value (spec 5.9): tensor index -> list of :class:`Mask`.

    Raises
    ------
    BadFormatError
        If ``masks`` or an entry is malformed (wrong container or types).
    BadMaskError
        If an entry is out of range: tensor index, generator id, seed, keep probability,
        granularity, a granularity that does not fit the tensor, too many masks on one tensor.
    """
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise BadFormatError(f"header: masks must be an array, got {type(raw).__name__}")
    masks: dict[int, list] = {}
    for index, entry in enumerate(raw):
        tensor, mask = _parse_entry(entry, index, tensors)
        masks.setdefault(tensor, []).append(mask)
        if len(masks[tensor]) > MAX_MASKS_PER_TENSOR:
            raise BadMaskError(f"tensor #{tensor} carries more than {MAX_MASKS_PER_TENSOR} masks")
    return masks
