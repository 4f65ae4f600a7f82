"""Merge `fstq simulate` runs of different methods (same settings) into one comparison.

    python benchmarks/simulate_merge.py --out runs/merged runs/baselines/results.json runs/fstq/results.json
    python benchmarks/simulate_merge.py --out runs/at0.7 --target 0.7 runs/alpha0.1/results.json   # re-target one run

Writes results.json, CSVs, summary.md and plots as `fstq simulate` does, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from fstqcodec.sim.report import format_table, merge_results, summarize, validate_results, write_outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--target", type=float, default=None,
                        help="summarise against this target accuracy instead of the runs' own (the "
                             "per-round records do not depend on the target)")
    parser.add_argument("results", nargs="+", help="results.json files")
    args = parser.parse_args()
    runs = [json.loads(pathlib.Path(p).read_text()) for p in args.results]
    merged = merge_results(runs)
    if args.target is not None:
        merged["target_accuracy"] = args.target
        merged["target_rule"] = f"given to simulate_merge.py (the runs used {runs[0]['target_accuracy']})"
        summarize(merged)
    validate_results(merged)
    write_outputs(merged, args.out)
    print(format_table(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
