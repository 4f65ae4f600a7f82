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
                      "mean_bits_per_param"},
          "message_anatomy": {"<part>": mean bytes per message},   # e.g. header, scales, codes
          "faults": [...], "dropped_messages": [...],               # what went wrong, per round
          ...
        }
      }
    }

``uplink_bytes`` is the sum over the round's participants of ``len(message)``; ``sim_time_s`` and
``cumulative_uplink_bytes`` are cumulative. "To target" values are taken at the first round whose
accuracy reaches the target, ``null`` when it is never reached.
"""

from __future__ import annotations

import csv
import json
import pathlib
from collections.abc import Mapping
from typing import Any

__all__ = ["ROUND_FIELDS", "summarize", "write_outputs", "format_table", "validate_results", "merge_results"]

ROUND_FIELDS = ("round", "accuracy", "uplink_bytes", "cumulative_uplink_bytes", "downlink_bytes", "sim_time_s")


def _first_reaching(rounds: list[Mapping[str, Any]], target: float) -> Mapping[str, Any] | None:
    for entry in rounds:
        # A small tolerance so 0.85 counts as reaching 0.85 despite float rounding of n/N.
        if entry["accuracy"] >= target - 1e-9:
            return entry
    return None


def summarize(results: dict) -> dict:
    """Add ``summary`` to every method of ``results`` (in place) and return ``results``."""
    target = float(results["target_accuracy"])
    methods = results["methods"]
    for data in methods.values():
        rounds = data["rounds"]
        hit = _first_reaching(rounds, target)
        data["summary"] = {
            "final_accuracy": rounds[-1]["accuracy"],
            "best_accuracy": max(r["accuracy"] for r in rounds),
            "reached_target": hit is not None,
            "rounds_to_target": hit["round"] if hit else None,
            "uplink_to_target_bytes": hit["cumulative_uplink_bytes"] if hit else None,
            "sim_time_to_target_s": hit["sim_time_s"] if hit else None,
            "total_uplink_bytes": rounds[-1]["cumulative_uplink_bytes"],
            "total_sim_time_s": rounds[-1]["sim_time_s"],
            "mean_message_bytes": data.get("mean_message_bytes"),
            "mean_bits_per_param": data.get("mean_bits_per_param"),
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


def format_table(results: Mapping[str, Any]) -> str:
    """The summary table printed at the end of a run (Markdown, so it pastes into the README)."""
    target = results["target_accuracy"]
    header = ["method", "final acc", "msg bytes", "bits/param", f"uplink to {target:.2f}", "vs fp32",
              "sim time to target", "time vs fp32"]
    rows = []
    for name, data in results["methods"].items():
        s = data["summary"]
        ratio = s.get("uplink_ratio_vs_fp32")
        reduction = s.get("time_reduction_vs_fp32")
        time_to_target = s.get("sim_time_to_target_s")
        rows.append([
            name,
            f"{s['final_accuracy']:.3f}",
            f"{s['mean_message_bytes']:.0f}" if s.get("mean_message_bytes") else "-",
            f"{s['mean_bits_per_param']:.3f}" if s.get("mean_bits_per_param") else "-",
            _human_bytes(s["uplink_to_target_bytes"]) if s["reached_target"] else "not reached",
            f"{ratio:.1f}x" if ratio is not None else "-",
            f"{time_to_target:.1f} s" if time_to_target is not None else "-",
            f"{-100 * reduction:+.0f}%" if reduction is not None else "-",
        ])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


def _plot(results: Mapping[str, Any], out_dir: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    target = results["target_accuracy"]
    config = results["config"]
    subtitle = (f"{config['task']} / {pathlib.PurePath(str(config['model'])).name}, {config['clients']} clients, "
                f"Dirichlet({config['alpha']}), {config['rounds']} rounds")
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
            ax.plot([r[x_field] for r in shown], [r["accuracy"] for r in shown], marker="o", markersize=3,
                    label=name, linewidth=2 if name.startswith("fstq") else 1.3)
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




# Settings that may differ between runs whose methods are merged into one comparison.
_MERGE_IGNORED = {"methods", "workers", "threads", "quick", "platform", "extra"}


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
    base = {k: v for k, v in first["config"].items() if k not in _MERGE_IGNORED}
    merged_methods: dict[str, Any] = {}
    for run in runs:
        config = {k: v for k, v in run["config"].items() if k not in _MERGE_IGNORED}
        differing = sorted(k for k in set(base) | set(config) if base.get(k) != config.get(k))
        if differing:
            raise ValueError(f"runs differ in settings {differing}; only runs of the same setup merge")
        if run["target_accuracy"] != first["target_accuracy"]:
            raise ValueError("runs have different target accuracies")
        for name, data in run["methods"].items():
            if name in merged_methods:
                raise ValueError(f"method {name!r} appears in more than one run")
            merged_methods[name] = {k: v for k, v in data.items() if k != "summary"}
    config = dict(first["config"])
    config["methods"] = list(merged_methods)
    config["merged_from"] = len(runs)
    merged = {"config": config, "target_accuracy": first["target_accuracy"],
              "target_rule": first.get("target_rule"), "methods": merged_methods}
    return summarize(merged)
