"""Flower adapter: fstq-compressed uplink (and optionally downlink) for Flower's Message API.

:class:`FstqStrategy` (server, :mod:`.strategy`) wraps any Flower strategy; :class:`FstqMod`
(client, :mod:`.mod`) is a client mod. They talk through the records named in :mod:`.protocol`,
whose normative description is ``spec/FLOWER.md``. A client process can import
:mod:`fstqcodec.flower.mod` alone: it loads no server code.
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
    STYPE_UPDATE,
)
from .strategy import DroppedReply, FstqStrategy, LinkBudget, RoundTraffic

__all__ = [
    "FstqMod",
    "FstqStrategy",
    "LinkBudget",
    "DroppedReply",
    "RoundTraffic",
    "PROTOCOL_VERSION",
    "CONFIG_RECORD",
    "FISHER_RECORD",
    "MESSAGE_ARRAY",
    "RESIDUAL_STATE",
    "STYPE_MODEL",
    "STYPE_UPDATE",
]
