"""Issue 13's first bar: the accuracy cost of downlink proxies on the default task, over 3 seeds.

Reads the per-seed records (``<record>/seed-<n>/results.json``) of `fstq simulate --methods fp32`
runs (fp32 uplink, so that only the downlink differs) and prints one Markdown table: per downlink
(the plain fp32 adapter, or proxies with a server mask of 30% and a client mask of 10% under each
recipe) the final accuracy and the mean of the last 5 rounds (mean +- std over the seeds, and per
seed), the difference of the mean final accuracy from the unmasked run under the same server
learning rate, the downlink bytes per client and round against fp32's, the cosine between a proxy
and the global adapter in the last round, and the share of the adapter any client was ever sent.

    python benchmarks/proxy_accuracy.py            # from benchmarks/simulate_results

Each row's command is in README.md ("Downlink proxies") and benchmarks/simulate_results/README.md.
"""

from __future__ import annotations

import json
import pathlib
import statistics

from fstqcodec.sim.report import last_rounds_accuracy

RECORDS = pathlib.Path(__file__).resolve().parent / "simulate_results"
FP32_ADAPTER_BYTES = 302_620  # the default task's adapter as one lossless fp32 message

# (label, server lr, record directory, record of the unmasked run under the same server lr)
ROWS = [
    ("fp32 downlink (no proxies)", 1.0, "seeds-bbc-default/runs-fp32", None),
    ("proxies, hidden entries `previous`", 1.0, "seeds-bbc-proxies", "seeds-bbc-default/runs-fp32"),
    ("proxies, hidden entries `received`", 1.0, "seeds-bbc-proxies-received", "seeds-bbc-default/runs-fp32"),
    ("fp32 downlink (no proxies)", 1.4, "seeds-bbc-default-slr1.4", None),
    ("**proxies, `received`, head exempt from the server mask**", 1.4, "seeds-bbc-proxies-head-exempt-slr1.4",
     "seeds-bbc-default-slr1.4"),
]


def seed_runs(record: str) -> list[tuple[dict, list[dict]]]:
    """(config, the fp32 method's per-round records) of every seed of ``record``, by seed."""
    paths = sorted((RECORDS / record).glob("seed-*/results.json")) or [RECORDS / record / "results.json"]
    runs = [json.loads(path.read_text()) for path in paths if path.exists()]
    return [(run["config"], run["methods"]["fp32"]["rounds"]) for run in runs]


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


FIGURE_COLUMNS = ["downlink per client and round", "cosine, last round", "ever sent"]


def downlink_figures(last_rounds: list[dict], clients_per_round: list[int]) -> str:
    """The downlink per client against fp32's, the proxies' cosine and the share ever sent, in the
    last round (means over the seeds); the plain fp32 downlink where the runs had no proxies."""
    if "proxy_downlink_bytes" not in last_rounds[0]:
        return f"{FP32_ADAPTER_BYTES / 1e3:.1f} kB (1.0x) | 1 | 1"
    per_client = statistics.mean(e["proxy_downlink_bytes"] / c for e, c in zip(last_rounds, clients_per_round))
    cosine = statistics.mean(e["proxy_cosine_mean"] for e in last_rounds)
    seen = statistics.mean(e["fraction_ever_seen"] for e in last_rounds)
    return f"{per_client / 1e3:.1f} kB ({FP32_ADAPTER_BYTES / per_client:.1f}x smaller) | {cosine:.3f} | {seen:.3f}"


def row(label: str, server_lr: float, record: str, reference: str | None) -> str:
    found = seed_runs(record)
    if not found:
        return f"| {label} | {server_lr:g} | not run | | | | | | |"
    configs, runs = zip(*found)
    finals = [rounds[-1]["accuracy"] for rounds in runs]
    lasts = [last_rounds_accuracy(rounds) for rounds in runs]
    versus = "-"
    if reference is not None:
        reference_finals = [rounds[-1]["accuracy"] for _, rounds in seed_runs(reference)]
        versus = f"{100 * (statistics.mean(finals) - statistics.mean(reference_finals)):+.1f}"
    per_seed = " / ".join(f"{value:.3f}" for value in finals)
    figures = downlink_figures([rounds[-1] for rounds in runs], [config["clients_per_round"] for config in configs])
    return f"| {label} | {server_lr:g} | {len(runs)} | {spread(finals)} ({per_seed}) | {spread(lasts)} | {versus} | {figures} |"


# The accuracy cost against mask rates (issue 13 bar 2): one seed (0), the recipe of the last row
# above (head exempt from the server mask, server lr 1.4), fp32 uplink: (server, client, record).
RATE_ROWS = [
    (0.0, 0.0, "seeds-bbc-default-slr1.4"),
    (0.1, 0.05, "bbc-proxies-server0.1-client0.05-seed0"),
    (0.3, 0.1, "seeds-bbc-proxies-head-exempt-slr1.4"),
    (0.5, 0.2, "bbc-proxies-server0.5-client0.2-seed0"),
]


def seed0_run(record: str):
    """(config, rounds) of seed 0 in ``record``, or None."""
    return next(((config, rounds) for config, rounds in seed_runs(record) if config["seed"] == 0), None)


def rate_row(server: float, client: float, record: str) -> str:
    """One mask setting's seed-0 figures."""
    found = seed0_run(record)
    if found is None:
        return f"| {server:.0%} | {client:.0%} | not run | | | | |"
    config, rounds = found
    figures = downlink_figures([rounds[-1]], [config["clients_per_round"]])
    return (f"| {server:.0%} | {client:.0%} | {rounds[-1]['accuracy']:.3f} | {last_rounds_accuracy(rounds):.3f} | "
            f"{figures} |")


def print_table(title: str, columns: list[str], lines: list[str]) -> None:
    """A Markdown table under a bold title: the first column left-aligned, the others right."""
    print(f"**{title}**\n")
    print("| " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * (len(columns) - 1))
    for line in lines:
        print(line)


def plot_rates(path: pathlib.Path) -> None:
    """Accuracy (final and last-5 mean) and the privacy figures of the last round against the mask
    rates of :data:`RATE_ROWS` (seed 0), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = [(server, client, seed0_run(record)) for server, client, record in RATE_ROWS]
    points = [(server, client, *run) for server, client, run in found if run is not None]
    labels = [f"{server:.0%}/{client:.0%}" for server, client, _, _ in points]
    last = [rounds[-1] for _, _, _, rounds in points]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(labels, [e["accuracy"] for e in last], "o-", label="final accuracy")
    axes[0].plot(labels, [last_rounds_accuracy(rounds) for _, _, _, rounds in points], "s--", label="mean of last 5 rounds")
    axes[0].set(xlabel="server mask / client mask", ylabel="accuracy (seed 0)", title="accuracy cost", ylim=(0.8, 1.0))
    axes[1].plot(labels, [e.get("fraction_ever_seen", 1.0) for e in last], "o-", label="share of the adapter ever sent")
    axes[1].plot(labels, [e.get("proxy_cosine_mean", 1.0) for e in last], "s--", label="cosine(proxy, global), last round")
    axes[1].set(xlabel="server mask / client mask", title="privacy figures")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    print_table("Default task (BBC, 10 clients, Dirichlet 0.5, 20 rounds), fp32 uplink; proxies: server mask 30%, "
                "client mask 10%, 4 bits per entry sent",
                ["downlink", "server lr", "seeds", "final acc (per seed)", "last 5 rounds",
                 "vs unmasked, same server lr (points)", *FIGURE_COLUMNS], [row(*spec) for spec in ROWS])
    print()
    print_table("Accuracy cost against mask rates: seed 0 only, head exempt from the server mask, server lr 1.4, "
                "`received`", ["server mask", "client mask", "final acc", "last 5 rounds", *FIGURE_COLUMNS],
                [rate_row(*spec) for spec in RATE_ROWS])
    plot = RECORDS.parent / "proxy_results" / "proxy_accuracy.png"
    plot_rates(plot)
    print(f"\nplot: {plot.relative_to(RECORDS.parent.parent)}")


if __name__ == "__main__":
    main()
