"""``fstq simulate``: options and entry point (called by :mod:`fstqcodec.cli`).

Kept free of torch imports at module level so ``fstq --help`` stays fast and works without the
``sim`` extra; torch, transformers and peft load only when a simulation runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from fstqcodec.sim.config import QUICK_SETTINGS, SimConfig
from fstqcodec.sim.methods import METHOD_NAMES, parse_methods

__all__ = ["add_arguments", "run", "config_from_args", "parse_seeds", "QUICK_SETTINGS"]


def _show_default(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _add_config_option(parser: argparse.ArgumentParser, spec: dataclasses.Field) -> None:
    """One ``SimConfig`` field as an option; ``None`` default so ``--quick`` can tell what was given."""
    meta = spec.metadata
    flags = [meta["flag"] or "--" + spec.name.replace("_", "-"), *meta["aliases"]]
    help_text = meta["help"]
    if spec.name == "methods":
        help_text += f" (known: {', '.join(METHOD_NAMES)})"
    if spec.default is not None and not isinstance(spec.default, bool):
        help_text += f" (default: {_show_default(spec.default)})"
    options = {"dest": spec.name, "default": None, "help": help_text.replace("%", "%%")}
    if isinstance(spec.default, bool):
        options["action"] = "store_true"
    else:
        options["metavar"] = meta["metavar"] or flags[0].lstrip("-").upper().replace("-", "_")
        # --methods stays text here: parse_methods' errors become one clean line in run().
        options["type"] = str if spec.name == "methods" else meta["type"] or type(spec.default)
    parser.add_argument(*flags, **options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ``fstq simulate`` option to ``parser``: one per :class:`SimConfig` field, and the run's."""
    parser.add_argument("--out", default="out/simulate", metavar="DIR",
                        help="output directory for results.json, CSVs, plots (default: %(default)s)")
    for spec in dataclasses.fields(SimConfig):
        if spec.metadata.get("cli", False):
            _add_config_option(parser, spec)
    parser.add_argument("--seeds", default=None, metavar="LIST",
                        help="run the configuration once per seed (comma-separated, e.g. 0,1,2) and report "
                             "mean ± std; each seed's own record goes to DIR/seed-<n> (default: --seed alone)")
    parser.add_argument("--engine", choices=["in-process", "flower"], default="in-process",
                        help="in-process (every method) or flower: the fstq method on Flower's simulation "
                             "engine via `flwr run` of integrations/flower-app (a source checkout)")
    parser.add_argument("--workers", type=int, default=None,
                        help="methods run in parallel processes, threads shared among them "
                             "(default: min(methods, 2 x threads); 1 = in this process)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Build a :class:`SimConfig` from parsed arguments: given options, then ``--quick``'s, then defaults.

    Raises
    ------
    ValueError
        On an invalid method list or setting.
    """
    from fstqcodec.sim.causal_data import CAUSAL_DEFAULTS, CAUSAL_QUICK_SETTINGS, QA_TASKS, check_qa_config

    values = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(SimConfig)
              if getattr(args, spec.name, None) is not None}
    causal = values.get("task") in QA_TASKS
    if values.get("quick"):
        for name, value in (CAUSAL_QUICK_SETTINGS if causal else QUICK_SETTINGS).items():
            values.setdefault(name, value)
    if causal:  # a causal LM's own defaults where the classifier's would not fit
        for name, value in CAUSAL_DEFAULTS.items():
            values.setdefault(name, value)
    if "methods" in values:
        values["methods"] = tuple(parse_methods(values["methods"]))
    config = SimConfig(**values)
    config.validate()
    if causal:
        check_qa_config(config.task, config.clients)
    return config


def _check_engine(config: SimConfig, engine: str) -> None:
    """Refuse, before anything starts, an engine that cannot run the task.

    Raises
    ------
    ValueError
        If ``--engine flower`` is asked for a method other than fstq, token selection
        (``--token-keep``) or a server optimizer (``--server-lr``, ``--server-momentum``), which
        run in-process only. (The causal-LM QA tasks run on either engine.)
    """
    if engine == "flower" and tuple(config.methods) != ("fstq",):
        raise ValueError("--engine flower runs the fstq method (FstqMod + FstqStrategy); pass --methods fstq")
    if engine == "flower" and (config.server_lr != 1.0 or config.server_momentum != 0.0):
        raise ValueError("--engine flower aggregates with FedAvg; --server-lr and --server-momentum run "
                         "with --engine in-process")

    if engine == "flower" and config.token_keep is not None:
        raise ValueError("--token-keep runs with --engine in-process (the Flower App trains full sequences)")


def parse_seeds(text: str | None) -> list[int] | None:
    """Parse ``--seeds``: distinct integers >= 0, comma-separated.

    Raises
    ------
    ValueError
        On anything else.
    """
    if text is None:
        return None
    try:
        seeds = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds takes distinct integers >= 0, got {text!r}")
    return seeds


def _run_on_flower(config: SimConfig, out_dir) -> dict:
    """The same experiment on Flower's simulation engine (``flwr run`` of the Flower App)."""
    from fstqcodec.sim.flower_engine import run_with_flwr

    return run_with_flwr(config, out_dir)


def _simulate(config: SimConfig, args: argparse.Namespace, seeds: list[int] | None) -> tuple[dict, list[dict]]:
    """The run's results record, and each seed's when there are several."""
    from fstqcodec.sim.loop import run_seeds, run_simulation

    if getattr(args, "engine", "in-process") == "flower":
        return _run_on_flower(config, args.out), []
    if seeds is None:
        return run_simulation(config, progress=not args.no_progress, workers=args.workers), []
    return run_seeds(config, seeds, progress=not args.no_progress, workers=args.workers)


def run(args: argparse.Namespace) -> int:
    """Run ``fstq simulate`` with parsed arguments; returns the process exit status."""
    try:
        config = config_from_args(args)
        seeds = parse_seeds(getattr(args, "seeds", None))
        if seeds is not None and getattr(args, "seed", None) is not None:
            raise ValueError("give --seed or --seeds, not both")
        if seeds is not None and getattr(args, "engine", "in-process") == "flower":
            raise ValueError("--engine flower runs one seed; use --seed")
        if args.workers is not None and args.workers < 1:
            raise ValueError("workers must be >= 1")
        _check_engine(config, getattr(args, "engine", "in-process"))
    except ValueError as error:
        print(f"fstq simulate: {error}", file=sys.stderr)
        return 2
    # Packaged models and data are local; keep transformers from reaching for the hub for them.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        from fstqcodec.sim.report import format_table, write_outputs
    except ImportError as error:
        print(f"fstq simulate needs the sim extra (torch, transformers, peft, matplotlib, tqdm): {error}",
              file=sys.stderr)
        return 2
    try:
        results, per_seed = _simulate(config, args, seeds)
    except (ValueError, RuntimeError) as error:
        print(f"fstq simulate: {error}", file=sys.stderr)
        return 1
    written = write_outputs(results, args.out, plots=not args.no_plots)
    for run_record in per_seed:
        written += write_outputs(run_record, os.path.join(args.out, f"seed-{run_record['config']['seed']}"),
                                 plots=not args.no_plots)
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
