"""``fstq-ef21``: predictive coding across rounds (EF21, Richtarik et al., 2021) over fstq messages.

Each client ``i`` and the server hold the same reference ``g_i``: the server's reconstruction of
that client's update, built from every message of the client that arrived. A round's message
encodes the difference ``update - g_i`` (fstq, Fisher-weighted, under the same byte budget); both
ends add the decoded difference to ``g_i``, and the server averages the participants' ``g_i``
rather than their messages. A persistent client drift (under label skew every client pulls the
same way round after round) is paid for once and then costs only its changes; plain error
feedback instead pays for it in every round and delivers it late.

The reference is state both ends keep, not part of the message: a lost or refused message leaves
both references where they were (the client is told, as with error feedback).
"""

from __future__ import annotations

import numpy as np

import fstqcodec
from fstqcodec.config import EncodeConfig
from fstqcodec.sim.methods import Fstq, UpdateLayout

__all__ = ["FstqEF21", "ReferenceState"]


class ReferenceState:
    """A client's reference ``g_i`` and, until the message is known delivered, the one before it."""

    def __init__(self) -> None:
        self.reference: dict[str, np.ndarray] = {}
        self._before: dict[str, np.ndarray] | None = None

    def message_lost(self) -> None:
        """The last message did not arrive: the server's reference did not move, so neither does ours."""
        if self._before is not None:
            self.reference, self._before = self._before, None


class FstqEF21(Fstq):
    """fstq messages of ``update - g_i``; the server averages the clients' references ``g_i``."""

    #: The server keeps one reference per client and averages those (see :meth:`server_update`).
    keeps_server_references = True

    def __init__(self, layout: UpdateLayout, config: EncodeConfig):
        super().__init__(layout, config, use_fisher=True)
        self.name = "fstq-ef21"

    def config(self):
        return {**super().config(), "name": self.name, "error_feedback": False,
                "predictive_coding": "EF21: message = update - reference; both ends add it to the reference"}

    def new_client_state(self):
        return ReferenceState()

    def encode(self, update, *, fisher, state, seed, budget_bytes=None):
        self.layout.check(update)
        config = self.encode_config.replace(seed=seed)
        if budget_bytes is not None:
            config = config.replace(budget=fstqcodec.Budget(max_bytes=int(budget_bytes)))
        reference = state.reference
        difference = {name: np.asarray(update[name], np.float32) - reference.get(name, np.float32(0))
                      for name in self.layout.names}
        message = fstqcodec.encode(difference, fisher=fisher, schema=self.wire_schema, config=config)
        state._before = reference
        state.reference = self.server_update(reference, self.decode(message))
        return message

    def server_update(self, reference: dict, decoded: dict) -> dict:
        """The reference after a delivered message's decoded difference (the same on both ends)."""
        return {name: np.add(reference[name], decoded[name], dtype=np.float32) if name in reference
                else np.asarray(decoded[name], np.float32) for name in self.layout.names}
