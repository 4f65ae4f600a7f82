"""The ``fstq`` subcommands inspect, encode, decode and demo (simulate lives in :mod:`fstqcodec.sim.cli`)."""

from __future__ import annotations

import json
import sys

import numpy as np

from ..codec import decode, encode, inspect
from ..files import load_file
from ..config import EncodeConfig
from ..errors import BudgetError, DecodeError, EncodeError
from ..policy.budget import Budget
from .errors import UsageError
from .tensorfiles import TensorFile, check_output_path, check_suffix, read_tensors, write_output, write_tensors

__all__ = ["cmd_inspect", "cmd_encode", "cmd_decode", "cmd_demo", "encode_config", "print_inspection", "plural"]


def plural(count: int, noun: str) -> str:
    """``"1 block"``, ``"3 blocks"``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def encode_config(args) -> EncodeConfig:
    """The one :class:`~fstqcodec.EncodeConfig` that ``fstq encode``'s options stand for.

    The option types have checked each value; this checks how they combine.

    Raises
    ------
    UsageError
        An option that would be silently ignored: ``--fisher`` without a budget, ``--fisher-power``
        without ``--fisher``, stochastic rounding of a lossless encoding, ``--unbiased`` without a
        budget.
    """
    budget = _budget(args)
    if args.fisher is not None and budget is None:
        raise UsageError("--fisher: importance weights steer the bits under a budget; give --bits-per-param, "
                         "--max-bytes or --ratio (lossless and fixed-rate encodings do not use them)")
    if args.fisher_power is not None and args.fisher is None:
        raise UsageError("--fisher-power: it weighs the --fisher weights; give --fisher too")
    if args.rounding == "stochastic" and budget is None and args.bits is None and args.codebook is None:
        raise UsageError("--rounding stochastic: a lossless encoding rounds nothing; give a budget, --bits or --codebook")
    if args.unbiased and budget is None:
        raise UsageError("--unbiased: it samples blocks under a budget; give --bits-per-param, --max-bytes or --ratio")
    fisher_power = 1.0 if args.fisher_power is None else args.fisher_power
    try:
        return EncodeConfig(budget=budget, block_size=args.block_size, bits=args.bits, codebook=args.codebook,
                            rounding=args.rounding, seed=args.seed, unbiased=args.unbiased, fisher_power=fisher_power,
                            nonfinite=args.nonfinite)
    except (TypeError, ValueError) as error:  # each option was checked by its type; a safety net
        raise UsageError(f"invalid encoder options: {error}") from None


def _budget(args) -> Budget | None:
    if args.bits_per_param is not None:
        return Budget(bits_per_param=args.bits_per_param)
    if args.max_bytes is not None:
        return Budget(max_bytes=args.max_bytes)
    return None if args.ratio is None else Budget(ratio=args.ratio)


def _budget_option(args) -> str:
    for option in ("bits_per_param", "max_bytes", "ratio"):
        if getattr(args, option) is not None:
            return f"--{option.replace('_', '-')} {getattr(args, option)}"
    return "the budget"


def _read_message(path: str) -> bytes:
    with open(path, "rb") as stream:
        return stream.read()


def _decode_error(path: str, error: DecodeError) -> UsageError:
    return UsageError(f"{path}: {type(error).__name__}: {error}")


def cmd_inspect(args) -> int:
    """``fstq inspect``: describe a message without decoding its codes.

    Raises
    ------
    UsageError
        The file is not a valid message (the DecodeError, with the file's name).
    OSError
        The file cannot be read.
    """
    data = _read_message(args.file)
    try:
        info = inspect(data)
    except DecodeError as error:
        raise _decode_error(args.file, error) from None
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print_inspection(info, sys.stdout)
    return 0


def _encodable(path: str, tensors: TensorFile) -> dict:
    """The arrays to hand to :func:`fstqcodec.encode`, bfloat16 ones as torch bfloat16 tensors.

    The core takes numpy arrays, which cannot say bfloat16; a torch bfloat16 tensor can, so the
    message declares bfloat16 and decodes back to it.
    """
    bfloat16 = [name for name, dtype in tensors.dtypes.items() if dtype == "bfloat16"]
    if not bfloat16:
        return tensors.arrays
    try:
        import torch
    except ImportError:
        raise UsageError(f"{path}: tensor {bfloat16[0]!r} is bfloat16; encoding bfloat16 needs torch "
                         "(in the source checkout: pip install '.[torch]')") from None
    return {name: torch.from_numpy(array).to(torch.bfloat16) if name in bfloat16 else array
            for name, array in tensors.arrays.items()}


def cmd_encode(args) -> int:
    """``fstq encode``: tensors from .npz or .safetensors into one message.

    Raises
    ------
    UsageError
        Options that do not fit together, an unreadable or empty input, tensors the encoder refuses,
        a budget below the smallest message, an output path that cannot be written.
    OSError
        An input file cannot be read.
    """
    config = encode_config(args)
    check_output_path(args.output)
    tensors = read_tensors(args.input)
    if not tensors.arrays:
        raise UsageError(f"{args.input}: holds no tensors")
    fisher = read_tensors(args.fisher).arrays if args.fisher else None
    try:
        message = encode(_encodable(args.input, tensors), fisher=fisher, config=config)
    except BudgetError as error:
        raise UsageError(f"{_budget_option(args)}: {error}") from None
    except EncodeError as error:
        raise UsageError(f"{args.input}: {error}") from None
    write_output(args.output, message)
    raw, size = tensors.raw_bytes, len(message)
    change = f"{raw / size:.1f}x smaller" if size <= raw else f"{size / raw:.2f}x larger"
    print(f"{args.input} -> {args.output}: {plural(len(tensors.arrays), 'tensor')}, {size} bytes "
          f"from {raw} raw ({change})")
    return 0


def cmd_decode(args) -> int:
    """``fstq decode``: a message into .npz or .safetensors, names, shapes and dtypes as declared.

    Raises
    ------
    UsageError
        An output suffix other than .npz or .safetensors, an invalid message, an output path that
        cannot be written.
    OSError
        The message cannot be read.
    """
    check_suffix(args.output, "-o")
    check_output_path(args.output)
    try:
        message = load_file(args.input)
    except DecodeError as error:
        raise _decode_error(args.input, error) from None
    write_tensors(args.output, TensorFile(dict(message), dict(message.dtypes)))
    print(f"{args.input} -> {args.output}: {plural(len(message), 'tensor')}")
    return 0


def _demo_update(seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    tensors, fisher = {}, {}
    for layer in range(4):
        for module in ("query", "value"):
            a = (rng.standard_normal((8, 384)) * 0.01).astype(np.float32)
            b = (rng.standard_normal((384, 8)) * 0.002 * (1 + layer)).astype(np.float32)
            for name, value in ((f"layer.{layer}.{module}.lora_A", a), (f"layer.{layer}.{module}.lora_B", b)):
                tensors[name] = value
                fisher[name] = np.abs(rng.standard_normal(value.shape)).astype(np.float32) * (layer + 1)
    return tensors, fisher


def cmd_demo(args) -> int:
    """Encode a built-in LoRA-shaped update at several budgets; inspect and decode each."""
    tensors, fisher = _demo_update(args.seed)
    elements = sum(t.size for t in tensors.values())
    raw = sum(t.nbytes for t in tensors.values())
    print(f"A LoRA-shaped update: {len(tensors)} tensors, {elements} parameters, {raw} bytes as float32.\n")
    lossless = encode(tensors)
    exact = all(np.array_equal(decode(lossless)[k], v) for k, v in tensors.items())
    print(f"lossless: {len(lossless)} bytes, {'decodes bit-exactly' if exact else 'DOES NOT DECODE EXACTLY'}")
    print(f"\n{'budget':>18} {'bytes':>8} {'ratio':>7} {'weighted SNR':>13}")
    for bits_per_param in (4, 2, 1, 0.5, 0.25):
        message = encode(tensors, fisher=fisher, budget=Budget(bits_per_param=bits_per_param))
        decoded = decode(message)
        signal = sum(float(np.sum(fisher[k] * tensors[k].astype(np.float64) ** 2)) for k in tensors)
        error = sum(float(np.sum(fisher[k] * (tensors[k].astype(np.float64) - decoded[k]) ** 2)) for k in tensors)
        snr = 10 * np.log10(signal / error) if error > 0 else float("inf")
        print(f"{str(bits_per_param) + ' bits/param':>18} {len(message):>8} {raw / len(message):>6.1f}x {snr:>10.2f} dB")
    print("\nfstq inspect of the 1 bit/param message:\n")
    print_inspection(inspect(encode(tensors, fisher=fisher, budget=Budget(bits_per_param=1))), sys.stdout)
    return 0 if exact else 1


def _width_label(width: int) -> str:
    if width == 0:
        return "dropped"
    return f"{width} bit" if width <= 8 else f"raw {width} bit"


def print_inspection(info: dict, stream) -> None:
    """Print :func:`fstqcodec.inspect`'s description of a message for a reader."""
    print(f"fstq message, format version {info['version']}", file=stream)
    per_element = info["bits_per_element"]
    print(f"  size        {plural(info['size'], 'byte')} ({_format_size(info['size'])})"
          + (f", {per_element:.4g} bits per element" if per_element is not None else ""), file=stream)
    print(f"  header      {info['header_size']} bytes ({info['header_encoding']}), "
          f"framing {info['framing_size']} bytes", file=stream)
    print(f"  tensors     {len(info['tensors'])}, {plural(info['elements'], 'element')}", file=stream)
    for tensor in info["tensors"][:20]:
        shape = "x".join(str(d) for d in tensor["shape"]) or "scalar"
        print(f"    {tensor['name']:<40} {tensor['dtype']:<9} {shape:<16} "
              f"{plural(tensor['blocks'], 'block')} of {tensor['block_size']}", file=stream)
    if len(info["tensors"]) > 20:
        print(f"    ... and {len(info['tensors']) - 20} more", file=stream)
    histogram = ", ".join(f"{_width_label(width)}: {count}" for width, count in info["width_histogram"].items())
    print(f"  blocks      {histogram or 'none'}", file=stream)
    print("  sections", file=stream)
    names = ["blocks", "scales"] + [f"codes ({c[0]}{'' if c[0] == 'zero' else ' ' + str(c[1])})" for c in info["contexts"]]
    for name, section in zip(names, info["sections"]):
        encoded = f" zstd -> {section['decoded']}" if section["encoding"] == "zstd" else ""
        print(f"    {name:<20} {section['stored']:>10} bytes{encoded}", file=stream)
    if info["meta"]:
        print(f"  meta        {info['meta']}", file=stream)


def _format_size(count: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
