"""Server-side helpers of :class:`~fstqcodec.flower.FstqStrategy`: decoding a reply's update, its
weight, and the streaming aggregation of a round for FedAvg-like strategies.

With a linear strategy (``FedAvg``: the weighted mean of the clients' models by the
``weighted_by_key`` of their ``MetricRecord``) the server needs only the weighted sum of the
updates. :class:`StreamingRound` adds each accepted update into one running sum
(:class:`fstqcodec.StreamingAggregator`) as the replies are read, so the server holds the sum, the
round's reference model and one decoded update, not one decoded model per client.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

import fstqcodec

from .protocol import ProtocolError, require_same_tensors, update_dtype

__all__ = ["resolve_streaming", "reply_weight", "decode_update", "StreamingRound"]

def resolve_streaming(strategy: Strategy, streaming: bool | str) -> bool:
    """Whether to aggregate ``strategy``'s rounds by streaming.

    ``"auto"`` streams when ``strategy`` is a ``FedAvg`` whose aggregation is ``FedAvg``'s own
    (the class itself, or a subclass such as ``FedProx`` that overrides neither
    ``aggregate_train`` nor the reply checks it uses): that is the weighted mean, which a running
    sum computes exactly. A subclass with its own ``aggregate_train`` (FedMedian, Krum, FedAdam,
    ...) may need every update and is not streamed unless ``streaming=True`` says it is linear.

    Raises
    ------
    TypeError
        If ``streaming`` is not True, False or ``"auto"``, or is True for a strategy that is not
        a ``FedAvg`` (streaming needs its ``weighted_by_key`` and ``train_metrics_aggr_fn``).
    """
    if not (streaming is True or streaming is False or (isinstance(streaming, str) and streaming == "auto")):
        raise TypeError(f"streaming must be True, False or 'auto', got {streaming!r}")
    if streaming is True and not isinstance(strategy, FedAvg):
        raise TypeError(
            f"streaming=True needs a FedAvg strategy (the weighted mean by its weighted_by_key), "
            f"got {type(strategy).__name__}"
        )
    if streaming == "auto":
        kind = type(strategy)
        return (
            isinstance(strategy, FedAvg)
            and kind.aggregate_train is FedAvg.aggregate_train
            and kind._check_and_log_replies is FedAvg._check_and_log_replies
        )
    return bool(streaming)


def reply_weight(content: RecordDict, strategy: Strategy) -> float | None:
    """The weight of a reply for a ``FedAvg``-like ``strategy`` (None for other strategies).

    A weight the wrapped strategy could not use at all (no single MetricRecord, the key missing,
    a list) is left for its own consistency check, which refuses the round as ``FedAvg`` does:
    None is returned. A weight that is there but would corrupt the mean is a drop.

    Raises
    ------
    ProtocolError
        If the weight is not a number, or not finite and above 0.
    """
    key = getattr(strategy, "weighted_by_key", None)
    metrics = list(content.metric_records.values())
    if not isinstance(strategy, FedAvg) or len(metrics) != 1 or key not in metrics[0]:
        return None
    value = metrics[0][key]
    if isinstance(value, list):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"bad weight: {key!r} is {type(value).__name__}, not a number")
    if not (math.isfinite(value) and value > 0):
        raise ProtocolError(f"bad weight: {key!r} is {value!r}; it must be finite and above 0")
    return float(value)


def decode_update(data: bytes, received: Mapping[str, np.ndarray], limits) -> dict[str, np.ndarray]:
    """Decode a reply's update and check it against the model the client received.

    The update is returned in the arithmetic dtype of each tensor (float32, float64 for float64
    models), and checked for finite values in that dtype.

    Raises
    ------
    ProtocolError
        If the bytes do not decode under ``limits``, or the update's names, shapes, dtypes
        (floating) or values (finite) do not fit ``received``.
    """
    try:
        update = fstqcodec.decode(data, limits=limits)
    except fstqcodec.DecodeError as err:
        raise ProtocolError(f"undecodable update ({type(err).__name__}: {err})") from None
    require_same_tensors(update, received, "the decoded update")
    cast = {}
    for name, reference in received.items():
        cast[name] = np.asarray(update.pop(name), dtype=update_dtype(reference.dtype))
    # A float64 update for a float32 model may overflow in the cast: check again.
    require_same_tensors(cast, received, "the decoded update")
    return cast


def plain_update(model: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> dict:
    """``model - received`` in each tensor's arithmetic dtype (a plain reply as an update)."""
    update = {
        name: np.subtract(model[name], reference, dtype=update_dtype(reference.dtype))
        for name, reference in received.items()
    }
    require_same_tensors(update, received, "the reply's update")
    return update


def record_bytes(tensors: Mapping[str, np.ndarray]) -> int:
    """``ArrayRecord.count_bytes()`` of plain arrays like ``tensors``, one tensor at a time."""
    # count_bytes() counts each Array's (serialised) data and its key.
    return sum(len(Array(np.ascontiguousarray(value)).data) + len(name) for name, value in tensors.items())


class StreamingRound:
    """One round of a FedAvg-like strategy, summed as the replies are read.

    Parameters
    ----------
    received : Mapping[str, numpy.ndarray]
        The model the round's clients received: the reference of their updates.
    strategy : FedAvg
        The wrapped strategy: its ``weighted_by_key`` and ``train_metrics_aggr_fn`` are used, its
        ``aggregate_train`` is not.
    """

    def __init__(self, received: Mapping[str, np.ndarray], strategy: FedAvg):
        self.received = received
        self.strategy = strategy
        self.aggregator = self._new_sum()
        # What the metrics aggregation and FedAvg's consistency checks read of each accepted
        # reply: its records without the ArrayRecord (a few numbers each).
        self.contents: list[RecordDict] = []
        self.record_keys: list[str] = []
        self.failures = 0
        self._decoded_bytes: int | None = None

    def _new_sum(self):
        """The running sum of the round's weighted updates."""
        expected = {name: (value.shape, update_dtype(value.dtype).name) for name, value in self.received.items()}
        return fstqcodec.StreamingAggregator(expected)

    def _mean_update(self) -> dict:
        """The weighted mean of the updates added (name -> array)."""
        return self.aggregator.result()

    @property
    def decoded_bytes(self) -> int:
        """What one accepted reply would weigh as plain arrays (the reference's dtypes and shapes)."""
        if self._decoded_bytes is None:
            self._decoded_bytes = record_bytes(self.received)
        return self._decoded_bytes

    def add(self, update: dict, weight: float | None, content: RecordDict, record_key: str) -> None:
        """Add an accepted reply's update, weighted, into the sum and keep its metrics.

        A reply without a usable weight (None) is kept for the consistency check of
        :meth:`result`, which then refuses the round as ``FedAvg`` would.

        Raises
        ------
        ProtocolError
            If the aggregator refuses the update (it re-checks names, shapes, finite values).
        """
        if weight is not None and not self.aggregator.add_arrays(update, weight):
            rejection = self.aggregator.rejections.pop()
            raise ProtocolError(f"{rejection.reason} in the update: {rejection.detail}")
        self.contents.append(RecordDict({k: v for k, v in content.items() if not isinstance(v, ArrayRecord)}))
        self.record_keys.append(record_key)

    def result(self) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """What ``FedAvg.aggregate_train`` returns for the accepted replies: the weighted mean of
        the clients' models and the aggregated metrics; ``(None, None)`` without any reply.

        Raises
        ------
        InconsistentMessageReplies
            As ``FedAvg``: the replies' MetricRecords differ in keys, lack the weight key or hold
            it as a list, or their ArrayRecords have different names.
        """
        if not self.contents:
            return None, None
        key = self.strategy.weighted_by_key
        validate_message_reply_consistency(self.contents, key, check_arrayrecord=False)
        if len(set(self.record_keys)) > 1:
            raise InconsistentMessageReplies(
                reason="All ArrayRecords must have the same keys for aggregation. "
                "This condition wasn't met. Skipping aggregation."
            )
        mean_update = self._mean_update()
        arrays = ArrayRecord()
        for name, reference in self.received.items():
            # One tensor at a time: the mean shrinks as the returned record grows.
            rebuilt = np.add(reference, mean_update.pop(name), dtype=update_dtype(reference.dtype))
            arrays[name] = Array(np.ascontiguousarray(rebuilt.astype(reference.dtype, copy=False)))
        metrics = self.strategy.train_metrics_aggr_fn(self.contents, key)
        return arrays, metrics
