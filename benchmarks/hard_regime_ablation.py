"""Issue 11's ablation under Dirichlet 0.1: what each change buys, alone and together, over 3 seeds.

Reads the per-seed records (``<run dir>/seed-<n>/results.json``) that `fstq simulate --seeds` wrote
and prints one Markdown table per setting: for each variant (error feedback or the unbiased mode,
0.3 or 0.6 bit/param, FedAvg or FedAvgM 0.5, Fisher or not) the final accuracy and the mean of the
last 5 rounds (mean +- std over the seeds), the uplink to one common target, and that uplink against
fp32's under the same server optimizer (ratio of the means, lowest seed's own ratio). One common
target per table, so rows compare: 95% of fp32-with-FedAvg's mean final accuracy, floored to 0.01.

    python benchmarks/hard_regime_ablation.py            # from benchmarks/simulate_results
    python benchmarks/hard_regime_ablation.py --target 0.85

A variant whose records are missing is listed as "not run"; a variant with fewer than three seeds
says how many it has.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics

from fstqcodec.sim.report import LAST_ROUNDS, first_reaching, last_rounds_accuracy

RECORDS = pathlib.Path(__file__).resolve().parent / "simulate_results"
PARTIAL = "seeds-bbc-alpha0.1-partial"
MOMENTUM = "seeds-bbc-alpha0.1-partial-momentum"
RATE = "seeds-bbc-alpha0.1-partial-momentum-bpp0.6"
FULL, FULL_MOMENTUM = "seeds-bbc-alpha0.1", "seeds-bbc-alpha0.1-momentum"

# (label, server optimizer, record directory with seed-<n>/results.json, method)
SETTINGS = {
    "Dirichlet 0.1, 30 clients, 30% sampled per round, 40 rounds": [
        ("fp32", "FedAvg", f"{PARTIAL}/runs-fp32", "fp32"),
        ("fp32", "FedAvgM 0.5", f"{MOMENTUM}/runs-fp32", "fp32"),
        ("error feedback, 0.3 bit/param", "FedAvg", f"{PARTIAL}/runs-fstq", "fstq"),
        ("unbiased, 0.3 bit/param", "FedAvg", f"{PARTIAL}/runs-unbiased", "fstq-unbiased"),
        ("error feedback, 0.3 bit/param", "FedAvgM 0.5", f"{MOMENTUM}/runs-fstq", "fstq"),
        ("unbiased, 0.3 bit/param", "FedAvgM 0.5", f"{MOMENTUM}/runs-unbiased", "fstq-unbiased"),
        ("error feedback, 0.6 bit/param", "FedAvgM 0.5", f"{RATE}/runs-fstq", "fstq"),
        ("error feedback, no Fisher, 0.6 bit/param", "FedAvgM 0.5", f"{RATE}/runs-baselines", "fstq-nofisher"),
        ("**unbiased, 0.6 bit/param**", "FedAvgM 0.5", f"{RATE}/runs-unbiased", "fstq-unbiased"),
        ("top-k with error feedback, 0.6 bit/param", "FedAvgM 0.5", f"{RATE}/runs-baselines", "topk"),
        ("nf4", "FedAvgM 0.5", f"{RATE}/runs-fixed", "nf4"),
        ("qsgd4", "FedAvgM 0.5", f"{RATE}/runs-fixed", "qsgd4"),
    ],
    "Dirichlet 0.1, 10 clients, every client every round, 40 rounds": [
        ("fp32", "FedAvg", f"{FULL}/runs-fp32", "fp32"),
        ("fp32", "FedAvgM 0.5", f"{FULL_MOMENTUM}/runs-fp32", "fp32"),
        ("error feedback, 0.3 bit/param", "FedAvg", f"{FULL}/runs-fstq", "fstq"),
        ("unbiased, 0.3 bit/param", "FedAvg", f"{FULL}/runs-unbiased", "fstq-unbiased"),
        ("error feedback, 0.3 bit/param", "FedAvgM 0.5", f"{FULL_MOMENTUM}/runs-fstq", "fstq"),
    ],
}


def _seed_records(directory: pathlib.Path, method: str) -> list[list[dict]]:
    """Each seed's per-round records of ``method`` (ordered by seed); empty if none were kept."""
    runs = []
    for path in sorted(directory.glob("seed-*/results.json"), key=lambda p: int(p.parent.name[5:])):
        methods = json.loads(path.read_text())["methods"]
        if method in methods:
            runs.append(methods[method]["rounds"])
    return runs


def _uplink_to(rounds: list[dict], target: float) -> float | None:
    hit = first_reaching(rounds, target)
    return hit["cumulative_uplink_bytes"] if hit else None


def _human_bytes(count: float) -> str:
    return f"{count / 1e6:.2f} MB" if count >= 1e6 else f"{count / 1e3:.1f} kB"


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {spread:.3f}"


def _row(label: str, server: str, runs: list[list[dict]], fp32: list[list[dict]] | None, target: float) -> str:
    if not runs:
        return f"| {label} | {server} | not run | | | | |"
    finals = [rounds[-1]["accuracy"] for rounds in runs]
    last = [last_rounds_accuracy(rounds) for rounds in runs]
    uplinks = [_uplink_to(rounds, target) for rounds in runs]
    reached = [u for u in uplinks if u is not None]
    to_target = _human_bytes(statistics.fmean(reached)) if reached else "not reached"
    if reached and len(reached) < len(runs):
        to_target += f" ({len(reached)}/{len(runs)} seeds)"
    ratio = "-"
    fp32_uplinks = [_uplink_to(rounds, target) for rounds in fp32] if fp32 else []
    if len(reached) == len(runs) and fp32_uplinks and None not in fp32_uplinks and len(fp32_uplinks) == len(runs):
        per_seed = [f / u for f, u in zip(fp32_uplinks, uplinks)]
        ratio = f"{statistics.fmean(fp32_uplinks) / statistics.fmean(reached):.1f}x ({min(per_seed):.1f}x)"
    seeds = str(len(runs))
    return f"| {label} | {server} | {seeds} | {_mean_std(finals)} | {_mean_std(last)} | {to_target} | {ratio} |"


def table(title: str, variants: list[tuple[str, str, str, str]], target: float | None, records: pathlib.Path) -> str:
    loaded = [(label, server, _seed_records(records / directory, method)) for label, server, directory, method in variants]
    fp32 = {server: runs for label, server, runs in loaded if label == "fp32"}
    if target is None:  # 95% of fp32-with-FedAvg's mean final accuracy, floored to 0.01
        finals = [rounds[-1]["accuracy"] for rounds in fp32.get("FedAvg", [])]
        target = math.floor(95 * statistics.fmean(finals)) / 100 if finals else 0.85
    lines = [f"**{title}** (target {target:.2f} for every row)", "",
             f"| variant | server | seeds | final acc | last {LAST_ROUNDS} rounds | uplink to {target:.2f} | vs fp32, same server (lowest seed) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [_row(label, server, runs, fp32.get(server), target) for label, server, runs in loaded]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=None, help="one target accuracy for every table")
    parser.add_argument("--records", type=pathlib.Path, default=RECORDS, help="the simulate_results directory")
    args = parser.parse_args()
    for title, variants in SETTINGS.items():
        print(table(title, variants, args.target, args.records))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
