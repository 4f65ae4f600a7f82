"""Token selection in the federated loop: Fisher against random and attention selection, and none.

Four ``fstq simulate`` runs of the default BBC task (fstq uplink), identical but for the tokens each
client trains on: every token (``--token-keep 1``, which trains as without the option and records
the compute), and half of each sequence chosen by the client's token-Fisher prior, at random, or by
first-layer [CLS] attention. Prints, per run: accuracy, rounds, uplink and client compute to the
target (counted FLOPs, real tokens, the modelled clock's seconds), and the measured training seconds.
A fifth variant, ``fisher-federated``, ranks by the clients' priors averaged by the server
(``--token-prior federated``): its uplink to the target includes the prior messages' bytes (shown
beside it).

    python benchmarks/token_loop.py --run             # the five runs (about 3-5 min each on 1 thread), then the table
    python benchmarks/token_loop.py                   # the table of runs already in --out
    python benchmarks/token_loop.py --run --seeds 1,2 --variants none,fisher,random   # more seeds
    python benchmarks/token_loop.py --seeds 0,1,2 --variants none,fisher,random       # mean +- std over seeds

Seed 0's runs live in ``--out/<variant>``, seed n's in ``--out/seed-<n>/<variant>``. With several
seeds the script prints each seed's table and one of means and standard deviations (ratios against
``none`` are taken per seed, then averaged), and writes ``table-seeds.md``.

Writes ``table.md`` next to the runs (default ``benchmarks/simulate_results/bbc-token-selection``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

OUT = pathlib.Path(__file__).resolve().parent / "simulate_results" / "bbc-token-selection"
#: run directory -> (keep ratio, selection)
VARIANTS = {"none": (1.0, "fisher"), "fisher": (0.5, "fisher"), "random": (0.5, "random"),
            "attention": (0.5, "attention"), "fisher-federated": (0.5, "fisher")}
#: run directory -> further options: the federated prior (sent through the codec, averaged, sent back)
EXTRA_OPTIONS = {"fisher-federated": ["--token-prior", "federated"]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="store_true", help="run the simulations first")
    parser.add_argument("--keep", type=float, default=0.5, help="keep ratio of the three selections")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of: {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    return parser.parse_args(argv)


def run_dir(args, seed: int, name: str) -> pathlib.Path:
    return args.out / name if seed == 0 else args.out / f"seed-{seed}" / name


def command(name: str, args, seed: int) -> list[str]:
    keep, selection = VARIANTS[name]
    keep = keep if name == "none" else args.keep
    return ["fstq", "simulate", "--methods", "fstq", "--threads", "1", "--workers", "1", "--no-plots",
            "--no-progress", "--step-time-s", "0.3", "--seed", str(seed), "--rounds", str(args.rounds),
            "--token-keep", f"{keep:g}", "--token-select", selection, *EXTRA_OPTIONS.get(name, []),
            "--out", str(run_dir(args, seed, name))]


def row(name: str, results: dict, baseline: dict | None) -> dict:
    data = results["methods"]["fstq"]
    summary, rounds = data["summary"], data["rounds"]
    entry = {
        "selection": name,
        "keep": results["config"]["token_keep"],
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": summary["best_accuracy"],
        "rounds_to_target": summary["rounds_to_target"],
        "uplink_to_target_bytes": summary["uplink_to_target_bytes"],
        "flops_to_target": summary["client_train_flops_to_target"],
        "tokens_to_target": summary["client_train_tokens_to_target"],
        "modelled_compute_to_target_s": summary["client_compute_s_to_target"],
        "total_flops": summary["total_client_train_flops"],
        "total_measured_train_s": summary["total_client_train_measured_s"],
        "flops_saved_per_run": summary["client_train_flops_saved"],
        "accuracy_by_round": [entry["accuracy"] for entry in rounds],
        # The federated prior's bytes (inside the uplink and downlink figures); None for the others.
        "prior_uplink_to_target_bytes": summary.get("prior_uplink_to_target_bytes"),
        "total_prior_uplink_bytes": summary.get("total_prior_uplink_bytes"),
        "total_prior_downlink_bytes": summary.get("total_prior_downlink_bytes"),
    }
    if baseline is not None:
        base = baseline["methods"]["fstq"]["summary"]
        entry["measured_train_s_vs_none"] = (summary["total_client_train_measured_s"]
                                             / base["total_client_train_measured_s"])
        if summary["client_train_flops_to_target"] and base["client_train_flops_to_target"]:
            entry["flops_to_target_vs_none"] = (summary["client_train_flops_to_target"]
                                                / base["client_train_flops_to_target"])
    return entry


def _fmt(value, pattern="{:.3f}", none="not reached"):
    return none if value is None else pattern.format(value)


def _tera(flops):
    return None if flops is None else flops / 1e12


def table(rows: list[dict], target: float) -> str:
    lines = [f"| training tokens | final acc | best acc | rounds to {target:.2f} | uplink to target | client FLOPs "
             "to target | vs none | modelled compute to target | FLOPs saved (20 rounds) | measured training s "
             "(20 rounds) | vs none |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        label = "every token (none)" if r["selection"] == "none" else f"{r['selection']}, keep {r['keep']:g}"
        prior = r.get("prior_uplink_to_target_bytes")
        prior_note = "" if prior is None else f" (prior {prior:,} B)"
        lines.append(
            f"| {label} | {r['final_accuracy']:.3f} | {r['best_accuracy']:.3f} | {_fmt(r['rounds_to_target'], '{}')} "
            f"| {_fmt(r['uplink_to_target_bytes'], '{:,} B')}{prior_note} | {_fmt(_tera(r['flops_to_target']), '{:.2f} T')} "
            f"| {_fmt(r.get('flops_to_target_vs_none'), '{:.2f}x', '-')} "
            f"| {_fmt(r['modelled_compute_to_target_s'], '{:.1f} s')} | {r['flops_saved_per_run']:.1%} "
            f"| {r['total_measured_train_s']:.0f} | {_fmt(r.get('measured_train_s_vs_none'), '{:.2f}x', '-')} |")
    return "\n".join(lines)


def seed_table(per_seed: dict[int, list[dict]], target: float) -> str:
    """Mean +- std over seeds per selection (ratios against ``none`` per seed, then averaged)."""
    lines = [f"| training tokens | seeds | final acc | rounds to {target:.2f} | uplink to target vs none "
             "| client FLOPs to target vs none | FLOPs saved (20 rounds) |", "|---|---:|---:|---:|---:|---:|---:|"]
    # Only the selections every seed ran (fisher-federated was run on seed 0 alone).
    names = [r["selection"] for r in next(iter(per_seed.values()))
             if all(any(other["selection"] == r["selection"] for other in rows) for rows in per_seed.values())]
    for name in names:
        rows = [next(r for r in rows if r["selection"] == name) for rows in per_seed.values()]
        bases = [next(r for r in rows if r["selection"] == "none") for rows in per_seed.values()]
        reached = [(r, b) for r, b in zip(rows, bases) if r["rounds_to_target"] and b["rounds_to_target"]]

        def stat(values, pattern):
            return "-" if not values else f"{pattern.format(np.mean(values))} +- {pattern.format(np.std(values))}"

        label = "every token (none)" if name == "none" else f"{name}, keep {rows[0]['keep']:g}"
        lines.append(
            f"| {label} | {len(rows)} | {stat([r['final_accuracy'] for r in rows], '{:.3f}')} "
            f"| {stat([r['rounds_to_target'] for r in rows if r['rounds_to_target']], '{:.1f}')}"
            f"{'' if len(reached) == len(rows) else f' ({len(rows) - len(reached)} not reached)'} "
            f"| {stat([r['uplink_to_target_bytes'] / b['uplink_to_target_bytes'] for r, b in reached], '{:.2f}x')} "
            f"| {stat([r['flops_to_target'] / b['flops_to_target'] for r, b in reached], '{:.2f}x')} "
            f"| {stat([r['flops_saved_per_run'] for r in rows], '{:.1%}')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.run:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        for seed in seeds:
            for name in variants:
                print(" ".join(command(name, args, seed)), flush=True)
                subprocess.run(command(name, args, seed), check=True, env=env)
    per_seed = {}
    for seed in seeds:
        loaded = {name: json.loads((run_dir(args, seed, name) / "results.json").read_text())
                  for name in variants if (run_dir(args, seed, name) / "results.json").exists()}
        if not loaded:
            print(f"no runs for seed {seed} in {args.out}; pass --run", file=sys.stderr)
            return 1
        baseline = loaded.get("none")
        per_seed[seed] = [row(name, results, baseline) for name, results in loaded.items()]
        target = next(iter(loaded.values()))["target_accuracy"]
        text = table(per_seed[seed], target)
        print(f"seed {seed}\n{text}\n")
        if len(seeds) == 1:
            note = (f"\n\nOne seed ({seed}), not a headline figure; fstq uplink; the simulated clock "
                    "models a full local step as 0.3 s and a reduced one by its FLOPs; measured seconds on a shared "
                    "2-core machine.\n")
            out = run_dir(args, seed, "")
            (out / "table.md").write_text(text + note)
            (out / "rows.json").write_text(json.dumps(per_seed[seed], indent=1) + "\n")
    if len(seeds) > 1:
        text = seed_table(per_seed, target)
        print(text)
        (args.out / "table-seeds.md").write_text(
            text + f"\n\nSeeds {', '.join(map(str, seeds))}; mean +- std over seeds; ratios against 'none' per seed; "
            "the whole held-out split (444) each round.\n")
        (args.out / "rows-seeds.json").write_text(json.dumps(per_seed, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
