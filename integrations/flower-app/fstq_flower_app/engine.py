"""Run this app with ``flwr run`` on a private local SuperLink and collect its ``results.json``.

What ``fstq simulate --engine flower`` needs: the reference experiment, configured like the
in-process loop (:class:`fstqcodec.sim.loop.SimConfig` field names), run on Flower's simulation
engine offline, its record returned, and nothing left running afterwards. ``flwr run`` leaves a
detached ``flower-superlink`` (and a ``flower-superexec`` under it) behind; this module stops the
one it started, by PID, found by the private ``FLWR_HOME`` its command line names.

Importing this module needs only the standard library (and ``psutil`` when installed), so a CLI
can offer the engine without importing Flower or torch first.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["APP_DIR", "run_config_for", "run_with_flwr"]

#: The Flower App directory (the one holding ``pyproject.toml`` with ``[tool.flwr.app]``).
APP_DIR = pathlib.Path(__file__).resolve().parents[1]

# SimConfig field -> key of the app's [tool.flwr.app.config].
_RUN_CONFIG_KEYS = {
    "rounds": "num-server-rounds",
    "clients": "clients",
    "fraction": "fraction-train",
    "budget_bpp": "budget-bpp",
    "block_size": "block-size",
    "fisher_power": "fisher-power",
    "task": "task",
    "model": "model",
    "alpha": "alpha",
    "seed": "seed",
    "local_steps": "local-steps",
    "batch_size": "batch-size",
    "lr": "lr",
    "max_length": "max-length",
    "test_fraction": "test-fraction",
    "eval_size": "eval-size",
    "eval_batch_size": "eval-batch-size",
    "lora_rank": "lora-rank",
    "lora_alpha": "lora-alpha",
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string for these values


def run_config_for(settings: Mapping[str, Any], out_dir: str | os.PathLike) -> str:
    """The ``flwr run -c`` argument for ``settings`` (SimConfig field names; unknown ones ignored).

    Raises
    ------
    ValueError
        If ``settings["methods"]`` names anything but ``fstq``: the app runs that method only.
    """
    methods = tuple(settings.get("methods", ("fstq",)))
    if methods != ("fstq",):
        raise ValueError(f"the Flower app runs the 'fstq' method only, not {methods}")
    pairs = {key: settings[field] for field, key in _RUN_CONFIG_KEYS.items() if field in settings}
    pairs["out-dir"] = str(pathlib.Path(out_dir).resolve())
    return " ".join(f"{key}={_toml_value(value)}" for key, value in pairs.items())


def _processes_naming(marker: str) -> list[int]:
    """PIDs of flower-superlink processes whose command line contains ``marker``."""
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # the process ended, or is not ours to read
        if "flower-superlink" in cmdline and marker in cmdline:
            pids.append(int(entry.name))
    return pids


def _descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (from ``/proc/<pid>/stat``'s parent field)."""
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name, in parentheses, may contain spaces: the fields after it are fixed.
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"  # a zombie has exited; only its entry remains


def _stop_superlink(flwr_home: pathlib.Path, timeout_s: float = 20.0) -> None:
    """Stop the local SuperLink ``flwr run`` started for ``flwr_home``, and everything under it.

    Its children (``flower-superexec``, ``flwr-simulation``, Ray) exit when it does, a moment
    later; they are signalled too and waited for, so that nothing is running when this returns.
    """
    targets = []
    for pid in _processes_naming(str(flwr_home / "local-superlink")):
        targets += [*_descendants(pid), pid]
    for pid in targets:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in targets) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in targets:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_with_flwr(
    settings: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    flwr_home: str | os.PathLike | None = None,
    timeout_s: float | None = None,
    stream_to: Any = None,
) -> dict:
    """Run the app with ``flwr run`` on a fresh local SuperLink; return its ``results.json``.

    Parameters
    ----------
    settings : Mapping
        The experiment in :class:`fstqcodec.sim.loop.SimConfig` field names (``clients``,
        ``rounds``, ``budget_bpp``, ``seed``, ...); ``clients`` also sets the number of simulated
        SuperNodes. Fields the app does not take are ignored.
    out_dir : path
        Where the app writes ``results.json``, ``fstq.csv`` and ``summary.md``.
    flwr_home : path, optional
        Flower's home for this run; a temporary directory (removed afterwards) by default.
    timeout_s : float, optional
        Give up (and stop everything) after this many seconds.
    stream_to : file, optional
        An open file for Flower's streamed logs (default: this process's standard output).

    Returns
    -------
    dict
        The record the app wrote (the layout of ``fstq simulate``).

    Raises
    ------
    RuntimeError
        If ``flwr run`` fails or the app wrote no results.
    subprocess.TimeoutExpired
        If the run exceeds ``timeout_s``.
    """
    out_dir = pathlib.Path(out_dir).resolve()
    temporary = flwr_home is None
    home = pathlib.Path(tempfile.mkdtemp(prefix="fstq-flwr-home-") if temporary else flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Otherwise Flower runs `uv sync` on the app's dependencies in a fresh environment.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
    }
    flwr = shutil.which("flwr") or str(pathlib.Path(sys.executable).with_name("flwr"))
    command = [
        flwr, "run", str(APP_DIR), "--stream",
        "--federation-config", f"num-supernodes={int(settings.get('clients', 4))}",
        "-c", run_config_for(settings, out_dir),
    ]
    try:
        completed = subprocess.run(
            command, env=env, stdout=stream_to, stderr=subprocess.STDOUT, timeout=timeout_s,
            check=False,
        )
    finally:
        _stop_superlink(home)
        if temporary:
            shutil.rmtree(home, ignore_errors=True)
    if completed.returncode != 0:
        raise RuntimeError(f"flwr run exited with status {completed.returncode}: {' '.join(command)}")
    results = out_dir / "results.json"
    if not results.exists():
        raise RuntimeError(f"flwr run finished but the app wrote no {results}")
    return json.loads(results.read_text())
