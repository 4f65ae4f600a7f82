"""The loop's downlink proxies (``fstq simulate --server-mask R --client-mask R``): FedQSN in fstq.

Each sampled client receives a proxy of the global adapter (:mod:`fstqcodec.proxy`): the server
mask hides a fixed share of every tensor for the whole run, a client mask hides more each round,
and the rest is quantized at ``downlink_bpp`` bits per entry sent. The client trains from the
decoded proxy (hidden entries zero, its own previous values, or the last values it received), sends
its update on the entries it saw, and the server averages each update only there. Per round the
record gains the downlink bytes, the cosine similarity of the proxies to the true global adapter,
and the share of the global adapter any client has ever seen.
"""

from __future__ import annotations

import numpy as np

from fstqcodec.policy.budget import Budget
from fstqcodec.proxy import MaskedAverage, ProxyServer, cosine_similarity, decode_proxy

__all__ = ["ProxyDownlink"]


class ProxyDownlink:
    """One run's proxy downlink: the masks, each client's previous values, and the privacy figures.

    Parameters
    ----------
    shapes : dict
        Tensor name -> shape of the adapter.
    initial : dict
        The initial adapter (a client that never took part holds it: the shared initialisation).
    server_mask, client_mask : float
        Shares hidden by the server (fixed) and per client and round, in [0, 1).
    bits_per_param : float
        Downlink budget per entry sent.
    fill : {"zero", "previous", "received"}
        What a client puts in hidden entries: zero, the model it last trained, or the last value the
        server sent it for each entry (the initial value where it was never sent).
    seed : int
        Run seed.
    server_exempt : sequence of str
        Glob patterns of tensor names the server mask leaves out (:class:`fstqcodec.proxy.ProxyServer`).
    """

    def __init__(self, shapes: dict, initial: dict, *, server_mask: float, client_mask: float,
                 bits_per_param: float, fill: str, seed: int, block_size: int = 64, server_exempt=()):
        self.server = ProxyServer(shapes, server_keep=1.0 - server_mask, client_keep=1.0 - client_mask,
                                  seed=seed, budget=Budget(bits_per_param=bits_per_param), block_size=block_size,
                                  server_exempt=server_exempt)
        self.shapes, self.fill = shapes, fill
        self.initial = {name: np.asarray(value, dtype=np.float32) for name, value in initial.items()}
        self.previous: dict[int, dict] = {}  # client -> what its hidden entries take next time
        self.ever_seen = {name: np.zeros(shape, dtype=bool) for name, shape in shapes.items()}
        self.total = sum(int(np.prod(shape)) for shape in shapes.values())
        self._start_round()

    def _start_round(self) -> None:
        self.bytes, self.last_bytes, self.cosines, self.average = 0, 0, [], MaskedAverage(self.shapes)

    def receive(self, global_state: dict, client: int, round_number: int) -> tuple[dict, dict]:
        """What ``client`` decodes from its proxy: (model, visibility). Counts the bytes sent."""
        message = self.server.downlink(global_state, client, round_number)
        self.bytes += len(message)
        self.last_bytes = len(message)
        previous = self.previous.get(client, self.initial)
        proxy, visible = decode_proxy(message, previous=previous, fill=self.fill)
        if self.fill == "received":  # the decoded model is the client's newest estimate of the global one
            self.previous[client] = proxy
        zero_filled = {name: np.where(visible[name], proxy[name], 0.0) for name in proxy}
        self.cosines.append(cosine_similarity(zero_filled, global_state))
        for name, seen in visible.items():
            self.ever_seen[name] |= seen
        return proxy, visible

    def keep_local(self, client: int, local_state: dict) -> None:
        """Remember the client's model after training (its 'previous values' next time, for that fill)."""
        if self.fill == "previous":
            self.previous[client] = {name: np.array(value, dtype=np.float32) for name, value in local_state.items()}

    def add(self, update: dict, visible: dict, weight: float) -> None:
        self.average.add(update, visible, weight)

    def finish_round(self, global_state: dict) -> tuple[dict, dict]:
        """(new global state, the round's downlink figures); starts the next round."""
        mean = self.average.result()
        new_state = {name: (global_state[name] + mean[name]).astype(np.float32) for name in global_state}
        seen = sum(int(np.count_nonzero(s)) for s in self.ever_seen.values())
        figures = {
            "proxy_downlink_bytes": self.bytes,
            "proxy_cosine_mean": float(np.mean(self.cosines)) if self.cosines else None,
            "proxy_cosine_max": float(np.max(self.cosines)) if self.cosines else None,
            "fraction_ever_seen": seen / self.total,
        }
        self._start_round()
        return new_state, figures
