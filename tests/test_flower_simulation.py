"""End-to-end: FstqMod and FstqStrategy in a real Flower simulation (``run_simulation``, Ray).

Each test starts Ray once (about 25 s on two cores), so there are only three: a federation of
honest clients, checked against Flower's own byte counts and against FedAvg computed here from the
decoded updates; a federation where some clients send broken replies, which the server drops
(with the reason) while finishing every round with the others; and a federation on downlink
proxies (FedQSN), checked against masked FedAvg computed here from the bytes on the wire.

The ClientApp below runs inside Ray workers, which import this module by name (Flower puts the
driver's ``sys.path`` on the workers' ``PYTHONPATH``), so module-level code must stay side-effect
free apart from the environment defaults.
"""

from __future__ import annotations

import os

# Before Flower is imported: no telemetry, no Ray usage stats, no runtime dependency installs.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import time

import numpy as np
import pytest

flwr = pytest.importorskip("flwr", minversion="1.22")
pytest.importorskip("ray")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

import fstqcodec
from fstqcodec.flower import STYPE_MODEL, STYPE_PROXY, STYPE_UPDATE, DownlinkProxies, FstqMod, FstqStrategy
from fstqcodec.sim.loop import corrupt_in_transit

# Each test starts Ray: runs by default, deselect with -m "not slow".
pytestmark = pytest.mark.slow

# A LoRA-shaped model: two factors of one adapted layer, 16 384 float32 parameters (64 KiB).
MODEL_SHAPES = {"layer0.lora_A.weight": (16, 512), "layer0.lora_B.weight": (512, 16)}
UPLINK_RATIO = 8.0
NUM_ROUNDS = 2


def initial_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    return {
        name: (0.02 * rng.standard_normal(shape)).astype(np.float32)
        for name, shape in MODEL_SHAPES.items()
    }


def local_training(received: dict[str, np.ndarray], partition_id: int, server_round: int):
    """A deterministic stand-in for training: a client- and round-specific step."""
    rng = np.random.default_rng(1000 * partition_id + server_round)
    return {
        name: value + (0.01 * rng.standard_normal(value.shape)).astype(np.float32)
        for name, value in received.items()
    }


def num_examples(partition_id: int) -> int:
    return 10 * (partition_id + 1)  # unequal weights, so FedAvg's weighting is exercised


# ------------------------------------------------------------------------------------------
# ClientApp: the app trains on plain arrays; FstqMod does all the compression.
# ------------------------------------------------------------------------------------------

client_app = ClientApp(mods=[FstqMod()])


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    received = {name: array.numpy() for name, array in msg.content["arrays"].items()}
    trained = local_training(received, partition_id, int(msg.content["config"]["server-round"]))
    content = RecordDict(
        {
            "arrays": ArrayRecord({name: Array(value) for name, value in trained.items()}),
            "metrics": MetricRecord(
                {"num-examples": num_examples(partition_id), "partition-id": partition_id}
            ),
        }
    )
    if partition_id == 1:
        # This client has a Fisher estimate: the mod must use it and keep it on the client.
        content["fisher"] = ArrayRecord(
            {name: Array(np.square(value - received[name])) for name, value in trained.items()}
        )
    return Message(content, reply_to=msg)


# A saboteur outside FstqMod corrupts what the mod produced, as a broken or hostile client would.
FAULTS = {2: "garbage", 3: "truncated", 4: "other-model", 5: "nan", 6: "bit-flips"}


def saboteur_mod(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    fault = FAULTS.get(int(context.node_config["partition-id"]))
    if fault is None or reply.has_error() or not msg.metadata.message_type.startswith("train"):
        return reply
    data = reply.content["arrays"]["fstq"].data
    if fault == "garbage":
        data = np.random.default_rng(7).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    elif fault == "truncated":
        data = data[: len(data) // 2]
    elif fault == "bit-flips":
        # Noise on the link: the same length, a few bits changed (the reference loop's model).
        data = corrupt_in_transit(data, np.random.default_rng(int(msg.metadata.group_id or 0) + 11))
    elif fault == "other-model":
        other = {"classifier.weight": np.ones((4, 8), np.float32)}
        data = fstqcodec.encode(other)
    if fault == "nan":
        # A client without the mod whose training diverged: plain arrays holding NaNs.
        poisoned = {name: np.full(shape, np.nan, np.float32) for name, shape in MODEL_SHAPES.items()}
        arrays = ArrayRecord({name: Array(value) for name, value in poisoned.items()})
    else:
        arrays = ArrayRecord(
            {"fstq": Array(dtype="uint8", shape=(len(data),), stype=STYPE_UPDATE, data=data)}
        )
    reply.content["arrays"] = arrays
    return reply


faulty_client_app = ClientApp(mods=[saboteur_mod, FstqMod()])
faulty_client_app.train()(train)

# With "previous"-filled proxies a client starts from the shared initial model where it is not sent.
proxy_client_app = ClientApp(mods=[FstqMod(initial_model=lambda context: initial_model())])
proxy_client_app.train()(train)


# ------------------------------------------------------------------------------------------
# ServerApp side: FlowerTune-style subclass that sees exactly what travels.
# ------------------------------------------------------------------------------------------


class WireRecordingStrategy(FstqStrategy):
    """Records messages as they travel, the way FlowerTune's CommunicationTracker is placed:
    after ``super().configure_train`` and before ``super().aggregate_train``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: dict[int, list[ArrayRecord]] = {}
        self.sent_to: dict[int, list[int]] = {}
        self.received: dict[int, list[dict]] = {}
        self.aggregated: dict[int, dict[str, np.ndarray]] = {}

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sent[server_round] = [message.content["arrays"] for message in messages]
        self.sent_to[server_round] = [message.metadata.dst_node_id for message in messages]
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.received[server_round] = [
            {
                "node_id": reply.metadata.src_node_id,
                "partition_id": int(reply.content["metrics"]["partition-id"]),
                "weight": int(reply.content["metrics"]["num-examples"]),
                "wire_bytes": reply.content["arrays"].count_bytes(),
                "stype": next(iter(reply.content["arrays"].values())).stype,
                "data": next(iter(reply.content["arrays"].values())).data,
                "record_names": sorted(reply.content.keys()),
            }
            for reply in replies
            if reply.has_content()
        ]
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.aggregated[server_round] = {name: a.numpy() for name, a in arrays.items()}
        return arrays, metrics


def run_federation(strategy, client, num_supernodes: int):
    results = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        initial = ArrayRecord({name: Array(value) for name, value in initial_model().items()})
        results["result"] = strategy.start(
            grid=grid, initial_arrays=initial, num_rounds=NUM_ROUNDS, train_config=ConfigRecord()
        )

    run_simulation(
        server_app=server_app,
        client_app=client,
        num_supernodes=num_supernodes,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    assert "result" in results, "the ServerApp did not finish"
    return results["result"]


@pytest.fixture(autouse=True)
def private_flower_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    # Children that existed before (e.g. multiprocessing's resource tracker, started by an earlier
    # test's worker pool and alive as long as this process) are not the simulation's.
    before = set(_ray_children())
    yield
    import ray

    assert not ray.is_initialized(), "run_simulation left Ray running"
    # Ray's workers exit asynchronously after shutdown: give them a bounded moment, then insist.
    deadline = time.monotonic() + 15
    leftovers = [child for child in _ray_children() if child not in before]
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.5)
        leftovers = [child for child in _ray_children() if child not in before]
    assert not leftovers, f"stray Ray processes 15 s after the simulation: {leftovers}"


def _ray_children() -> list[str]:
    """Live child processes of this test process (Ray's raylet, GCS, workers would be some)."""
    try:
        import psutil  # installed with peft; without it only ray.is_initialized() is checked
    except ImportError:
        return []
    names = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                names.append(f"{child.pid}:{child.name()}")
        except psutil.NoSuchProcess:
            pass
    return names


def fedavg_of_decoded(reference: dict[str, np.ndarray], replies: list[dict]):
    """FedAvg computed here, independently of Flower, from the raw messages on the wire."""
    total = sum(reply["weight"] for reply in replies)
    average = {name: np.zeros(value.shape, np.float64) for name, value in reference.items()}
    for reply in replies:
        update = fstqcodec.decode(reply["data"])
        for name in average:
            average[name] += reply["weight"] * (reference[name] + update[name].astype(np.float64))
    return {name: value / total for name, value in average.items()}


def test_compressed_federation_matches_budget_and_fedavg():
    config = fstqcodec.EncodeConfig(budget=fstqcodec.Budget(ratio=UPLINK_RATIO),
                                    fisher_power=fstqcodec.FEDERATED_FISHER_POWER)
    strategy = WireRecordingStrategy(
        FedAvg(min_train_nodes=3, min_available_nodes=3, fraction_evaluate=0.0),
        config,
        downlink=fstqcodec.Budget(bits_per_param=8),
    )
    result = run_federation(strategy, client_app, num_supernodes=3)

    # What the same model costs in plain NumPy arrays, counted by Flower itself.
    plain_bytes = ArrayRecord({n: Array(v) for n, v in initial_model().items()}).count_bytes()
    for server_round in range(1, NUM_ROUNDS + 1):
        replies = strategy.received[server_round]
        assert len(replies) == 3
        for reply in replies:
            assert reply["stype"] == STYPE_UPDATE
            assert "fisher" not in reply["record_names"]  # Fisher never leaves the client
            shrink = plain_bytes / reply["wire_bytes"]
            # The budget caps every byte of the message; it is close to what Flower counts.
            assert UPLINK_RATIO * 0.98 <= shrink <= UPLINK_RATIO * 1.15, shrink

        # Every client got the same compressed model, and it is smaller than the plain one.
        sent = strategy.sent[server_round]
        assert {next(iter(record.values())).stype for record in sent} == {STYPE_MODEL}
        assert all(record.count_bytes() < plain_bytes / 3 for record in sent)

        # The server rebuilds from what the clients decoded, and averages exactly that.
        reference = fstqcodec.decode(next(iter(sent[0].values())).data)
        expected = fedavg_of_decoded(reference, replies)
        for name, value in expected.items():
            np.testing.assert_allclose(strategy.aggregated[server_round][name], value, atol=1e-6)

        metrics = result.train_metrics_clientapp[server_round]
        assert metrics["fstq.uplink-bytes"] == sum(r["wire_bytes"] for r in replies)
        assert metrics["fstq.uplink-bytes-decoded"] == 3 * plain_bytes
        assert metrics["fstq.downlink-bytes"] == sum(record.count_bytes() for record in sent)
        assert metrics["fstq.replies-dropped"] == 0
    assert strategy.dropped_replies == []


def test_server_drops_broken_replies_and_finishes_the_round():
    strategy = WireRecordingStrategy(  # the keyword form of earlier versions still works
        FedAvg(min_train_nodes=7, min_available_nodes=7, fraction_evaluate=0.0),
        budget=fstqcodec.Budget(ratio=UPLINK_RATIO),
    )
    result = run_federation(strategy, faulty_client_app, num_supernodes=7)

    expected_reason = {
        "garbage": "undecodable update",
        "truncated": "undecodable update",
        "other-model": "wrong tensors",
        "nan": "non-finite",
        "bit-flips": "undecodable update",
    }
    for server_round in range(1, NUM_ROUNDS + 1):
        replies = strategy.received[server_round]
        partition_of = {reply["node_id"]: reply["partition_id"] for reply in replies}
        dropped = [d for d in strategy.dropped_replies if d.server_round == server_round]
        assert sorted(partition_of[d.node_id] for d in dropped) == sorted(FAULTS)
        for drop in dropped:
            assert expected_reason[FAULTS[partition_of[drop.node_id]]] in drop.reason, drop

        honest = [reply for reply in replies if reply["partition_id"] not in FAULTS]
        assert len(honest) == 2
        reference = (
            initial_model() if server_round == 1 else strategy.aggregated[server_round - 1]
        )
        expected = fedavg_of_decoded(reference, honest)
        for name, value in expected.items():
            np.testing.assert_allclose(strategy.aggregated[server_round][name], value, atol=1e-6)

        metrics = result.train_metrics_clientapp[server_round]
        assert metrics["fstq.replies-dropped"] == len(FAULTS)
        assert metrics["fstq.replies-accepted"] == 2


def test_a_federation_on_downlink_proxies_never_sends_a_server_masked_entry():
    proxies = DownlinkProxies(server_mask=0.3, client_mask=0.1, fill="previous",
                              budget=fstqcodec.Budget(bits_per_param=4))
    config = fstqcodec.EncodeConfig(budget=fstqcodec.Budget(ratio=UPLINK_RATIO),
                                    fisher_power=fstqcodec.FEDERATED_FISHER_POWER)
    strategy = WireRecordingStrategy(
        FedAvg(min_train_nodes=3, min_available_nodes=3, fraction_evaluate=0.0), config, downlink=proxies
    )
    result = run_federation(strategy, proxy_client_app, num_supernodes=3)

    server = strategy._proxies.server
    hidden = {name: ~seen for name, seen in server.server_visible().items()}
    plain_bytes = ArrayRecord({n: Array(v) for n, v in initial_model().items()}).count_bytes()
    reference = initial_model()  # the true global model of the round
    for server_round in range(1, NUM_ROUNDS + 1):
        sent = strategy.sent[server_round]
        assert {next(iter(record.values())).stype for record in sent} == {STYPE_PROXY}
        assert len({next(iter(record.values())).data for record in sent}) == 3  # a proxy per client
        for node, record in zip(strategy.sent_to[server_round], sent):
            data = next(iter(record.values())).data
            assert 8 * record.count_bytes() <= plain_bytes  # at least 8x below fp32
            # The bytes depend on no server-masked value: other values there, the same bytes.
            altered = {n: np.where(hidden[n], 7.0, v).astype(np.float32) for n, v in reference.items()}
            assert server.downlink(altered, node, server_round) == data
            _, visible = fstqcodec.proxy.decode_proxy(data)
            assert not any(np.any(visible[n] & hidden[n]) for n in hidden)

        # Masked FedAvg, computed here from the bytes on the wire and the masks' seeds.
        total = {n: np.zeros(v.shape, np.float64) for n, v in reference.items()}
        weights = {n: np.zeros(v.shape, np.float64) for n, v in reference.items()}
        replies = strategy.received[server_round]
        assert len(replies) == 3 and all(reply["stype"] == STYPE_UPDATE for reply in replies)
        for reply in replies:
            update = fstqcodec.decode(reply["data"])
            for name, seen in server.visible(reply["node_id"], server_round).items():
                total[name] += np.where(seen, reply["weight"] * update[name], 0.0)
                weights[name] += reply["weight"] * seen
        for name, value in reference.items():
            expected = value + np.where(weights[name] > 0, total[name] / np.maximum(weights[name], 1e-300), 0.0)
            np.testing.assert_allclose(strategy.aggregated[server_round][name], expected, atol=1e-6)
            np.testing.assert_array_equal(strategy.aggregated[server_round][name][hidden[name]],
                                          initial_model()[name][hidden[name]])
        reference = strategy.aggregated[server_round]

        metrics = result.train_metrics_clientapp[server_round]
        assert metrics["fstq.downlink-bytes"] == sum(record.count_bytes() for record in sent)
        assert metrics["fstq.replies-accepted"] == 3 and metrics["fstq.replies-dropped"] == 0
        assert 0.0 < metrics["fstq.proxy-cosine-mean"] < 1.0
        assert 0.5 < metrics["fstq.proxy-seen-fraction"] <= 0.75
