"""FstqStrategy's streaming aggregation against its decode-everything path (issue 15).

The same replies, good and hostile, go through ``FstqStrategy(..., streaming=True)`` and
``streaming=False`` (whose aggregation is the wrapped FedAvg's own): the rounds must agree on the
model (to float rounding), the metrics, the traffic and the dropped replies.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

pytest.importorskip("flwr", minversion="1.22")

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, Krum
from test_flower import SHAPES, SharedRecordFedAvg, _broken, client_round, metadata, model, record, tensors_of, the_message

import fstqcodec
from fstqcodec.flower import MESSAGE_ARRAY, STYPE_UPDATE, FstqStrategy

NODES = [11, 12, 13]
WEIGHTS = {11: 3, 12: 5, 13: 11, 14: 2}
DOWNLINK = fstqcodec.Budget(bits_per_param=8)


def received_model():
    """What the clients decode of the lossy downlink: the reference of their updates."""
    return fstqcodec.decode(fstqcodec.encode(model(0), budget=DOWNLINK))


def copy_of(reply):
    """The reply as a fresh Message (the decode-all path replaces a reply's content)."""
    if reply.has_error():
        return make_message(metadata(src=reply.metadata.src_node_id, dst=0), error=reply.error)
    return make_message(metadata(src=reply.metadata.src_node_id, dst=0), RecordDict(dict(reply.content.items())))


def round_replies():
    """Three clients through FstqMod with distinct weights, a plain reply, hostile ones, an error."""
    strategy = FstqStrategy(SharedRecordFedAvg(NODES), budget=fstqcodec.Budget(ratio=8), downlink=DOWNLINK)
    messages = list(strategy.configure_train(1, record(model(0)), ConfigRecord(), grid=None))
    replies = client_round(messages, [model(seed, scale=0.001) for seed in (1, 2, 3)])
    for reply in replies:
        node = reply.metadata.src_node_id
        reply.content["metrics"] = MetricRecord({"num-examples": WEIGHTS[node], "loss": 0.1 * node, "acc": [1.0, float(node)]})
    plain = {name: value + np.float32(0.003) for name, value in received_model().items()}
    replies.append(make_message(metadata(src=14, dst=0), RecordDict({
        "arrays": record(plain), "metrics": MetricRecord({"num-examples": 2, "loss": 1.4, "acc": [1.0, 14.0]})})))
    for node, kind in enumerate(("garbage", "truncated", "other-model", "wrong-shape", "nan-plain", "two-records"), 20):
        replies.append(make_message(metadata(src=node, dst=0), _broken(kind)))
    for node, weight in ((30, float("nan")), (31, 0), (32, -4.0), (33, float("inf"))):
        content = _broken("truncated")
        content["arrays"] = replies[0].content["arrays"]  # a good update with a bad weight
        content["metrics"] = MetricRecord({"num-examples": weight, "loss": 0.0, "acc": [1.0, 0.0]})
        replies.append(make_message(metadata(src=node, dst=0), content))
    replies.append(make_message(metadata(src=40, dst=0), error=Error(code=0, reason="client crashed")))
    return replies


def aggregate(replies, streaming, inner=None):
    strategy = FstqStrategy(inner or SharedRecordFedAvg(NODES), budget=fstqcodec.Budget(ratio=8),
                            downlink=DOWNLINK, streaming=streaming)
    strategy.configure_train(1, record(model(0)), ConfigRecord(), grid=None)
    arrays, metrics = strategy.aggregate_train(1, [copy_of(reply) for reply in replies])
    return strategy, arrays, metrics


def test_streaming_gives_the_decode_all_round_with_the_same_drops():
    replies = round_replies()
    streamed, arrays, metrics = aggregate(replies, streaming=True)
    decoded_all, arrays_all, metrics_all = aggregate(replies, streaming=False)
    assert streamed.streaming and not decoded_all.streaming

    got, want = tensors_of(arrays), tensors_of(arrays_all)
    assert list(got) == list(want) == list(SHAPES)
    for name in SHAPES:
        assert got[name].dtype == want[name].dtype == np.float32
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-8)
    # And both are the weighted mean of the clients' models (reference + decoded update).
    reference = received_model()
    updates = {r.metadata.src_node_id: fstqcodec.decode(the_message(r)) for r in replies[:3]}
    updates[14] = {name: tensors_of(replies[3].content["arrays"])[name] - reference[name] for name in SHAPES}
    for name in SHAPES:
        mean = sum(WEIGHTS[n] * (reference[name] + updates[n][name]) for n in updates) / sum(WEIGHTS.values())
        np.testing.assert_allclose(got[name], mean, atol=2e-6)

    assert dict(metrics) == dict(metrics_all)
    assert metrics["fstq.replies-accepted"] == 4 and metrics["fstq.replies-dropped"] == 10
    assert metrics["loss"] == pytest.approx(sum(WEIGHTS[n] * (0.1 * n if n != 14 else 1.4) for n in WEIGHTS) / 21)
    assert streamed.traffic == decoded_all.traffic
    reasons = [drop.reason for drop in streamed.dropped_replies]
    assert [(d.node_id, d.reason) for d in streamed.dropped_replies] == [(d.node_id, d.reason) for d in decoded_all.dropped_replies]
    assert [drop.node_id for drop in streamed.dropped_replies] == [20, 21, 22, 23, 24, 25, 30, 31, 32, 33]
    assert all("bad weight" in reason for reason in reasons[6:]), reasons
    assert streamed._last_accepted == decoded_all._last_accepted == {11: 1, 12: 1, 13: 1, 14: 1}


def test_streaming_keeps_the_replies_compressed():
    replies = [copy_of(reply) for reply in round_replies()[:3]]
    strategy = FstqStrategy(SharedRecordFedAvg(NODES), budget=fstqcodec.Budget(ratio=8))
    strategy.configure_train(1, record(model(0)), ConfigRecord(), grid=None)
    strategy.aggregate_train(1, replies)
    assert all(next(iter(r.content["arrays"].values())).stype == STYPE_UPDATE for r in replies)


class OwnAggregation(FedAvg):
    def aggregate_train(self, server_round, replies):
        return super().aggregate_train(server_round, replies)


@pytest.mark.parametrize(
    "inner, streaming, expected",
    [
        (FedAvg(), "auto", True),
        (FedProx(), "auto", True),  # FedAvg's aggregation, a client-side proximal term
        (SharedRecordFedAvg(NODES), "auto", True),  # overrides configure_train only
        (FedMedian(), "auto", False),
        (Krum(), "auto", False),
        (OwnAggregation(), "auto", False),
        (OwnAggregation(), True, True),
        (FedAvg(), False, False),
    ],
)
def test_auto_streams_only_strategies_that_aggregate_as_fedavg(inner, streaming, expected):
    assert FstqStrategy(inner, streaming=streaming).streaming is expected


@pytest.mark.parametrize("streaming", ["yes", 1, None])
def test_a_bad_streaming_option_is_refused(streaming):
    with pytest.raises(TypeError, match="streaming must be"):
        FstqStrategy(FedAvg(), streaming=streaming)


def test_streaming_needs_a_fedavg():
    with pytest.raises(TypeError, match="needs a FedAvg"):
        FstqStrategy(FstqStrategy(FedAvg()), streaming=True)  # a Strategy, not a FedAvg


@pytest.mark.parametrize("streaming", [True, False])
def test_a_missing_weight_refuses_the_round_as_fedavg_does(streaming):
    replies = round_replies()[:3]
    del replies[1].content["metrics"]["num-examples"]
    with pytest.raises(InconsistentMessageReplies):
        aggregate(replies, streaming=streaming)


@pytest.mark.parametrize("streaming", [True, False])
def test_a_round_without_any_accepted_reply_gives_no_model(streaming):
    replies = round_replies()[4:]
    _, arrays, metrics = aggregate(replies, streaming=streaming)
    assert arrays is None and metrics["fstq.replies-accepted"] == 0


def _peak_bytes(streaming: bool, clients: int, update_bytes: list) -> int:
    shapes = {"a": (512, 256), "b": (256, 512)}
    base = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    strategy = FstqStrategy(FedAvg(), budget=fstqcodec.Budget(bits_per_param=0.3), streaming=streaming)
    strategy._references[1] = base  # as configure_train keeps it
    replies = []
    for node, data in zip(range(clients), update_bytes * clients):
        array = Array(dtype="uint8", shape=(len(data),), stype=STYPE_UPDATE, data=data)
        content = RecordDict({"arrays": ArrayRecord({MESSAGE_ARRAY: array}), "metrics": MetricRecord({"num-examples": 1 + node})})
        replies.append(make_message(metadata(src=node, dst=0), content))
    tracemalloc.start()
    try:
        strategy.aggregate_train(1, replies)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_streaming_peak_does_not_grow_with_the_clients():
    rng = np.random.default_rng(0)
    update = {"a": rng.standard_normal((512, 256), np.float32), "b": rng.standard_normal((256, 512), np.float32)}
    data = [fstqcodec.encode(update, budget=fstqcodec.Budget(bits_per_param=0.3))]
    model_bytes = 4 * 2 * 512 * 256  # 1 MiB
    few, many = (_peak_bytes(True, n, data) for n in (3, 15))
    assert many < few + model_bytes // 4, (few, many)
    assert few < 6 * model_bytes
    # The decode-all path holds every client's model: its peak grows by about 2 models a client
    # (the arrays and their serialised ArrayRecord), which is what streaming removes.
    few_all, many_all = (_peak_bytes(False, n, data) for n in (3, 15))
    assert many_all > few_all + 12 * model_bytes, (few_all, many_all)
