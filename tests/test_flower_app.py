"""The Flower App in ``integrations/flower-app`` runs with ``flwr run`` offline, as its README says.

Slow (it loads the real model in every Ray actor, about two minutes on two cores), so it runs only
when ``FSTQ_SLOW_TESTS=1``. It follows the README: a private ``FLWR_HOME`` with a local SuperLink,
no telemetry, no runtime dependency installation; and it stops the SuperLink that ``flwr run``
leaves behind, by PID, checking that nothing of it survives.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

if os.environ.get("FSTQ_SLOW_TESTS") != "1":
    pytest.skip("slow: set FSTQ_SLOW_TESTS=1 to run flwr run end to end", allow_module_level=True)

pytest.importorskip("flwr", minversion="1.22")
pytest.importorskip("ray")
pytest.importorskip("peft")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow

APP_DIR = pathlib.Path(__file__).resolve().parents[1] / "integrations" / "flower-app"
NUM_SUPERNODES = 2


def _superlink_processes(flwr_home: pathlib.Path) -> list[psutil.Process]:
    """The local SuperLink of this FLWR_HOME (its command line names the home's database)."""
    marker = str(flwr_home / "local-superlink")
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "flower-superlink" in cmdline and marker in cmdline:
            found.append(process)
    return found


def _stop_superlink(flwr_home: pathlib.Path) -> None:
    for process in _superlink_processes(flwr_home):
        children = process.children(recursive=True)
        process.terminate()
        gone, alive = psutil.wait_procs([process, *children], timeout=20)
        for leftover in alive:
            leftover.kill()


def test_flwr_run_trains_with_a_compressed_uplink_and_leaves_nothing_running(tmp_path):
    flwr = shutil.which("flwr") or str(pathlib.Path(sys.executable).with_name("flwr"))
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )
    out_dir = tmp_path / "out"
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
    }
    run_config = (
        f'num-server-rounds=2 clients={NUM_SUPERNODES} local-steps=1 batch-size=4 '
        f'eval-size=32 out-dir="{out_dir}"'
    )
    started = time.perf_counter()
    try:
        completed = subprocess.run(
            [flwr, "run", str(APP_DIR), "--stream", "-c", run_config,
             "--federation-config", f"num-supernodes={NUM_SUPERNODES}"],
            env=env, capture_output=True, text=True, timeout=540,
        )
    finally:
        _stop_superlink(flwr_home)
    elapsed = time.perf_counter() - started
    log = completed.stdout + completed.stderr
    assert completed.returncode == 0, log[-4000:]
    assert not _superlink_processes(flwr_home), "the local SuperLink survived"

    record = json.loads((out_dir / "results.json").read_text())
    from fstqcodec.sim.report import validate_results

    validate_results(record)  # the layout `fstq simulate` writes, so the same tools read both
    assert (out_dir / "fstq.csv").exists() and (out_dir / "summary.md").exists()
    rounds = record["methods"]["fstq"]["rounds"]
    assert [entry["round"] for entry in rounds] == [0, 1, 2]
    for entry in rounds[1:]:
        assert 0.0 <= entry["accuracy"] <= 1.0
        assert entry["replies_accepted"] == NUM_SUPERNODES and entry["dropped_replies"] == []
        # 0.5 bit per parameter against 32-bit floats: Flower counted > 30x fewer uplink bytes.
        assert entry["uplink_bytes"] * 30 < entry["downlink_bytes"], entry
    print(f"flwr run finished in {elapsed:.0f} s")
