"""Server side of the fstq Flower protocol: :class:`FstqStrategy` and its budgets (``spec/FLOWER.md``)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, Union

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

import fstqcodec
from fstqcodec.policy.fisher import check_fisher_power

from .protocol import (
    CONFIG_RECORD,
    PROTOCOL_VERSION,
    STYPE_MODEL,
    STYPE_UPDATE,
    Rejected,
    budget_to_config,
    matching_tensors,
    message_bytes,
    message_record,
    numpy_record,
    plain_tensors,
    require_same_tensors,
    update_dtype,
)

__all__ = ["FstqStrategy", "LinkBudget", "DroppedReply", "RoundTraffic"]

logger = logging.getLogger("flwr").getChild("fstqcodec")

BudgetSpec = Union["fstqcodec.Budget", None, Callable[[int, int], "fstqcodec.Budget | None"]]


@dataclasses.dataclass(frozen=True)
class LinkBudget:
    """Give each client the bytes its uplink can carry within the round's deadline.

    An instance is a callable ``(node_id, server_round) -> Budget`` and can be passed as
    ``FstqStrategy(budget=...)``. Each client's budget is
    ``fstqcodec.Budget.for_link(bandwidth_bps, deadline_s)``: the whole fstq message, every byte
    counted, fits in what its link carries before the deadline.

    Parameters
    ----------
    bandwidth_bps : Mapping[int, float] or Callable[[int], float]
        The uplink bandwidth of each client in bits per second, by Flower node id.
    deadline_s : float
        Seconds each client may spend sending its update.
    default_bps : float or None
        Bandwidth assumed for a node missing from the mapping; ``None`` makes a missing node an
        error (``KeyError``), so that a mistake in the node ids does not pass silently.

    Raises
    ------
    ValueError
        If ``deadline_s`` or ``default_bps`` is not positive and finite.

    Examples
    --------
    >>> budget = LinkBudget({101: 8e6, 202: 1e6}, deadline_s=2.0)
    >>> budget(202, server_round=1)
    Budget(max_bytes=250000)
    """

    bandwidth_bps: Mapping[int, float] | Callable[[int], float]
    deadline_s: float
    default_bps: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.deadline_s) and self.deadline_s > 0):
            raise ValueError(f"deadline_s must be positive and finite, got {self.deadline_s!r}")
        if self.default_bps is not None and not (
            math.isfinite(self.default_bps) and self.default_bps > 0
        ):
            raise ValueError(f"default_bps must be positive and finite, got {self.default_bps!r}")

    def __call__(self, node_id: int, server_round: int) -> fstqcodec.Budget:
        """Return the budget of ``node_id`` (the round does not change it)."""
        if callable(self.bandwidth_bps):
            bandwidth = self.bandwidth_bps(node_id)
        elif node_id in self.bandwidth_bps:
            bandwidth = self.bandwidth_bps[node_id]
        elif self.default_bps is not None:
            bandwidth = self.default_bps
        else:
            raise KeyError(f"LinkBudget has no bandwidth for node {node_id} and no default")
        if not (math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"bandwidth of node {node_id} must be positive, got {bandwidth!r}")
        return fstqcodec.Budget.for_link(bandwidth_bps=bandwidth, deadline_s=self.deadline_s)


@dataclasses.dataclass(frozen=True)
class DroppedReply:
    """A reply the server refused, and why.

    Attributes
    ----------
    server_round : int
        The round it belonged to.
    node_id : int
        The Flower node that sent it.
    reason : str
        Why it was dropped (decode error, wrong tensors, non-finite values, ...).
    """

    server_round: int
    node_id: int
    reason: str


@dataclasses.dataclass
class RoundTraffic:
    """Bytes moved in one round, as Flower counts them (``ArrayRecord.count_bytes()``).

    Attributes
    ----------
    downlink_bytes : int
        Array bytes of all train messages sent (the global model, compressed or not, once per
        client).
    evaluate_downlink_bytes : int
        Array bytes of all evaluate messages sent.
    uplink_bytes : int
        Array bytes of all train replies received with content, dropped ones included.
    uplink_bytes_decoded : int
        What the accepted replies weigh once decoded into plain arrays: what they would have cost
        uncompressed.
    replies_accepted : int
        Replies handed to the wrapped strategy.
    dropped : list of DroppedReply
        Replies refused, with their reasons.
    """

    downlink_bytes: int = 0
    evaluate_downlink_bytes: int = 0
    uplink_bytes: int = 0
    uplink_bytes_decoded: int = 0
    replies_accepted: int = 0
    dropped: list[DroppedReply] = dataclasses.field(default_factory=list)


class FstqStrategy(Strategy):
    """Strategy wrapper: ask clients for fstq-compressed updates and decode them for a strategy.

    ``configure_train`` asks the wrapped strategy for its messages, then gives each a copy of its
    records plus a ``ConfigRecord "fstq"`` with that client's budget (the wrapped strategy may
    share one ``RecordDict`` among all its messages, as ``FedAvg`` does, so nothing it built is
    modified). ``aggregate_train`` decodes each reply's update, checks its tensor names, shapes and
    values against the model the client received, rebuilds the client's model as
    ``received + update`` in plain arrays, and hands the accepted replies to the wrapped strategy.
    A reply that fails any check is dropped: the reason is logged, kept in :attr:`traffic` and
    counted in the round's metrics, and the round goes on with the others. A client without
    :class:`FstqMod` ignores the request and sends plain arrays; those are validated and accepted.

    Per round it adds to the train metrics returned by the wrapped strategy:
    ``fstq.uplink-bytes``, ``fstq.uplink-bytes-decoded``, ``fstq.downlink-bytes``,
    ``fstq.replies-accepted`` and ``fstq.replies-dropped``; and ``fstq.downlink-bytes`` to the
    evaluate metrics. All counts are Flower's own ``ArrayRecord.count_bytes()``.

    Parameters
    ----------
    strategy : Strategy
        The strategy to wrap (``FedAvg`` or any other); it receives plain arrays as usual.
    budget : fstqcodec.Budget, callable or None
        The uplink budget: one :class:`fstqcodec.Budget` for every client, or a callable
        ``(node_id, server_round) -> Budget | None`` (such as :class:`LinkBudget`) for a budget
        per client. ``None`` asks for lossless compression.
    downlink : {None, "lossless"} or fstqcodec.Budget
        How the global model travels to clients: plain arrays (``None``), one lossless fstq
        message, or one fstq message under that budget. A compressed downlink requires
        :class:`FstqMod` on every client. With a lossy downlink each client trains from the model
        it decoded, and the server rebuilds its model from that same decoded model (the server
        decodes its own message, which is deterministic), so the wrapped strategy sees exactly
        the models the clients hold.
    error_feedback : bool
        Whether clients keep what compression lost and add it to their next update.
    block_size : int or None
        Block size for the encoder; ``None`` leaves the encoder's default.
    fisher_power : float or None
        Clients weigh their Fisher as ``F ** fisher_power`` (see :func:`fstqcodec.encode`);
        ``None`` leaves the encoder's default (1).
    seed : int
        Base of the per-client, per-round encoder seeds, so runs are reproducible.
    limits : fstqcodec.Limits or None
        Limits for decoding replies (untrusted bytes); ``None`` means the library's safe defaults.

    Raises
    ------
    TypeError
        If ``strategy`` is not a Flower ``Strategy`` or ``downlink`` is not one of the values above.

    Attributes
    ----------
    traffic : dict[int, RoundTraffic]
        Bytes and dropped replies per round.

    Notes
    -----
    FlowerTune's ``CommunicationTracker`` sums ``len(array.data)`` of what ``configure_train``
    returns and of what ``aggregate_train`` gets. To make it count the bytes that travel,
    subclass this class (with ``FedAvg`` as the wrapped strategy) and track *after*
    ``super().configure_train(...)`` and *before* ``super().aggregate_train(...)``; a tracking
    ``FedAvg`` subclass wrapped inside would count decoded, uncompressed arrays.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        budget: BudgetSpec = None,
        downlink: Literal["lossless"] | fstqcodec.Budget | None = None,
        error_feedback: bool = True,
        block_size: int | None = None,
        fisher_power: float | None = None,
        seed: int = 0,
        limits: fstqcodec.Limits | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a flwr Strategy, got {type(strategy).__name__}")
        if not (downlink is None or downlink == "lossless" or isinstance(downlink, fstqcodec.Budget)):
            raise TypeError(f"downlink must be None, 'lossless' or a Budget, got {downlink!r}")
        if budget is not None and not callable(budget):
            budget_to_config(budget)  # fail now, not in round 1, on a malformed budget
        self.strategy = strategy
        self.budget = budget
        self.downlink = downlink
        self.error_feedback = error_feedback
        self.block_size = block_size
        # Checked now, not in every client's round 1.
        self.fisher_power = None if fisher_power is None else check_fisher_power(fisher_power)
        self.seed = seed
        self.limits = limits
        self.traffic: dict[int, RoundTraffic] = {}
        # node_id -> the latest round whose train reply from it was accepted (told to the client,
        # whose error feedback then keeps an update that never arrived).
        self._last_accepted: dict[int, int] = {}
        # server_round -> the model each client of that round received (decoded), which is the
        # reference its update is relative to.
        self._references: dict[int, dict[str, np.ndarray]] = {}
        # (global ArrayRecord, its downlink record or None, what clients decode): the global model
        # is packed once per round and reused for every message, train and evaluate alike.
        self._packed: tuple[ArrayRecord, ArrayRecord | None, dict[str, np.ndarray]] | None = None

    def __repr__(self) -> str:
        return (
            f"FstqStrategy({self.strategy!r}, budget={self.budget!r}, downlink={self.downlink!r}, "
            f"error_feedback={self.error_feedback!r})"
        )

    @property
    def dropped_replies(self) -> list[DroppedReply]:
        """Every reply dropped so far, in order."""
        return [drop for traffic in self.traffic.values() for drop in traffic.dropped]

    def summary(self) -> None:
        """Log the compression settings, then the wrapped strategy's summary."""
        logger.info(
            "FstqStrategy: uplink budget %r, downlink %r, error feedback %s",
            self.budget,
            self.downlink,
            self.error_feedback,
        )
        self.strategy.summary()

    # -- downlink ------------------------------------------------------------------------------

    def _pack(self, arrays: ArrayRecord) -> tuple[ArrayRecord | None, dict[str, np.ndarray]]:
        """The downlink record for ``arrays`` (None = send as is) and what clients will hold."""
        if self._packed is not None and self._packed[0] is arrays:
            return self._packed[1], self._packed[2]
        tensors = plain_tensors(arrays)
        if self.downlink is None:
            record, received = None, tensors
        else:
            budget = None if self.downlink == "lossless" else self.downlink
            data = fstqcodec.encode(tensors, budget=budget, **self._encoder_options())
            record = message_record(data, STYPE_MODEL)
            received = fstqcodec.decode(data, limits=self.limits)
        self._packed = (arrays, record, received)
        return record, received

    def _encoder_options(self) -> dict[str, int]:
        options = {"seed": self.seed}
        if self.block_size is not None:
            options["block_size"] = self.block_size
        return options

    def _client_request(self, server_round: int, node_id: int) -> ConfigRecord:
        budget = self.budget(node_id, server_round) if callable(self.budget) else self.budget
        request: dict[str, int | float | str | bool] = {"version": PROTOCOL_VERSION}
        request.update(budget_to_config(budget))
        request["error-feedback"] = bool(self.error_feedback)
        # Distinct per client and round, reproducible across runs.
        request["seed"] = (self.seed * 1_000_003 + server_round * 10_007 + node_id) % (1 << 31)
        request["round"] = int(server_round)
        request["last-accepted-round"] = int(self._last_accepted.get(node_id, 0))
        if self.block_size is not None:
            request["block-size"] = int(self.block_size)
        if self.fisher_power is not None:
            request["fisher-power"] = float(self.fisher_power)
        return ConfigRecord(request)

    def _repack_messages(
        self,
        messages: Iterable[Message],
        arrays: ArrayRecord,
        downlink_record: ArrayRecord | None,
        request_for: Callable[[int], ConfigRecord] | None,
    ) -> tuple[list[Message], int]:
        """Give each message its own RecordDict with the downlink (and request) swapped in."""
        messages = list(messages)
        if downlink_record is None and request_for is None:
            # Nothing to swap in: send the wrapped strategy's messages as they are.
            sent = sum(r.count_bytes() for m in messages for r in m.content.array_records.values())
            return messages, sent
        sent_bytes = 0
        for message in messages:
            content = message.content
            if request_for is not None and CONFIG_RECORD in content:
                raise ValueError(
                    f"the wrapped strategy already uses the record name {CONFIG_RECORD!r}"
                )
            repacked = RecordDict()
            for key, record in content.items():
                if downlink_record is not None and _is_global_model(record, arrays):
                    record = downlink_record
                repacked[key] = record
            if request_for is not None:
                repacked[CONFIG_RECORD] = request_for(message.metadata.dst_node_id)
            message.content = repacked
            sent_bytes += sum(record.count_bytes() for record in repacked.array_records.values())
        return messages, sent_bytes

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the round with the wrapped strategy, then add compression to each message."""
        downlink_record, received = self._pack(arrays)
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        messages, sent_bytes = self._repack_messages(
            messages,
            arrays,
            downlink_record,
            lambda node_id: self._client_request(server_round, node_id),
        )
        self._references[server_round] = received
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        traffic.downlink_bytes += sent_bytes
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure evaluation with the wrapped strategy; compress its model if asked."""
        downlink_record, _ = self._pack(arrays)
        messages = self.strategy.configure_evaluate(server_round, arrays, config, grid)
        messages, sent_bytes = self._repack_messages(messages, arrays, downlink_record, None)
        self.traffic.setdefault(server_round, RoundTraffic()).evaluate_downlink_bytes += sent_bytes
        return messages

    # -- uplink --------------------------------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and validate the replies, then aggregate the accepted ones.

        Raises
        ------
        RuntimeError
            If ``configure_train`` did not configure ``server_round`` on this instance.
        """
        if server_round not in self._references:
            raise RuntimeError(
                f"FstqStrategy.aggregate_train: round {server_round} was not configured by this "
                "strategy's configure_train, so there is no reference model for its updates"
            )
        received = self._references.pop(server_round)
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        accepted: list[Message] = []
        for reply in replies:
            if reply.has_error():
                accepted.append(reply)  # the wrapped strategy logs and counts failures its way
                continue
            traffic.uplink_bytes += sum(r.count_bytes() for r in reply.content.array_records.values())
            try:
                reply.content = self._restore(reply.content, received)
            except Rejected as rejection:
                drop = DroppedReply(server_round, reply.metadata.src_node_id, str(rejection))
                traffic.dropped.append(drop)
                logger.warning(
                    "FstqStrategy: round %d: dropped the reply of node %d: %s",
                    drop.server_round,
                    drop.node_id,
                    drop.reason,
                )
                continue
            traffic.uplink_bytes_decoded += sum(
                r.count_bytes() for r in reply.content.array_records.values()
            )
            traffic.replies_accepted += 1
            node = reply.metadata.src_node_id
            self._last_accepted[node] = max(server_round, self._last_accepted.get(node, 0))
            accepted.append(reply)

        arrays, metrics = self.strategy.aggregate_train(server_round, accepted)
        metrics = MetricRecord() if metrics is None else metrics
        metrics["fstq.uplink-bytes"] = traffic.uplink_bytes
        metrics["fstq.uplink-bytes-decoded"] = traffic.uplink_bytes_decoded
        metrics["fstq.downlink-bytes"] = traffic.downlink_bytes
        metrics["fstq.replies-accepted"] = traffic.replies_accepted
        metrics["fstq.replies-dropped"] = len(traffic.dropped)
        return arrays, metrics

    def _restore(self, content: RecordDict, received: dict[str, np.ndarray]) -> RecordDict:
        """The reply's content with its update rebuilt into the client's model (plain arrays)."""
        records = content.array_records
        if len(records) != 1:
            raise Rejected(f"expected exactly one ArrayRecord in the reply, found {sorted(records)}")
        (key, record), = records.items()
        data = message_bytes(record, STYPE_UPDATE)
        if data is None:
            # A client without FstqMod sent its model in plain arrays: accept it if it fits.
            matching_tensors(record, received, "the reply", unreadable="unreadable arrays")
            return content
        try:
            update = fstqcodec.decode(data, limits=self.limits)
        except fstqcodec.DecodeError as err:
            raise Rejected(f"undecodable update ({type(err).__name__}: {err})") from None
        require_same_tensors(update, received, "the decoded update")
        model = {}
        for name, reference in received.items():
            rebuilt = np.add(reference, update[name], dtype=update_dtype(reference.dtype))
            model[name] = rebuilt.astype(reference.dtype, copy=False)
        restored = RecordDict()
        for record_key, value in content.items():
            restored[record_key] = numpy_record(model) if record_key == key else value
        return restored

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate with the wrapped strategy and add the evaluate downlink bytes."""
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        traffic = self.traffic.get(server_round)
        if metrics is not None and traffic is not None:
            metrics["fstq.downlink-bytes"] = traffic.evaluate_downlink_bytes
        return metrics


def _is_global_model(record: object, arrays: ArrayRecord) -> bool:
    """Whether a record in a strategy's message is the global model it was given."""
    if record is arrays:
        return True
    # A strategy may copy the record; same names and the very same Array objects is the same model.
    return (
        isinstance(record, ArrayRecord)
        and list(record.keys()) == list(arrays.keys())
        and all(record[name] is arrays[name] for name in arrays.keys())
    )
