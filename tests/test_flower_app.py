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


def test_run_config_refuses_methods_the_app_does_not_run():
    with pytest.raises(ValueError, match="fstq"):
        engine.run_config_for(SimConfig(methods=("fp32", "fstq")), "/tmp/out")


def _app_run_config() -> dict:
    pyproject = engine.app_dir() / "pyproject.toml"
    return tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]


def test_the_apps_defaults_are_the_loops():
    """One source of defaults: the app's run_config differs from SimConfig only where it says so."""
    app = engine.config_from_run_config(_app_run_config())
    assert app == SimConfig(methods=("fstq",), rounds=3, clients=4, threads=1)


def test_a_config_survives_the_trip_through_flwr_run_options():
    config = SimConfig(methods=("fstq",), clients=3, rounds=2, participation=0.5, eval_size=None,
                       budget_bpp=0.25, fisher_power=1.0, alpha=0.1, seed=7, lora_rank=4)
    pairs = dict(item.split("=", 1) for item in engine.run_config_for(config, "/tmp/out").split(" "))
    run_config = {**_app_run_config(), **{key: tomllib.loads(f"v = {value}")["v"] for key, value in pairs.items()}}
    assert engine.config_from_run_config(run_config) == config.replace(threads=1)
