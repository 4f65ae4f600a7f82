"""Fisher importance as the encoder takes it: per element, per tensor, or none (uniform)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..errors import EncodeError

__all__ = ["normalize_fisher", "check_fisher_power"]


def check_fisher_power(power) -> float:
    """``power`` as a float, or ``ValueError`` unless it is a finite number >= 0."""
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not (math.isfinite(power) and power >= 0):
        raise ValueError(f"fisher_power must be a finite number >= 0, got {power!r}")
    return float(power)


def normalize_fisher(fisher, names: list, shapes: dict, power: float = 1.0) -> dict:
    """Validate ``fisher`` against the tensors and return ``name -> float | ndarray``.

    Parameters
    ----------
    fisher : None or Mapping[str, array-like or float]
        ``None`` means uniform importance (plain MSE). A mapping must name every tensor; each value
        is a non-negative finite scalar (one weight for the whole tensor) or an array of the
        tensor's shape (one weight per element).
    power : float
        The weights used are ``fisher ** power`` (see ``fisher_power`` of :func:`fstqcodec.encode`).

    Raises
    ------
    EncodeError
        If a tensor is missing, a shape differs, or a weight is negative or not finite.
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
    out = {}
    for name in names:
        if name not in fisher:
            raise EncodeError(f"fisher has no weights for tensor {name!r}", tensor=name)
        value = fisher[name]
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().float().cpu().numpy()
        if isinstance(value, (str, bytes, bool)) or np.asarray(value).dtype.kind not in "fiu":
            raise EncodeError(f"fisher for {name!r} must be numbers, got {type(value).__name__}", tensor=name)
        array = np.asarray(value, dtype=np.float64)
        if array.ndim == 0:
            weight = float(array)
            if not (math.isfinite(weight) and weight >= 0):
                raise EncodeError(f"fisher weight of {name!r} must be finite and >= 0, got {weight}", tensor=name)
            out[name] = weight**power
            continue
        if array.shape != tuple(shapes[name]):
            raise EncodeError(
                f"fisher for {name!r} has shape {array.shape}, the tensor has {tuple(shapes[name])}", tensor=name
            )
        if not np.all(np.isfinite(array)) or np.any(array < 0):
            raise EncodeError(f"fisher for {name!r} holds negative or non-finite weights", tensor=name)
        out[name] = array if power == 1 else np.power(array, power)
    return _normalized(out)


def _normalized(weights: dict) -> dict:
    """Divide every weight by the largest: only ratios matter to the allocation, and weights
    near 1 stay representable through float32 arithmetic whatever their original scale."""
    top = max(((float(np.max(w)) if np.ndim(w) else float(w)) for w in weights.values() if np.size(w)), default=0.0)
    if not top > 0:
        return weights  # all zero: nothing matters more than anything else
    return {name: (w / top if np.ndim(w) else float(w) / top) for name, w in weights.items()}
