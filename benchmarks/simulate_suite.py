"""Run the `fstq simulate` experiments the README reports, one output directory each.

Each experiment is an ordinary `fstq simulate` invocation (so every number can be reproduced from
the command printed); this script only sequences them and gathers their summary tables into one
Markdown file. Expect roughly 3-4 minutes per method per experiment on a quiet 2-core CPU.

    HF_HUB_OFFLINE=1 python benchmarks/simulate_suite.py --out runs/suite            # one seed each
    HF_HUB_OFFLINE=1 python benchmarks/simulate_suite.py --only bbc-default,bbc-alpha0.1
    HF_HUB_OFFLINE=1 python benchmarks/simulate_suite.py --only seeds-bbc-alpha0.1   # issue 11, 3 seeds
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import subprocess
import sys
import time

_CLOCK = ["--step-time-s", "0.3"]  # a modelled clock: the machine is shared, the numbers stay repeatable
EXPERIMENTS = {
    # The README's headline: every method on the default task and split.
    "bbc-default": ["--methods", "all", *_CLOCK],
    # Uplink loss (issue 5): fstq beside fp32 under the same seeded losses.
    "bbc-loss0.05": ["--methods", "fp32,fstq", "--uplink-loss", "0.05", *_CLOCK],
    "bbc-loss0.10": ["--methods", "fp32,fstq", "--uplink-loss", "0.1", *_CLOCK],
    "bbc-loss0.20": ["--methods", "fp32,fstq", "--uplink-loss", "0.2", *_CLOCK],
    # How much Fisher: fstq weighs its error by Fisher ** p (default p = 0.5; fstq-nofisher is p = 0).
    "bbc-fisher-power1": ["--methods", "fstq", "--fisher-power", "1", *_CLOCK],
    "bbc-fisher-power0.25": ["--methods", "fstq", "--fisher-power", "0.25", *_CLOCK],
    # Stragglers (issue 5): the server closes each round after 3 s. With the default links, five
    # clients need 3.4-10 s to send an fp32 update, so their updates never arrive; compressed ones do.
    "bbc-deadline3": ["--methods", "fp32,nf4,fstq", "--round-deadline-s", "3", *_CLOCK],
    # Extreme non-IID.
    "bbc-alpha0.1": ["--methods", "fp32,nf4,qsgd4,topk,fstq-nofisher,fstq", "--alpha", "0.1", *_CLOCK],
    # The other built-in tasks, with the three methods the issue requires at least. Both need more
    # local steps than BBC: with 2, drug reviews stay at the majority class for 20 rounds (trained
    # centrally, this model needs 100-150 steps at lr 2e-3 to leave it), and 28-language
    # identification reaches only 0.37.
    "drugreview": ["--task", "drugreview", "--methods", "fp32,nf4,fstq", "--local-steps", "8", *_CLOCK],
    "multilingual": ["--task", "multilingual", "--methods", "fp32,nf4,fstq-nofisher,fstq", "--local-steps", "4", *_CLOCK],
    # Issue 11's headline configurations, three seeds each (a seed changes the split, partition,
    # initialisation, sampling, batches and links); every figure as mean +- std, plots with the
    # seed band, each seed's own record in seed-<n>/. Targets: 0.85 on the default task; 95% of
    # fp32's mean final accuracy under Dirichlet 0.1.
    "seeds-bbc-default": ["--methods", "fp32,nf4,qsgd4,topk,fstq-nofisher,fstq", "--seeds", "0,1,2", *_CLOCK],
    "seeds-bbc-alpha0.1": ["--alpha", "0.1", "--rounds", "40", "--target-of-fp32", "0.95",
                           "--methods", "fp32,nf4,qsgd4,topk,fstq-nofisher,fstq", "--seeds", "0,1,2", *_CLOCK],
    "seeds-bbc-alpha0.1-partial": ["--alpha", "0.1", "--rounds", "40", "--clients", "30", "--participation", "0.3",
                                   "--target-of-fp32", "0.95", "--methods", "fp32,nf4,qsgd4,topk,fstq-nofisher,fstq",
                                   "--seeds", "0,1,2", *_CLOCK],
    # Server momentum (FedAvgM, every method alike): what moved the hard regime (issue 11).
    "seeds-bbc-alpha0.1-momentum": ["--alpha", "0.1", "--rounds", "40", "--server-momentum", "0.5",
                                    "--target-of-fp32", "0.95", "--methods", "fp32,fstq", "--seeds", "0,1,2", *_CLOCK],
    "seeds-bbc-alpha0.1-partial-momentum": ["--alpha", "0.1", "--rounds", "40", "--clients", "30", "--participation", "0.3",
                                            "--server-momentum", "0.5", "--target-of-fp32", "0.95",
                                            "--methods", "fp32,fstq", "--seeds", "0,1,2", *_CLOCK],
    # fstq's unbiased mode (no error feedback) beside the records above (issue 16).
    "seeds-bbc-unbiased": ["--methods", "fstq-unbiased", "--seeds", "0,1,2", *_CLOCK],
    "seeds-bbc-alpha0.1-partial-unbiased": ["--alpha", "0.1", "--rounds", "40", "--clients", "30", "--participation", "0.3",
                                            "--target", "0.82", "--methods", "fstq-unbiased", "--seeds", "0,1,2", *_CLOCK],
    # Partial participation with FedAvgM (issue 11's third bar): the unbiased mode at 0.3 and 0.6 bit/param,
    # and at 0.6 the error-feedback mode, fstq-nofisher and top-k under the same budget, nf4 and qsgd4;
    # fp32 is seeds-bbc-alpha0.1-partial-momentum's (fixed-rate runs merge with any budget).
    "seeds-bbc-alpha0.1-partial-momentum-unbiased": ["--alpha", "0.1", "--rounds", "40", "--clients", "30",
                                                     "--participation", "0.3", "--server-momentum", "0.5",
                                                     "--target", "0.873", "--methods", "fstq-unbiased",
                                                     "--seeds", "0,1,2", *_CLOCK],
    "seeds-bbc-alpha0.1-partial-momentum-bpp0.6": ["--alpha", "0.1", "--rounds", "40", "--clients", "30",
                                                   "--participation", "0.3", "--server-momentum", "0.5",
                                                   "--budget-bpp", "0.6", "--target", "0.873",
                                                   "--methods", "fstq-unbiased,fstq,fstq-nofisher,topk,nf4,qsgd4",
                                                   "--seeds", "0,1,2", *_CLOCK],
    # The distributed-mean-estimation peers in the loop (issue 16), beside seeds-bbc-default.
    "seeds-bbc-peers": ["--methods", "eden,signsgd-ef", "--seeds", "0,1,2", *_CLOCK],
    # Downlink proxies (FedQSN, issue 13): server mask 0.3, client mask 0.1, 4 bits per entry sent, fp32
    # uplink, beside seeds-bbc-default's fp32. Hidden entries keep the client's last trained model
    # ("previous") or the last values the server sent it ("received"); then the server mask alone.
    "seeds-bbc-proxies": ["--methods", "fp32", "--server-mask", "0.3", "--client-mask", "0.1",
                          "--proxy-fill", "previous", "--seeds", "0,1,2", *_CLOCK],
    # The "received" record was run as --seeds 0, 1 and 2 in parallel on the shared machine and joined
    # with simulate_merge.py --seed-parts; then the server mask alone and the client mask alone on
    # seed 2 for 12 rounds (where that seed's masked runs lag the unmasked one by 0.29-0.41).
    "seeds-bbc-proxies-received": ["--methods", "fp32", "--server-mask", "0.3", "--client-mask", "0.1",
                                   "--proxy-fill", "received", "--seeds", "0,1,2", *_CLOCK],
    "bbc-proxies-server-only-seed2": ["--methods", "fp32", "--server-mask", "0.3", "--client-mask", "0",
                                      "--proxy-fill", "received", "--seeds", "2", "--rounds", "12", *_CLOCK],
    "bbc-proxies-client-only-seed2": ["--methods", "fp32", "--server-mask", "0", "--client-mask", "0.1",
                                      "--proxy-fill", "received", "--seeds", "2", "--rounds", "12", *_CLOCK],
    # Within 1 point (issue 13 bar 1): the classifier head out of the server mask and the server step
    # scaled by about 1/0.7 for the entries that move, beside the unmasked run under the same step.
    "bbc-proxies-head-exempt-seed0": ["--methods", "fp32", "--server-mask", "0.3", "--client-mask", "0.1",
                                      "--proxy-fill", "received", "--server-mask-exempt", "*classifier*",
                                      "--seeds", "0", *_CLOCK],
    "seeds-bbc-proxies-head-exempt-slr1.4": ["--methods", "fp32", "--server-mask", "0.3", "--client-mask", "0.1",
                                             "--proxy-fill", "received", "--server-mask-exempt", "*classifier*",
                                             "--server-lr", "1.4", "--seeds", "0,1,2", *_CLOCK],
    "seeds-bbc-default-slr1.4": ["--methods", "fp32", "--server-lr", "1.4", "--seeds", "0,1,2", *_CLOCK],
    # The accuracy cost against mask rates (issue 13 bar 2), the same recipe, seed 0.
    **{f"bbc-proxies-server{server}-client{client}-seed0": [
        "--methods", "fp32", "--server-mask", server, "--client-mask", client, "--proxy-fill", "received",
        "--server-mask-exempt", "*classifier*", "--server-lr", "1.4", "--seeds", "0", *_CLOCK]
       for server, client in (("0.1", "0.05"), ("0.5", "0.2"))},
    # One-seed exploration behind the above (bbc-*-variants-seed0 in the records).
    "bbc-alpha0.1-ef21": ["--alpha", "0.1", "--methods", "fstq,fstq-ef21", *_CLOCK],
    "bbc-alpha0.1-momentum": ["--alpha", "0.1", "--methods", "fp32,fstq", "--server-momentum", "0.5", *_CLOCK],
}
# Not run by default (hours on two cores): only when named with --only.
_ON_REQUEST = {name for name in EXPERIMENTS if name.startswith("seeds-")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/suite")
    parser.add_argument("--only", default="", help=f"comma list of: {', '.join(EXPERIMENTS)}")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="extra options for every run, after --")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or [n for n in EXPERIMENTS if n not in _ON_REQUEST]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiments {unknown}")
    extra = [a for a in args.extra if a != "--"]
    out = pathlib.Path(args.out)
    report = []
    for name in names:
        command = [sys.executable, "-m", "fstqcodec.sim.cli", "--out", str(out / name), "--no-progress",
                   *EXPERIMENTS[name], *extra]
        print(f"== {name}: {shlex.join(command)}", flush=True)
        started = time.perf_counter()
        status = subprocess.call(command)
        if status != 0:
            print(f"{name} failed with status {status}", file=sys.stderr)
            return status
        results = json.loads((out / name / "results.json").read_text())
        report += [f"## {name}", "", f"`fstq simulate {shlex.join(command[3:])}`", "",
                   f"target accuracy {results['target_accuracy']:.2f}; "
                   f"{time.perf_counter() - started:.0f} s wall", "",
                   (out / name / "summary.md").read_text(), ""]
    (out / "SUITE.md").write_text("\n".join(report))
    print(f"wrote {out / 'SUITE.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
