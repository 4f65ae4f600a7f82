"""Byte budgets in the units users think in."""

from __future__ import annotations

import math

__all__ = ["Budget"]


class Budget:
    """A limit on the size of a whole message, counting every byte (preamble, header, tables,
    scales, codes, checksum).

    Give exactly one of the parameters.

    Parameters
    ----------
    bits_per_param : float, optional
        Bits per tensor element: ``max_bytes = floor(bits_per_param * elements / 8)``.
    max_bytes : int, optional
        The message size in bytes.
    ratio : float, optional
        Compression ratio against the tensors' raw size at their own dtypes:
        ``max_bytes = floor(raw_bytes / ratio)``.

    Examples
    --------
    >>> Budget(bits_per_param=1).resolve(elements=1000, raw_bytes=4000)
    125
    >>> Budget.for_link(bandwidth_bps=1e6, deadline_s=2.0).max_bytes
    250000
    """

    __slots__ = ("bits_per_param", "max_bytes", "ratio")

    def __init__(self, bits_per_param: float | None = None, *, max_bytes: int | None = None, ratio: float | None = None):
        given = [name for name, value in (("bits_per_param", bits_per_param), ("max_bytes", max_bytes), ("ratio", ratio)) if value is not None]
        if len(given) != 1:
            raise TypeError(f"Budget takes exactly one of bits_per_param, max_bytes, ratio; got {given or 'none'}")
        if bits_per_param is not None and not (math.isfinite(bits_per_param) and bits_per_param > 0):
            raise ValueError(f"bits_per_param must be a positive finite number, got {bits_per_param!r}")
        if max_bytes is not None:
            if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
                raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        if ratio is not None and not (math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"ratio must be a positive finite number, got {ratio!r}")
        self.bits_per_param = bits_per_param
        self.max_bytes = max_bytes
        self.ratio = ratio

    @classmethod
    def for_link(cls, bandwidth_bps: float, deadline_s: float) -> "Budget":
        """The bytes a link of ``bandwidth_bps`` bits per second carries within ``deadline_s``."""
        if not (bandwidth_bps > 0 and deadline_s > 0):
            raise ValueError("bandwidth_bps and deadline_s must be positive")
        return cls(max_bytes=max(1, int(bandwidth_bps * deadline_s // 8)))

    def resolve(self, *, elements: int, raw_bytes: int) -> int:
        """The budget in bytes for tensors with ``elements`` elements taking ``raw_bytes``."""
        if self.max_bytes is not None:
            return self.max_bytes
        if self.bits_per_param is not None:
            return int(math.floor(self.bits_per_param * elements / 8))
        return int(math.floor(raw_bytes / self.ratio))

    def get_config(self) -> dict:
        """A JSON-safe dict naming the one parameter given, e.g. ``{"bits_per_param": 0.3}``."""
        return {name: getattr(self, name) for name in self.__slots__ if getattr(self, name) is not None}

    @classmethod
    def from_config(cls, config: dict) -> "Budget":
        """The budget that :meth:`get_config` described.

        Raises
        ------
        TypeError
            Not a dict, unknown keys, or not exactly one parameter.
        ValueError
            A parameter out of range.
        """
        if not isinstance(config, dict):
            raise TypeError(f"a budget config is a dict, got {type(config).__name__}")
        unknown = sorted(set(config) - set(cls.__slots__), key=str)
        if unknown:
            raise TypeError(f"unknown budget parameter(s): {', '.join(map(str, unknown))}")
        return cls(**config)

    def __repr__(self) -> str:
        for name in self.__slots__:
            value = getattr(self, name)
            if value is not None:
                return f"Budget({name}={value!r})"
        return "Budget()"

    def __eq__(self, other) -> bool:
        if not isinstance(other, Budget):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, n) for n in self.__slots__))
