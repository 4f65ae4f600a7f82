"""The request/reply contract between :class:`FstqStrategy` and :class:`FstqMod`.

Normative text: ``spec/FLOWER.md``. This module holds its names (records, keys, stypes, version)
and the helpers both sides use to build and check records. It imports only ``flwr.app``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

import fstqcodec

__all__ = [
    "PROTOCOL_VERSION",
    "CONFIG_RECORD",
    "FISHER_RECORD",
    "MESSAGE_ARRAY",
    "STYPE_MODEL",
    "STYPE_UPDATE",
    "RESIDUAL_STATE",
    "MOD_FAILED_PRECONDITION",
]

#: Version of the adapter's protocol (the record names and config keys below). A mod refuses a
#: train message that declares a newer version instead of guessing what it means.
PROTOCOL_VERSION = 1
#: Name of the ``ConfigRecord`` that carries the server's compression request.
CONFIG_RECORD = "fstq"
#: Default name of the ``ArrayRecord`` in which an app hands its diagonal Fisher to the mod.
FISHER_RECORD = "fisher"
#: Name of the single ``Array`` that holds an fstq message inside an ``ArrayRecord``.
MESSAGE_ARRAY = "fstq"
#: ``Array.stype`` of a compressed global model (downlink).
STYPE_MODEL = "fstqcodec.model"
#: ``Array.stype`` of a compressed client update, trained minus received model (uplink).
STYPE_UPDATE = "fstqcodec.update"
#: Default key under which the mod keeps its error-feedback residual in ``Context.state``.
RESIDUAL_STATE = "fstq.residual"

# Flower's ErrorCode.MOD_FAILED_PRECONDITION (flwr.common.constant), the code Flower's own mods
# use for replies they refuse to produce; copied because flwr.common is not part of Flower's
# stable ``flwr.app`` surface.
MOD_FAILED_PRECONDITION = 6

BUDGET_UNITS = ("bits_per_param", "max_bytes", "ratio")


def budget_to_config(budget: fstqcodec.Budget | None) -> dict[str, str | float]:
    """Describe a budget (``None`` = lossless) as ConfigRecord entries."""
    if budget is None:
        return {"uplink": "lossless"}
    given = [(unit, getattr(budget, unit, None)) for unit in BUDGET_UNITS]
    given = [(unit, value) for unit, value in given if value is not None]
    if len(given) != 1:
        raise TypeError(f"expected an fstqcodec.Budget with exactly one unit set, got {budget!r}")
    unit, value = given[0]
    return {"uplink": "budget", "budget-unit": unit, "budget-value": float(value)}


def budget_from_config(config: ConfigRecord) -> fstqcodec.Budget | None:
    """Inverse of :func:`budget_to_config`; raises ``ValueError`` on a malformed request."""
    uplink = config.get("uplink")
    if uplink == "lossless":
        return None
    if uplink != "budget":
        raise ValueError(f"unknown uplink mode {uplink!r} (expected 'lossless' or 'budget')")
    unit, value = config.get("budget-unit"), config.get("budget-value")
    if unit not in BUDGET_UNITS:
        raise ValueError(f"unknown budget unit {unit!r} (expected one of {BUDGET_UNITS})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"budget-value must be a finite number, got {value!r}")
    if unit == "max_bytes":
        return fstqcodec.Budget(max_bytes=int(value))
    return fstqcodec.Budget(**{unit: float(value)})



def message_record(data: bytes, stype: str) -> ArrayRecord:
    """Wrap an fstq message as an ArrayRecord with one opaque Array (bytes as uint8)."""
    return ArrayRecord(
        {MESSAGE_ARRAY: Array(dtype="uint8", shape=(len(data),), stype=stype, data=bytes(data))}
    )


def message_bytes(record: ArrayRecord, stype: str) -> bytes | None:
    """The fstq message held by ``record``, or ``None`` if it holds plain arrays."""
    arrays = list(record.values())
    if any(array.stype == stype for array in arrays):
        if len(arrays) != 1 or MESSAGE_ARRAY not in record:
            raise Rejected(
                f"an ArrayRecord with a {stype!r} Array must hold exactly that one Array, "
                f"named {MESSAGE_ARRAY!r}; found {sorted(record.keys())}"
            )
        return arrays[0].data
    return None


def plain_tensors(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Tensors of an ArrayRecord of NumPy arrays, in the record's order."""
    return {name: array.numpy() for name, array in record.items()}


def numpy_record(tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in tensors.items()})


def update_dtype(dtype: np.dtype) -> np.dtype:
    """Arithmetic dtype of an update: float32, or float64 for float64 models."""
    return np.result_type(dtype, np.float32)


def check_same_tensors(
    got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], what: str
) -> str | None:
    """Why ``got`` does not match ``expected`` by names, shapes and finiteness, or ``None``."""
    missing = [name for name in expected if name not in got]
    unexpected = [name for name in got if name not in expected]
    if missing or unexpected:
        return (
            f"wrong tensors in {what}: missing {short_list(missing)}, "
            f"unexpected {short_list(unexpected)}"
        )
    for name, reference in expected.items():
        value = got[name]
        if tuple(value.shape) != tuple(reference.shape):
            return (
                f"wrong shape in {what}: {name!r} is {tuple(value.shape)}, "
                f"expected {tuple(reference.shape)}"
            )
        if not np.issubdtype(value.dtype, np.floating):
            return f"{what}: {name!r} has dtype {value.dtype}, expected a floating-point dtype"
        if not np.all(np.isfinite(value)):
            return f"non-finite values in {what}: {name!r}"
    return None


def short_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return f"[{shown}{more}]"


class Rejected(Exception):
    """Internal: a record is not acceptable; ``args[0]`` is the reason, for logs and metrics."""


def require_same_tensors(got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], what: str) -> None:
    """Raise :class:`Rejected` unless ``got`` matches ``expected`` (see :func:`check_same_tensors`)."""
    reason = check_same_tensors(got, expected, what)
    if reason is not None:
        raise Rejected(reason)


def matching_tensors(record: ArrayRecord, expected: Mapping[str, np.ndarray], what: str, *, unreadable: str) -> dict:
    """The NumPy tensors of ``record``, which must match ``expected``; else :class:`Rejected`."""
    try:
        tensors = plain_tensors(record)
    except TypeError as err:
        raise Rejected(f"{unreadable}: {err}") from None
    require_same_tensors(tensors, expected, what)
    return tensors

