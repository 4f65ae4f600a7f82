"""Decode time of hostile messages that stress the byte-order walks of FORMAT.md 5.1 and 11.

Usage::

    python benchmarks/hostile_walks.py              # with the C accelerator, when built
    FSTQ_PURE_PYTHON=1 python benchmarks/hostile_walks.py

Prints, for each message, its size, the error or outcome, and the seconds ``fstqcodec.decode`` took.
The figures in FORMAT.md Appendix B come from this script.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spec"))

import make_vectors as mv  # noqa: E402  (the vector generator's message builders)

import fstqcodec  # noqa: E402


def timed(name: str, message: bytes) -> None:
    start = time.perf_counter()
    try:
        fstqcodec.decode(message)
        outcome = "decoded"
    except fstqcodec.DecodeError as exc:
        outcome = type(exc).__name__
    print(f"{name}: {len(message)} bytes, {outcome}, {time.perf_counter() - start:.2f} s")


def main() -> None:
    header, body, _ = mv.base_message()
    print(f"C accelerator: {fstqcodec.stages.rans.ACCELERATED}")
    nils = (16 << 20) - 4096
    timed(
        "header: 16 MiB of nils, then 0xc1",
        mv.frame(mv.with_extra_key(header, "x", b"\xdd" + nils.to_bytes(4, "big") + b"\xc0" * (nils - 1) + b"\xc1"), body, header_encoding=1),
    )
    strings = 4 << 20
    timed(
        "header: 4M one-character strings (8 MiB), then 0xc1",
        mv.frame(mv.with_extra_key(header, "x", b"\xdd" + strings.to_bytes(4, "big") + b"\xa1a" * (strings - 1) + b"\xc1"), body, header_encoding=1),
    )
    blocks = 10_000_000
    frame = mv.ZSTD_MAGIC + bytes([0x20, 16]) + mv.zstd_block(0, 0, 0) * blocks + mv.zstd_block(1, 0, 16) + bytes(16)
    timed(f"zstd section: {blocks} empty blocks", mv.replace_section(header, body, 3, frame, "zstd", 16))


if __name__ == "__main__":
    main()
