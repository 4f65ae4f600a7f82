"""``fstq simulate``: options and entry point (called by :mod:`fstqcodec.cli`).

Kept free of torch imports at module level so ``fstq --help`` stays fast and works without the
``sim`` extra; torch, transformers and peft load only when a simulation runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from fstqcodec.sim.methods import DEFAULT_METHODS, METHOD_NAMES, parse_methods

__all__ = ["add_arguments", "run", "config_from_args", "QUICK_SETTINGS"]

#: What ``--quick`` changes (a smoke run of well under a minute of training); options given
#: explicitly on the command line win.
QUICK_SETTINGS = {
    "clients": 4,
    "rounds": 3,
    "local_steps": 1,
    "eval_size": 64,
}

# Defaults of the full run; the parser uses None so that --quick can tell what the user set.
_DEFAULTS = {
    "task": "bbc",
    "model": "all-MiniLM-L6-v2",
    "clients": 10,
    "rounds": 20,
    "fraction": 1.0,
    "local_steps": 2,
    "batch_size": 8,
    "lr": 2e-3,
    "max_length": 64,
    "alpha": 0.5,
    "seed": 0,
    "budget_bpp": 0.3,
    "block_size": 64,
    "fisher_power": 0.5,
    "eval_size": 320,
    "test_fraction": 0.2,
    "lora_rank": 8,
    "uplink_mbps": 1.0,
    "downlink_mbps": 10.0,
    "bandwidth_sigma": 1.0,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ``fstq simulate`` option to ``parser``."""
    d = _DEFAULTS
    parser.add_argument("--out", default="out/simulate", metavar="DIR",
                        help="output directory for results.json, CSVs, plots (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated methods or 'all' (known: {', '.join(METHOD_NAMES)}; "
                             "'qsgd' = qsgd8,qsgd4) (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run of about a minute: " +
                             ", ".join(f"{k.replace('_', '-')}={v}" for k, v in QUICK_SETTINGS.items()))
    parser.add_argument("--task", default=None,
                        help=f"bbc, drugreview, multilingual, hf:<dataset>[:<config>], or a causal-LM QA task: "
                             f"chatterbot-qa, drug-condition (default: {d['task']})")
    parser.add_argument("--model", default=None,
                        help=f"packaged model name, local path or hub id (default: {d['model']}; "
                             "SmolLM2-135M-Instruct for the QA tasks)")
    parser.add_argument("--clients", type=int, default=None, help=f"number of clients (default: {d['clients']})")
    parser.add_argument("--rounds", type=int, default=None, help=f"federated rounds (default: {d['rounds']})")
    parser.add_argument("--fraction", type=float, default=None,
                        help=f"fraction of clients sampled per round (default: {d['fraction']})")
    parser.add_argument("--local-steps", type=int, default=None,
                        help=f"local optimizer steps per round (default: {d['local_steps']})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"local batch size (default: {d['batch_size']})")
    parser.add_argument("--lr", type=float, default=None, help=f"local AdamW learning rate (default: {d['lr']})")
    parser.add_argument("--max-length", type=int, default=None,
                        help=f"tokens per example after truncation (default: {d['max_length']})")
    parser.add_argument("--alpha", type=float, default=None,
                        help=f"Dirichlet concentration over labels; 0.1 is extreme non-IID (default: {d['alpha']})")
    parser.add_argument("--seed", type=int, default=None, help=f"seed for everything (default: {d['seed']})")
    parser.add_argument("--budget-bpp", type=float, default=None,
                        help=f"bits per parameter for fstq, fstq-nofisher and topk (default: {d['budget_bpp']})")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="per-client fstq budgets: each client's uplink bandwidth x this round deadline "
                             "(floored at 2048 bytes) instead of --budget-bpp")
    parser.add_argument("--fisher-power", type=float, default=None,
                        help=f"fstq weighs its error by Fisher ** this; 1 = pure Fisher, 0 = uniform (default: {d['fisher_power']})")
    parser.add_argument("--block-size", type=int, default=None, help=f"fstq block size (default: {d['block_size']})")
    parser.add_argument("--target", type=float, default=None,
                        help="target accuracy for 'to target' figures (default: 0.85 for bbc, else 95%% of fp32's final)")
    parser.add_argument("--eval-size", type=int, default=None,
                        help=f"held-out examples evaluated each round (default: {d['eval_size']})")
    parser.add_argument("--test-fraction", type=float, default=None,
                        help=f"share of the data held out for testing (default: {d['test_fraction']})")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="QA tasks: greedy tokens generated per held-out answer (default: 24 for "
                             "chatterbot-qa, 12 for drug-condition)")
    parser.add_argument("--lora-rank", type=int, default=None, help=f"LoRA rank (default: {d['lora_rank']})")
    parser.add_argument("--uplink-mbps", type=float, default=None,
                        help=f"median client uplink, Mbit/s (log-normal) (default: {d['uplink_mbps']})")
    parser.add_argument("--downlink-mbps", type=float, default=None,
                        help=f"median client downlink, Mbit/s (log-normal) (default: {d['downlink_mbps']})")
    parser.add_argument("--bandwidth-sigma", type=float, default=None,
                        help=f"log-normal sigma of client bandwidths (default: {d['bandwidth_sigma']})")
    parser.add_argument("--step-time-s", type=float, default=None,
                        help="model each local step as this many seconds on the simulated clock instead of "
                             "measuring (repeatable timings on a busy machine; 0.3 is a quiet 2-core CPU)")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="probability that a sampled client drops out of a round (seeded; default 0)")
    parser.add_argument("--uplink-loss", type=float, default=0.0,
                        help="probability that an uplink message is lost in transit (seeded; default 0)")
    parser.add_argument("--uplink-corruption", type=float, default=0.0,
                        help="probability that an uplink message arrives with 8 bits flipped (default 0)")
    parser.add_argument("--round-deadline-s", type=float, default=None,
                        help="the server closes each round after this many simulated seconds; replies that "
                             "would arrive later (stragglers) are discarded, their error feedback kept (default: none)")
    parser.add_argument("--engine", choices=["in-process", "flower"], default="in-process",
                        help="in-process (every method) or flower: the fstq method on Flower's simulation "
                             "engine via `flwr run` of integrations/flower-app (a source checkout)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads in all (default: all cores)")
    parser.add_argument("--workers", type=int, default=None,
                        help="methods run in parallel processes, threads shared among them "
                             "(default: min(methods, 2 x threads); 1 = in this process)")
    parser.add_argument("--text-column", default="text", help="text column of an hf: dataset")
    parser.add_argument("--label-column", default="label", help="label column of an hf: dataset")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    """Build a :class:`fstqcodec.sim.loop.SimConfig` from parsed arguments.

    Raises
    ------
    ValueError
        On an invalid method list or setting.
    """
    from fstqcodec.sim.loop import SimConfig

    from fstqcodec.sim.causal_data import CAUSAL_DEFAULTS, CAUSAL_QUICK_SETTINGS, QA_TASKS

    causal = (args.task or _DEFAULTS["task"]) in QA_TASKS
    quick_settings = CAUSAL_QUICK_SETTINGS if causal else QUICK_SETTINGS
    defaults = {**_DEFAULTS, **CAUSAL_DEFAULTS} if causal else _DEFAULTS

    def pick(name: str, arg_name: str | None = None):
        value = getattr(args, arg_name or name, None)
        if value is not None:
            return value
        if getattr(args, "quick", False) and name in quick_settings:
            return quick_settings[name]
        return defaults[name]

    config = SimConfig(
        task=pick("task"),
        model=pick("model"),
        clients=pick("clients"),
        rounds=pick("rounds"),
        fraction=pick("fraction"),
        local_steps=pick("local_steps"),
        batch_size=pick("batch_size"),
        lr=pick("lr"),
        max_length=pick("max_length"),
        alpha=pick("alpha"),
        seed=pick("seed"),
        budget_bpp=pick("budget_bpp"),
        block_size=pick("block_size"),
        fisher_power=pick("fisher_power"),
        target_accuracy=args.target,
        deadline_s=args.deadline_s,
        step_time_s=args.step_time_s,
        dropout=getattr(args, "dropout", 0.0),
        uplink_loss=getattr(args, "uplink_loss", 0.0),
        uplink_corruption=getattr(args, "uplink_corruption", 0.0),
        round_deadline_s=getattr(args, "round_deadline_s", None),
        test_fraction=pick("test_fraction"),
        eval_size=pick("eval_size"),
        eval_batch_size=pick("eval_batch_size") if causal else 64,
        lora_rank=pick("lora_rank"),
        lora_alpha=2 * pick("lora_rank"),
        median_uplink_mbps=pick("uplink_mbps"),
        median_downlink_mbps=pick("downlink_mbps"),
        bandwidth_sigma=pick("bandwidth_sigma"),
        threads=args.threads,
        text_column=args.text_column,
        label_column=args.label_column,
        methods=tuple(parse_methods(args.methods)),
        quick=bool(args.quick),
        extra=({"max_new_tokens": pick("max_new_tokens")} if causal else {}),
    )
    config.validate()
    if causal:
        from fstqcodec.sim.causal_data import check_qa_config

        check_qa_config(config.task, config.clients)
    return config


def _flower_app_dir():
    """integrations/flower-app of the source checkout this package runs from, if there is one."""
    import pathlib

    import fstqcodec

    candidate = pathlib.Path(fstqcodec.__file__).resolve().parents[1] / "integrations" / "flower-app"
    return candidate if (candidate / "pyproject.toml").is_file() else None


def _run_on_flower(config, out_dir) -> dict:
    """The same experiment on Flower's simulation engine (``flwr run`` of the Flower App)."""
    import dataclasses

    if tuple(config.methods) != ("fstq",):
        raise ValueError("--engine flower runs the fstq method (FstqMod + FstqStrategy); pass --methods fstq")
    app_dir = _flower_app_dir()
    if app_dir is None:
        raise RuntimeError("--engine flower runs integrations/flower-app from a source checkout of fstqcodec; none found")
    sys.path.insert(0, str(app_dir))
    try:
        from fstq_flower_app.engine import run_with_flwr
    finally:
        sys.path.remove(str(app_dir))
    return run_with_flwr(dataclasses.asdict(config), out_dir)


def _check_engine(config, engine: str) -> None:
    """Refuse, before anything starts, an engine that cannot run the task.

    Raises
    ------
    ValueError
        If ``--engine flower`` is asked for a causal-LM QA task: the Flower App's workbench loads
        the classification tasks only.
    """
    from fstqcodec.sim.causal_data import QA_TASKS

    if engine == "flower" and config.task in QA_TASKS:
        raise ValueError(f"--engine flower runs the classification tasks; {config.task!r} (a causal LM) "
                         "runs with --engine in-process")


def run(args: argparse.Namespace) -> int:
    """Run ``fstq simulate`` with parsed arguments; returns the process exit status."""
    try:
        config = config_from_args(args)
        if args.workers is not None and args.workers < 1:
            raise ValueError("workers must be >= 1")
        _check_engine(config, getattr(args, "engine", "in-process"))
    except ValueError as error:
        print(f"fstq simulate: {error}", file=sys.stderr)
        return 2
    if any(name.startswith("fstq") for name in config.methods):
        import fstqcodec

        if not all(hasattr(fstqcodec, attr) for attr in ("encode", "decode", "Budget", "ErrorFeedback")):
            print("fstq simulate: this fstqcodec build has no encoder yet; run baselines only "
                  "(e.g. --methods fp32,nf4)", file=sys.stderr)
            return 2
    # Packaged models and data are local; keep transformers from reaching for the hub for them.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        from fstqcodec.sim.loop import run_simulation
        from fstqcodec.sim.report import format_table, write_outputs
    except ImportError as error:
        print(f"fstq simulate needs the sim extra (torch, transformers, peft, matplotlib, tqdm): {error}",
              file=sys.stderr)
        return 2
    try:
        if getattr(args, "engine", "in-process") == "flower":
            results = _run_on_flower(config, args.out)
        else:
            results = run_simulation(config, progress=not args.no_progress, workers=args.workers)
    except (ValueError, RuntimeError) as error:
        print(f"fstq simulate: {error}", file=sys.stderr)
        return 1
    written = write_outputs(results, args.out, plots=not args.no_plots)
    print()
    print(format_table(results))
    print()
    rule = f" ({results['target_rule']})" if "target_rule" in results else ""
    took = f"run took {results['wall_time_s']:.0f} s; " if "wall_time_s" in results else ""
    print(f"target accuracy {results['target_accuracy']:.2f}{rule}; {took}wrote {len(written)} files to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m fstqcodec.sim.cli``), same options as ``fstq simulate``."""
    parser = argparse.ArgumentParser(prog="fstq simulate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
