"""Downlink proxies (FedQSN) in the Flower adapter: FstqStrategy(downlink=DownlinkProxies(...)) and
FstqMod, on hand-built Flower messages (spec/FLOWER.md, protocol 3, sections 5 and 7).

What each client decodes must carry no entry of the server mask, over rounds and clients; the
round is masked FedAvg; bad or mismatched proxies are refused with their reason. The run through
Flower's own simulation engine is in ``test_flower_simulation.py``.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

pytest.importorskip("flwr", minversion="1.22")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.serverapp.strategy import FedAdam, FedAvg

import fstqcodec
from fstqcodec.flower import (
    CONFIG_RECORD,
    MESSAGE_ARRAY,
    STYPE_PROXY,
    STYPE_UPDATE,
    DownlinkProxies,
    FstqMod,
    FstqStrategy,
)
from fstqcodec.flower.mod import PROXY_PREVIOUS_STATE, PROXY_RECEIVED_STATE
from fstqcodec.flower.protocol import proxy_fill_record

from test_flower import SHAPES, SharedRecordFedAvg, metadata, model, new_context, record, tensors_of, train_message

VECTORS = pathlib.Path(__file__).resolve().parents[1] / "spec" / "vectors"
NODES = [11, 22, 33]


class SteppingApp:
    """A ClientApp stand-in: adds a node- and round-specific step to what it received, replies
    with a node-specific weight, and records the arrays it was given."""

    def __init__(self, node_id: int, server_round: int, *, weight: int | None = None):
        self.node_id, self.server_round = node_id, server_round
        self.weight = weight if weight is not None else node_id // 11
        self.seen: dict[str, np.ndarray] | None = None

    def step(self) -> dict[str, np.ndarray]:
        return model(1000 * self.node_id + self.server_round, scale=0.001)

    def __call__(self, msg: Message, context) -> Message:
        self.seen = tensors_of(msg.content["arrays"])
        trained = {name: value + self.step()[name] for name, value in self.seen.items()}
        content = RecordDict({"arrays": record(trained), "metrics": MetricRecord({"num-examples": self.weight})})
        return Message(content, reply_to=msg)


def proxy_strategy(*, fill="zero", budget=fstqcodec.Budget(bits_per_param=4), uplink=fstqcodec.Budget(ratio=8),
                   server_mask=0.3, client_mask=0.1, nodes=NODES) -> FstqStrategy:
    proxies = DownlinkProxies(server_mask=server_mask, client_mask=client_mask, fill=fill, budget=budget)
    config = fstqcodec.EncodeConfig(budget=uplink, seed=4, fisher_power=fstqcodec.FEDERATED_FISHER_POWER)
    return FstqStrategy(SharedRecordFedAvg(nodes), config, downlink=proxies)


def the_array(array_record: ArrayRecord) -> Array:
    (array,) = array_record.values()
    return array


def run_clients(messages, server_round, mods, contexts):
    """Each node's FstqMod and app on its message: (replies as the server gets them, the apps)."""
    replies, apps = [], {}
    for msg in messages:
        node = msg.metadata.dst_node_id
        apps[node] = SteppingApp(node, server_round)
        reply = mods[node](msg, contexts[node], apps[node])
        assert not reply.has_error(), reply.error.reason
        replies.append(make_message(metadata(src=node, dst=0), reply.content))
    return replies, apps


def altered_on(hidden: dict, tensors: dict) -> dict:
    """``tensors`` with every ``hidden`` entry replaced by large values (a different secret model)."""
    return {name: np.where(hidden[name], 1e3 + np.arange(value.size, dtype=np.float32).reshape(value.shape), value)
            .astype(np.float32) for name, value in tensors.items()}


# ------------------------------------------------------------------------------------------
# No client ever receives a server-masked entry
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fill", ["zero", "previous", "received"])
def test_no_client_decodes_a_server_masked_entry_over_rounds_and_clients(fill):
    """Two federations run side by side: one on the true global model, one whose server-masked
    entries hold other values. Every byte sent (train and evaluate) and every array each client's
    app is given are the same in both, and the models differ only on the server-masked entries."""
    true_run, secret_run = proxy_strategy(fill=fill), proxy_strategy(fill=fill)
    initial = {name: value * 0.5 for name, value in model(9).items()}
    mods = {node: FstqMod(initial_model=lambda context: initial) for node in NODES}
    contexts = {run: {node: new_context(node) for node in NODES} for run in ("true", "secret")}
    global_model = model(0)
    secret_model = None
    for server_round in (1, 2, 3):
        true_messages = list(true_run.configure_train(server_round, record(global_model), ConfigRecord(), grid=None))
        hidden = {name: ~seen for name, seen in true_run._proxies.server.server_visible().items()}
        assert all(0.2 < h.mean() < 0.4 for h in hidden.values())  # the server mask hides about 30 %
        if secret_model is None:
            secret_model = altered_on(hidden, global_model)
        secret_messages = list(secret_run.configure_train(server_round, record(secret_model), ConfigRecord(), grid=None))

        for sent, other in zip(true_messages, secret_messages):
            array = the_array(sent.content["arrays"])
            assert array.stype == STYPE_PROXY and sent.content[CONFIG_RECORD]["proxy-fill"] == fill
            assert array.data == the_array(other.content["arrays"]).data  # the bytes hold no hidden value
            assert 8 * len(array.data) <= 4 * sum(v.size for v in global_model.values())  # >= 8x below fp32
            _, visible = fstqcodec.proxy.decode_proxy(array.data)
            assert not any(np.any(visible[name] & hidden[name]) for name in SHAPES)

        replies, apps = run_clients(true_messages, server_round, mods, contexts["true"])
        secret_replies, secret_apps = run_clients(secret_messages, server_round, mods, contexts["secret"])
        for node, app in apps.items():
            for name in SHAPES:
                np.testing.assert_array_equal(app.seen[name], secret_apps[node].seen[name])
                if fill == "zero":
                    assert np.all(app.seen[name][hidden[name]] == 0)
        for reply, secret_reply in zip(replies, secret_replies):
            data = the_array(reply.content["arrays"]).data
            assert data == the_array(secret_reply.content["arrays"]).data
            # The update carries the proxy's masks: nothing of an entry the client was not sent.
            _, update_visible = fstqcodec.proxy.decode_proxy(data)
            assert not any(np.any(update_visible[name] & hidden[name]) for name in SHAPES)

        arrays, metrics = true_run.aggregate_train(server_round, replies)
        secret_arrays, _ = secret_run.aggregate_train(server_round, secret_replies)
        global_model, secret_model = tensors_of(arrays), tensors_of(secret_arrays)
        for name in SHAPES:  # masked FedAvg never moves a server-masked entry
            np.testing.assert_array_equal(global_model[name][~hidden[name]], secret_model[name][~hidden[name]])
            np.testing.assert_array_equal(global_model[name][hidden[name]], model(0)[name][hidden[name]])
        server_share = sum(int((~h).sum()) for h in hidden.values()) / sum(h.size for h in hidden.values())
        assert metrics["fstq.replies-accepted"] == 3 and 0.5 < metrics["fstq.proxy-seen-fraction"] <= server_share
        assert 0.3 < metrics["fstq.proxy-cosine-mean"] <= metrics["fstq.proxy-cosine-max"] < 0.95

        evaluate = list(true_run.configure_evaluate(server_round, arrays, ConfigRecord(), grid=None))
        secret_evaluate = list(secret_run.configure_evaluate(server_round, secret_arrays, ConfigRecord(), grid=None))
        for sent, other in zip(evaluate, secret_evaluate):
            assert the_array(sent.content["arrays"]).stype == STYPE_PROXY
            assert sent.content[CONFIG_RECORD]["proxy-fill"] == fill
            assert the_array(sent.content["arrays"]).data == the_array(other.content["arrays"]).data
    if fill != "zero":
        key = PROXY_PREVIOUS_STATE if fill == "previous" else PROXY_RECEIVED_STATE
        stored = tensors_of(contexts["true"][NODES[0]].state[key])
        assert stored.keys() == SHAPES.keys()


def test_a_previous_filled_proxy_gives_the_client_its_own_values_where_hidden():
    strategy = proxy_strategy(fill="previous", server_mask=0.5, client_mask=0.2)
    initial = model(9)
    mod, context = FstqMod(initial_model=lambda ctxt: initial), new_context(11)
    global_model = model(0)
    for server_round in (1, 2):
        (msg, *_) = strategy.configure_train(server_round, record(global_model), ConfigRecord(), grid=None)
        sent, visible = fstqcodec.proxy.decode_proxy(the_array(msg.content["arrays"]).data)
        previous = initial if server_round == 1 else trained
        app = SteppingApp(11, server_round)
        mod(msg, context, app)
        trained = {name: app.seen[name] + app.step()[name] for name in SHAPES}
        for name in SHAPES:
            np.testing.assert_array_equal(app.seen[name][~visible[name]], previous[name][~visible[name]])
            np.testing.assert_array_equal(app.seen[name][visible[name]], sent[name][visible[name]])
        strategy._references.clear()  # the server side of the round is not under test here


def test_a_received_filled_proxy_gives_the_client_the_last_values_it_was_sent():
    """Hidden entries hold the value the server last sent this client (the initial one where
    never sent), not what the app trained; an evaluate message's proxy counts as sent too."""
    strategy = proxy_strategy(fill="received", server_mask=0.3, client_mask=0.5)
    initial = model(9)
    mod, context = FstqMod(initial_model=lambda ctxt: initial), new_context(11)
    received = initial
    for server_round, global_model in ((1, model(0)), (2, model(1))):
        (msg, *_) = strategy.configure_train(server_round, record(global_model), ConfigRecord(), grid=None)
        sent, visible = fstqcodec.proxy.decode_proxy(the_array(msg.content["arrays"]).data)
        app = SteppingApp(11, server_round)
        assert not mod(msg, context, app).has_error()
        for name in SHAPES:
            np.testing.assert_array_equal(app.seen[name][~visible[name]], received[name][~visible[name]])
            np.testing.assert_array_equal(app.seen[name][visible[name]], sent[name][visible[name]])
        received = app.seen  # what the app trained is not kept: only what the server sent
        kept = tensors_of(context.state[PROXY_RECEIVED_STATE])
        assert all(np.array_equal(kept[name], received[name]) for name in SHAPES)
        strategy._references.clear()  # the server side of the round is not under test here
    hidden_twice = {name: ~visible[name] for name in SHAPES}
    assert any(np.any(h & (received[name] != initial[name])) for name, h in hidden_twice.items())
    (evaluate, *_) = strategy.configure_evaluate(2, record(model(2)), ConfigRecord(), grid=None)
    sent, visible = fstqcodec.proxy.decode_proxy(the_array(evaluate.content["arrays"]).data)
    evaluated = {}
    mod(evaluate, context, lambda msg, ctxt: evaluated.update(tensors_of(msg.content["arrays"])) or Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg))
    kept = tensors_of(context.state[PROXY_RECEIVED_STATE])
    for name in SHAPES:
        np.testing.assert_array_equal(kept[name], evaluated[name])
        np.testing.assert_array_equal(kept[name][visible[name]], sent[name][visible[name]])
        np.testing.assert_array_equal(kept[name][~visible[name]], received[name][~visible[name]])


# ------------------------------------------------------------------------------------------
# Masked FedAvg
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lossless", [True, False], ids=["lossless", "4-bit proxies, 8x uplink"])
def test_the_round_is_fedavg_of_each_update_where_its_client_saw(lossless):
    budget, uplink = (None, None) if lossless else (fstqcodec.Budget(bits_per_param=4), fstqcodec.Budget(ratio=8))
    strategy = proxy_strategy(budget=budget, uplink=uplink, server_mask=0.3, client_mask=0.4)
    global_model = model(0)
    messages = list(strategy.configure_train(1, record(global_model), ConfigRecord(), grid=None))
    contexts = {node: new_context(node) for node in NODES}
    replies, apps = run_clients(messages, 1, {node: FstqMod() for node in NODES}, contexts)
    arrays, metrics = strategy.aggregate_train(1, replies)
    result = tensors_of(arrays)

    server = strategy._proxies.server
    for name in SHAPES:
        total = np.zeros(SHAPES[name], np.float64)
        weights = np.zeros(SHAPES[name], np.float64)
        for reply in replies:
            node = reply.metadata.src_node_id
            visible = server.visible(node, 1)[name]
            update = fstqcodec.decode(the_array(reply.content["arrays"]).data)[name]
            if lossless:  # the update is exactly the app's step, where the client saw
                np.testing.assert_allclose(update[visible], apps[node].step()[name][visible], atol=1e-7)
            total += np.where(visible, apps[node].weight * update, 0.0)
            weights += apps[node].weight * visible
        expected = global_model[name] + np.where(weights > 0, total / np.maximum(weights, 1), 0.0)
        np.testing.assert_allclose(result[name], expected, atol=1e-6)
        nobody = weights == 0
        assert nobody.any() and np.array_equal(result[name][nobody], global_model[name][nobody])
        # Not plain FedAvg: an entry two of three clients saw is their mean, not diluted by the third.
        assert not np.allclose(result[name], global_model[name] + total / sum(a.weight for a in apps.values()))
    assert metrics["fstq.replies-accepted"] == 3


def test_error_feedback_keeps_what_a_hidden_entry_owes_until_it_is_visible():
    strategy = proxy_strategy(uplink=fstqcodec.Budget(ratio=8), server_mask=0.0, client_mask=0.5)
    (msg, *_) = strategy.configure_train(1, record(model(0)), ConfigRecord(), grid=None)
    context = new_context(11)
    FstqMod()(msg, context, SteppingApp(11, 1))
    residual = tensors_of(context.state["fstq.residual"])
    _, visible = fstqcodec.proxy.decode_proxy(the_array(msg.content["arrays"]).data)
    for name in SHAPES:
        # The update was zero where hidden, so nothing is owed there; where visible, the 8x loss is.
        assert np.all(residual[name][~visible[name]] == 0)
        assert np.any(residual[name][visible[name]] != 0)


# ------------------------------------------------------------------------------------------
# Bad and mismatched proxies
# ------------------------------------------------------------------------------------------


def proxy_message(data: bytes, *, fill_record: ConfigRecord | None, message_type=MessageType.EVALUATE) -> Message:
    content = RecordDict({"arrays": ArrayRecord(
        {MESSAGE_ARRAY: Array(dtype="uint8", shape=(len(data),), stype=STYPE_PROXY, data=data)})})
    if fill_record is not None:
        content[CONFIG_RECORD] = fill_record
    return make_message(metadata(message_type), content)


def evaluate_app(msg, context):
    return Message(RecordDict({"metrics": MetricRecord({"accuracy": 0.5})}), reply_to=msg)


@pytest.mark.parametrize(
    "vector, reason",
    [
        ("mask_keep_zero", "keep probability"),
        ("mask_keep_above_one", "keep probability"),
        ("mask_generator_unknown", "unknown generator"),
        ("mask_row_on_1d_tensor", "does not fit tensor"),
        ("mask_granularity_unknown", "unknown granularity"),
    ],
)
def test_a_proxy_with_bad_mask_parameters_is_refused(vector, reason):
    data = (VECTORS / "invalid" / f"{vector}.fstq").read_bytes()
    with pytest.raises(fstqcodec.DecodeError, match=reason):
        fstqcodec.proxy.read_proxy(data)
    reply = FstqMod()(proxy_message(data, fill_record=proxy_fill_record("zero")), new_context(), evaluate_app)
    assert reply.has_error() and "could not read the server's message" in reply.error.reason
    assert reason in reply.error.reason, reply.error.reason


def a_proxy() -> bytes:
    server = fstqcodec.proxy.ProxyServer(SHAPES, server_keep=0.7, client_keep=0.9, seed=1)
    return server.downlink(model(0), client=11, round_number=1)


@pytest.mark.parametrize(
    "case, reason",
    [
        ("no-record", "needs the 'fstq' record with 'proxy-fill'"),
        ("unknown-fill", "'proxy-fill' must be one of"),
        ("older-record", "upgrade fstqcodec on the server"),
        ("beside-arrays", "exactly that one Array"),
        ("two-proxies", "one proxy of the global model, found two"),
        ("previous-of-another-model", "the proxy does not fit this client's model: wrong shape"),
        ("train-without-fill", "'proxy-fill' as str"),
    ],
)
def test_a_mismatched_proxy_is_refused_with_its_reason(case, reason):
    data = a_proxy()
    msg = proxy_message(data, fill_record=proxy_fill_record("zero"))
    mod, app = FstqMod(), evaluate_app
    if case == "no-record":
        msg = proxy_message(data, fill_record=None)
    elif case == "unknown-fill":
        msg = proxy_message(data, fill_record=ConfigRecord({"version": 3, "proxy-fill": "mean"}))
    elif case == "older-record":
        msg = proxy_message(data, fill_record=ConfigRecord({"version": 2, "proxy-fill": "zero"}))
    elif case == "beside-arrays":
        msg.content["arrays"]["extra"] = Array(np.zeros(3, np.float32))
    elif case == "two-proxies":
        msg.content["more"] = ArrayRecord(
            {MESSAGE_ARRAY: Array(dtype="uint8", shape=(len(data),), stype=STYPE_PROXY, data=data)})
    elif case == "previous-of-another-model":
        msg = proxy_message(data, fill_record=proxy_fill_record("previous"))
        other = {name: np.zeros((3, 3), np.float32) for name in SHAPES}
        mod = FstqMod(initial_model=lambda ctxt: other)
    elif case == "train-without-fill":
        fstq_request = proxy_strategy()._client_request(1, 11)
        del fstq_request["proxy-fill"]
        msg = train_message(model(0), fstq_request)
        msg.content["arrays"] = proxy_message(data, fill_record=None).content["arrays"]
        app = SteppingApp(11, 1)
    reply = mod(msg, new_context(), app)
    assert reply.has_error(), case
    assert reason in reply.error.reason, reply.error.reason


def test_the_server_drops_a_reply_its_node_was_sent_no_proxy_for_and_one_of_another_model():
    strategy = proxy_strategy()
    messages = list(strategy.configure_train(1, record(model(0)), ConfigRecord(), grid=None))
    replies, _ = run_clients(messages[:1], 1, {11: FstqMod()}, {11: new_context(11)})
    stranger = make_message(metadata(src=99, dst=0), replies[0].content)
    wrong = fstqcodec.encode({name: np.ones((2, 2), np.float32) for name in SHAPES})
    wrong_shape = make_message(metadata(src=22, dst=0), RecordDict({
        "arrays": ArrayRecord({MESSAGE_ARRAY: Array(dtype="uint8", shape=(len(wrong),), stype=STYPE_UPDATE, data=wrong)}),
        "metrics": MetricRecord({"num-examples": 2})}))
    _, metrics = strategy.aggregate_train(1, [replies[0], stranger, wrong_shape])
    reasons = {drop.node_id: drop.reason for drop in strategy.dropped_replies}
    assert "node 99 was sent no proxy in round 1" in reasons[99]
    assert "wrong shape" in reasons[22]
    assert metrics["fstq.replies-accepted"] == 1 and metrics["fstq.replies-dropped"] == 2


def test_the_strategy_refuses_proxies_it_cannot_keep_private_or_aggregate():
    with pytest.raises(TypeError, match="masked FedAvg"):
        FstqStrategy(FedAdam(), downlink=DownlinkProxies())
    with pytest.raises(TypeError, match="masked FedAvg"):
        FstqStrategy(FedAvg(), downlink=DownlinkProxies(), streaming=False)
    for bad in ({"server_mask": 1.0}, {"client_mask": -0.1}, {"fill": "mean"}, {"granularity": "block"}, {"seed": -1}):
        with pytest.raises(ValueError):
            DownlinkProxies(**bad)
    with pytest.raises(TypeError, match="budget"):
        DownlinkProxies(budget=1000)
    with pytest.raises(TypeError, match="server_exempt"):
        DownlinkProxies(server_exempt="head*")

    strategy = proxy_strategy()
    strategy.configure_train(1, record(model(0)), ConfigRecord(), grid=None)
    grown = {**model(0), "extra.weight": np.zeros((4, 4), np.float32)}
    with pytest.raises(ValueError, match="changed during the run"):
        strategy.configure_train(2, record(grown), ConfigRecord(), grid=None)

    class CopyingFedAvg(SharedRecordFedAvg):
        """Sends a copy of the model: the proxy wrapper cannot tell it is the global model."""

        def configure_train(self, server_round, arrays, config, grid):
            copy = ArrayRecord({name: Array(array.numpy().copy()) for name, array in arrays.items()})
            return super().configure_train(server_round, copy, config, grid)

    leaky = FstqStrategy(CopyingFedAvg(NODES), downlink=DownlinkProxies())
    with pytest.raises(ValueError, match="sent unmasked"):
        leaky.configure_train(1, record(model(0)), ConfigRecord(), grid=None)


def test_server_exempt_tensors_reach_the_clients_under_the_client_mask_only():
    exempt_name = next(iter(SHAPES))
    proxies = DownlinkProxies(server_mask=0.3, client_mask=0.1, server_exempt=(exempt_name,))
    strategy = FstqStrategy(SharedRecordFedAvg(NODES), fstqcodec.EncodeConfig(budget=fstqcodec.Budget(ratio=8)),
                            downlink=proxies)
    messages = list(strategy.configure_train(1, record(model(0)), ConfigRecord(), grid=None))
    server_visible = strategy._proxies.server.server_visible()
    assert np.all(server_visible[exempt_name])
    assert all(0.2 < (~seen).mean() < 0.4 for name, seen in server_visible.items() if name != exempt_name)
    for sent in messages:
        _, visible = fstqcodec.proxy.decode_proxy(the_array(sent.content["arrays"]).data)
        assert 0.8 < visible[exempt_name].mean() < 0.98  # the client mask alone
