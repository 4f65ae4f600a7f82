"""Encode time of this checkout against another, paired encode by encode (README, "Speed").

On a shared machine the load changes from second to second, and two runs of ``throughput.py``
minutes apart disagree by more than the change being measured. Here two worker processes, one
per checkout, hold the same 64 MiB LoRA-shaped input (``throughput.lora_update`` and
``throughput.lora_fisher``) and take turns: one encode in one, the same encode in the other
(alternating which goes first), and zstd level 3 on the same raw bytes in each. Every pair ran
under about the same load, so the median of the per-pair time ratios says which encoder is faster
and by how much; each side's fastest time against the fastest zstd-3 gives the ratios to zstd-3.
Times are process CPU seconds, one thread.

Run: python benchmarks/throughput_paired.py --base /path/to/other/checkout [--rounds 15]
(each checkout needs its C accelerator built in place).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "fisher-p1": "encode, per-element Fisher, power 1, 1 bit/param",
    "fisher-p0.5": "encode, per-element Fisher, power 0.5, 1 bit/param",
    "no-fisher": "encode, no Fisher, 1 bit/param",
}


def worker() -> None:
    """Encode on request: reads a case name per line, prints the CPU seconds it took."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import zstandard

    import fstqcodec
    from throughput import lora_fisher, lora_update

    tensors = lora_update(64)
    fisher = lora_fisher(tensors)
    budget = fstqcodec.Budget(bits_per_param=1)
    options = {"fisher-p1": dict(fisher=fisher, fisher_power=1.0), "fisher-p0.5": dict(fisher=fisher, fisher_power=0.5),
               "no-fisher": {}}
    raw = b"".join(t.tobytes() for t in tensors.values())
    compressor = zstandard.ZstdCompressor(level=3)
    sizes = {name: len(fstqcodec.encode(tensors, budget=budget, **o)) for name, o in options.items()}  # warm up
    print("ready", fstqcodec.stages.rans.ACCELERATED, sizes, flush=True)
    for line in sys.stdin:
        name = line.strip()
        start = time.process_time()
        if name == "zstd-3":
            compressor.compress(raw)
        else:
            fstqcodec.encode(tensors, budget=budget, **options[name])
        print(time.process_time() - start, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the other checkout (its root directory)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    roots = {"this": Path(__file__).resolve().parent.parent, "base": Path(args.base).resolve()}
    workers = {}
    for side, root in roots.items():
        env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
        workers[side] = subprocess.Popen([sys.executable, str(root / "benchmarks" / "throughput_paired.py"), "--worker"],
                                         cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for side, process in workers.items():
        print(f"{side}: {roots[side]}: {process.stdout.readline().strip()}")
    times = {(side, case): [] for side in workers for case in [*CASES, "zstd-3"]}
    for round_number in range(args.rounds):
        for case in [*CASES, "zstd-3"]:
            for side in (("this", "base") if round_number % 2 == 0 else ("base", "this")):
                workers[side].stdin.write(case + "\n")
                workers[side].stdin.flush()
                times[(side, case)].append(float(workers[side].stdout.readline()))
    for process in workers.values():
        process.stdin.close()
        process.wait()
    zstd = min(times[("this", "zstd-3")] + times[("base", "zstd-3")])
    print(f"\n{args.rounds} rounds; CPU ms (fastest / median); zstd-3 fastest {zstd * 1000:.1f} ms")
    print(f"{'':52} {'this':>15} {'base':>15} {'base/this':>10} {'x zstd-3':>15}")
    for case, label in CASES.items():
        mine, theirs = times[("this", case)], times[("base", case)]
        ratio = statistics.median(b / a for a, b in zip(mine, theirs))
        print(f"{label:52} {min(mine) * 1000:6.1f} / {statistics.median(mine) * 1000:6.1f} "
              f"{min(theirs) * 1000:6.1f} / {statistics.median(theirs) * 1000:6.1f} {ratio:10.2f} "
              f"{zstd / min(mine):6.2f} / {zstd / min(theirs):5.2f}")
    print("(base/this: median over the pairs of the base encode's time over this one's; x zstd-3: this / base)")


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker()
    else:
        main()
