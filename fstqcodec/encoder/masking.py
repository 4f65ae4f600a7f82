"""Masked tensors: the encoder codes only the elements a tensor's seeded masks keep (spec 5.9)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import EncodeError
from ..wire.header import TensorSpec
from ..wire.masks import Mask, visibility
from .source import _as_array

__all__ = ["apply_masks"]


def _mask_list(name: str, value) -> list:
    """The masks given for one tensor as a list of :class:`Mask`."""
    masks = [value] if isinstance(value, Mask) else list(value)
    for mask in masks:
        if not isinstance(mask, Mask):
            raise TypeError(f"masks[{name!r}] must be a fstqcodec.Mask or a list of them, got {type(mask).__name__}")
    return masks


def apply_masks(tensors, fisher, masks, block_size: int) -> tuple:
    """Keep the visible elements of masked tensors (C order, as 1-D arrays), and their Fisher weights.

    Returns ``(tensors, fisher, (declared specs, tensor index -> masks))``: the tensors and weights
    to encode, and what the header declares (the tensors' real shapes and their masks).

    Raises
    ------
    EncodeError
        If a mask names a tensor that is not there, does not fit its tensor's shape, or is given
        for a bfloat16 tensor; or if a per-element Fisher array does not match its tensor.
    TypeError
        If ``masks`` is not a mapping of names to Masks.
    """
    if not isinstance(masks, Mapping) or not isinstance(tensors, Mapping):
        raise TypeError("masks must be a mapping of tensor names to fstqcodec.Mask (or lists of them)")
    unknown = [name for name in masks if name not in tensors]
    if unknown:
        raise EncodeError(f"masks name tensors that are not encoded: {unknown}", tensor=str(unknown[0]))
    compact, weights, declared, by_index = {}, None if fisher is None else dict(fisher), [], {}
    for index, (name, value) in enumerate(tensors.items()):
        dtype, array = _as_array(str(name), value)
        shape = tuple(int(d) for d in array.shape)
        declared.append(TensorSpec(name, dtype, shape, block_size))
        listed = _mask_list(name, masks.get(name, []))
        if not listed:
            compact[name] = value
            continue
        if dtype == "bfloat16":
            raise EncodeError(f"tensor {name!r}: masks are not supported for bfloat16 tensors", tensor=name)
        try:
            visible = visibility(shape, listed).reshape(-1)
        except ValueError as error:
            raise EncodeError(f"tensor {name!r}: {error}", tensor=name) from None
        compact[name] = np.ascontiguousarray(array).reshape(-1)[visible]
        by_index[index] = listed
        if weights is not None and name in weights and np.ndim(weights[name]) > 0:
            weight = np.asarray(weights[name])
            if weight.shape != shape:
                raise EncodeError(f"fisher[{name!r}] has shape {weight.shape}, the tensor {shape}", tensor=name)
            weights[name] = weight.reshape(-1)[visible]
    return compact, weights, (declared, by_index)
