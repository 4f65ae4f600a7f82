"""The server's step over the round's averaged update: FedAvg, or FedAvgM (server momentum).

FedAvg adds the weighted mean of the decoded updates to the global adapter. FedAvgM (Hsu et al.,
2019, "Measuring the effects of non-identical data distribution for federated visual
classification") keeps a velocity ``v <- momentum * v + mean`` and adds ``server_lr * v``. Under a
compressed uplink with error feedback each round delivers only part of every client's update (the
rest waits in the client's memory and arrives later), so the mean the server sees is a delayed,
smoothed copy of the true one; momentum carries the persistent direction forward in the meantime.

The same step applies to every method of a run, so fp32 is always measured with the server
optimizer the compressed methods get.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["ServerOptimizer"]


class ServerOptimizer:
    """``global += server_lr * v``, ``v = momentum * v + mean``; plain FedAvg at (1, 0).

    Parameters
    ----------
    server_lr : float
        Scale of the server's step (> 0).
    momentum : float
        Velocity decay in ``[0, 1)``; 0 is FedAvg (with ``server_lr`` 1).
    """

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.0):
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"server momentum must be in [0, 1), got {momentum}")
        self.server_lr, self.momentum = float(server_lr), float(momentum)
        self.velocity: dict[str, np.ndarray] = {}

    @property
    def is_fedavg(self) -> bool:
        return self.server_lr == 1.0 and self.momentum == 0.0

    def step(self, global_state: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new global state after one round whose averaged update is ``mean``.

        Tensors absent from ``mean`` (a round in which nothing arrived) keep their value, and
        their velocity keeps moving them.
        """
        new_state = dict(global_state)
        for name in set(mean) | set(self.velocity):
            step = mean.get(name)
            if self.momentum:
                velocity = self.velocity.get(name)
                if velocity is None:
                    velocity = np.zeros_like(global_state[name], dtype=np.float32)
                velocity = self.momentum * velocity + (step if step is not None else 0.0)
                self.velocity[name] = step = velocity.astype(np.float32, copy=False)
            if step is None:
                continue
            new_state[name] = np.add(global_state[name], self.server_lr * step, dtype=np.float32)
        return new_state
