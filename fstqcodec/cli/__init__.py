"""The ``fstq`` command: inspect, encode, decode, demo, and the reference federated loop (simulate).

:mod:`~fstqcodec.cli.app` holds the parser and the entry point, :mod:`~fstqcodec.cli.commands` the
subcommands, :mod:`~fstqcodec.cli.tensorfiles` the .npz and .safetensors files (bfloat16 included,
numpy only). ``simulate``'s options are :mod:`fstqcodec.sim.cli`'s.
"""

from .app import build_parser, main

__all__ = ["main", "build_parser"]
