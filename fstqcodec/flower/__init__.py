"""Flower adapter: fstq-compressed uplink (and optionally downlink) for Flower's Message API.

:class:`FstqStrategy` (server, :mod:`.strategy`) wraps any Flower strategy; :class:`FstqMod`
(client, :mod:`.mod`) is a client mod. They talk through the records named in :mod:`.protocol`,
whose normative description is ``spec/FLOWER.md``.

The server-side names are loaded on first use, so that a client (``import fstqcodec.flower.mod``
or ``from fstqcodec.flower import FstqMod``) loads no server code (no ``flwr.serverapp``).
"""

from __future__ import annotations

from .mod import FstqMod
from .protocol import (
    CONFIG_RECORD,
    FISHER_RECORD,
    MESSAGE_ARRAY,
    PROTOCOL_VERSION,
    RESIDUAL_STATE,
    STYPE_MODEL,
    STYPE_PROXY,
    STYPE_UPDATE,
)
from .budget import LinkBudget

_SERVER_NAMES = ("FstqStrategy", "DroppedReply", "RoundTraffic", "DownlinkProxies")

__all__ = [
    "FstqMod",
    "FstqStrategy",
    "LinkBudget",
    "DroppedReply",
    "RoundTraffic",
    "DownlinkProxies",
    "PROTOCOL_VERSION",
    "CONFIG_RECORD",
    "FISHER_RECORD",
    "MESSAGE_ARRAY",
    "RESIDUAL_STATE",
    "STYPE_MODEL",
    "STYPE_UPDATE",
    "STYPE_PROXY",
]


def __getattr__(name: str):
    # PEP 562: the server side is imported when one of its names is first asked for.
    if name in _SERVER_NAMES:
        from . import strategy

        return getattr(strategy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
