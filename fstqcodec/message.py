"""A decoded message together with what it declares: dtypes (bfloat16 included), shapes, metadata."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["Message"]


class Message(Mapping):
    """The tensors of one message and what the message declares about them.

    A read-only mapping of names to numpy arrays, in the message's order (like the dict
    :func:`fstqcodec.decode` returns), with the declared dtype of each tensor beside it. numpy has
    no bfloat16: a tensor declared ``"bfloat16"`` is a float32 array holding bfloat16 values, and
    :attr:`dtypes` says so; ``fstqcodec.torch.decode`` turns it back into ``torch.bfloat16``.

    Attributes
    ----------
    dtypes : dict[str, str]
        Declared dtype per tensor: ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``.
    shapes : dict[str, tuple[int, ...]]
        Declared shape per tensor.
    meta : dict
        The message's metadata (``meta=`` at encode time; empty if none).
    version : tuple[int, int]
        The format version the message was written in.
    size : int
        The message's length in bytes.
    """

    def __init__(self, tensors: dict, dtypes: dict, meta: dict, version: tuple, size: int):
        self._tensors = tensors
        self.dtypes = dtypes
        self.shapes = {name: tuple(array.shape) for name, array in tensors.items()}
        self.meta = meta
        self.version = version
        self.size = size

    def __getitem__(self, name: str) -> np.ndarray:
        return self._tensors[name]

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def tensors(self) -> dict:
        """A new dict of name -> array (the arrays themselves are not copied)."""
        return dict(self._tensors)

    def __repr__(self) -> str:
        listed = ", ".join(f"{name}: {self.dtypes[name]}{list(self.shapes[name])}" for name in list(self)[:4])
        more = f", ... ({len(self)} tensors)" if len(self) > 4 else ""
        return f"Message({listed}{more}, meta={self.meta!r})"
