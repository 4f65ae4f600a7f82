"""Per-block scales as positive bfloat16 (spec section 6.2).

A scale is stored as the upper 16 bits of an IEEE 754 binary32, little-endian. It must be finite
and strictly positive: sign bit clear, exponent not all ones, not zero. Subnormals are allowed.
bfloat16 keeps float32's exponent range (LoRA updates can be 1e-6 small, below float16's normal
range) and converts to float32 exactly, so every decoder computes the same values.
"""

from __future__ import annotations

import numpy as np

from ..errors import BadFormatError

__all__ = ["to_bf16_bits", "from_bf16_bits", "round_bf16"]


def to_bf16_bits(values: np.ndarray, *, mode: str = "nearest") -> np.ndarray:
    """Round positive finite float32 ``values`` to bfloat16 bit patterns (``uint16``).

    ``mode="nearest"`` rounds to nearest, ties to even; ``mode="up"`` rounds toward +inf, for
    scales that must not shrink (an absmax scale that shrank would clip the block's maximum);
    ``mode="down"`` toward zero, for scales that must not grow.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    if mode == "nearest":
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    elif mode == "up":
        rounded = bits + np.uint32(0xFFFF)
    elif mode == "down":
        rounded = bits
    else:
        raise ValueError(f"unknown rounding mode {mode!r}")
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    # Never round a positive scale to zero or to infinity.
    out = np.clip(out, 0x0001, 0x7F7F)
    return out


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns to float32 scales, validating them.

    Raises
    ------
    BadFormatError
        If any scale is negative, zero, infinite or NaN.
    """
    bits = np.asarray(bits, dtype=np.uint16)
    # Valid positive finite non-zero bfloat16: 0x0001 .. 0x7F7F.
    bad = (bits == 0) | (bits > 0x7F7F)
    if bad.any():
        index = int(np.argmax(bad))
        raise BadFormatError(
            f"scale #{index} is not a finite positive bfloat16 (bits {int(bits[index]):#06x})"
        )
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_bf16(values: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even), returned as float32.

    Used for tensors whose dtype is bfloat16. Non-finite values pass through unchanged.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    finite = (bits & np.uint32(0x7F800000)) != np.uint32(0x7F800000)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) & np.uint32(0xFFFF0000)
    return np.where(finite, rounded, bits).view(np.float32)
