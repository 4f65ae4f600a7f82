"""Fisher importance as the encoder takes it: per element, per tensor, or none (uniform)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from ..errors import EncodeError
from ..stages import rans as _rans

__all__ = ["normalize_fisher", "check_fisher_power", "ElementWeights", "DeferredWeights"]


def check_fisher_power(power) -> float:
    """``power`` as a float, or ``ValueError`` unless it is a finite number >= 0."""
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not (math.isfinite(power) and power >= 0):
        raise ValueError(f"fisher_power must be a finite number >= 0, got {power!r}")
    return float(power)


@dataclasses.dataclass(frozen=True)
class ElementWeights:
    """One tensor's per-element weights, ``sqrt(values) / top`` (``root``) or ``values / top``.

    The caller's Fisher array is kept as given (float32 or float64): the encoder normalises it
    one tensor at a time, as it sums the weights per block (:mod:`fstqcodec.encoder.moments`),
    instead of holding a float64 copy of every Fisher array. (For fractional powers other than
    0.5, ``values`` holds ``F ** power`` in float64.)
    """

    values: np.ndarray
    root: bool
    top: float


def normalize_fisher(fisher, names: list, shapes: dict, power: float = 1.0, *, defer: bool = False):
    """Validate ``fisher`` against the tensors and return ``name -> float | ElementWeights``.

    Parameters
    ----------
    fisher : None or Mapping[str, array-like or float]
        ``None`` means uniform importance (plain MSE). A mapping must name every tensor; each value
        is a non-negative finite scalar (one weight for the whole tensor) or an array of the
        tensor's shape (one weight per element).
    power : float
        The weights used are ``fisher ** power`` (see ``fisher_power`` of :func:`fstqcodec.encode`).
    defer : bool
        Leave the value checks and the largest value of float32 per-element arrays at powers 1
        and 0.5 to the pass that sums the weights per block (:mod:`fstqcodec.encoder.moments`),
        which reads them anyway: the result is then a :class:`DeferredWeights`.

    Returns
    -------
    dict or DeferredWeights
        Per tensor its weight divided by the largest weight of all tensors: a float, or an
        :class:`ElementWeights` for per-element weights.

    Raises
    ------
    EncodeError
        If a tensor is missing, a shape differs, or a weight is negative or not finite (with
        ``defer``: values of deferred arrays are checked by :meth:`DeferredWeights.finish`).
    TypeError
        If ``fisher`` is not a mapping.
    """
    power = check_fisher_power(power)
    if fisher is None:
        return {name: 1.0 for name in names}
    if not isinstance(fisher, Mapping):
        raise TypeError(f"fisher must be a mapping of tensor names to weights, got {type(fisher).__name__}")
    unknown = set(fisher) - set(names)
    if unknown:
        raise EncodeError(f"fisher names tensors that are not being encoded: {sorted(unknown)[:5]}")
    out, largest = {}, {}
    for name in names:
        if name not in fisher:
            raise EncodeError(f"fisher has no weights for tensor {name!r}", tensor=name)
        out[name], largest[name] = _tensor_weights(name, fisher[name], tuple(shapes[name]), power, defer)
    deferred = DeferredWeights(out, largest)
    return deferred if defer else deferred.check()


class DeferredWeights:
    """The weights of :func:`normalize_fisher` before the checks and maxima of some per-element
    arrays (``unchecked``: name -> (float32 array, root)), which the encoder's block-sum pass
    takes in the same read of the array as the sums (:mod:`fstqcodec.encoder.moments`).
    :meth:`finish` turns them into :func:`normalize_fisher`'s dict from those maxima;
    :meth:`check` takes the maxima itself, for encodes that never sum the weights."""

    def __init__(self, weights: dict, largest: dict):
        self._weights, self._largest = weights, largest
        self.unchecked = {name: weights[name] for name, top in largest.items() if top is None}

    def finish(self, maxima: dict) -> dict:
        """``normalize_fisher``'s dict, given per unchecked tensor its largest value (None: a
        negative or non-finite value was seen).

        Raises
        ------
        EncodeError
            Naming the first tensor (in order) whose weights are negative or not finite.
        """
        largest = {}
        for name, top in self._largest.items():
            if top is None:
                top = maxima[name]
                if top is None:
                    raise EncodeError(f"fisher for {name!r} holds negative or non-finite weights", tensor=name)
                top = (math.sqrt(top) if top >= 0 else top) if self._weights[name][1] else top
            largest[name] = top
        return _normalized(self._weights, largest)

    def check(self) -> dict:
        """:meth:`finish` with the maxima taken by a separate pass over the unchecked arrays."""
        return self.finish({name: _checked_max(array) for name, (array, _) in self.unchecked.items()})


def _tensor_weights(name: str, value, shape: tuple, power: float, defer: bool = False) -> tuple:
    """(the tensor's weights before normalisation, their largest value, -inf if there are none):
    a float, or for per-element weights a float32/float64 array (to be square-rooted where the
    power is 0.5, the one fractional power the federated entry points use: exact and cheap).
    With ``defer``, a float32 array at power 1 or 0.5 is not checked here and its largest value
    is None (see :class:`DeferredWeights`)."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().float().cpu().numpy()
    if isinstance(value, (str, bytes, bool)) or np.asarray(value).dtype.kind not in "fiu":
        raise EncodeError(f"fisher for {name!r} must be numbers, got {type(value).__name__}", tensor=name)
    array = np.asarray(value)
    if array.ndim == 0:
        weight = float(array)
        if not (math.isfinite(weight) and weight >= 0):
            raise EncodeError(f"fisher weight of {name!r} must be finite and >= 0, got {weight}", tensor=name)
        return weight**power, weight**power
    if array.shape != shape:
        raise EncodeError(f"fisher for {name!r} has shape {array.shape}, the tensor has {shape}", tensor=name)
    if array.dtype not in (np.float32, np.float64) or not array.dtype.isnative:
        array = array.astype(np.float64)
    array = np.ascontiguousarray(array).reshape(-1)
    if defer and power in (1, 0.5) and array.dtype == np.float32:
        return (array, power == 0.5), None
    top = _checked_max(array)
    if top is None:
        raise EncodeError(f"fisher for {name!r} holds negative or non-finite weights", tensor=name)
    if power == 0:
        return (np.ones(array.size, dtype=np.float32), False), (1.0 if array.size else -math.inf)
    if power == 1:
        return (array, False), top
    if power == 0.5:
        return (array, True), (math.sqrt(top) if top >= 0 else top)
    powered = np.power(array.astype(np.float64), power)
    return (powered, False), (float(np.max(powered)) if powered.size else -math.inf)


def _checked_max(array: np.ndarray):
    """The largest element (-inf for an empty array), or None if any is negative or not finite."""
    native = getattr(_rans._speedups, "weights_max", None)
    if native is not None:
        return native(array, array.itemsize)
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        return None
    return float(np.max(array)) if array.size else -math.inf


def _normalized(weights: dict, largest: dict) -> dict:
    """Divide every weight by the largest: only ratios matter to the allocation, and weights
    near 1 stay representable whatever their original scale."""
    top = max((value for value in largest.values() if value > -math.inf), default=0.0)
    top = top if top > 0 else 0.0  # all zero: nothing matters more than anything else
    out = {}
    for name, weight in weights.items():
        if isinstance(weight, tuple):
            out[name] = ElementWeights(values=weight[0], root=weight[1], top=top)
        else:
            out[name] = float(weight) / top if top > 0 else float(weight)
    return out
