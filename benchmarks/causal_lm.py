"""A generative LM in the loop: the README's table for the causal-LM QA tasks of `fstq simulate`.

Runs (with ``--run``) or reads the records of one `fstq simulate` run per task, then prints, per
task and method: ROUGE-L F1 of the untuned model (round 0: a fresh LoRA adapter has B = 0, so the
model is the base model) and after the last round, exact match, the cumulative uplink to reach the
target (95% of fp32's final ROUGE-L) and its ratio to fp32's, and the anatomy of a mean message
(header, block table, scales, codes) with the bits per parameter it spends.

    HF_HUB_OFFLINE=1 python benchmarks/causal_lm.py            # print from the committed records
    HF_HUB_OFFLINE=1 python benchmarks/causal_lm.py --run --only drug-condition   # rerun one (15-30 min)
    HF_HUB_OFFLINE=1 python benchmarks/causal_lm.py --engines [--run]   # fstq on both engines, per round
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import subprocess
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "simulate_results"
#: The runs the README reports (record directory -> options): small enough for a busy 2-core CPU
#: (2 clients, 4 rounds of 2-4 local steps of 4 examples), with a modelled clock of 5 s per step.
_COMMON = ["--methods", "fp32,fstq", "--step-time-s", "5"]
RUNS = {
    "drug-condition": ["--task", "drug-condition", "--lr", "2e-3", *_COMMON],  # the whole held-out split
    "drug-condition-eval32": ["--task", "drug-condition", "--lr", "2e-3", "--eval-size", "32", *_COMMON],
    "chatterbot-qa": ["--task", "chatterbot-qa", "--lr", "2e-3", "--eval-size", "32", *_COMMON],
    "chatterbot-qa-steps4": ["--task", "chatterbot-qa", "--lr", "3e-3", "--local-steps", "4", "--eval-size", "32",
                             *_COMMON],
    # drug-condition's settings with fstq's variants under the current encoder (one seed); no fp32
    # in this record: the target is the drug-condition record's (95% of its fp32's final ROUGE-L).
    "drug-condition-methods": ["--task", "drug-condition", "--lr", "2e-3", "--step-time-s", "5", "--threads", "2",
                               "--methods", "fstq-nofisher,fstq,fstq-unbiased", "--target", "0.31"],
}


#: The same fstq run on both engines (``--engines``): drug-condition, 2 rounds, 32 held-out pairs,
#: one torch thread (the Flower App's ClientApp and ServerApp use one each).
_ENGINE_COMMON = ["--task", "drug-condition", "--methods", "fstq", "--rounds", "2", "--eval-size", "32",
                  "--lr", "2e-3", "--step-time-s", "5", "--threads", "1", "--no-plots"]
ENGINE_RUNS = {
    "drug-condition-engines/in-process": [*_ENGINE_COMMON, "--workers", "1"],
    "drug-condition-engines/flower": [*_ENGINE_COMMON, "--engine", "flower"],
}


def _run(task: str, out: pathlib.Path) -> None:
    command = [sys.executable, "-m", "fstqcodec.sim.cli", "--out", str(out), "--no-progress",
               *{**RUNS, **ENGINE_RUNS}[task]]
    print(f"== {shlex.join(command)}", flush=True)
    if subprocess.call(command) != 0:
        raise SystemExit(f"{task}: fstq simulate failed")


def _kib(value) -> str:
    return "-" if value is None else f"{value / 1024:,.1f} KiB"


def table(task: str, results: dict) -> list[str]:
    """Markdown lines for one task's record."""
    config = results["config"]
    n_params = config["trainable_parameters"]
    lines = [
        f"### {task}: {n_params:,} LoRA parameters, {config['clients']} clients x {config['rounds']} rounds x "
        f"{config['local_steps']} steps of {config['batch_size']}, {config['eval_examples']} held-out pairs, "
        f"target ROUGE-L {results['target_accuracy']:.2f}",
        "",
        "| method | ROUGE-L untuned | ROUGE-L final | exact match final | uplink to target | vs fp32 "
        "| bits/param | header | block table | scales | codes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, data in results["methods"].items():
        rounds, summary, parts = data["rounds"], data["summary"], data["message_anatomy"]
        ratio = summary.get("uplink_ratio_vs_fp32")
        total = sum(parts.values())
        header = parts.get("header", 0) + parts.get("framing", 0)

        def share(part: str) -> str:
            return f"{parts[part] / total:.1%}" if part in parts else "-"

        lines.append(
            f"| {name} | {rounds[0]['rouge_l']:.3f} | {rounds[-1]['rouge_l']:.3f} | {rounds[-1]['exact_match']:.3f} "
            f"| {_kib(summary['uplink_to_target_bytes'])} | {'-' if ratio is None else f'{ratio:.1f}x'} "
            f"| {8 * total / n_params:.3f} | {header / total:.2%} | {share('blocks')} | {share('scales')} "
            f"| {share('codes') if 'codes' in parts else share('payload')} |"
        )
    return lines


def engines_table(in_process: dict, flower: dict) -> list[str]:
    """Markdown lines comparing the same fstq run on the in-process and the Flower engine, per round.

    Uplink: the in-process loop counts ``len(message)``; Flower counts ``count_bytes()`` of each
    reply, the message plus its 4-byte array name.
    """
    lines = [
        "| round | ROUGE-L in-process | ROUGE-L Flower | exact match in-process | exact match Flower "
        "| uplink in-process | uplink Flower | difference |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mine, theirs in zip(in_process["methods"]["fstq"]["rounds"], flower["methods"]["fstq"]["rounds"]):
        lines.append(
            f"| {mine['round']} | {mine['rouge_l']:.4f} | {theirs['rouge_l']:.4f} | {mine['exact_match']:.4f} "
            f"| {theirs['exact_match']:.4f} | {mine['uplink_bytes']:,} | {theirs['uplink_bytes']:,} "
            f"| {theirs['uplink_bytes'] - mine['uplink_bytes']:+,} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run fstq simulate for each record first")
    parser.add_argument("--only", default="", help=f"comma list of: {', '.join(RUNS)}")
    parser.add_argument("--results", default=str(RESULTS), help="directory holding <task>/results.json")
    parser.add_argument("--engines", action="store_true",
                        help="instead: the same fstq run on the in-process and the Flower engine, round by round")
    args = parser.parse_args()
    root = pathlib.Path(args.results)
    if args.engines:
        for name in ENGINE_RUNS if args.run else ():
            _run(name, root / name)
        records = [json.loads((root / name / "results.json").read_text()) for name in ENGINE_RUNS]
        print("\n".join(engines_table(*records)))
        return 0
    lines: list[str] = []
    names = [n for n in args.only.split(",") if n] or list(RUNS)
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    for task in names:
        if args.run:
            _run(task, root / task)
        path = root / task / "results.json"
        if not path.exists():
            print(f"{task}: no record at {path}; run with --run", file=sys.stderr)
            continue
        lines += [*table(task, json.loads(path.read_text())), ""]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
