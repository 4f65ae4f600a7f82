"""Built-in codebooks for the encoder. In a message every codebook is carried explicitly (spec 6.4),
so decoders need no shared tables; these names exist only on the encoding side."""

from __future__ import annotations

import numpy as np

__all__ = ["NF4", "BUILTIN_CODEBOOKS", "resolve_codebook"]

#: The 4-bit NormalFloat levels of QLoRA (Dettmers et al., 2023), scaled to [-1, 1].
NF4 = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)

BUILTIN_CODEBOOKS = {"nf4": NF4}


def resolve_codebook(codebook) -> np.ndarray:
    """A codebook given by name (``"nf4"``) or as levels: float32, sorted, finite, 2**k entries."""
    if isinstance(codebook, str):
        try:
            return BUILTIN_CODEBOOKS[codebook]
        except KeyError:
            raise ValueError(f"unknown codebook {codebook!r}; known: {sorted(BUILTIN_CODEBOOKS)}") from None
    levels = np.asarray(codebook, dtype=np.float32).ravel()
    count = len(levels)
    if count < 2 or count > 256 or count & (count - 1):
        raise ValueError(f"a codebook needs 2, 4, ..., 256 levels, got {count}")
    if not np.all(np.isfinite(levels)) or np.any(np.diff(levels) <= 0):
        raise ValueError("codebook levels must be finite and strictly increasing")
    return levels
