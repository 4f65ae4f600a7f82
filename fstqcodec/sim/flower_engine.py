"""Run the Flower App with ``flwr run`` on a private local SuperLink and collect its ``results.json``.

What ``fstq simulate --engine flower`` needs: the reference experiment, a :class:`SimConfig` as
the in-process loop takes it, run on Flower's simulation engine offline by the Flower App of a
source checkout (``integrations/flower-app``), its record returned, and nothing left running
afterwards. ``flwr run`` leaves a detached ``flower-superlink`` (and a ``flower-superexec`` under
it) behind; this module stops the one it started, by PID, found by the private ``FLWR_HOME`` its
command line names.

It is also where a :class:`SimConfig` becomes the app's ``run_config`` and back
(:func:`run_config_for`, :func:`config_from_run_config`), so the app takes its defaults from the
same place as the loop.

Importing this module needs only the standard library and :mod:`fstqcodec.sim.config`, so a CLI
can offer the engine without importing Flower or torch first.
"""

from __future__ import annotations

import dataclasses
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

from fstqcodec.sim.config import SimConfig

__all__ = ["app_dir", "run_config_for", "config_from_run_config", "run_with_flwr"]

# SimConfig field -> key of the app's [tool.flwr.app.config].
RUN_CONFIG_KEYS = {
    "rounds": "num-server-rounds",
    "clients": "clients",
    "participation": "fraction-train",
    "budget_bpp": "budget-bpp",
    "block_size": "block-size",
    "fisher_power": "fisher-power",
    "deadline_s": "deadline-s",
    "median_uplink_mbps": "median-uplink-mbps",
    "bandwidth_sigma": "bandwidth-sigma",
    "latency_s": "latency-s",
    "min_budget_bytes": "min-budget-bytes",
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
    "max_new_tokens": "max-new-tokens",
    "target_accuracy": "target",
    "lora_rank": "lora-rank",
    "lora_alpha": "lora-alpha",
    "threads": "threads",
    "server_mask": "server-mask",
    "server_mask_exempt": "server-mask-exempt",
    "client_mask": "client-mask",
    "downlink_bpp": "downlink-bpp",
    "proxy_fill": "proxy-fill",
}
# TOML has no null: eval_size's None (the whole held-out set), deadline_s's (one budget for all),
# max_new_tokens' (the QA task's own answer length) and target_accuracy's (the task's default)
# travel as 0; other None values are not passed, so the app's own setting applies (threads: one
# per ClientApp, one Ray CPU each).
_NONE_AS_ZERO = {"eval_size", "deadline_s", "max_new_tokens", "target_accuracy"}


def app_dir() -> pathlib.Path:
    """``integrations/flower-app`` of the source checkout this package runs from.

    Raises
    ------
    RuntimeError
        If this package does not run from a source checkout holding the app.
    """
    candidate = pathlib.Path(__file__).resolve().parents[2] / "integrations" / "flower-app"
    if not (candidate / "pyproject.toml").is_file():
        raise RuntimeError("--engine flower runs integrations/flower-app from a source checkout of fstqcodec; none found")
    return candidate


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string for these values


def run_config_for(config: SimConfig, out_dir: str | os.PathLike) -> str:
    """The ``flwr run -c`` argument that runs ``config`` and writes to ``out_dir``.

    Raises
    ------
    ValueError
        If ``config.methods`` names anything but ``fstq`` (the app runs that method only), the
        config asks for a server optimizer other than FedAvg, or token selection is on
        (``token_keep``: the app trains full sequences).
    """
    if tuple(config.methods) != ("fstq",):
        raise ValueError(f"the Flower app runs the 'fstq' method only, not {config.methods}")
    if config.server_lr != 1.0 or config.server_momentum != 0.0:
        raise ValueError("the Flower app aggregates with FedAvg; --server-lr and --server-momentum run "
                         "with the in-process engine only")
    if config.token_keep is not None:
        raise ValueError("the Flower app trains full sequences: token selection (token_keep) runs in-process only")
    pairs = {}
    for field, key in RUN_CONFIG_KEYS.items():
        value = getattr(config, field)
        if value is None and field in _NONE_AS_ZERO:
            value = 0
        if value is not None:
            pairs[key] = value
    pairs["out-dir"] = str(pathlib.Path(out_dir).resolve())
    return " ".join(f"{key}={_toml_value(value)}" for key, value in pairs.items())


def config_from_run_config(run_config: Mapping[str, Any], **overrides) -> SimConfig:
    """The :class:`SimConfig` a Flower ``run_config`` describes (fields it lacks keep their defaults).

    Raises
    ------
    ValueError
        On an invalid setting.
    """
    fields = {spec.name: spec for spec in dataclasses.fields(SimConfig)}
    values: dict[str, Any] = {"methods": ("fstq",)}
    for field, key in RUN_CONFIG_KEYS.items():
        if key not in run_config:
            continue
        spec = fields[field]
        kind = spec.metadata.get("type") or type(spec.default)
        value = kind(run_config[key])
        values[field] = None if field in _NONE_AS_ZERO and value == 0 else value
    config = SimConfig(**{**values, **overrides})
    config.validate()
    return config


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


def _private_flwr_env(home: pathlib.Path) -> dict:
    """The environment of ``flwr run`` with its own ``FLWR_HOME`` (a local SuperLink), offline."""
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Otherwise Flower runs `uv sync` on the app's dependencies in a fresh environment.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
    }


def run_with_flwr(
    config: SimConfig,
    out_dir: str | os.PathLike,
    *,
    flwr_home: str | os.PathLike | None = None,
    timeout_s: float | None = None,
    stream_to: Any = None,
) -> dict:
    """Run the app with ``flwr run`` on a fresh local SuperLink; return its ``results.json``.

    Parameters
    ----------
    config : SimConfig
        The experiment; ``clients`` also sets the number of simulated SuperNodes. Settings the app
        does not take (faults, links, deadlines) are not passed on.
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
        If ``flwr run`` fails, the app wrote no results, or there is no source checkout.
    ValueError
        If ``config`` asks for a method other than ``fstq``.
    subprocess.TimeoutExpired
        If the run exceeds ``timeout_s``.
    """
    out_dir = pathlib.Path(out_dir).resolve()
    run_config = run_config_for(config, out_dir)
    app = app_dir()
    temporary = flwr_home is None
    home = pathlib.Path(tempfile.mkdtemp(prefix="fstq-flwr-home-") if temporary else flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    env = _private_flwr_env(home)
    flwr = shutil.which("flwr") or str(pathlib.Path(sys.executable).with_name("flwr"))
    command = [
        flwr, "run", str(app), "--stream",
        "--federation-config", f"num-supernodes={config.clients}",
        "-c", run_config,
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
