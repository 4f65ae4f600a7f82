"""Run a command and print its wall time and the peak memory of its whole process tree.

    python benchmarks/timed_run.py -- fstq simulate --out runs/timed

`fstq simulate` runs its methods in worker processes, so the peak of one process (what
`/usr/bin/time` reports) understates what the machine must hold: this samples the resident memory
of the command and all its descendants every 0.2 s and reports the largest sum (psutil, which
the sim extra's Ray already installs). Prints one JSON line at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:  # a worker that ended between the listing and the reading
            pass
    return total


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("timed_run.py: give the command after --", file=sys.stderr)
        return 2
    started = time.perf_counter()
    child = subprocess.Popen(argv)
    watched = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        try:
            peak = max(peak, _tree_rss(watched))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    status = child.wait()
    wall = time.perf_counter() - started
    print(json.dumps({"command": argv, "exit_status": status, "wall_s": round(wall, 1),
                      "peak_tree_rss_mib": round(peak / 2**20, 1)}))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
