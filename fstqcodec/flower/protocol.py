"""The request/reply contract between :class:`FstqStrategy` and :class:`FstqMod`.

Normative text: ``spec/FLOWER.md`` (this module implements its version :data:`PROTOCOL_VERSION`).
It holds the protocol's names (records, keys, stypes), the train request as a dataclass, and the
record helpers both sides use. It imports only ``flwr.app``, so client and server can share it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fstqcodec.config import FEDERATED_FISHER_POWER, EncodeConfig
from fstqcodec.proxy import FILLS

__all__ = [
    "PROTOCOL_VERSION",
    "CONFIG_RECORD",
    "FISHER_RECORD",
    "MESSAGE_ARRAY",
    "STYPE_MODEL",
    "STYPE_UPDATE",
    "STYPE_PROXY",
    "PROXY_FILLS",
    "RESIDUAL_STATE",
    "REQUEST_KEYS",
    "MOD_FAILED_PRECONDITION",
    "ProtocolError",
    "TrainRequest",
]

#: Version of the protocol (``spec/FLOWER.md``). 3: downlink proxies (``STYPE_PROXY``) and the
#: request key ``"proxy-fill"``; 2: the encoder's options travel as one JSON object
#: (``EncodeConfig.get_config()``) under ``"encoder"``; 1 sent them as loose keys.
PROTOCOL_VERSION = 3
#: Name of the ``ConfigRecord`` that carries the server's compression request.
CONFIG_RECORD = "fstq"
#: Default name of the ``ArrayRecord`` in which an app hands its diagonal Fisher to the mod
#: (client-local: it never travels).
FISHER_RECORD = "fisher"
#: Name of the single ``Array`` that holds an fstq message inside an ``ArrayRecord``.
MESSAGE_ARRAY = "fstq"
#: ``Array.stype`` of a compressed global model (downlink).
STYPE_MODEL = "fstqcodec.model"
#: ``Array.stype`` of a compressed client update, trained minus received model (uplink).
STYPE_UPDATE = "fstqcodec.update"
#: ``Array.stype`` of a proxy of the global model (downlink): an fstq message with seeded masks
#: (spec/FORMAT.md 5.9) that carries only the entries this client may see in this round.
STYPE_PROXY = "fstqcodec.proxy"
#: What a client puts in the entries a proxy hides: zeros, the model it last trained ("previous"),
#: or the model it last decoded from a proxy ("received": each entry as the server last sent it).
PROXY_FILLS = FILLS
#: Default key under which the mod keeps its error-feedback residual in ``Context.state``.
RESIDUAL_STATE = "fstq.residual"

#: The keys of the request ``ConfigRecord`` and the type of each value (spec/FLOWER.md, 3).
REQUEST_KEYS: Mapping[str, type] = {
    "version": int,
    "encoder": str,
    "error-feedback": bool,
    "round": int,
    "last-accepted-round": int,
    "proxy-fill": str,
}

# Flower's ErrorCode.MOD_FAILED_PRECONDITION (flwr.common.constant), the code Flower's own mods
# use for replies they refuse to produce; copied because flwr.common is not part of Flower's
# stable ``flwr.app`` surface.
MOD_FAILED_PRECONDITION = 6


class ProtocolError(ValueError):
    """A record breaks the contract of ``spec/FLOWER.md``; the message says how, for logs and replies."""


@dataclasses.dataclass(frozen=True)
class TrainRequest:
    """What the server asks of one client in one round: the ``ConfigRecord "fstq"``.

    Attributes
    ----------
    encoder : EncodeConfig
        The client's encoder options for this round (its budget and seed included).
    error_feedback : bool
        Whether the client keeps what compression lost and adds it to its next update.
    server_round : int
        The server's round, 1 or more.
    last_accepted_round : int
        The latest round whose reply from this client the server accepted (0: none), below
        ``server_round``.
    proxy_fill : {"zero", "previous", "received"}
        What the client puts in the entries a proxy of the global model hides (only read when
        the message holds a proxy).
    """

    encoder: EncodeConfig
    error_feedback: bool
    server_round: int
    last_accepted_round: int
    proxy_fill: str = "zero"

    def to_record(self) -> ConfigRecord:
        """The request as the ``ConfigRecord`` the server sends."""
        encoder = json.dumps(self.encoder.get_config(), sort_keys=True, allow_nan=False)
        return ConfigRecord({
            "version": PROTOCOL_VERSION,
            "encoder": encoder,
            "error-feedback": bool(self.error_feedback),
            "round": int(self.server_round),
            "last-accepted-round": int(self.last_accepted_round),
            "proxy-fill": str(self.proxy_fill),
        })

    @classmethod
    def from_record(cls, record: ConfigRecord) -> "TrainRequest":
        """Read a request (the client's side), checking the version first.

        Raises
        ------
        ProtocolError
            If the version is missing, older or newer than :data:`PROTOCOL_VERSION`, a key is
            missing or of the wrong type, the rounds are inconsistent, the proxy fill is
            unknown, or the encoder config cannot be read.
        """
        check_version(record)
        values = {}
        for key, expected in REQUEST_KEYS.items():
            value = record.get(key)
            if not _is_a(value, expected):
                raise ProtocolError(
                    f"the {CONFIG_RECORD!r} request needs {key!r} as {expected.__name__}, got {value!r}"
                )
            values[key] = value
        if values["round"] < 1 or not 0 <= values["last-accepted-round"] < values["round"]:
            raise ProtocolError(
                f"inconsistent rounds in the request: round {values['round']}, "
                f"last-accepted-round {values['last-accepted-round']}"
            )
        return cls(read_encoder_config(values["encoder"]), values["error-feedback"],
                   values["round"], values["last-accepted-round"], check_proxy_fill(values["proxy-fill"]))


def proxy_fill_record(fill: str) -> ConfigRecord:
    """The ``"fstq"`` record of a message other than a train message that holds a proxy."""
    return ConfigRecord({"version": PROTOCOL_VERSION, "proxy-fill": check_proxy_fill(fill)})


def read_proxy_fill(record: ConfigRecord) -> str:
    """The ``"proxy-fill"`` of a request record, version checked first (spec/FLOWER.md, 5).

    Raises
    ------
    ProtocolError
        If the version is not this protocol's, or ``proxy-fill`` is missing or unknown.
    """
    check_version(record)
    return check_proxy_fill(record.get("proxy-fill"))


def check_proxy_fill(fill: object) -> str:
    """``fill`` if it is one of :data:`PROXY_FILLS`; else :class:`ProtocolError`."""
    if not isinstance(fill, str) or fill not in PROXY_FILLS:
        raise ProtocolError(f"the {CONFIG_RECORD!r} record's 'proxy-fill' must be one of {list(PROXY_FILLS)}, got {fill!r}")
    return fill


def check_version(record: ConfigRecord) -> None:
    """Refuse a request of another protocol version, naming the side to upgrade.

    Raises
    ------
    ProtocolError
        If ``version`` is missing, not a positive int, or not :data:`PROTOCOL_VERSION`.
    """
    version = record.get("version")
    if not _is_a(version, int) or version < 1:
        raise ProtocolError(f"the {CONFIG_RECORD!r} ConfigRecord has no valid 'version' (got {version!r})")
    if version != PROTOCOL_VERSION:
        upgrade = "client" if version > PROTOCOL_VERSION else "server"
        raise ProtocolError(
            f"the server speaks fstq adapter protocol {version}, this client {PROTOCOL_VERSION}; "
            f"upgrade fstqcodec on the {upgrade}"
        )


def read_encoder_config(text: str) -> EncodeConfig:
    """The ``EncodeConfig`` a request's ``"encoder"`` JSON text describes.

    Members left out take ``EncodeConfig``'s defaults, except ``fisher_power``, which takes
    :data:`fstqcodec.FEDERATED_FISHER_POWER` (spec/FLOWER.md, 4).

    Raises
    ------
    ProtocolError
        If the text is not one JSON object or names an option or value the encoder refuses.
    """
    try:
        config = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as err:
        raise ProtocolError(f"cannot read the encoder config: not JSON ({err})") from None
    if not isinstance(config, dict):
        raise ProtocolError(
            f"cannot read the encoder config: a JSON object is expected, got {type(config).__name__}"
        )
    try:
        return EncodeConfig.from_config({"fisher_power": FEDERATED_FISHER_POWER, **config})
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"cannot read the encoder config: {err}") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _is_a(value: object, expected: type) -> bool:
    """Whether ``value`` has the ConfigRecord type ``expected`` (a bool is not an int here)."""
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


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
            raise ProtocolError(
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


def require_same_tensors(
    got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], what: str
) -> None:
    """Raise :class:`ProtocolError` unless ``got`` matches ``expected`` (see :func:`check_same_tensors`)."""
    reason = check_same_tensors(got, expected, what)
    if reason is not None:
        raise ProtocolError(reason)


def matching_tensors(
    record: ArrayRecord, expected: Mapping[str, np.ndarray], what: str, *, unreadable: str
) -> dict:
    """The NumPy tensors of ``record``, which must match ``expected``; else :class:`ProtocolError`."""
    try:
        tensors = plain_tensors(record)
    except TypeError as err:
        raise ProtocolError(f"{unreadable}: {err}") from None
    require_same_tensors(tensors, expected, what)
    return tensors

