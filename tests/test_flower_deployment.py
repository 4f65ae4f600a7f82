"""The Flower App on a real deployment: a SuperLink and two SuperNodes as separate processes.

What ``integrations/flower-app/README.md`` ("Run it on a real deployment") tells a user to do, on
loopback ports: ``flower-superlink --insecure`` (Flower 1.42 serves every SuperLink API on its
one ``--port``), two ``flower-supernode`` processes (each with its own ``--port``), a private
``FLWR_HOME`` whose ``config.toml`` names the SuperLink with ``insecure = true``, then
``flwr run`` for 2 rounds. Every process the test starts, and every process below those, is
stopped by PID when the test ends, whether it passed or not.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "integrations" / "flower-app"
NUM_SUPERNODES = 2
ROUNDS = 2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(name) is None for name in ("flwr", "peft", "torch"))
        or shutil.which("flower-superlink") is None,
        reason="needs flwr (with flower-superlink on PATH) and the sim extra (torch, peft)",
    ),
]


def free_loopback_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 (held open together, so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float) -> None:
    """Wait until something accepts connections on ``port``; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{process.args[0]} exited with status {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


class Processes:
    """Processes started here and everything they start, stopped by PID.

    Each is started as the leader of its own process group; Flower's ``flower-superexec`` puts
    itself in a group of its own, so what runs below is found by parent PID, not by group.
    """

    def __init__(self, env: dict, log_dir: pathlib.Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.started: list[subprocess.Popen] = []
        self.stopped: set[int] = set()

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("w")
        process = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        log.close()  # the child holds its own descriptor
        self.started.append(process)
        return process

    def stop_all(self, grace_s: float = 15.0) -> None:
        """SIGTERM every process started here and below, wait, then SIGKILL what is left."""
        leaders = [process.pid for process in self.started]
        self.stopped = set(leaders) | descendants(leaders)
        for pid in self.stopped:
            _signal(pid, signal.SIGTERM)
        wait_until_gone(self.stopped, grace_s)
        for pid in self.still_running():
            _signal(pid, signal.SIGKILL)
        for process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)  # reap our own children
        wait_until_gone(self.stopped, 10.0)

    def still_running(self) -> list[int]:
        return sorted(pid for pid in self.stopped if running(pid))


def descendants(pids: list[int]) -> set[int]:
    """Every process below ``pids``, from the parent field of ``/proc/<pid>/stat``."""
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                # The command name, in parentheses, may hold spaces: the fields after it are fixed.
                children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
    found, pending = set(), list(pids)
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (which has exited; only its entry is left)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_until_gone(pids: set[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def flower_env(flwr_home: pathlib.Path) -> dict:
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        # The ServerApp and ClientApps run in subprocesses of the SuperLink and SuperNodes.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def test_flwr_run_on_a_superlink_and_two_supernodes(tmp_path):
    superlink_port, *supernode_ports = free_loopback_ports(1 + NUM_SUPERNODES)
    flwr_home, out_dir = tmp_path / "flwr-home", tmp_path / "out"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "deployment"\n\n'
        f'[superlink.deployment]\naddress = "127.0.0.1:{superlink_port}"\ninsecure = true\n'
    )
    bin_dir = pathlib.Path(sys.executable).parent
    processes = Processes(flower_env(flwr_home), tmp_path)
    started = time.monotonic()
    try:
        superlink = processes.start("superlink", [
            str(bin_dir / "flower-superlink"), "--insecure",
            "--host", "127.0.0.1", "--port", str(superlink_port),
        ])
        wait_for_port(superlink_port, superlink, timeout_s=60)
        for partition, port in enumerate(supernode_ports):
            processes.start(f"supernode-{partition}", [
                str(bin_dir / "flower-supernode"), "--insecure",
                "--superlink", f"127.0.0.1:{superlink_port}", "--port", str(port),
                "--node-config", f"partition-id={partition} num-partitions={NUM_SUPERNODES}",
            ])
        run_config = (f"num-server-rounds={ROUNDS} clients={NUM_SUPERNODES} local-steps=1 "
                      f'batch-size=4 eval-size=32 out-dir="{out_dir}"')
        with (tmp_path / "flwr-run.log").open("w") as log:
            completed = subprocess.run(
                [str(bin_dir / "flwr"), "run", str(APP_DIR), "deployment", "--stream",
                 "-c", run_config],
                env=processes.env, stdout=log, stderr=subprocess.STDOUT, timeout=240, check=False,
            )
        run_log = (tmp_path / "flwr-run.log").read_text()
        assert completed.returncode == 0, run_log[-3000:]
        assert (out_dir / "results.json").exists(), run_log[-3000:]
    finally:
        processes.stop_all()
    assert len(processes.stopped) > 1 + NUM_SUPERNODES  # the SuperExecs and apps below were found
    assert processes.still_running() == [], "a process the test started is still running"

    record = json.loads((out_dir / "results.json").read_text())
    rounds = record["methods"]["fstq"]["rounds"]
    assert [entry["round"] for entry in rounds] == list(range(ROUNDS + 1))
    for entry in rounds[1:]:
        assert entry["replies_accepted"] == NUM_SUPERNODES and entry["dropped_replies"] == []
        assert 0.0 <= entry["accuracy"] <= 1.0
        # Compressed uplink: 0.3 bit per parameter against the 32-bit model sent down to each
        # client, both as Flower counted them (count_bytes()) in the SuperLink's ServerApp.
        assert 0 < entry["uplink_bytes"] * 50 < entry["downlink_bytes"], entry
    assert "fstq.uplink-bytes" in run_log  # Flower's own streamed log shows the counts
    print(f"deployment run: {time.monotonic() - started:.0f} s")
