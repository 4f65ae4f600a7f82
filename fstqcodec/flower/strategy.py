"""Server side of the fstq Flower protocol: :class:`FstqStrategy` (``spec/FLOWER.md``)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Literal, Union

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

import fstqcodec
from fstqcodec.config import FEDERATED_FISHER_POWER, EncodeConfig

from .protocol import (
    CONFIG_RECORD,
    STYPE_MODEL,
    STYPE_UPDATE,
    ProtocolError,
    TrainRequest,
    matching_tensors,
    message_bytes,
    message_record,
    numpy_record,
    plain_tensors,
    proxy_fill_record,
    update_dtype,
)
from .proxies import DownlinkProxies, MaskedRound, ProxyDownlinks
from .streaming import StreamingRound, decode_update, plain_update, reply_weight, resolve_streaming

__all__ = ["FstqStrategy", "DroppedReply", "RoundTraffic", "DownlinkProxies"]

logger = logging.getLogger("flwr").getChild("fstqcodec")

BudgetSpec = Union["fstqcodec.Budget", None, Callable[[int, int], "fstqcodec.Budget | None"]]


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
    ``received + update`` in plain arrays, and hands the accepted replies to the wrapped strategy
    (or, when streaming, adds each update into one running sum: see ``streaming``).
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
    config : fstqcodec.EncodeConfig or None
        The clients' encoder options (budget, block size, Fisher power, rounding, ...). Its
        ``seed`` is the base of the per-client, per-round seeds the clients get, so runs are
        reproducible. ``None``: lossless, with ``fisher_power`` at
        :data:`fstqcodec.FEDERATED_FISHER_POWER`. A config built by hand keeps its own
        ``fisher_power`` (``EncodeConfig``'s default is 1): set it to
        ``fstqcodec.FEDERATED_FISHER_POWER`` for the setting the reference loop measured best.
    budget : fstqcodec.Budget, callable or None
        A callable ``(node_id, server_round) -> Budget | None`` (such as :class:`~fstqcodec.flower.LinkBudget`)
        gives each client its own budget, in place of ``config.budget`` (which must then be
        unset, as must ``bits`` and ``codebook``). A plain :class:`fstqcodec.Budget` is the
        same as ``config.replace(budget=...)``.
    downlink : {None, "lossless"}, fstqcodec.Budget or DownlinkProxies
        How the global model travels to clients: plain arrays (``None``), one lossless fstq
        message, one fstq message under that budget (with ``config``'s block size and seed), or,
        with :class:`DownlinkProxies`, never whole: each client gets its own proxy (a server mask
        fixed for the run, a client mask per round, quantized; ``spec/FLOWER.md`` 7), in train
        and evaluate messages, and the round is aggregated by masked FedAvg (each update counts
        only where its client saw; needs a ``FedAvg`` that keeps its own aggregation, as
        streaming does).
        A compressed downlink requires :class:`FstqMod` on every client. With a lossy downlink
        each client trains from the model it decoded, and the server rebuilds its model from
        that same decoded model (the server decodes its own message, which is deterministic),
        so the wrapped strategy sees exactly the models the clients hold.
    error_feedback : bool
        Whether clients keep what compression lost and add it to their next update.
    limits : fstqcodec.Limits or None
        Limits for decoding replies (untrusted bytes); ``None`` means the library's safe defaults.
    streaming : True, False or "auto"
        Whether to aggregate by adding each accepted update into one running sum as it is read
        (:class:`fstqcodec.StreamingAggregator`), so that the server holds about one model
        whatever the number of clients, instead of rebuilding every client's model for the
        wrapped strategy. Only for a ``FedAvg`` (the weighted mean by its ``weighted_by_key``):
        the result, metrics included, is what the wrapped ``FedAvg`` returns, up to float
        rounding, but its ``aggregate_train`` is not called, and its ``train_metrics_aggr_fn``
        gets each reply's records without the ArrayRecord. ``"auto"`` streams for ``FedAvg``
        itself and subclasses that keep its aggregation (``FedProx``), not for those that
        aggregate their own way (``FedMedian``, ``Krum``, ``FedAdam``, ...); True asserts that
        a ``FedAvg`` subclass aggregates linearly.
    **options
        ``block_size``, ``fisher_power``, ``seed``: the keywords of earlier versions, accepted
        when ``config`` is not given and folded into the config.

    Raises
    ------
    TypeError
        If ``strategy`` is not a Flower ``Strategy``, ``downlink`` is not one of the values
        above, ``config`` is not an ``EncodeConfig``, a keyword is unknown or given beside
        ``config``, two budgets are given, ``streaming`` is not one of the values above (or
        True for a strategy that is not a ``FedAvg``), or proxies are asked for with a
        strategy that does not aggregate as ``FedAvg`` (or with ``streaming=False``).
    ValueError
        If an option is out of range (as :class:`fstqcodec.EncodeConfig` says).

    Attributes
    ----------
    config : fstqcodec.EncodeConfig
        The clients' encoder options (the per-client budget and seed are filled in per request).
    traffic : dict[int, RoundTraffic]
        Bytes and dropped replies per round.
    streaming : bool
        Whether rounds are aggregated by streaming (``streaming`` resolved; always with proxies).
    proxy_figures : dict[int, dict[str, float]]
        With proxies, per round: ``proxy-cosine-mean`` and ``proxy-cosine-max`` (cosine
        similarity of each proxy sent, hidden entries as 0, to the true global model) and
        ``proxy-seen-fraction`` (share of the model's entries any client has ever been sent).

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
        config: EncodeConfig | None = None,
        *,
        budget: BudgetSpec = None,
        downlink: Literal["lossless"] | fstqcodec.Budget | None = None,
        error_feedback: bool = True,
        limits: fstqcodec.Limits | None = None,
        streaming: bool | Literal["auto"] = "auto",
        **options,
    ) -> None:
        super().__init__()
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a flwr Strategy, got {type(strategy).__name__}")
        proxies = isinstance(downlink, DownlinkProxies)
        if not (downlink is None or proxies or isinstance(downlink, fstqcodec.Budget)
                or (isinstance(downlink, str) and downlink == "lossless")):
            raise TypeError(f"downlink must be None, 'lossless', a Budget or DownlinkProxies, got {downlink!r}")
        self.strategy = strategy
        self.config, self.budget = _clients_config(config, budget, options)
        self.downlink = downlink
        self.error_feedback = bool(error_feedback)
        self.limits = limits
        self.streaming = resolve_streaming(strategy, streaming)
        if proxies and not self.streaming:
            raise TypeError(
                "downlink proxies aggregate by masked FedAvg (each update only where its client saw): "
                f"wrap a FedAvg that keeps FedAvg's aggregation, not {type(strategy).__name__} with "
                f"streaming={streaming!r}"
            )
        self._proxies = ProxyDownlinks(downlink, self.config.seed, self.config.block_size) if proxies else None
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
            f"FstqStrategy({self.strategy!r}, {self.config!r}, budget={self.budget!r}, "
            f"downlink={self.downlink!r}, error_feedback={self.error_feedback!r}, "
            f"streaming={self.streaming!r})"
        )

    @property
    def proxy_figures(self) -> dict[int, dict[str, float]]:
        return {} if self._proxies is None else self._proxies.figures

    @property
    def dropped_replies(self) -> list[DroppedReply]:
        """Every reply dropped so far, in order."""
        return [drop for traffic in self.traffic.values() for drop in traffic.dropped]

    def summary(self) -> None:
        """Log the compression settings, then the wrapped strategy's summary."""
        logger.info(
            "FstqStrategy: clients' encoder %r, per-client budget %r, downlink %r, error feedback %s, "
            "streaming aggregation %s",
            self.config,
            self.budget,
            self.downlink,
            self.error_feedback,
            self.streaming,
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
            options = EncodeConfig(budget=budget, block_size=self.config.block_size, seed=self.config.seed)
            data = fstqcodec.encode(tensors, config=options)
            record = message_record(data, STYPE_MODEL)
            received = fstqcodec.decode(data, limits=self.limits)
        self._packed = (arrays, record, received)
        return record, received

    def _client_request(self, server_round: int, node_id: int) -> ConfigRecord:
        encoder = self.config
        if self.budget is not None:
            encoder = encoder.replace(budget=self.budget(node_id, server_round))
        # Distinct per client and round, reproducible across runs.
        seed = (self.config.seed * 1_000_003 + server_round * 10_007 + node_id) % (1 << 31)
        return TrainRequest(
            encoder=encoder.replace(seed=seed),
            error_feedback=self.error_feedback,
            server_round=server_round,
            last_accepted_round=self._last_accepted.get(node_id, 0),
            proxy_fill="zero" if self._proxies is None else self._proxies.options.fill,
        ).to_record()

    def _repack_messages(
        self,
        messages: Iterable[Message],
        arrays: ArrayRecord,
        downlink_for: Callable[[int], ArrayRecord] | None,
        request_for: Callable[[int], ConfigRecord] | None,
    ) -> tuple[list[Message], int]:
        """Give each message its own RecordDict with the downlink (``downlink_for(node_id)``) and
        the request swapped in.

        Raises
        ------
        ValueError
            If the wrapped strategy already uses the record name ``"fstq"``, or, with proxies, a
            message holds an ``ArrayRecord`` other than the global model (it would travel whole).
        """
        messages = list(messages)
        if downlink_for is None and request_for is None:
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
            node_id = message.metadata.dst_node_id
            for key, record in content.items():
                if downlink_for is not None and _is_global_model(record, arrays):
                    record = downlink_for(node_id)
                elif self._proxies is not None and isinstance(record, ArrayRecord):
                    raise ValueError(
                        f"downlink proxies: the wrapped strategy's message to node {node_id} holds an "
                        f"ArrayRecord {key!r} that is not the global model it was given; it would be "
                        "sent unmasked"
                    )
                repacked[key] = record
            if request_for is not None:
                repacked[CONFIG_RECORD] = request_for(node_id)
            message.content = repacked
            sent_bytes += sum(record.count_bytes() for record in repacked.array_records.values())
        return messages, sent_bytes

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the round with the wrapped strategy, then add compression to each message
        (with proxies: each client's own proxy in place of the global model)."""
        if self._proxies is None:
            downlink_record, received = self._pack(arrays)
            downlink_for = None if downlink_record is None else (lambda node_id: downlink_record)
        else:
            received = plain_tensors(arrays)  # the true global model: the masked mean is added to it
            downlink_for = lambda node_id: self._proxies.train_record(received, node_id, server_round)  # noqa: E731
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        messages, sent_bytes = self._repack_messages(
            messages,
            arrays,
            downlink_for,
            lambda node_id: self._client_request(server_round, node_id),
        )
        self._references[server_round] = received
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        traffic.downlink_bytes += sent_bytes
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure evaluation with the wrapped strategy; compress its model if asked (with
        proxies: each client's proxy of the round, and the record naming the fill)."""
        messages = self.strategy.configure_evaluate(server_round, arrays, config, grid)
        if self._proxies is None:
            downlink_record, _ = self._pack(arrays)
            downlink_for = None if downlink_record is None else (lambda node_id: downlink_record)
            request_for = None
        else:
            tensors = plain_tensors(arrays)
            downlink_for = lambda node_id: self._proxies.evaluate_record(tensors, node_id, server_round)  # noqa: E731
            fill_record = proxy_fill_record(self._proxies.options.fill)
            request_for = lambda node_id: fill_record  # noqa: E731
        messages, sent_bytes = self._repack_messages(messages, arrays, downlink_for, request_for)
        self.traffic.setdefault(server_round, RoundTraffic()).evaluate_downlink_bytes += sent_bytes
        return messages

    # -- uplink --------------------------------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and validate the replies, then aggregate the accepted ones.

        With :attr:`streaming`, each accepted update is added into one running sum as it is
        read and the result is what the wrapped ``FedAvg`` returns (its ``aggregate_train`` is
        not called); otherwise the accepted replies, rebuilt into plain models, go to the
        wrapped strategy's ``aggregate_train``.

        Raises
        ------
        RuntimeError
            If ``configure_train`` did not configure ``server_round`` on this instance.
        InconsistentMessageReplies
            With streaming, where ``FedAvg`` raises it (see :class:`StreamingRound`).
        """
        if server_round not in self._references:
            raise RuntimeError(
                f"FstqStrategy.aggregate_train: round {server_round} was not configured by this "
                "strategy's configure_train, so there is no reference model for its updates"
            )
        received = self._references.pop(server_round)
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        if self._proxies is not None:
            summed = MaskedRound(received, self.strategy)
        else:
            summed = StreamingRound(received, self.strategy) if self.streaming else None
        # What the wrapped strategy gets: the error replies, and the accepted ones unless streaming.
        handed: list[Message] = []
        for reply in replies:
            if reply.has_error():
                handed.append(reply)  # the wrapped strategy logs and counts failures its way
                continue
            traffic.uplink_bytes += sum(r.count_bytes() for r in reply.content.array_records.values())
            try:
                if self._proxies is not None:
                    decoded_bytes = self._accept_masked(reply, server_round, summed)
                else:
                    decoded_bytes = self._accept(reply, received, summed)
            except ProtocolError as rejection:
                self._drop(traffic, DroppedReply(server_round, reply.metadata.src_node_id, str(rejection)))
                continue
            traffic.uplink_bytes_decoded += decoded_bytes
            traffic.replies_accepted += 1
            node = reply.metadata.src_node_id
            self._last_accepted[node] = max(server_round, self._last_accepted.get(node, 0))
            if summed is None:
                handed.append(reply)

        if summed is None:
            arrays, metrics = self.strategy.aggregate_train(server_round, handed)
        else:
            _log_replies(traffic.replies_accepted, handed)
            arrays, metrics = summed.result()
        metrics = MetricRecord() if metrics is None else metrics
        metrics["fstq.uplink-bytes"] = traffic.uplink_bytes
        metrics["fstq.uplink-bytes-decoded"] = traffic.uplink_bytes_decoded
        metrics["fstq.downlink-bytes"] = traffic.downlink_bytes
        metrics["fstq.replies-accepted"] = traffic.replies_accepted
        metrics["fstq.replies-dropped"] = len(traffic.dropped)
        if self._proxies is not None:
            for name, value in self._proxies.finish(server_round).items():
                metrics[f"fstq.{name}"] = value
        return arrays, metrics

    @staticmethod
    def _drop(traffic: RoundTraffic, drop: DroppedReply) -> None:
        traffic.dropped.append(drop)
        logger.warning(
            "FstqStrategy: round %d: dropped the reply of node %d: %s",
            drop.server_round,
            drop.node_id,
            drop.reason,
        )

    def _accept(
        self, reply: Message, received: dict[str, np.ndarray], summed: StreamingRound | None
    ) -> int:
        """Check one reply and take its update: into ``summed``, or else rebuilt into the
        reply's content as the client's model in plain arrays (for the wrapped strategy).

        Returns
        -------
        int
            What the reply weighs as plain arrays (``ArrayRecord.count_bytes()``).

        Raises
        ------
        ProtocolError
            If the reply is dropped (spec/FLOWER.md, Section 7), with the reason.
        """
        content, key, record, data, weight = self._read_reply(reply)
        if data is None:
            # A client without FstqMod sent its model in plain arrays: accept it if it fits.
            plain = matching_tensors(record, received, "the reply", unreadable="unreadable arrays")
            if summed is not None:
                summed.add(plain_update(plain, received), weight, content, key)
            return record.count_bytes()
        update = decode_update(data, received, self.limits)
        if summed is not None:
            summed.add(update, weight, content, key)
            return summed.decoded_bytes
        model = {}
        for name, reference in received.items():
            rebuilt = np.add(reference, update.pop(name), dtype=update_dtype(reference.dtype))
            model[name] = rebuilt.astype(reference.dtype, copy=False)
        restored = RecordDict()
        for record_key, value in content.items():
            restored[record_key] = numpy_record(model) if record_key == key else value
        reply.content = restored
        return restored[key].count_bytes()

    def _accept_masked(self, reply: Message, server_round: int, masked: MaskedRound) -> int:
        """Check one reply of a proxy round against the proxy its node was sent, and add its
        update into ``masked`` where that proxy carried entries.

        Returns
        -------
        int
            What the reply weighs as plain arrays.

        Raises
        ------
        ProtocolError
            If the reply is dropped (spec/FLOWER.md, Section 7), with the reason.
        """
        received, visible = self._proxies.received(server_round, reply.metadata.src_node_id)
        content, key, record, data, weight = self._read_reply(reply)
        if data is None:
            plain = matching_tensors(record, received, "the reply", unreadable="unreadable arrays")
            update = plain_update(plain, received)
        else:
            update = decode_update(data, received, self.limits)
        masked.add(update, weight, content, key, visible=visible)
        return masked.decoded_bytes

    def _read_reply(self, reply: Message) -> tuple[RecordDict, str, ArrayRecord, bytes | None, float]:
        """A train reply's content, its one ArrayRecord (key and record), the fstq message's bytes
        (None for plain arrays) and its FedAvg weight; :class:`ProtocolError` if unreadable."""
        content = reply.content
        key, record = _the_record(content)
        return content, key, record, message_bytes(record, STYPE_UPDATE), reply_weight(content, self.strategy)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate with the wrapped strategy and add the evaluate downlink bytes."""
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        traffic = self.traffic.get(server_round)
        if metrics is not None and traffic is not None:
            metrics["fstq.downlink-bytes"] = traffic.evaluate_downlink_bytes
        return metrics


def _log_replies(results: int, failures: list[Message]) -> None:
    """Log a streamed round's replies as ``FedAvg.aggregate_train`` does."""
    logger.info("aggregate_train: Received %s results and %s failures", results, len(failures))
    for reply in failures:
        logger.info("\t> Received error in reply from node %d: %s", reply.metadata.src_node_id, reply.error.reason)


def _the_record(content: RecordDict) -> tuple[str, ArrayRecord]:
    """The key and record of a reply's one ArrayRecord; else :class:`ProtocolError`."""
    records = content.array_records
    if len(records) != 1:
        raise ProtocolError(f"expected exactly one ArrayRecord in the reply, found {sorted(records)}")
    (key, record), = records.items()
    return key, record


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


_LEGACY_OPTIONS = ("block_size", "fisher_power", "seed")


def _clients_config(
    config: EncodeConfig | None, budget: BudgetSpec, options: dict
) -> tuple[EncodeConfig, Callable[[int, int], fstqcodec.Budget | None] | None]:
    """The clients' EncodeConfig and per-client budget from FstqStrategy's arguments."""
    unknown = sorted(set(options) - set(_LEGACY_OPTIONS))
    if unknown:
        raise TypeError(f"FstqStrategy got unexpected keyword argument(s): {', '.join(unknown)}")
    options = {name: value for name, value in options.items() if value is not None}
    if config is None:
        config = EncodeConfig(**{"fisher_power": FEDERATED_FISHER_POWER, **options})
    elif not isinstance(config, EncodeConfig):
        raise TypeError(f"config must be a fstqcodec.EncodeConfig, got {type(config).__name__}")
    elif options:
        raise TypeError(f"give {', '.join(sorted(options))} inside config, not beside it")
    if budget is None:
        return config, None
    if config.mode != "lossless":
        raise TypeError(
            f"config already sets the uplink's size ({config.mode}); give budget= or config, not both"
        )
    if isinstance(budget, fstqcodec.Budget):
        return config.replace(budget=budget), None
    if callable(budget):
        return config, budget
    raise TypeError(f"budget must be a fstqcodec.Budget or a callable, got {type(budget).__name__}")
