"""The ``fstq`` command's parser and entry point: every user error is one line, exit status 2."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys

from .. import __version__
from ..errors import FstqError
from ..policy.fisher import check_fisher_power
from . import commands
from .errors import UsageError

__all__ = ["main", "build_parser", "SIM_MODULES"]

#: What ``fstq simulate`` imports beyond the core, and the extra that installs it (tqdm only for the
#: progress bar, matplotlib only for the plots).
SIM_MODULES = {"torch": "sim", "transformers": "sim", "peft": "sim", "tqdm": "sim", "matplotlib": "sim"}

_NPZ_BFLOAT16_HELP = ("bfloat16 tensors keep their 16 bits: BF16 in .safetensors; in .npz a uint16 array of "
                      "structured dtype [('bfloat16', '<u2')] holding the raw bits (numpy has no bfloat16)")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line, ``fstq <command>: <what is wrong>`` (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _number_type(kind, test, requirement: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _fisher_power(text: str) -> float:
    try:
        return check_fisher_power(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}") from None


_positive = _number_type(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
_positive_int = _number_type(int, lambda v: v > 0, "a positive integer")
_ratio = _number_type(float, lambda v: math.isfinite(v) and v >= 1, "a number >= 1 (raw size / message size)")
_block_size = _number_type(int, lambda v: 1 <= v <= 65536, "an integer from 1 to 65536")
_seed = _number_type(int, lambda v: v >= 0, "an integer >= 0")


def _add_encode_parser(commands_) -> None:
    p = commands_.add_parser(
        "encode", help="encode tensors from .npz or .safetensors",
        description="Encode the tensors of a .npz or .safetensors file into an fstq message. " + _NPZ_BFLOAT16_HELP + ".",
    )
    p.add_argument("input", help="tensors to encode (.npz or .safetensors; float16, bfloat16, float32, float64)")
    p.add_argument("-o", "--output", required=True, help="where to write the message")
    p.add_argument("--fisher", metavar="FILE",
                   help="importance weights with the same names and shapes (.npz or .safetensors); needs a budget")
    p.add_argument("--fisher-power", type=_fisher_power, metavar="P",
                   help="weigh the error by Fisher ** P (default 1, the Fisher-weighted error; the federated "
                        "entry points use 0.5); needs --fisher")
    modes = p.add_argument_group("budget or fixed-rate mode (default: lossless)").add_mutually_exclusive_group()
    modes.add_argument("--bits-per-param", type=_positive, metavar="BITS",
                       help="size limit in bits per tensor element, every byte counted")
    modes.add_argument("--max-bytes", type=_positive_int, metavar="BYTES", help="size limit of the whole message")
    modes.add_argument("--ratio", type=_ratio,
                       help="compression ratio against the raw tensors at their own dtypes, at least 1 "
                            "(below 1 the 'limit' would exceed the raw size: use no budget for lossless)")
    modes.add_argument("--bits", type=int, choices=range(2, 9), help="fixed-rate: uniform grid of this width, absmax scales")
    modes.add_argument("--codebook", choices=["nf4"], help="fixed-rate with a built-in codebook")
    p.add_argument("--block-size", type=_block_size, default=64, help="elements per block (default 64)")
    p.add_argument("--rounding", choices=["nearest", "stochastic"], default="nearest", help="(default nearest)")
    p.add_argument("--unbiased", action="store_true",
                   help="budget mode: an unbiased estimate (blocks sent with Fisher-chosen probabilities, "
                        "scaled by their inverse, stochastic rounding), for averaging without error feedback")
    p.add_argument("--seed", type=_seed, default=0, help="seed of stochastic rounding and --unbiased (default 0)")
    p.add_argument("--nonfinite", choices=["error", "zero"], default="error",
                   help="NaN and inf: refuse them, or send them as 0 (default error)")
    p.set_defaults(handler=commands.cmd_encode)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fstq`` command."""
    parser = _Parser(prog="fstq", description="Fisher-guided compression of federated fine-tuning updates (fstqcodec).")
    parser.add_argument("--version", action="version", version=f"fstqcodec {__version__}")
    commands_ = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = commands_.add_parser("inspect", help="describe a message without decoding its codes",
                             description="Describe an fstq message: version, sizes, tensors, bit-widths "
                                         "(0 = dropped block, 1-8 quantized, 16/32/64 raw), sections.")
    p.add_argument("file", help="an fstq message")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(handler=commands.cmd_inspect)

    _add_encode_parser(commands_)

    p = commands_.add_parser("decode", help="decode a message to .npz or .safetensors",
                             description="Decode an fstq message into a .npz or .safetensors file with the names, "
                                         "shapes and dtypes it declares. " + _NPZ_BFLOAT16_HELP + ".")
    p.add_argument("input", help="an fstq message")
    p.add_argument("-o", "--output", required=True, help="the .npz or .safetensors file to write")
    p.set_defaults(handler=commands.cmd_decode)

    p = commands_.add_parser("demo", help="encode, inspect and decode a built-in LoRA-shaped update",
                             description=commands.cmd_demo.__doc__)
    p.add_argument("--seed", type=_seed, default=0)
    p.set_defaults(handler=commands.cmd_demo)

    p = commands_.add_parser(
        "simulate", help="the reference federated loop: compare uplink compression methods end to end",
        description="Federated LoRA fine-tuning with each uplink compression method; writes results.json, CSVs and plots.",
    )
    try:
        from ..sim.cli import add_arguments  # numpy only: the sim's heavy imports wait for a run
    except ImportError:
        p.add_argument("sim_options", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    else:
        add_arguments(p)
    p.set_defaults(handler=_run_simulate)

    from ..prune_cli import add_arguments as add_prune_arguments, run as run_prune  # argparse only at import

    p = commands_.add_parser(
        "prune", help="accuracy and speed of a classifier with its lowest-prior tokens dropped",
        description="Drop the lowest-prior input tokens of a transformers classifier and report accuracy and "
                    "end-to-end speed against the unpruned model.",
    )
    add_prune_arguments(p)
    p.set_defaults(handler=run_prune)
    return parser


def _missing_extra(modules: dict) -> str | None:
    """A one-line hint naming the first missing module and the extra that installs it, or None."""
    for module, extra in modules.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return (f"needs the {extra!r} extra, which is not installed (no module {module!r}); "
                    f"in the source checkout: pip install '.[{extra}]'")
    return None


def _run_simulate(args) -> int:
    """Check the sim extra before handing over, so a core-only install gets a line, not a traceback."""
    needed = dict(SIM_MODULES)
    if getattr(args, "no_progress", False):
        del needed["tqdm"]
    if getattr(args, "no_plots", False):
        del needed["matplotlib"]
    if getattr(args, "engine", None) == "flower":
        needed["flwr"] = "flower"
    hint = _missing_extra(needed)
    if hint:
        raise UsageError(hint)
    from ..sim.cli import run

    try:
        return run(args)
    except ModuleNotFoundError as error:  # a module the list above does not name (pyyaml for one task)
        raise UsageError(f"a module it needs is not installed ({error}); "
                         "in the source checkout: pip install '.[sim]'") from None


def _os_error_line(error: OSError) -> str:
    if error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    return str(error)


def main(argv=None) -> int:
    """Entry point of the ``fstq`` command.

    Returns
    -------
    int
        0 on success; 2 for any mistake in the options or the files given (one line on stderr,
        ``fstq <command>: ...``); 130 when interrupted.

    Raises
    ------
    SystemExit
        From argparse: ``--help`` and ``--version`` (status 0), a malformed option (status 2, one line).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        print("fstq: choose a command (inspect, encode, decode, demo, simulate); fstq --help says more", file=sys.stderr)
        return 2
    prog = f"fstq {args.command}"
    try:
        status = int(args.handler(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at exit
        return status
    except BrokenPipeError:
        return _reader_went_away()
    except (UsageError, FstqError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
    except OSError as error:
        print(f"{prog}: {_os_error_line(error)}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 2


def _reader_went_away() -> int:
    """``fstq demo | head -n 1``: the reader has what it wanted; stop quietly, as Unix tools do.

    Files are written before anything is printed, so nothing is left half-done. stdout is pointed
    at /dev/null so that Python's own flush at exit does not raise a second BrokenPipeError.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0
