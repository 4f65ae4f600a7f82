"""Merge `fstq simulate` runs of different methods (same settings) into one comparison.

    python benchmarks/simulate_merge.py --out runs/merged runs/baselines/results.json runs/fstq/results.json
    python benchmarks/simulate_merge.py --out runs/at0.7 --target 0.7 runs/alpha0.1/results.json   # re-target one run
    python benchmarks/simulate_merge.py --out runs/seeds --seeds runs/fp32-seeds runs/fstq-seeds
        # runs made with --seeds: merged seed by seed (seed-<n>/results.json), then mean +- std
    python benchmarks/simulate_merge.py --out runs/all --seed-parts runs/s01 runs/s2
        # one configuration run in parts (--seeds 0,1 and --seeds 2): its seeds together, mean +- std

Writes results.json, CSVs, summary.md and plots as `fstq simulate` does, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from fstqcodec.sim.report import (aggregate_seeds, format_table, merge_results, summarize, validate_results, with_defaults,
                                  write_outputs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--target", type=float, default=None,
                        help="summarise against this target accuracy instead of the runs' own (the "
                             "per-round records do not depend on the target)")
    parser.add_argument("--seeds", action="store_true",
                        help="the arguments are output directories of `fstq simulate --seeds`: merge their "
                             "seed-<n>/results.json seed by seed, then aggregate over the seeds")
    parser.add_argument("--seed-parts", action="store_true",
                        help="the arguments are output directories of `fstq simulate --seeds` with the same "
                             "settings and different seeds: aggregate all their seed-<n>/results.json, as one "
                             "run over all those seeds would")
    parser.add_argument("results", nargs="+", help="results.json files (directories with --seeds or --seed-parts)")
    args = parser.parse_args()
    if args.seeds and args.seed_parts:
        parser.error("give --seeds or --seed-parts, not both")
    if args.seed_parts:
        per_seed = _seed_parts(args.results, args.target)
        for run in per_seed:
            write_outputs(run, pathlib.Path(args.out) / f"seed-{run['config']['seed']}", plots=False)
        merged = aggregate_seeds(per_seed)
    elif args.seeds:
        per_seed = [_merge(_seed_runs(args.results, seed), args.target) for seed in _common_seeds(args.results)]
        for run in per_seed:
            write_outputs(run, pathlib.Path(args.out) / f"seed-{run['config']['seed']}", plots=False)
        merged = aggregate_seeds(per_seed)
    else:
        merged = _merge([json.loads(pathlib.Path(p).read_text()) for p in args.results], args.target)
    write_outputs(merged, args.out)
    print(format_table(merged))
    return 0


def _merge(runs: list[dict], target: float | None) -> dict:
    if target is not None:  # runs summarised against other targets merge once all use this one
        runs = [{**run, "target_accuracy": target} for run in runs]
    merged = merge_results(runs)
    if target is not None:
        merged["target_accuracy"] = target
        merged["target_rule"] = f"given to simulate_merge.py (the runs used {runs[0]['target_accuracy']})"
        summarize(merged)
    validate_results(merged)
    return merged


# Config entries a seed changes (the split, the partition, the links): not settings of the run.
_PER_SEED_CONFIG = {"seed", "client_examples", "client_label_histogram", "bandwidth_model", "train_examples",
                    "test_examples", "eval_examples", "wall_time_s", "platform",
                    # the causal-LM tasks' split and generations differ by seed
                    "mean_train_tokens", "mean_answer_tokens", "sample_generations_last_eval"}


def _common_seeds(directories: list[str]) -> list[int]:
    """The seeds every directory has a seed-<n>/results.json for (an error if they differ)."""
    found = [sorted(int(p.parent.name[5:]) for p in pathlib.Path(d).glob("seed-*/results.json")) for d in directories]
    if not found[0] or any(seeds != found[0] for seeds in found):
        sys.exit(f"simulate_merge.py: the directories hold different seeds: {dict(zip(directories, found))}")
    return found[0]


def _seed_parts(directories: list[str], target: float | None) -> list[dict]:
    """Every seed-<n>/results.json of ``directories``, ordered by seed (an error if a seed repeats
    or the settings other than the seed differ)."""
    runs = [json.loads(p.read_text()) for d in directories for p in pathlib.Path(d).glob("seed-*/results.json")]
    seeds = [run["config"]["seed"] for run in runs]
    if not runs or len(set(seeds)) != len(seeds):
        sys.exit(f"simulate_merge.py: --seed-parts needs distinct seeds, found {sorted(seeds)} in {directories}")
    # A run recorded before an option existed ran with its default (with_defaults).
    settings = [{k: v for k, v in with_defaults(run["config"]).items() if k not in _PER_SEED_CONFIG} for run in runs]
    differing = sorted({k for other in settings[1:] for k in other.keys() | settings[0].keys()
                        if other.get(k) != settings[0].get(k)})
    if differing:
        sys.exit(f"simulate_merge.py: --seed-parts runs differ in {differing}")
    return [_merge([run], target) for run in sorted(runs, key=lambda run: run["config"]["seed"])]


def _seed_runs(directories: list[str], seed: int) -> list[dict]:
    return [json.loads((pathlib.Path(d) / f"seed-{seed}" / "results.json").read_text()) for d in directories]


if __name__ == "__main__":
    sys.exit(main())
