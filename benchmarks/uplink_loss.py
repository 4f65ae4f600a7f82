"""Accuracy under uplink loss: fstq beside fp32, from `fstq simulate` records at several loss rates.

Each record is an ordinary `fstq simulate --methods fp32,fstq --uplink-loss P` run (see
`benchmarks/simulate_suite.py`, experiments `bbc-loss*`; the 0% curve comes from `bbc-default`).
Losses are drawn from a seeded stream of their own, so fp32 and fstq lose the same clients' messages
in the same rounds. This script prints the table the README quotes and draws the curves:

    python benchmarks/uplink_loss.py --out benchmarks/simulate_results/bbc-uplink-loss \\
        benchmarks/simulate_results/bbc-default/results.json \\
        benchmarks/simulate_results/bbc-loss0.05/results.json ...
"""

from __future__ import annotations

import argparse
import json
import pathlib

from fstqcodec.sim.report import validate_results

METHODS = ("fp32", "fstq")


def _row(results: dict, method: str) -> dict:
    record = results["methods"][method]
    summary = record["summary"]
    lost = sum(1 for fault in record.get("faults", []) if fault["fault"] == "lost")
    return {
        "loss": float(results["config"].get("uplink_loss", 0.0)),
        "method": method,
        "lost_messages": lost,
        "final": summary["final_accuracy"],
        "rounds_to_target": summary["rounds_to_target"],
        "uplink_to_target": summary["uplink_to_target_bytes"],
        "curve": [r["accuracy"] for r in record["rounds"]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for accuracy_vs_round.png and table.md")
    parser.add_argument("results", nargs="+", help="results.json of runs that differ only in --uplink-loss")
    args = parser.parse_args()
    runs = [json.loads(pathlib.Path(p).read_text()) for p in args.results]
    for run in runs:
        validate_results(run)
    targets = {run["target_accuracy"] for run in runs}
    if len(targets) != 1:
        parser.error(f"the runs have different targets: {sorted(targets)}")
    target = targets.pop()
    rows = sorted((_row(run, m) for run in runs for m in METHODS if m in run["methods"]),
                  key=lambda r: (r["loss"], METHODS.index(r["method"])))
    fp32_bytes = {r["loss"]: r["uplink_to_target"] for r in rows if r["method"] == "fp32"}

    lines = [f"| uplink loss | method | messages lost | final acc | round reaching {target:.2f} | uplink to {target:.2f} | vs fp32 at that loss |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        reached = r["uplink_to_target"] is not None
        ratio = ""
        if reached and fp32_bytes.get(r["loss"]):
            ratio = f"{fp32_bytes[r['loss']] / r['uplink_to_target']:.1f}x"
        uplink = f"{r['uplink_to_target'] / 1e3:,.0f} kB" if reached else "-"
        round_reached = r["rounds_to_target"] if reached else "not reached"
        lines.append(f"| {r['loss']:.0%} | {r['method']} | {r['lost_messages']} | {r['final']:.3f} | "
                     f"{round_reached} | {uplink} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    for r in rows:
        print(f"{r['method']:>5} at {r['loss']:.0%}: " + " ".join(f"{a:.3f}" for a in r["curve"]))

    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(table + "\n")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        losses = sorted({r["loss"] for r in rows})
        colours = plt.cm.viridis([i / max(1, len(losses) - 1) * 0.85 for i in range(len(losses))])
        for r in rows:
            colour = colours[losses.index(r["loss"])]
            style = "--" if r["method"] == "fp32" else "-"
            ax.plot(range(len(r["curve"])), r["curve"], style, color=colour, marker="o" if r["method"] == "fstq" else None,
                    markersize=3, label=f"{r['method']}, {r['loss']:.0%} lost")
        ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("round")
        ax.set_ylabel("held-out accuracy")
        ax.set_title("Accuracy under uplink loss (fstq solid, fp32 dashed)")
        ax.legend(fontsize=8, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_round.png", dpi=120)
        print(f"wrote {out / 'accuracy_vs_round.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
