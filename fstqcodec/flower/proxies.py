"""Server side of downlink proxies (FedQSN) in the fstq Flower protocol (``spec/FLOWER.md`` 7).

With ``FstqStrategy(..., downlink=DownlinkProxies(...))`` no client gets the global model: each
train (and evaluate) message carries that client's proxy, an fstq message with seeded masks
(:mod:`fstqcodec.proxy`): a server mask fixed for the run hides a share of every tensor from
everyone, a client mask drawn per client and round hides more, and the rest is quantized. The
round is aggregated by masked FedAvg (:class:`MaskedRound`): each entry of the new global model
is the true global value plus the weighted mean of the updates of the clients that saw it; an
entry nobody saw keeps its value.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flwr.app import ArrayRecord, RecordDict

import fstqcodec
from fstqcodec.proxy import FILLS, MaskedAverage, ProxyServer, cosine_similarity, decode_proxy, exempt_patterns
from fstqcodec.wire.masks import GRANULARITIES

from .protocol import STYPE_PROXY, ProtocolError, message_record
from .streaming import StreamingRound

__all__ = ["DownlinkProxies", "ProxyDownlinks", "MaskedRound"]


@dataclasses.dataclass(frozen=True)
class DownlinkProxies:
    """The proxies' settings: ``FstqStrategy(strategy, downlink=DownlinkProxies(...))``.

    Parameters
    ----------
    server_mask : float
        Share of every tensor that no client ever receives (fixed for the run), in [0, 1).
    client_mask : float
        Share of the rest that each client does not receive in a round (drawn per client and
        round), in [0, 1).
    fill : {"zero", "previous", "received"}
        What a client puts in the entries its proxy hides: zeros, the model it last trained, or
        the model it last decoded from a proxy (each entry as last sent to it: its estimate of
        the global model, free of its own training).
    budget : fstqcodec.Budget or None
        Size of each proxy (``bits_per_param`` counts the entries sent); ``None``: exact values.
    granularity : {"element", "row", "column"}
        Mask unit (rows and columns for 2-D tensors; other tensors are masked by element).
    server_exempt : tuple of str
        Glob patterns of tensor names the server mask leaves out (the client mask still applies):
        for example a classification head trained from scratch, every entry of which must train.
    seed : int or None
        Run seed of the masks; ``None``: the strategy's encoder seed.

    Raises
    ------
    ValueError
        If a setting is out of range.
    TypeError
        If ``budget`` is not a :class:`fstqcodec.Budget` or ``None``.
    """

    server_mask: float = 0.3
    client_mask: float = 0.1
    fill: str = "zero"
    budget: fstqcodec.Budget | None = fstqcodec.Budget(bits_per_param=4)
    granularity: str = "element"
    seed: int | None = None
    server_exempt: tuple = ()

    def __post_init__(self):
        for what in ("server_mask", "client_mask"):
            rate = getattr(self, what)
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
                raise ValueError(f"{what} must be a number in [0, 1), got {rate!r}")
        if self.fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {self.fill!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if not (self.budget is None or isinstance(self.budget, fstqcodec.Budget)):
            raise TypeError(f"budget must be a fstqcodec.Budget or None, got {type(self.budget).__name__}")
        object.__setattr__(self, "server_exempt", exempt_patterns(self.server_exempt))
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0 or None, got {self.seed!r}")


class ProxyDownlinks:
    """One run's proxies: the mask server (built on the first model it sees), each round's
    proxies by node, and the privacy figures.

    Parameters
    ----------
    options : DownlinkProxies
        The settings.
    seed : int
        The run seed of the masks (``options.seed`` if set).
    block_size : int
        Encoder block size of the proxies.
    """

    def __init__(self, options: DownlinkProxies, seed: int, block_size: int):
        self.options = options
        self.seed = int(options.seed if options.seed is not None else seed)
        self.block_size = block_size
        self.server: ProxyServer | None = None
        # server_round -> node_id -> the proxy sent in that round's train message.
        self._sent: dict[int, dict[int, bytes]] = {}
        self._ever_seen: dict[str, np.ndarray] | None = None
        #: server_round -> {"proxy-cosine-mean", "proxy-cosine-max", "proxy-seen-fraction"}.
        self.figures: dict[int, dict[str, float]] = {}

    def _server_for(self, tensors: dict) -> ProxyServer:
        """The run's mask server; the model must keep the names and shapes it started with.

        Raises
        ------
        ValueError
            If the model's tensors differ from the first round's (the server mask is fixed
            for the run, so the model cannot change under it).
        """
        shapes = {name: tuple(value.shape) for name, value in tensors.items()}
        if self.server is None:
            self.server = ProxyServer(shapes, server_keep=1.0 - self.options.server_mask,
                                      client_keep=1.0 - self.options.client_mask,
                                      granularity=self.options.granularity, seed=self.seed,
                                      budget=self.options.budget, block_size=self.block_size,
                                      server_exempt=self.options.server_exempt)
            self._ever_seen = {name: np.zeros(shape, dtype=bool) for name, shape in shapes.items()}
        elif shapes != self.server.shapes:
            raise ValueError(
                "downlink proxies: the global model's tensors changed during the run "
                f"({sorted(shapes.items())} against {sorted(self.server.shapes.items())}); the server "
                "mask is fixed for the run"
            )
        return self.server

    def train_record(self, tensors: dict, node_id: int, server_round: int) -> ArrayRecord:
        """The proxy ``ArrayRecord`` of ``node_id``'s train message; kept as its round reference."""
        data = self._server_for(tensors).downlink(tensors, node_id, server_round)
        self._sent.setdefault(server_round, {})[node_id] = data
        received, visible = decode_proxy(data)
        cosines = self.figures.setdefault(server_round, {}).setdefault("cosines", [])
        cosines.append(cosine_similarity(received, tensors))
        self._count_seen(visible)
        return message_record(data, STYPE_PROXY)

    def evaluate_record(self, tensors: dict, node_id: int, server_round: int) -> ArrayRecord:
        """The proxy ``ArrayRecord`` of ``node_id``'s evaluate message (the round's masks)."""
        data = self._server_for(tensors).downlink(tensors, node_id, server_round)
        self._count_seen(self.server.visible(node_id, server_round))  # a node not trained this round
        return message_record(data, STYPE_PROXY)

    def _count_seen(self, visible: dict) -> None:
        for name, seen in visible.items():
            self._ever_seen[name] |= seen

    def received(self, server_round: int, node_id: int) -> tuple[dict, dict]:
        """What ``node_id`` decoded from its proxy of ``server_round`` (hidden entries 0) and
        which entries it carried: the reference of its update, and where it counts.

        Raises
        ------
        ProtocolError
            If that node was sent no proxy in that round.
        """
        data = self._sent.get(server_round, {}).get(node_id)
        if data is None:
            raise ProtocolError(f"node {node_id} was sent no proxy in round {server_round}")
        return decode_proxy(data)  # the server's own message: deterministic, what the client decoded

    def finish(self, server_round: int) -> dict[str, float]:
        """Forget the round's proxies; its privacy figures (cosine of each proxy, hidden entries
        as 0, to the true global model; share of the model any client has ever been sent)."""
        self._sent.pop(server_round, None)
        figures = self.figures.setdefault(server_round, {})
        cosines = figures.pop("cosines", [])
        if cosines:
            figures["proxy-cosine-mean"] = float(np.mean(cosines))
            figures["proxy-cosine-max"] = float(np.max(cosines))
        if self._ever_seen is not None:
            total = sum(seen.size for seen in self._ever_seen.values())
            figures["proxy-seen-fraction"] = sum(int(np.count_nonzero(s)) for s in self._ever_seen.values()) / total
        return figures


class MaskedRound(StreamingRound):
    """One round of masked FedAvg: each update counts, weighted, only where its client saw.

    ``received`` is the true global model of the round: the result is it plus, per entry, the
    weighted mean of the updates of the clients whose proxy carried that entry (unchanged where
    no client's did). Metrics and the consistency checks are ``FedAvg``'s, as in
    :class:`StreamingRound`.
    """

    def _new_sum(self) -> MaskedAverage:
        return MaskedAverage({name: value.shape for name, value in self.received.items()})

    def add(self, update: dict, weight: float | None, content: RecordDict, record_key: str, *, visible=None) -> None:
        """Add an accepted reply's update where ``visible``, weighted (see :class:`StreamingRound`)."""
        if visible is None:
            raise TypeError("MaskedRound.add needs the entries the client saw (visible=)")
        if weight is not None:
            self.aggregator.add(update, visible, weight)
        self.contents.append(RecordDict({k: v for k, v in content.items() if not isinstance(v, ArrayRecord)}))
        self.record_keys.append(record_key)
