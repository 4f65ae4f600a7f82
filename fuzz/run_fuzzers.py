"""Run the atheris targets for a while and report their exec counts (for the README table).

Each target runs in its own libFuzzer process over a scratch corpus seeded from
``fuzz/corpus/<target>/``; a crash is saved under ``fuzz/crashes-new/`` (git-ignored: triage it,
then move it to ``fuzz/crashes/<target>/``), and the target is restarted until its time or run
budget is spent. Exec counts are summed over restarts.

Usage (from the repository root)::

    python fuzz/run_fuzzers.py --seconds 600 [--runs 1000000] [--targets fuzz_decode ...]

Exits with status 1 if any target crashed (or exited abnormally), else 0.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
TARGETS = ("fuzz_decode", "fuzz_inspect", "fuzz_roundtrip")


def run_target(target: str, seconds: float, runs: int | None, workdir: pathlib.Path, log, rss_limit_mb: int = 2048) -> dict:
    scratch = workdir / target
    scratch.mkdir(parents=True, exist_ok=True)
    crashes = HERE / "crashes-new"
    crashes.mkdir(exist_ok=True)
    env = dict(os.environ, FSTQ_FUZZ_SKIP_KNOWN="1", PYTHONWARNINGS="ignore")
    deadline = time.monotonic() + seconds
    total_execs, restarts, artifacts, peak_rss = 0, 0, [], 0
    while True:
        left = deadline - time.monotonic()
        if left < 5 or (runs is not None and total_execs >= runs):
            break
        command = [
            sys.executable, str(HERE / f"{target}.py"), str(scratch), str(HERE / "corpus" / target),
            f"-max_total_time={int(left)}", "-print_final_stats=1", "-timeout=20", f"-rss_limit_mb={rss_limit_mb}",
            f"-artifact_prefix={crashes}/{target}-", "-max_len=8192",
        ]
        if runs is not None:
            command.append(f"-runs={runs - total_execs}")
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        output = result.stdout + result.stderr
        log.write(output[-20000:])
        log.write(f"\n[run_fuzzers] {target} exited with status {result.returncode}\n")
        log.flush()
        executed = re.findall(r"stat::number_of_executed_units: (\d+)", output)
        if executed:
            total_execs += int(executed[-1])
        else:
            # A crash prints no final stats: take the last progress line's count.
            progress = re.findall(r"^#(\d+)\s", output, re.M)
            total_execs += int(progress[-1]) if progress else 0
        rss = re.findall(r"(?:peak_rss_mb:\s+|rss: )(\d+)", output)
        peak_rss = max([peak_rss] + [int(r) for r in rss])
        found = re.findall(r"Test unit written to (\S+)", output)
        artifacts += found
        if result.returncode == 0:
            break
        restarts += 1
        if not found and restarts > 3:  # exits that leave no crash input (bad arguments): do not spin
            break
    return {"target": target, "execs": total_execs, "crash_restarts": restarts, "artifacts": artifacts, "peak_rss_mb": peak_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60, help="wall-clock budget per target")
    parser.add_argument("--runs", type=int, default=None, help="stop a target after this many execs")
    parser.add_argument("--targets", nargs="*", default=list(TARGETS))
    parser.add_argument("--workdir", default=None, help="scratch corpus directory (default: a temp dir)")
    parser.add_argument("--log", default=None, help="file for libFuzzer's output (default: stderr)")
    parser.add_argument(
        "--rss-limit-mb", type=int, default=2048,
        help="libFuzzer's RSS limit; the atheris-instrumented roundtrip target grows by ~15 KB per exec "
        "(not the codec: a plain loop over the same inputs stays flat), so long runs need more",
    )
    args = parser.parse_args()
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="fstq-fuzz-"))
    log = open(args.log, "a") if args.log else sys.stderr
    print("| target | execs | seconds | crashes (restarts) | peak RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    crashed = False
    for target in args.targets:
        start = time.monotonic()
        summary = run_target(target, args.seconds, args.runs, workdir, log, args.rss_limit_mb)
        elapsed = time.monotonic() - start
        print(f"| {target} | {summary['execs']:,} | {elapsed:.0f} | {summary['crash_restarts']} | {summary['peak_rss_mb']} |", flush=True)
        for path in summary["artifacts"]:
            print(f"    crash: {path}", flush=True)
        crashed = crashed or bool(summary["artifacts"]) or summary["crash_restarts"] > 0
    # Non-zero when anything crashed, so a short run can gate CI (for example
    # `python fuzz/run_fuzzers.py --seconds 20` in .ci/run).
    sys.exit(1 if crashed else 0)


if __name__ == "__main__":
    main()
