"""Recompute the simulated clock of a finished `fstq simulate` run with modelled compute time.

`sim_time_s` in a run measures each client's training time on the machine that ran it, so a busy
machine inflates it. This rebuilds every round's time as

    max over participants of  local_steps * step_time + download + upload

from the run's own link draws (config.bandwidth_model) and byte counts, with each participant's
message taken as the round's uplink bytes / participants (exact for fixed-size encodings; fstq
messages sit at their budget, within a few bytes). New runs can pass `--step-time-s` instead.

    python benchmarks/simulate_retime.py runs/x/results.json --step-time-s 0.3 --out runs/x-retimed
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys

from fstqcodec.sim.report import format_table, summarize, validate_results, write_outputs


def retime(results: dict, step_time_s: float) -> dict:
    """A copy of ``results`` with ``sim_time_s`` rebuilt from modelled compute (see module doc)."""
    out = copy.deepcopy(results)
    config = out["config"]
    links = config["bandwidth_model"]
    up = [m * 1e6 for m in links["uplink_mbps"]]
    down = [m * 1e6 for m in links["downlink_mbps"]]
    latency = float(links["latency_s"])
    if config["clients_per_round"] != config["clients"]:
        raise ValueError("retime needs every client in every round (participation 1.0): participants are not recorded")
    compute = config["local_steps"] * step_time_s
    for data in out["methods"].values():
        clock = 0.0
        for entry in data["rounds"]:
            if entry["round"] > 0:
                n = config["clients_per_round"]
                message = entry["uplink_bytes"] / n
                downlink = entry["downlink_bytes"] / n
                clock += max(compute + 2 * latency + 8 * downlink / down[c] + 8 * message / up[c] for c in range(n))
            entry["sim_time_s"] = clock
    config["compute_time_retimed"] = f"local_steps x {step_time_s} s per step (benchmarks/simulate_retime.py)"
    return summarize(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--step-time-s", type=float, default=0.3)
    parser.add_argument("--out", help="write the retimed run here (results.json, CSVs, plots)")
    args = parser.parse_args()
    results = retime(json.loads(pathlib.Path(args.results).read_text()), args.step_time_s)
    validate_results(results)
    if args.out:
        write_outputs(results, args.out)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
