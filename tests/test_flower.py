"""Unit tests of fstqcodec.flower: FstqMod and FstqStrategy on hand-built Flower messages.

Messages are built with ``flwr.app.message.make_message`` (a plain ``Message(...)`` needs Flower's
runtime); no Ray, no simulation. The end-to-end runs are in ``test_flower_simulation.py``.
"""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest

pytest.importorskip("flwr", minversion="1.22")

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message import make_message
from flwr.serverapp.strategy import FedAvg

import fstqcodec
from fstqcodec.flower import (
    CONFIG_RECORD,
    FISHER_RECORD,
    MESSAGE_ARRAY,
    PROTOCOL_VERSION,
    STYPE_MODEL,
    STYPE_UPDATE,
    FstqMod,
    FstqStrategy,
    LinkBudget,
)

SHAPES = {"block.lora_A.weight": (8, 256), "block.lora_B.weight": (256, 8)}
RAW_BYTES = 4 * sum(a * b for a, b in SHAPES.values())
_message_ids = itertools.count(1)


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def model(seed: int = 0, scale: float = 0.02) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (scale * rng.standard_normal(shape)).astype(np.float32) for name, shape in SHAPES.items()}


def record(tensors) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in tensors.items()})


def tensors_of(array_record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in array_record.items()}


def metadata(message_type: str = MessageType.TRAIN, *, src: int = 0, dst: int = 1) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"m{next(_message_ids)}",
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )


def new_context(node_id: int = 1) -> Context:
    return Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(), run_config={})


def request(budget=fstqcodec.Budget(ratio=8), *, error_feedback=True, seed=3, fisher_power=None,
            server_round=1, last_accepted=None) -> ConfigRecord:
    """The server's request for node 1 in ``server_round``; by default every earlier reply was accepted."""
    strategy = FstqStrategy(FedAvg(), budget=budget, error_feedback=error_feedback, seed=seed, fisher_power=fisher_power)
    strategy._last_accepted[1] = server_round - 1 if last_accepted is None else last_accepted
    return strategy._client_request(server_round=server_round, node_id=1)


def encoder_of(fstq_request: ConfigRecord) -> fstqcodec.EncodeConfig:
    """The encoder config a request carries (its JSON text, read as a client must)."""
    return fstqcodec.EncodeConfig.from_config(json.loads(fstq_request["encoder"]))


def with_encoder(fstq_request: ConfigRecord, **changes) -> str:
    """The request's encoder JSON with some members replaced (raw, so it may be invalid)."""
    return json.dumps({**json.loads(fstq_request["encoder"]), **changes})


def train_message(global_model, fstq_request=None, message_type=MessageType.TRAIN) -> Message:
    content = RecordDict({"arrays": record(global_model), "config": ConfigRecord({"lr": 0.1})})
    if fstq_request is not None:
        content[CONFIG_RECORD] = fstq_request
    return make_message(metadata(message_type), content)


class FakeApp:
    """A ClientApp stand-in: adds a fixed step to the model it receives, and records what it saw."""

    def __init__(self, step, *, fisher=None, reply_arrays=None):
        self.step = step
        self.fisher = fisher
        self.reply_arrays = reply_arrays
        self.seen: list[dict] = []  # the records of each message, as the app saw them

    def __call__(self, msg: Message, context: Context) -> Message:
        self.seen.append(dict(msg.content.items()))
        received = tensors_of(msg.content["arrays"])
        trained = {name: value + self.step[name] for name, value in received.items()}
        content = RecordDict(
            {
                "arrays": self.reply_arrays if self.reply_arrays is not None else record(trained),
                "metrics": MetricRecord({"num-examples": 5}),
            }
        )
        if self.fisher is not None:
            content[FISHER_RECORD] = record(self.fisher)
        return Message(content, reply_to=msg)


def the_message(reply: Message) -> bytes:
    (array,) = reply.content["arrays"].values()
    assert array.stype == STYPE_UPDATE
    return array.data


# ------------------------------------------------------------------------------------------
# FstqMod
# ------------------------------------------------------------------------------------------


def test_mod_changes_nothing_when_the_server_did_not_ask():
    global_model, step = model(0), model(1, scale=0.001)
    app = FakeApp(step)
    context = new_context()
    reply = FstqMod()(train_message(global_model), context, app)

    assert not reply.has_error()
    trained = tensors_of(reply.content["arrays"])  # plain NumPy arrays, as the app sent them
    for name in SHAPES:
        np.testing.assert_array_equal(trained[name], global_model[name] + step[name])
    assert len(context.state) == 0


def test_mod_sends_one_fstq_message_of_the_update_within_the_budget():
    global_model, step = model(0), model(1, scale=0.001)
    app = FakeApp(step)
    reply = FstqMod()(train_message(global_model, request()), new_context(), app)

    assert not reply.has_error()
    assert list(reply.content["arrays"].keys()) == [MESSAGE_ARRAY]
    data = the_message(reply)
    assert len(data) <= RAW_BYTES // 8
    update = fstqcodec.decode(data)
    assert list(update) == list(SHAPES)
    # The message carries the update (a delta), not the model: compare with the step, not the sum.
    for name in SHAPES:
        error = np.linalg.norm(update[name] - step[name]) / np.linalg.norm(step[name])
        assert error < 0.5, (name, error)
    # The app never sees the compression request; the other records come back untouched.
    assert CONFIG_RECORD not in app.seen[0]
    assert app.seen[0]["config"]["lr"] == 0.1
    assert reply.content["metrics"]["num-examples"] == 5


def test_mod_keeps_error_feedback_in_the_context_across_rounds():
    context = new_context()
    mod = FstqMod()
    global_model = model(0)
    steps = [model(1, scale=0.001), model(2, scale=0.001)]
    sent = []
    for server_round, step in enumerate(steps, start=1):
        reply = mod(train_message(global_model, request(server_round=server_round)), context, FakeApp(step))
        sent.append(fstqcodec.decode(the_message(reply)))
    residual = tensors_of(context.state["fstq.residual"])

    # Nothing is lost, only delayed: what was sent plus what is kept equals what was trained.
    for name in SHAPES:
        np.testing.assert_allclose(
            sent[0][name] + sent[1][name] + residual[name],
            steps[0][name] + steps[1][name],
            atol=1e-6,
        )
        assert np.linalg.norm(residual[name]) > 0


@pytest.mark.parametrize("accepted", [True, False], ids=["delivered", "never-accepted"])
def test_an_update_the_server_never_accepted_goes_back_into_error_feedback(accepted):
    context = new_context()
    mod = FstqMod()
    global_model = model(0)
    steps = [model(1, scale=0.001), model(2, scale=0.001)]
    lossless = None  # a lossless uplink: what arrives is exactly the update plus what was carried
    mod(train_message(global_model, request(lossless, server_round=1)), context, FakeApp(steps[0]))
    # Round 2: the server says whether it accepted round 1's reply (lost, late or broken if not).
    second = request(lossless, server_round=2, last_accepted=1 if accepted else 0)
    sent = fstqcodec.decode(the_message(mod(train_message(global_model, second), context, FakeApp(steps[1]))))
    for name in SHAPES:
        expected = steps[1][name] + (0 if accepted else steps[0][name])
        np.testing.assert_allclose(sent[name], expected, atol=1e-7)
    assert tensors_of(context.state["fstq.residual.sent"]).keys() == SHAPES.keys()


def test_the_strategy_tells_each_node_the_last_round_it_accepted_from_it():
    nodes = [11, 22]
    strategy = FstqStrategy(SharedRecordFedAvg(nodes), budget=fstqcodec.Budget(ratio=8))
    messages = list(strategy.configure_train(1, record(model(0)), ConfigRecord(), grid=None))
    assert [m.content[CONFIG_RECORD]["last-accepted-round"] for m in messages] == [0, 0]
    assert [m.content[CONFIG_RECORD]["round"] for m in messages] == [1, 1]
    (good_reply,) = client_round(messages[:1], [model(1, scale=0.001)])
    broken_reply = make_message(metadata(src=22, dst=0), _broken("garbage"))
    arrays, _ = strategy.aggregate_train(1, [good_reply, broken_reply])
    messages = list(strategy.configure_train(2, arrays, ConfigRecord(), grid=None))
    told = {m.metadata.dst_node_id: m.content[CONFIG_RECORD]["last-accepted-round"] for m in messages}
    assert told == {11: 1, 22: 0}


def test_mod_without_error_feedback_keeps_no_residual():
    context = new_context()
    context.state["fstq.residual"] = record(model(9))  # left over from an earlier setting
    reply = FstqMod()(
        train_message(model(0), request(error_feedback=False)), context, FakeApp(model(1, 0.001))
    )
    assert not reply.has_error()
    assert "fstq.residual" not in context.state


def test_mod_discards_a_residual_of_another_model():
    context = new_context()
    context.state["fstq.residual"] = record({"other.weight": np.ones((3, 3), np.float32)})
    step = model(1, scale=0.001)
    reply = FstqMod()(train_message(model(0), request()), context, FakeApp(step))
    assert not reply.has_error()
    assert sorted(tensors_of(context.state["fstq.residual"])) == sorted(SHAPES)


def skewed_fisher() -> dict:
    """A Fisher that calls the first tensor of the model important and the second not."""
    important, unimportant = SHAPES
    return {important: np.full(SHAPES[important], 1e4, np.float32),
            unimportant: np.full(SHAPES[unimportant], 1e-4, np.float32)}


def test_mod_encodes_with_the_apps_fisher_and_keeps_it_on_the_client():
    global_model, step = model(0), model(1, scale=0.001)
    important, unimportant = SHAPES
    fisher = skewed_fisher()
    tight = fstqcodec.Budget(ratio=16)

    uniform = fstqcodec.decode(the_message(
        FstqMod()(train_message(global_model, request(tight)), new_context(), FakeApp(step))
    ))
    reply = FstqMod()(
        train_message(global_model, request(tight)), new_context(), FakeApp(step, fisher=fisher)
    )
    weighted = fstqcodec.decode(the_message(reply))

    assert FISHER_RECORD not in reply.content
    error = lambda sent, name: float(np.sum((sent[name] - step[name]) ** 2))  # noqa: E731
    assert error(weighted, important) < error(uniform, important)
    assert error(weighted, unimportant) > error(uniform, unimportant)


def test_the_servers_fisher_power_reaches_the_client_encoder():
    global_model, step = model(0), model(1, scale=0.001)
    fisher = skewed_fisher()
    tight = fstqcodec.Budget(ratio=16)

    def message(fisher_power, app_fisher):
        the_request = request(tight, fisher_power=fisher_power)
        return the_message(FstqMod()(train_message(global_model, the_request), new_context(),
                                     FakeApp(step, fisher=app_fisher)))

    assert encoder_of(request(tight, fisher_power=0.5)).fisher_power == 0.5
    # Power 0 makes any Fisher uniform: the same bytes as no Fisher at all.
    assert message(0, fisher) == message(None, None)
    assert message(None, fisher) != message(None, None)
    with pytest.raises(ValueError, match="fisher_power"):
        FstqStrategy(FedAvg(), budget=tight, fisher_power=-1)


def test_mod_decodes_a_compressed_model_before_the_app_sees_it():
    global_model, step = model(0), model(1, scale=0.001)
    data = fstqcodec.encode(global_model, budget=fstqcodec.Budget(bits_per_param=8))
    received = fstqcodec.decode(data)
    msg = train_message(global_model, request(None))  # lossless uplink
    msg.content["arrays"] = ArrayRecord(
        {MESSAGE_ARRAY: Array(dtype="uint8", shape=(len(data),), stype=STYPE_MODEL, data=data)}
    )
    app = FakeApp(step)
    reply = FstqMod()(msg, new_context(), app)

    assert not reply.has_error()
    # The runtime's message is handed back as it came: compressed model and request still there.
    assert next(iter(msg.content["arrays"].values())).stype == STYPE_MODEL
    assert CONFIG_RECORD in msg.content
    seen = tensors_of(app.seen[0]["arrays"])
    for name in SHAPES:
        np.testing.assert_array_equal(seen[name], received[name])
    # The update is relative to what the client decoded; lossless uplink returns it exactly.
    update = fstqcodec.decode(the_message(reply))
    for name in SHAPES:
        np.testing.assert_allclose(update[name], step[name], atol=1e-7)


def test_mod_decodes_the_model_of_an_evaluate_message_and_compresses_nothing():
    global_model = model(0)
    data = fstqcodec.encode(global_model)
    msg = make_message(
        metadata(MessageType.EVALUATE),
        RecordDict({"arrays": ArrayRecord({MESSAGE_ARRAY: Array(
            dtype="uint8", shape=(len(data),), stype=STYPE_MODEL, data=data)})}),
    )
    seen = {}

    def evaluate(msg, context):
        seen.update(tensors_of(msg.content["arrays"]))
        return Message(RecordDict({"metrics": MetricRecord({"accuracy": 0.5})}), reply_to=msg)

    reply = FstqMod()(msg, new_context(), evaluate)
    assert not reply.has_error()
    np.testing.assert_array_equal(seen[next(iter(SHAPES))], global_model[next(iter(SHAPES))])


@pytest.mark.parametrize(
    "case, reason",
    [
        ("other-tensors", "wrong tensors"),
        ("nan-update", "non-finite"),
        ("negative-fisher", "negative"),
        ("newer-protocol", "protocol"),
        ("garbage-downlink", "could not read"),
        ("unknown-budget-unit", "cannot read the encoder config"),
        ("budget-too-small", "could not compress"),
    ],
)
def test_mod_answers_with_an_error_reply_when_it_cannot_comply(case, reason):
    global_model, step = model(0), model(1, scale=0.001)
    fstq_request = request()
    app = FakeApp(step)
    msg = train_message(global_model, fstq_request)
    if case == "other-tensors":
        app = FakeApp(step, reply_arrays=record({"classifier.weight": np.ones((2, 2), np.float32)}))
    elif case == "nan-update":
        poisoned = dict(step)
        poisoned[next(iter(SHAPES))] = np.full(SHAPES[next(iter(SHAPES))], np.nan, np.float32)
        app = FakeApp(poisoned)
    elif case == "negative-fisher":
        app = FakeApp(step, fisher={name: -np.ones(shape, np.float32) for name, shape in SHAPES.items()})
    elif case == "newer-protocol":
        fstq_request["version"] = PROTOCOL_VERSION + 1
    elif case == "unknown-budget-unit":
        fstq_request["encoder"] = with_encoder(fstq_request, budget={"dollars": 8})
    elif case == "budget-too-small":
        fstq_request["encoder"] = with_encoder(fstq_request, budget={"max_bytes": 8})
    elif case == "garbage-downlink":
        msg.content["arrays"] = ArrayRecord(
            {MESSAGE_ARRAY: Array(dtype="uint8", shape=(5,), stype=STYPE_MODEL, data=b"\x00junk")}
        )
    reply = FstqMod()(msg, new_context(), app)
    assert reply.has_error()
    assert reason in reply.error.reason, reply.error.reason


# ------------------------------------------------------------------------------------------
# FstqStrategy
# ------------------------------------------------------------------------------------------


class SharedRecordFedAvg(FedAvg):
    """FedAvg whose configure_train, like the real one, sends one RecordDict to every node, but
    builds its messages with make_message (the real one needs Flower's runtime)."""

    def __init__(self, node_ids, **kwargs):
        super().__init__(**kwargs)
        self.node_ids = node_ids
        self.shared: RecordDict | None = None

    def configure_train(self, server_round, arrays, config, grid):
        config["server-round"] = server_round
        self.shared = RecordDict({"arrays": arrays, "config": config})
        return [make_message(metadata(src=0, dst=node), self.shared) for node in self.node_ids]

    def configure_evaluate(self, server_round, arrays, config, grid):
        shared = RecordDict({"arrays": arrays, "config": config})
        return [make_message(metadata(MessageType.EVALUATE, dst=n), shared) for n in self.node_ids]


def client_round(messages, steps, *, mods=None, contexts=None):
    """Run FstqMod + FakeApp for each message; return the replies as the server gets them."""
    replies = []
    for index, msg in enumerate(messages):
        context = contexts[index] if contexts else new_context(msg.metadata.dst_node_id)
        reply = (mods[index] if mods else FstqMod())(msg, context, FakeApp(steps[index]))
        # What the server receives carries the client as its source.
        replies.append(make_message(metadata(src=msg.metadata.dst_node_id, dst=0), reply.content))
    return replies


def test_configure_train_gives_each_client_its_budget_and_leaves_shared_records_alone():
    nodes = [11, 22]
    inner = SharedRecordFedAvg(nodes)
    budget = LinkBudget({11: 80_000.0, 22: 40_000.0}, deadline_s=1.0)
    strategy = FstqStrategy(inner, budget=budget, downlink="lossless")
    arrays = record(model(0))
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid=None))

    requests = {m.metadata.dst_node_id: m.content[CONFIG_RECORD] for m in messages}
    assert encoder_of(requests[11]).budget == fstqcodec.Budget(max_bytes=10_000)
    assert encoder_of(requests[22]).budget == fstqcodec.Budget(max_bytes=5_000)
    assert encoder_of(requests[11]).seed != encoder_of(requests[22]).seed
    assert messages[0].content is not messages[1].content
    # The wrapped strategy's shared RecordDict and the global model itself are untouched.
    assert CONFIG_RECORD not in inner.shared
    assert inner.shared["arrays"] is arrays and next(iter(arrays.values())).stype == "numpy.ndarray"
    for message in messages:
        (array,) = message.content["arrays"].values()
        assert array.stype == STYPE_MODEL
        decoded = fstqcodec.decode(array.data)
        for name, value in model(0).items():
            np.testing.assert_array_equal(decoded[name], value)


def test_a_round_through_mod_and_strategy_equals_fedavg_of_the_decoded_updates():
    nodes = [11, 22, 33]
    strategy = FstqStrategy(
        SharedRecordFedAvg(nodes), budget=fstqcodec.Budget(ratio=8),
        downlink=fstqcodec.Budget(bits_per_param=8),
    )
    messages = list(strategy.configure_train(1, record(model(0)), ConfigRecord(), grid=None))
    reference = fstqcodec.decode(next(iter(messages[0].content["arrays"].values())).data)
    replies = client_round(messages, [model(seed, scale=0.001) for seed in (1, 2, 3)])
    updates = [fstqcodec.decode(the_message(reply)) for reply in replies]

    arrays, metrics = strategy.aggregate_train(1, replies)

    aggregated = tensors_of(arrays)
    for name in SHAPES:  # equal weights (num-examples = 5 each)
        expected = reference[name] + np.mean([update[name] for update in updates], axis=0)
        np.testing.assert_allclose(aggregated[name], expected, atol=1e-6)
    assert metrics["fstq.replies-accepted"] == 3 and metrics["fstq.replies-dropped"] == 0
    assert metrics["fstq.uplink-bytes"] <= 3 * (RAW_BYTES // 8 + len(MESSAGE_ARRAY))
    assert metrics["fstq.uplink-bytes-decoded"] == 3 * record(model(0)).count_bytes()
    assert metrics["fstq.downlink-bytes"] == sum(
        m.content["arrays"].count_bytes() for m in messages
    )


def _broken(kind: str) -> RecordDict:
    content = RecordDict({"metrics": MetricRecord({"num-examples": 5})})
    good = fstqcodec.encode(model(4, scale=0.001), budget=fstqcodec.Budget(ratio=8))

    def wrap(data, stype=STYPE_UPDATE):
        return ArrayRecord({MESSAGE_ARRAY: Array(dtype="uint8", shape=(len(data),), stype=stype, data=data)})

    if kind == "garbage":
        content["arrays"] = wrap(bytes(range(256)) * 4)
    elif kind == "truncated":
        content["arrays"] = wrap(good[: len(good) - 7])
    elif kind == "trailing":
        content["arrays"] = wrap(good + b"\x00")
    elif kind == "other-model":
        content["arrays"] = wrap(fstqcodec.encode({"classifier.weight": np.ones((4, 4), np.float32)}))
    elif kind == "wrong-shape":
        content["arrays"] = wrap(fstqcodec.encode({name: np.ones((2, 2), np.float32) for name in SHAPES}))
    elif kind == "nan-plain":
        content["arrays"] = record({name: np.full(shape, np.nan, np.float32) for name, shape in SHAPES.items()})
    elif kind == "two-records":
        content["arrays"] = wrap(good)
        content["more"] = wrap(good)
    elif kind == "unknown-stype":
        content["arrays"] = wrap(good, stype="torch.Tensor")
    elif kind == "message-beside-arrays":
        content["arrays"] = ArrayRecord({
            MESSAGE_ARRAY: Array(dtype="uint8", shape=(len(good),), stype=STYPE_UPDATE, data=good),
            "extra": Array(np.zeros(3, np.float32)),
        })
    return content


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("garbage", "undecodable update"),
        ("truncated", "undecodable update"),
        ("trailing", "undecodable update"),
        ("other-model", "wrong tensors"),
        ("wrong-shape", "wrong shape"),
        ("nan-plain", "non-finite"),
        ("two-records", "exactly one ArrayRecord"),
        ("unknown-stype", "unreadable arrays"),
        ("message-beside-arrays", "exactly that one Array"),
    ],
)
def test_a_broken_reply_is_dropped_with_its_reason_and_the_round_goes_on(kind, reason, caplog):
    nodes = [11, 22]
    strategy = FstqStrategy(SharedRecordFedAvg(nodes), budget=fstqcodec.Budget(ratio=8))
    messages = list(strategy.configure_train(1, record(model(0)), ConfigRecord(), grid=None))
    (good_reply,) = client_round(messages[:1], [model(1, scale=0.001)])
    broken_reply = make_message(metadata(src=22, dst=0), _broken(kind))

    good_update = fstqcodec.decode(the_message(good_reply))

    with caplog.at_level("WARNING", logger="flwr.fstqcodec"):
        arrays, metrics = strategy.aggregate_train(1, [good_reply, broken_reply])

    # The round's result is the good client's model alone.
    for name, value in tensors_of(arrays).items():
        np.testing.assert_allclose(value, model(0)[name] + good_update[name], atol=1e-7)
    (drop,) = strategy.dropped_replies
    assert (drop.server_round, drop.node_id) == (1, 22)
    assert reason in drop.reason, drop.reason
    assert metrics["fstq.replies-dropped"] == 1 and metrics["fstq.replies-accepted"] == 1
    assert any("node 22" in record.getMessage() and reason in record.getMessage()
               for record in caplog.records)


def test_a_plain_reply_from_a_client_without_the_mod_is_accepted():
    strategy = FstqStrategy(SharedRecordFedAvg([11]), budget=fstqcodec.Budget(ratio=8))
    strategy.configure_train(1, record(model(0)), ConfigRecord(), grid=None)
    trained = {name: value + 0.01 for name, value in model(0).items()}
    reply = make_message(
        metadata(src=11, dst=0),
        RecordDict({"arrays": record(trained), "metrics": MetricRecord({"num-examples": 5})}),
    )
    arrays, metrics = strategy.aggregate_train(1, [reply])
    for name, value in tensors_of(arrays).items():
        np.testing.assert_array_equal(value, trained[name])
    assert metrics["fstq.replies-dropped"] == 0


def test_evaluate_messages_carry_the_compressed_model_and_their_bytes_are_reported():
    strategy = FstqStrategy(SharedRecordFedAvg([11, 22]), downlink="lossless")
    arrays = record(model(0))
    messages = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), grid=None))
    assert all(CONFIG_RECORD not in m.content for m in messages)  # no uplink request
    (array,) = messages[0].content["arrays"].values()
    assert array.stype == STYPE_MODEL
    replies = [
        make_message(metadata(MessageType.EVALUATE, src=n, dst=0),
                     RecordDict({"metrics": MetricRecord({"num-examples": 5, "accuracy": 0.5})}))
        for n in (11, 22)
    ]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["fstq.downlink-bytes"] == 2 * messages[0].content["arrays"].count_bytes()


def test_aggregating_a_round_that_was_not_configured_is_an_error():
    strategy = FstqStrategy(FedAvg(), budget=fstqcodec.Budget(ratio=8))
    with pytest.raises(RuntimeError, match="not configured"):
        strategy.aggregate_train(1, [])


def test_constructor_refuses_what_it_cannot_send():
    with pytest.raises(TypeError):
        FstqStrategy(object(), budget=fstqcodec.Budget(ratio=8))
    with pytest.raises(TypeError):
        FstqStrategy(FedAvg(), downlink="fp16")


class FlowerTuneStyle(FstqStrategy):
    """FlowerTune's CommunicationTracker placement: after configure, before aggregate."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tracked: list[int] = []

    @staticmethod
    def _compute_bytes(arrays: ArrayRecord) -> int:  # as in FlowerTune's template
        return sum(len(array.data) for array in arrays.values())

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.tracked.append(sum(self._compute_bytes(m.content["arrays"]) for m in messages))
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.tracked.append(sum(self._compute_bytes(r.content["arrays"]) for r in replies))
        return super().aggregate_train(server_round, replies)


def test_a_flowertune_style_tracker_counts_the_compressed_bytes():
    strategy = FlowerTuneStyle(
        SharedRecordFedAvg([11, 22]), budget=fstqcodec.Budget(ratio=8),
        downlink=fstqcodec.Budget(bits_per_param=8),
    )
    messages = list(strategy.configure_train(1, record(model(0)), ConfigRecord(), grid=None))
    replies = client_round(messages, [model(1, 0.001), model(2, 0.001)])
    strategy.aggregate_train(1, replies)

    downlink, uplink = strategy.tracked
    assert downlink <= 2 * (RAW_BYTES // 4)  # 8 of 32 bits per parameter
    assert uplink <= 2 * (RAW_BYTES // 8)


def test_link_budget_gives_each_node_what_its_link_carries_before_the_deadline():
    budget = LinkBudget({11: 8e6, 22: 1e6}, deadline_s=2.0)
    assert budget(11, 1).max_bytes == 2_000_000
    assert budget(22, 5).max_bytes == 250_000
    with pytest.raises(KeyError, match="33"):
        budget(33, 1)
    assert LinkBudget({}, deadline_s=1.0, default_bps=8000.0)(33, 1).max_bytes == 1000
    assert LinkBudget(lambda node: 16_000.0, deadline_s=0.5)(7, 1).max_bytes == 1000
    with pytest.raises(ValueError):
        LinkBudget({}, deadline_s=0.0)
    floored = LinkBudget({11: 8000.0}, deadline_s=1.0, min_bytes=2048)
    assert floored(11, 1).max_bytes == 2048  # the link carries 1000 bytes: the floor applies
    with pytest.raises(ValueError, match="min_bytes"):
        LinkBudget({}, deadline_s=1.0, min_bytes=0)


class FakeGrid:
    """Just enough of a Grid for Flower's own configure_train: the connected node ids."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def runtime_free(strategy_class):
    """A Flower strategy whose messages are built with make_message (Message() needs a runtime)."""

    class RuntimeFree(strategy_class):
        def _construct_messages(self, record, node_ids, message_type):
            return [make_message(metadata(message_type, dst=node), record) for node in node_ids]

    return RuntimeFree


@pytest.mark.parametrize("strategy_name", ["FedAvg", "FedMedian", "FedAdam"])
def test_a_wrapped_strategy_aggregates_exactly_as_it_would_the_decoded_models(strategy_name):
    import flwr.serverapp.strategy as strategies

    nodes = [11, 22, 33]
    cls = runtime_free(getattr(strategies, strategy_name))
    wrapped, plain = cls(min_available_nodes=3), cls(min_available_nodes=3)
    fstq = FstqStrategy(wrapped, budget=fstqcodec.Budget(ratio=8))
    global_arrays = record(model(0))
    steps = [model(seed, scale=0.001) for seed in (1, 2, 3)]

    messages = list(fstq.configure_train(1, global_arrays, ConfigRecord(), FakeGrid(nodes)))
    replies = client_round(messages, [steps[nodes.index(m.metadata.dst_node_id)] for m in messages])
    # What the clients' models are, as the server decodes them: the same strategy gets them plain.
    decoded_models = [
        {name: model(0)[name] + update for name, update in fstqcodec.decode(the_message(r)).items()}
        for r in replies
    ]
    plain_replies = [
        make_message(metadata(src=r.metadata.src_node_id, dst=0),
                     RecordDict({"arrays": record(m), "metrics": MetricRecord({"num-examples": 5})}))
        for r, m in zip(replies, decoded_models)
    ]
    list(plain.configure_train(1, global_arrays, ConfigRecord(), FakeGrid(nodes)))

    compressed_result, _ = fstq.aggregate_train(1, replies)
    plain_result, _ = plain.aggregate_train(1, plain_replies)
    for name, value in tensors_of(plain_result).items():
        np.testing.assert_allclose(tensors_of(compressed_result)[name], value, atol=1e-7)
