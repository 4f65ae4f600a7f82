"""The encoder's options as one frozen, hashable, JSON-serialisable object (numcodecs' habits)."""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass

from .policy.budget import Budget
from .policy.fisher import check_fisher_power
from .stages.codebooks import resolve_codebook

__all__ = ["EncodeConfig", "DEFAULT_BLOCK_SIZE", "FEDERATED_FISHER_POWER", "resolve_config"]

DEFAULT_BLOCK_SIZE = 64

#: The Fisher power the reference loop measured best for federated updates from Adam-like
#: optimizers (README, "How it works"); the federated entry points (PEFT helper, Flower mod and
#: strategy, the sim) default to it, while :func:`fstqcodec.encode` keeps 1 (Fisher-weighted error).
FEDERATED_FISHER_POWER = 0.5

_ROUNDING = ("nearest", "stochastic")
_NONFINITE = ("error", "zero")


@dataclass(frozen=True)
class EncodeConfig:
    """Everything :func:`fstqcodec.encode` takes besides the tensors, Fisher, metadata and schema.

    Frozen and hashable; equality and ``repr`` come from the fields. :meth:`get_config` gives a
    JSON-safe dict and :meth:`from_config` reads it back (``from_config(get_config()) == self``),
    which is how the Flower protocol and the sim records carry it.

    Parameters
    ----------
    budget : Budget or int, optional
        Size limit of the whole message (an int is a number of bytes). None: lossless, unless
        ``bits`` or ``codebook`` chooses a fixed-rate mode.
    block_size : int
        Elements per block (1..65536).
    bits : int, optional
        Fixed-rate uniform grid of this width (2..8). Excludes ``budget`` and ``codebook``.
    codebook : str or sequence of float, optional
        Fixed-rate explicit levels (``"nf4"``, or 2**k increasing values, stored as a tuple).
    rounding : {"nearest", "stochastic"}
    seed : int
        Seed of stochastic rounding and of the unbiased mode's draws; the same input, config and
        seed give the same bytes.
    unbiased : bool
        Budget mode only: an unbiased estimate of the input (:func:`fstqcodec.encode`). Left out
        of :meth:`get_config` when False, so configs read the same as before the option existed.
    fisher_power : float
        The error is weighed by ``F ** fisher_power`` (1: Fisher-weighted error; 0: uniform).
    nonfinite : {"error", "zero"}
    compress_header : bool

    Raises
    ------
    TypeError, ValueError
        On an invalid option, at construction (not at the first encode).

    Examples
    --------
    >>> import json, fstqcodec
    >>> c = fstqcodec.EncodeConfig(budget=fstqcodec.Budget(bits_per_param=0.3), fisher_power=0.5)
    >>> fstqcodec.EncodeConfig.from_config(json.loads(json.dumps(c.get_config()))) == c
    True
    """

    budget: Budget | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    bits: int | None = None
    codebook: str | tuple[float, ...] | None = None
    rounding: str = "nearest"
    seed: int = 0
    unbiased: bool = False
    fisher_power: float = 1.0
    nonfinite: str = "error"
    compress_header: bool = True

    def __post_init__(self) -> None:
        set_field = object.__setattr__.__get__(self)
        set_field("budget", _budget(self.budget))
        set_field("block_size", _block_size(self.block_size))
        if self.bits is not None and (isinstance(self.bits, bool) or self.bits not in range(2, 9)):
            raise ValueError(f"bits must be an int from 2 to 8, got {self.bits!r}")
        if self.codebook is not None:
            set_field("codebook", _codebook(self.codebook))
        if sum(x is not None for x in (self.budget, self.bits, self.codebook)) > 1:
            raise TypeError("give at most one of budget, bits, codebook")
        if self.rounding not in _ROUNDING:
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {self.rounding!r}")
        if self.nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be 'error' or 'zero', got {self.nonfinite!r}")
        set_field("seed", _seed(self.seed))
        if not isinstance(self.unbiased, bool):
            raise TypeError(f"unbiased must be a bool, got {type(self.unbiased).__name__}")
        if self.unbiased and self.budget is None:
            raise ValueError("unbiased=True needs a budget (the fixed-rate modes round as 'rounding' says)")
        set_field("fisher_power", check_fisher_power(self.fisher_power))
        if not isinstance(self.compress_header, bool):
            raise TypeError(f"compress_header must be a bool, got {type(self.compress_header).__name__}")

    @property
    def mode(self) -> str:
        """``"budget"``, ``"bits"``, ``"codebook"`` or ``"lossless"``."""
        if self.budget is not None:
            return "budget"
        if self.bits is not None:
            return "bits"
        return "codebook" if self.codebook is not None else "lossless"

    def replace(self, **changes) -> "EncodeConfig":
        """A copy with some options changed (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    def get_config(self) -> dict:
        """A JSON-safe dict of every option (``budget`` as :meth:`Budget.get_config`)."""
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        config["budget"] = None if self.budget is None else self.budget.get_config()
        if not self.unbiased:
            del config["unbiased"]
        if isinstance(self.codebook, tuple):
            config["codebook"] = list(self.codebook)
        return {"id": "fstq", **config}

    @classmethod
    def from_config(cls, config: dict) -> "EncodeConfig":
        """The config that :meth:`get_config` described.

        Raises
        ------
        ValueError
            Unknown keys or an ``id`` other than ``"fstq"`` (a config from something else).
        """
        if not isinstance(config, dict):
            raise TypeError(f"an encoder config is a dict, got {type(config).__name__}")
        options = dict(config)
        codec_id = options.pop("id", "fstq")
        if codec_id != "fstq":
            raise ValueError(f"not an fstq encoder config (id {codec_id!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown encoder option(s): {', '.join(map(str, unknown))}")
        if options.get("budget") is not None:
            options["budget"] = Budget.from_config(options["budget"])
        if isinstance(options.get("codebook"), list):
            options["codebook"] = tuple(options["codebook"])
        return cls(**options)

    def encode_kwargs(self) -> dict:
        """The keyword arguments of :func:`fstqcodec.encode` that this config stands for."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def resolve_config(config: "EncodeConfig | None", options: dict, *, defaults: dict | None = None) -> EncodeConfig:
    """The one config an adapter works with: ``config``, or one built from keyword ``options``.

    ``defaults`` fills the options a caller left out (the federated entry points default
    ``fisher_power`` to :data:`FEDERATED_FISHER_POWER`); it does not apply to a given ``config``.

    Raises
    ------
    TypeError
        If ``config`` is not an EncodeConfig, if both ``config`` and options are given, or an
        option is unknown.
    ValueError
        On an invalid option value.
    """
    if config is None:
        return EncodeConfig(**{**(defaults or {}), **options})
    if not isinstance(config, EncodeConfig):
        raise TypeError(f"config must be a fstqcodec.EncodeConfig, got {type(config).__name__}")
    if options:
        raise TypeError(f"give the encoder options either in config or as keyword arguments, not both ({', '.join(sorted(options))})")
    return config


def _budget(budget):
    if budget is None or isinstance(budget, Budget):
        return budget
    if isinstance(budget, int) and not isinstance(budget, bool):
        return Budget(max_bytes=budget)
    raise TypeError(f"budget must be a Budget or an int number of bytes, got {type(budget).__name__}")


def _seed(seed) -> int:
    try:
        value = None if isinstance(seed, bool) else operator.index(seed)
    except TypeError:
        value = None
    if value is None or value < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return value


def _block_size(block_size) -> int:
    try:
        value = None if isinstance(block_size, bool) else operator.index(block_size)
    except TypeError:
        value = None
    if value is None or not 1 <= value <= 65536:
        raise ValueError("block_size must be an int in [1, 65536]")
    return value


def _codebook(codebook):
    if isinstance(codebook, str):
        resolve_codebook(codebook)  # unknown names fail here, not at the first encode
        return codebook
    levels = tuple(float(v) for v in _flat(codebook))
    resolve_codebook(levels)
    if not all(math.isfinite(v) for v in levels):
        raise ValueError("codebook levels must be finite and strictly increasing")
    return levels


def _flat(values):
    if hasattr(values, "ravel"):
        return values.ravel().tolist()
    return list(values)
