"""Results of ``fstq simulate``: summaries, ``results.json``, CSV files, plots and the summary table.

``results.json`` layout::

    {
      "config": {...},                  # every setting of the run, data and link statistics
      "target_accuracy": 0.85,
      "methods": {
        "<name>": {
          "rounds": [{"round", "accuracy", "uplink_bytes", "cumulative_uplink_bytes",
                      "downlink_bytes", "sim_time_s"}, ...],   # round 0 = the initial model
          "summary": {"final_accuracy", "best_accuracy", "reached_target", "rounds_to_target",
                      "uplink_to_target_bytes", "uplink_ratio_vs_fp32", "sim_time_to_target_s",
                      "time_reduction_vs_fp32", "total_uplink_bytes", "mean_message_bytes",
                      "mean_bits_per_param",
                      # with token selection (config "token_keep"): the client compute, in all and
                      # to target: "total_client_train_flops", "client_train_flops_to_target", ...
                      },
          "message_anatomy": {"<part>": mean bytes per message},   # e.g. header, scales, codes
          "faults": [...], "dropped_messages": [...],               # what went wrong, per round
          ...
        }
      }
    }

With token selection on, each round (after round 0) also holds the clients' compute summed over
the round's participants (``client_compute_s``: the simulated clock's; ``client_train_measured_s``,
``client_train_tokens``, ``client_train_flops`` and ``client_train_flops_full``, the FLOPs the same
steps would have cost on full sequences).

With the federated token prior (config ``token_prior``), each round also holds ``prior_uplink_bytes``
and ``prior_downlink_bytes`` (already counted in ``uplink_bytes`` and ``downlink_bytes``),
``prior_messages_averaged`` and ``prior_clients``, and the summary their totals and
``prior_uplink_to_target_bytes``.

``uplink_bytes`` is the sum over the round's participants of ``len(message)`` (plus their prior messages); ``sim_time_s`` and
``cumulative_uplink_bytes`` are cumulative. "To target" values are taken at the first round whose
accuracy reaches the target, ``null`` when it is never reached.

A run over several seeds (``fstq simulate --seeds 0,1,2``) writes each seed's record, as above, to
``seed-<n>/`` and, at the top, the record :func:`aggregate_seeds` makes of them: the same layout
plus ``"seeds": [...]``; each round holds the mean over the seeds (with ``accuracy_std``,
``accuracy_min``, ``accuracy_max``), and each summary the figures' means with ``seeds``,
``seeds_reaching_target`` and ``spread`` (per figure: ``mean``, sample ``std``, ``min``, ``max``,
per-seed ``values``).
"""

from __future__ import annotations

import csv
import json
import pathlib
from collections.abc import Mapping
from typing import Any

__all__ = ["ROUND_FIELDS", "summarize", "write_outputs", "format_table", "validate_results", "merge_results",
           "aggregate_seeds"]

ROUND_FIELDS = ("round", "accuracy", "uplink_bytes", "cumulative_uplink_bytes", "downlink_bytes", "sim_time_s")


def first_reaching(rounds: list[Mapping[str, Any]], target: float) -> Mapping[str, Any] | None:
    """The first round record whose accuracy reaches ``target``, or None."""
    for entry in rounds:
        # A small tolerance so 0.85 counts as reaching 0.85 despite float rounding of n/N.
        if entry["accuracy"] >= target - 1e-9:
            return entry
    return None


#: Per-round client compute, recorded when token selection is on (``token_keep``), summed over clients.
COMPUTE_FIELDS = ("client_compute_s", "client_train_measured_s", "client_train_tokens", "client_train_flops",
                  "client_train_flops_full")


def _client_compute_summary(rounds: list[Mapping[str, Any]], hit: Mapping[str, Any] | None) -> dict:
    """Client compute in all and to the target (runs with token selection; nothing otherwise)."""
    if not any("client_train_flops" in entry for entry in rounds):
        return {}

    def total(key: str, entries) -> float:
        return sum(entry.get(key, 0) for entry in entries)

    summary = {f"total_{key}": total(key, rounds) for key in COMPUTE_FIELDS}
    reached = rounds[: rounds.index(hit) + 1] if hit is not None else None
    for key in ("client_compute_s", "client_train_tokens", "client_train_flops"):
        summary[f"{key}_to_target"] = total(key, reached) if reached is not None else None
    full = summary["total_client_train_flops_full"]
    summary["client_train_flops_saved"] = 1.0 - summary["total_client_train_flops"] / full if full else None
    return summary


#: Per-round figures of the federated token prior (``token_prior="federated"``), already inside
#: ``uplink_bytes`` and ``downlink_bytes`` and broken out here.
PRIOR_FIELDS = ("prior_uplink_bytes", "prior_downlink_bytes")


def _prior_summary(rounds: list[Mapping[str, Any]], hit: Mapping[str, Any] | None) -> dict:
    """The federated prior's bytes in all and to the target (nothing for runs without it)."""
    if not any("prior_uplink_bytes" in entry for entry in rounds):
        return {}
    summary = {f"total_{key}": sum(entry.get(key, 0) for entry in rounds) for key in PRIOR_FIELDS}
    reached = rounds[: rounds.index(hit) + 1] if hit is not None else None
    summary["prior_uplink_to_target_bytes"] = (sum(entry.get("prior_uplink_bytes", 0) for entry in reached)
                                               if reached is not None else None)
    return summary


#: Rounds averaged into ``last_rounds_accuracy``: under strong label skew and partial participation one
#: round's accuracy swings by 5-15 points with the clients sampled, so a final figure of one round is
#: mostly noise; the mean of the last few rounds is the steadier figure reported beside it.
LAST_ROUNDS = 5


def last_rounds_accuracy(rounds: list) -> float:
    """Mean accuracy of the last :data:`LAST_ROUNDS` rounds after round 0 (fewer when the run is shorter)."""
    trained = rounds[1:] or rounds
    window = trained[-LAST_ROUNDS:]
    return sum(entry["accuracy"] for entry in window) / len(window)


def summarize(results: dict) -> dict:
    """Add ``summary`` to every method of ``results`` (in place) and return ``results``."""
    target = float(results["target_accuracy"])
    methods = results["methods"]
    for data in methods.values():
        rounds = data["rounds"]
        hit = first_reaching(rounds, target)
        data["summary"] = {
            "final_accuracy": rounds[-1]["accuracy"],
            "last_rounds_accuracy": last_rounds_accuracy(rounds),
            "best_accuracy": max(r["accuracy"] for r in rounds),
            "reached_target": hit is not None,
            "rounds_to_target": hit["round"] if hit else None,
            "uplink_to_target_bytes": hit["cumulative_uplink_bytes"] if hit else None,
            "sim_time_to_target_s": hit["sim_time_s"] if hit else None,
            "total_uplink_bytes": rounds[-1]["cumulative_uplink_bytes"],
            "total_sim_time_s": rounds[-1]["sim_time_s"],
            "mean_message_bytes": data.get("mean_message_bytes"),
            "mean_bits_per_param": data.get("mean_bits_per_param"),
            **_client_compute_summary(rounds, hit),
            **_prior_summary(rounds, hit),
        }
    reference = methods.get("fp32", {}).get("summary")
    for data in methods.values():
        summary = data["summary"]
        ratio = reduction = accuracy_gap = None
        if reference is not None:
            accuracy_gap = summary["final_accuracy"] - reference["final_accuracy"]
            if reference["uplink_to_target_bytes"] and summary["uplink_to_target_bytes"]:
                ratio = reference["uplink_to_target_bytes"] / summary["uplink_to_target_bytes"]
            if reference["sim_time_to_target_s"] and summary["sim_time_to_target_s"] is not None:
                reduction = 1.0 - summary["sim_time_to_target_s"] / reference["sim_time_to_target_s"]
        summary["uplink_ratio_vs_fp32"] = ratio
        summary["time_reduction_vs_fp32"] = reduction
        summary["final_accuracy_minus_fp32"] = accuracy_gap
    return results


def validate_results(results: Mapping[str, Any]) -> None:
    """Check the ``results.json`` schema; raise ``ValueError`` describing the first problem."""
    for key in ("config", "target_accuracy", "methods"):
        if key not in results:
            raise ValueError(f"results lacks {key!r}")
    if not results["methods"]:
        raise ValueError("results has no methods")
    for name, data in results["methods"].items():
        rounds = data.get("rounds")
        if not isinstance(rounds, list) or not rounds:
            raise ValueError(f"method {name!r} has no rounds")
        previous_uplink, previous_time = 0, 0.0
        for entry in rounds:
            missing = [f for f in ROUND_FIELDS if f not in entry]
            if missing:
                raise ValueError(f"method {name!r} round entry lacks {missing}")
            if not 0.0 <= entry["accuracy"] <= 1.0:
                raise ValueError(f"method {name!r}: accuracy {entry['accuracy']} out of [0, 1]")
            if entry["cumulative_uplink_bytes"] != previous_uplink + entry["uplink_bytes"]:
                raise ValueError(f"method {name!r}: cumulative uplink does not add up at round {entry['round']}")
            if entry["sim_time_s"] < previous_time:
                raise ValueError(f"method {name!r}: sim_time_s decreases at round {entry['round']}")
            previous_uplink, previous_time = entry["cumulative_uplink_bytes"], entry["sim_time_s"]
        if "summary" not in data:
            raise ValueError(f"method {name!r} has no summary")


def _human_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def _plus_minus(spread: Mapping[str, Any] | None, show) -> str:
    if spread is None:
        return "-"
    return f"{show(spread['mean'])} ± {show(spread['std'])}"


def _single_seed_row(name: str, s: Mapping[str, Any]) -> list[str]:
    ratio, reduction = s.get("uplink_ratio_vs_fp32"), s.get("time_reduction_vs_fp32")
    time_to_target = s.get("sim_time_to_target_s")
    return [
        name,
        f"{s['final_accuracy']:.3f}",
        f"{s['last_rounds_accuracy']:.3f}" if s.get("last_rounds_accuracy") is not None else "-",
        f"{s['mean_message_bytes']:.0f}" if s.get("mean_message_bytes") else "-",
        f"{s['mean_bits_per_param']:.3f}" if s.get("mean_bits_per_param") else "-",
        _human_bytes(s["uplink_to_target_bytes"]) if s["reached_target"] else "not reached",
        f"{ratio:.1f}x" if ratio is not None else "-",
        f"{time_to_target:.1f} s" if time_to_target is not None else "-",
        f"{-100 * reduction:+.0f}%" if reduction is not None else "-",
    ]


def _seeds_row(name: str, s: Mapping[str, Any]) -> list[str]:
    """Mean ± std over the seeds; "to target" over the seeds that reached it (how many, if not all)."""
    spread, seeds, reached = s["spread"], s["seeds"], s["seeds_reaching_target"]
    uplink = "not reached"
    if reached:
        uplink = _plus_minus(spread.get("uplink_to_target_bytes"), _human_bytes)
        uplink += "" if reached == seeds else f" ({reached}/{seeds} seeds)"
    ratio, ratios = s.get("uplink_ratio_vs_fp32"), spread.get("uplink_ratio_vs_fp32")
    reduction, reductions = s.get("time_reduction_vs_fp32"), spread.get("time_reduction_vs_fp32")
    return [
        name,
        str(seeds),
        _plus_minus(spread.get("final_accuracy"), lambda v: f"{v:.3f}"),
        _plus_minus(spread.get("last_rounds_accuracy"), lambda v: f"{v:.3f}"),
        f"{s['mean_message_bytes']:.0f}" if s.get("mean_message_bytes") else "-",
        f"{s['mean_bits_per_param']:.3f}" if s.get("mean_bits_per_param") else "-",
        uplink,
        f"{ratio:.1f}x (min {ratios['min']:.1f}x)" if ratio is not None and ratios else "-",
        _plus_minus(spread.get("sim_time_to_target_s"), lambda v: f"{v:.1f} s") if reached == seeds else "-",
        f"{-100 * reduction:+.0f}% ± {100 * reductions['std']:.0f}" if reduction is not None and reductions else "-",
    ]


def format_table(results: Mapping[str, Any]) -> str:
    """The summary table printed at the end of a run (Markdown, so it pastes into the README).

    A record of several seeds (:func:`aggregate_seeds`) gives each figure as mean ± std with the
    number of seeds; its "vs fp32" is the ratio of the mean uplinks, with the smallest per-seed ratio.
    """
    target = results["target_accuracy"]
    seeded = "seeds" in results
    header = ["method", *(["seeds"] if seeded else []), "final acc", f"last {LAST_ROUNDS} acc", "msg bytes", "bits/param",
              f"uplink to {target:.2f}", "vs fp32", "sim time to target", "time vs fp32"]
    row = _seeds_row if seeded else _single_seed_row
    rows = [row(name, data["summary"]) for name, data in results["methods"].items()]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)


def _plot(results: Mapping[str, Any], out_dir: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    target = results["target_accuracy"]
    config = results["config"]
    sampled = f" ({config['participation']:.0%} per round)" if config.get("participation", 1.0) < 1.0 else ""
    subtitle = (f"{config['task']} / {pathlib.PurePath(str(config['model'])).name}, {config['clients']} clients"
                f"{sampled}, Dirichlet({config['alpha']}), {config['rounds']} rounds")
    if "seeds" in results:
        subtitle += f", mean ± std of {len(results['seeds'])} seeds"
    written = []
    figures = [
        ("accuracy_vs_uplink.png", "cumulative_uplink_bytes", "cumulative uplink (bytes, log scale)", True,
         "Accuracy vs cumulative uplink"),
        ("accuracy_vs_time.png", "sim_time_s", "simulated wall-clock (s)", False,
         "Accuracy vs simulated wall-clock"),
    ]
    for filename, x_field, x_label, log_x, title in figures:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for name, data in results["methods"].items():
            rounds = data["rounds"]
            # Round 0 has zero uplink, which a log axis cannot show: start log plots at round 1.
            shown = rounds[1:] if log_x else rounds
            x = [r[x_field] for r in shown]
            (line,) = ax.plot(x, [r["accuracy"] for r in shown], marker="o", markersize=3,
                              label=name, linewidth=2 if name.startswith("fstq") else 1.3)
            if "accuracy_std" in shown[0]:  # the seed band: mean ± one standard deviation
                ax.fill_between(x, [r["accuracy"] - r["accuracy_std"] for r in shown],
                                [r["accuracy"] + r["accuracy_std"] for r in shown], color=line.get_color(),
                                alpha=0.18, linewidth=0)
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.2f}")
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{title}\n{subtitle}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_outputs(results: dict, out_dir: str | pathlib.Path, *, plots: bool = True) -> list[pathlib.Path]:
    """Write ``results.json``, ``<method>.csv`` per method, ``summary.md`` and the PNG plots.

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "results.json"
    # allow_nan=False: the file must be strict JSON, which NaN/Infinity are not.
    path.write_text(json.dumps(results, indent=2, default=_json_default, allow_nan=False) + "\n")
    written.append(path)
    for name, data in results["methods"].items():
        csv_path = out / f"{name}.csv"
        with csv_path.open("w", newline="") as fh:
            extras = [k for k in dict.fromkeys(k for r in data["rounds"] for k in r) if k not in ROUND_FIELDS]
            writer = csv.DictWriter(fh, fieldnames=[*ROUND_FIELDS, *extras], restval="")
            writer.writeheader()
            for entry in data["rounds"]:
                writer.writerow(entry)
        written.append(csv_path)
    summary_path = out / "summary.md"
    summary_path.write_text(format_table(results) + "\n")
    written.append(summary_path)
    if plots:
        written.extend(_plot(results, out))
    return written


# Settings that may differ between runs whose methods are merged into one comparison ("extra" is
# a field of older records).
# Not settings of the experiment: how it ran, a description derived from settings compared anyway
# (server_optimizer from server_lr and server_momentum), and how its summary chose the target
# (the targets themselves must agree, checked apart).
_MERGE_IGNORED = {"methods", "workers", "threads", "quick", "platform", "extra", "server_optimizer",
                  "target_accuracy", "target_of_fp32",
                  # an output of the causal-LM tasks (generations of the methods the run had), not a setting
                  "sample_generations_last_eval"}


def with_defaults(config: Mapping[str, Any]) -> dict:
    """A run's recorded settings with every setting added to the loop after the run was recorded
    at its default (the run had no other)."""
    from fstqcodec.sim.config import SimConfig

    return {**SimConfig().record(), **config}


def _comparable_settings(config: Mapping[str, Any]) -> dict:
    """A run's settings as merging compares them (:func:`with_defaults`), ignored keys left out."""
    # A run of fixed-rate methods only (fp32, nf4, ...) read no encoder setting, so it merges with
    # runs of any budget; runs that do read them must agree.
    from fstqcodec.sim.methods import ENCODER_SETTINGS

    ignored = _MERGE_IGNORED if _reads_encoder_settings(config) else _MERGE_IGNORED | set(ENCODER_SETTINGS)
    return {k: v for k, v in with_defaults(config).items() if k not in ignored}


def _reads_encoder_settings(config: Mapping[str, Any]) -> bool:
    """Whether some method of a run reads the encoder settings (its budget, block size, Fisher power)."""
    from fstqcodec.sim.methods import FIXED_RATE_METHODS

    return any(name not in FIXED_RATE_METHODS for name in config.get("methods", ()))


def merge_results(runs: list[Mapping[str, Any]]) -> dict:
    """Combine runs of different methods under the same settings into one results record.

    Used when methods were run separately (e.g. a new codec version against stored baselines).
    Per-round accuracies and bytes do not depend on the other methods of a run, so the merge is
    exact; summaries are recomputed against the merged fp32.

    Raises
    ------
    ValueError
        If the runs' settings differ (other than which methods ran), or a method appears twice.
    """
    if not runs:
        raise ValueError("nothing to merge")
    first = runs[0]
    base = _comparable_settings(first["config"])
    merged_methods: dict[str, Any] = {}
    for run in runs:
        config = _comparable_settings(run["config"])
        # A key on one side only (an encoder setting a fixed-rate run does not read) is not a difference.
        differing = sorted(k for k in base.keys() & config.keys() if base[k] != config[k])
        if differing:
            raise ValueError(f"runs differ in settings {differing}; only runs of the same setup merge")
        base = {**config, **base}  # a later run may be the first to read the encoder settings
        if run["target_accuracy"] != first["target_accuracy"]:
            raise ValueError("runs have different target accuracies")
        for name, data in run["methods"].items():
            if name in merged_methods:
                raise ValueError(f"method {name!r} appears in more than one run")
            merged_methods[name] = {k: v for k, v in data.items() if k != "summary"}
    from fstqcodec.sim.methods import ENCODER_SETTINGS

    config = dict(first["config"])
    encoder_run = next((run for run in runs if _reads_encoder_settings(run["config"])), first)
    config.update({key: encoder_run["config"][key] for key in ENCODER_SETTINGS if key in encoder_run["config"]})
    config["methods"] = list(merged_methods)
    config["merged_from"] = len(runs)
    merged = {"config": config, "target_accuracy": first["target_accuracy"],
              "target_rule": first.get("target_rule"), "methods": merged_methods}
    return summarize(merged)


# -- several seeds --------------------------------------------------------------------------------

def _spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and the values themselves."""
    import statistics

    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def _mean_rounds(runs: list[Mapping[str, Any]], name: str) -> list[dict]:
    """Round by round: mean and std of the accuracy, mean bytes and times over the seeds."""
    import statistics

    per_seed = [run["methods"][name]["rounds"] for run in runs]
    if len({len(rounds) for rounds in per_seed}) != 1:
        raise ValueError(f"method {name!r} has a different number of rounds in different seeds")
    out, cumulative = [], 0.0
    for entries in zip(*per_seed):
        accuracy = _spread([e["accuracy"] for e in entries])
        uplink = statistics.fmean(e["uplink_bytes"] for e in entries)
        cumulative += uplink  # summed here, so the record adds up exactly as validate_results checks
        out.append({"round": entries[0]["round"], "accuracy": accuracy["mean"], "accuracy_std": accuracy["std"],
                    "accuracy_min": accuracy["min"], "accuracy_max": accuracy["max"],
                    "uplink_bytes": uplink, "cumulative_uplink_bytes": cumulative,
                    "downlink_bytes": statistics.fmean(e["downlink_bytes"] for e in entries),
                    "sim_time_s": statistics.fmean(e["sim_time_s"] for e in entries)})
    return out


def _seed_summary(runs: list[Mapping[str, Any]], name: str) -> dict:
    """A method's summary over the seeds: each figure's mean (the table's), and its spread."""
    summaries = [run["methods"][name]["summary"] for run in runs]
    reached = [s for s in summaries if s["reached_target"]]
    summary: dict[str, Any] = {"seeds": len(summaries), "seeds_reaching_target": len(reached),
                               "reached_target": len(reached) == len(summaries), "spread": {}}
    for key in ("final_accuracy", "last_rounds_accuracy", "best_accuracy", "total_uplink_bytes", "total_sim_time_s",
                "mean_message_bytes", "mean_bits_per_param", "final_accuracy_minus_fp32",
                "uplink_ratio_vs_fp32", "time_reduction_vs_fp32"):
        values = [s[key] for s in summaries if s.get(key) is not None]
        if len(values) == len(summaries):
            summary["spread"][key] = _spread(values)
        summary[key] = summary["spread"][key]["mean"] if key in summary["spread"] else None
    # "To target" figures are averaged over the seeds that reached it (all of them when
    # reached_target is true; the table says how many otherwise).
    for key in ("rounds_to_target", "uplink_to_target_bytes", "sim_time_to_target_s"):
        values = [s[key] for s in reached]
        summary[key] = _spread(values)["mean"] if values else None
        if values:
            summary["spread"][key] = _spread(values)
    return summary


def aggregate_seeds(runs: list[Mapping[str, Any]]) -> dict:
    """One record of several seeds' runs of the same configuration: means, spreads, and the runs.

    Each run must be summarised against the same target. Per method, ``rounds`` holds the mean
    accuracy (with ``accuracy_std``, ``accuracy_min``, ``accuracy_max``) and mean bytes and times
    per round; ``summary`` holds each figure's mean over the seeds and, under ``spread``, its
    ``mean``, sample ``std``, ``min``, ``max`` and per-seed ``values``. Against fp32,
    ``uplink_ratio_vs_fp32`` is the ratio of the mean uplinks to target (reported only when every
    seed of both reached it; ``spread`` keeps the per-seed ratios) and ``time_reduction_vs_fp32``
    likewise from the mean times.

    Raises
    ------
    ValueError
        If there are no runs, or they differ in target, methods or rounds.
    """
    if not runs:
        raise ValueError("no runs to aggregate")
    first = runs[0]
    if any(run["target_accuracy"] != first["target_accuracy"] for run in runs):
        raise ValueError("the seeds' runs were summarised against different targets")
    if any(list(run["methods"]) != list(first["methods"]) for run in runs):
        raise ValueError("the seeds' runs differ in their methods")
    seeds = [run["config"]["seed"] for run in runs]
    methods = {name: {"rounds": _mean_rounds(runs, name), "summary": _seed_summary(runs, name),
                      "config": data.get("config")} for name, data in first["methods"].items()}
    reference = methods.get("fp32", {}).get("summary")
    for data in methods.values():
        summary = data["summary"]
        summary["uplink_ratio_vs_fp32"] = summary["time_reduction_vs_fp32"] = None
        if reference is None or not (summary["reached_target"] and reference["reached_target"]):
            continue
        if summary["uplink_to_target_bytes"]:
            summary["uplink_ratio_vs_fp32"] = reference["uplink_to_target_bytes"] / summary["uplink_to_target_bytes"]
        if reference["sim_time_to_target_s"]:
            summary["time_reduction_vs_fp32"] = 1.0 - summary["sim_time_to_target_s"] / reference["sim_time_to_target_s"]
    return {"config": {**first["config"], "seed": None, "seeds": seeds}, "seeds": seeds,
            "target_accuracy": first["target_accuracy"], "target_rule": first.get("target_rule"),
            "methods": methods, "wall_time_s": sum(run.get("wall_time_s", 0.0) for run in runs)}
