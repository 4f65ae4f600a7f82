"""``eden`` and ``signsgd-ef``: the distributed-mean-estimation peers of :mod:`fstqcodec.sim.peers`
as methods of the reference loop.

eden
    DRIVE / EDEN with EDEN's unbiased scale (no error feedback: the estimate is unbiased). At
    ``b >= 1`` bits per parameter (the budget, rounded down to 1..4) ``b``-bit Lloyd-Max codes of the
    rotated update; below one bit a shared-random fraction ``b`` of the rotated coordinates at one
    bit. The rotation's seed is the client's seed, carried in the message.
signsgd-ef
    Scaled sign with error feedback (Karimireddy et al., 2019): the client adds its residual, sends
    one bit per element and one ``mean |x|`` per tensor, and keeps what the message missed. One bit
    per parameter whatever the budget.
"""

from __future__ import annotations

import numpy as np

from fstqcodec.config import EncodeConfig
from fstqcodec.sim import peers
from fstqcodec.sim.methods import Method, UpdateLayout

__all__ = ["Eden", "SignSGDEF"]


class Eden(Method):
    """EDEN / DRIVE at the budget's bits per parameter, unbiased scale."""

    name = "eden"

    def __init__(self, layout: UpdateLayout, config: EncodeConfig):
        super().__init__(layout)
        if config.budget is None or config.budget.bits_per_param is None:
            raise ValueError("eden needs a bits-per-parameter budget")
        rate = float(config.budget.bits_per_param)
        self.bits, self.fraction = (1, rate) if rate < 1 else (min(4, int(rate)), 1.0)

    def config(self):
        return {"name": self.name, "bits": self.bits, "fraction": self.fraction, "scale": "unbiased",
                "chunk": peers.CHUNK, "error_feedback": False}

    def encode(self, update, *, fisher, state, seed, budget_bytes=None):
        self.layout.check(update)
        return peers.eden_encode(self.layout.flatten(update), bits=self.bits, fraction=self.fraction,
                                 scale="unbiased", seed=int(seed) & ((1 << 64) - 1))

    def decode(self, data):
        flat = peers.eden_decode(data)
        if flat.size != self.layout.total:
            raise ValueError(f"eden message holds {flat.size} elements, the model has {self.layout.total}")
        return self.layout.unflatten(flat)

    def anatomy(self, data):
        chunks = -(-self.layout.total // peers.CHUNK)
        head = peers.EDEN_HEADER_SIZE
        return {"header": head, "scales": 4 * chunks, "codes": len(data) - head - 4 * chunks}


class SignSGDEF(Method):
    """Scaled sign (one bit per element, ``mean |x|`` per tensor) with error feedback."""

    name = "signsgd-ef"

    def config(self):
        return {"name": self.name, "bits_per_param": 1, "scale": "mean |x| per tensor", "error_feedback": True}

    def new_client_state(self):
        return {"residual": np.zeros(self.layout.total, dtype=np.float32)}

    def encode(self, update, *, fisher, state, seed, budget_bytes=None):
        self.layout.check(update)
        corrected = self.layout.flatten(update) + state["residual"]
        parts = self.layout.unflatten(corrected)
        message = peers.sign_encode([parts[name] for name in self.layout.names])
        state["residual"] = corrected - self.layout.flatten(self.decode(message))
        return message

    def decode(self, data):
        sizes = [self.layout.sizes[name] for name in self.layout.names]
        flats = peers.sign_decode(data, sizes)
        return {name: flat.reshape(self.layout.shapes[name]) for name, flat in zip(self.layout.names, flats)}

    def anatomy(self, data):
        head = 7 + 4 * len(self.layout.names)
        return {"header": 7, "scales": head - 7, "codes": len(data) - head}
