"""The ``fstq`` command: inspect, encode, decode, demo, and the reference federated loop (simulate)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from . import __version__
from .codec import decode, encode, inspect
from .errors import FstqError
from .policy.budget import Budget

__all__ = ["main"]


def _atomic_write(path: str, write) -> None:
    """Write through a temporary file in the same directory, then rename: no half-written files."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    handle, temporary = tempfile.mkstemp(prefix=".fstq-", dir=directory)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _load_tensors(path: str) -> dict:
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise SystemExit("fstq: reading .safetensors needs the safetensors package (pip install safetensors)") from None
        return load_file(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    raise SystemExit(f"fstq: {path}: expected a .npz or .safetensors file")


def _budget_from(args) -> Budget | None:
    given = [(k, v) for k, v in (("bits_per_param", args.bits_per_param), ("max_bytes", args.max_bytes), ("ratio", args.ratio)) if v is not None]
    if len(given) > 1:
        raise SystemExit("fstq: give at most one of --bits-per-param, --max-bytes, --ratio")
    return Budget(**dict(given)) if given else None


def _format_size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def _print_inspection(info: dict, stream) -> None:
    print(f"fstq message, format version {info['version']}", file=stream)
    bpe = info["bits_per_element"]
    print(
        f"  size        {info['size']} bytes ({_format_size(info['size'])})"
        + (f", {bpe:.4g} bits per element" if bpe is not None else ""),
        file=stream,
    )
    print(f"  header      {info['header_size']} bytes ({info['header_encoding']}), framing {info['framing_size']} bytes", file=stream)
    print(f"  tensors     {len(info['tensors'])}, {info['elements']} elements", file=stream)
    for tensor in info["tensors"][:20]:
        shape = "x".join(str(d) for d in tensor["shape"]) or "scalar"
        print(f"    {tensor['name']:<40} {tensor['dtype']:<9} {shape:<16} {tensor['blocks']} blocks of {tensor['block_size']}", file=stream)
    if len(info["tensors"]) > 20:
        print(f"    ... and {len(info['tensors']) - 20} more", file=stream)
    histogram = ", ".join(
        f"{'dropped' if width == 0 else str(width) + ' bit'}: {count}" for width, count in info["width_histogram"].items()
    )
    print(f"  blocks      {histogram or 'none'}", file=stream)
    print("  sections", file=stream)
    names = ["blocks", "scales"] + [f"codes ({c[0]}{'' if c[0] in ('zero',) else ' ' + str(c[1])})" for c in info["contexts"]]
    for name, section in zip(names, info["sections"]):
        encoded = f" zstd -> {section['decoded']}" if section["encoding"] == "zstd" else ""
        print(f"    {name:<20} {section['stored']:>10} bytes{encoded}", file=stream)
    if info["meta"]:
        print(f"  meta        {info['meta']}", file=stream)


def _cmd_inspect(args) -> int:
    with open(args.file, "rb") as stream:
        data = stream.read()
    info = inspect(data)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_inspection(info, sys.stdout)
    return 0


def _cmd_encode(args) -> int:
    tensors = _load_tensors(args.input)
    fisher = _load_tensors(args.fisher) if args.fisher else None
    budget = _budget_from(args)
    options = {"block_size": args.block_size, "seed": args.seed, "rounding": args.rounding}
    if args.bits is not None:
        options["bits"] = args.bits
    if args.codebook is not None:
        options["codebook"] = args.codebook
    message = encode(tensors, fisher=fisher, budget=budget, **options)
    _atomic_write(args.output, lambda stream: stream.write(message))
    raw = sum(np.asarray(t).nbytes for t in tensors.values())
    print(f"{args.input} -> {args.output}: {len(message)} bytes ({raw / max(len(message), 1):.1f}x smaller than {raw} raw)")
    return 0


def _cmd_decode(args) -> int:
    if not args.output.endswith(".npz"):
        raise SystemExit("fstq: the output must be a .npz file")
    with open(args.input, "rb") as stream:
        data = stream.read()
    tensors = decode(data)
    _atomic_write(args.output, lambda stream: np.savez(stream, **tensors))
    print(f"{args.input} -> {args.output}: {len(tensors)} tensors")
    return 0


def _cmd_demo(args) -> int:
    """Encode a built-in LoRA-shaped update at several budgets; inspect and decode each."""
    rng = np.random.default_rng(args.seed)
    tensors, fisher = {}, {}
    for layer in range(4):
        for module in ("query", "value"):
            a = (rng.standard_normal((8, 384)) * 0.01).astype(np.float32)
            b = (rng.standard_normal((384, 8)) * 0.002 * (1 + layer)).astype(np.float32)
            tensors[f"layer.{layer}.{module}.lora_A"] = a
            tensors[f"layer.{layer}.{module}.lora_B"] = b
            fisher[f"layer.{layer}.{module}.lora_A"] = np.abs(rng.standard_normal(a.shape)).astype(np.float32) * (layer + 1)
            fisher[f"layer.{layer}.{module}.lora_B"] = np.abs(rng.standard_normal(b.shape)).astype(np.float32) * (layer + 1)
    elements = sum(t.size for t in tensors.values())
    raw = sum(t.nbytes for t in tensors.values())
    print(f"A LoRA-shaped update: {len(tensors)} tensors, {elements} parameters, {raw} bytes as float32.\n")
    lossless = encode(tensors)
    assert all(np.array_equal(decode(lossless)[k], v) for k, v in tensors.items())
    print(f"lossless: {len(lossless)} bytes, decodes bit-exactly")
    print(f"\n{'budget':>18} {'bytes':>8} {'ratio':>7} {'weighted SNR':>13}")
    for bpp in (4, 2, 1, 0.5, 0.25):
        message = encode(tensors, fisher=fisher, budget=Budget(bits_per_param=bpp))
        decoded = decode(message)
        signal = sum(float(np.sum(fisher[k] * tensors[k].astype(np.float64) ** 2)) for k in tensors)
        error = sum(float(np.sum(fisher[k] * (tensors[k].astype(np.float64) - decoded[k]) ** 2)) for k in tensors)
        snr = 10 * np.log10(signal / error) if error > 0 else float("inf")
        print(f"{str(bpp) + ' bits/param':>18} {len(message):>8} {raw / len(message):>6.1f}x {snr:>10.2f} dB")
    print("\nfstq inspect of the 1 bit/param message:\n")
    _print_inspection(inspect(encode(tensors, fisher=fisher, budget=Budget(bits_per_param=1))), sys.stdout)
    return 0


def _add_budget_options(parser) -> None:
    group = parser.add_argument_group("budget (default: lossless)")
    group.add_argument("--bits-per-param", type=float, help="size limit in bits per tensor element, every byte counted")
    group.add_argument("--max-bytes", type=int, help="size limit of the whole message in bytes")
    group.add_argument("--ratio", type=float, help="compression ratio against the raw tensors")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fstq`` command."""
    parser = argparse.ArgumentParser(
        prog="fstq",
        description="Fisher-guided compression of federated fine-tuning updates (fstqcodec).",
    )
    parser.add_argument("--version", action="version", version=f"fstqcodec {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = commands.add_parser("inspect", help="describe a message without decoding its codes", description="Describe an fstq message: version, sizes, tensors, bit-widths, sections.")
    p.add_argument("file", help="an fstq message")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(handler=_cmd_inspect)

    p = commands.add_parser("encode", help="encode tensors from .npz or .safetensors", description="Encode the tensors of a .npz or .safetensors file into an fstq message.")
    p.add_argument("input", help="tensors to encode (.npz or .safetensors)")
    p.add_argument("-o", "--output", required=True, help="where to write the message")
    p.add_argument("--fisher", help="importance weights with the same names and shapes (.npz or .safetensors)")
    _add_budget_options(p)
    p.add_argument("--bits", type=int, choices=range(2, 9), help="fixed-rate mode: uniform grid of this width, absmax scales")
    p.add_argument("--codebook", choices=["nf4"], help="fixed-rate mode with a built-in codebook")
    p.add_argument("--block-size", type=int, default=64, help="elements per block (default 64)")
    p.add_argument("--rounding", choices=["nearest", "stochastic"], default="nearest")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_encode)

    p = commands.add_parser("decode", help="decode a message to .npz", description="Decode an fstq message into a .npz file.")
    p.add_argument("input", help="an fstq message")
    p.add_argument("-o", "--output", required=True, help="the .npz file to write")
    p.set_defaults(handler=_cmd_decode)

    p = commands.add_parser("demo", help="encode, inspect and decode a built-in LoRA-shaped update", description=_cmd_demo.__doc__)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_demo)

    p = commands.add_parser(
        "simulate",
        help="the reference federated loop: compare uplink compression methods end to end",
        description="Federated LoRA fine-tuning with each uplink compression method; writes results.json, CSVs and plots.",
    )
    try:
        from .sim.cli import add_arguments, run
    except ImportError as exc:  # the sim extra is not installed
        missing = str(exc)

        def run(args, _missing=missing):  # noqa: ARG001
            raise SystemExit(f"fstq simulate needs the sim extra: pip install 'fstqcodec[sim]' ({_missing})")

    else:
        add_arguments(p)
    p.set_defaults(handler=run)

    from .prune_cli import add_arguments as add_prune_arguments, run as run_prune

    p = commands.add_parser(
        "prune",
        help="accuracy and speed of a classifier with its lowest-prior tokens dropped",
        description="Drop the lowest-prior input tokens of a transformers classifier and report accuracy and end-to-end speed against the unpruned model.",
    )
    add_prune_arguments(p)
    p.set_defaults(handler=run_prune)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``fstq`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except FstqError as exc:
        print(f"fstq {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fstq {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
