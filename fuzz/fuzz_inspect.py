"""Fuzz target: ``fstqcodec.inspect`` on arbitrary bytes must describe the message or raise a
``DecodeError`` subclass; what it reports must agree with ``decode`` (see ``fuzz/README.md``).

Run: ``python fuzz/fuzz_inspect.py fuzz/corpus/fuzz_inspect -max_total_time=60``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fstqcodec  # noqa: E402
from fuzzlib import FUZZ_LIMITS, FUZZ_SCHEMAS, message_from_input, run_fuzzer  # noqa: E402


def check_report(report: dict, message: bytes) -> None:
    assert report["version"].startswith("1.")
    assert report["size"] == len(message)
    sections = report["sections"]
    stored = sum(s["stored"] for s in sections)
    assert report["framing_size"] + report["header_size"] + stored == len(message)
    blocks = sum(t["blocks"] for t in report["tensors"])
    assert sum(report["width_histogram"].values()) == blocks
    assert sections[0]["kind"] == "blocks" and sections[0]["decoded"] == blocks
    assert len(sections) == 2 + len(report["contexts"])


def test_one_input(data: bytes) -> None:
    message = message_from_input(data)
    try:
        report = fstqcodec.inspect(message, limits=FUZZ_LIMITS, schemas=FUZZ_SCHEMAS)
    except fstqcodec.DecodeError:
        report = None
    if report is not None:
        check_report(report, message)
    # inspect reads less than decode: whatever decode accepts, inspect must accept too.
    try:
        decoded = fstqcodec.decode(message, limits=FUZZ_LIMITS, schemas=FUZZ_SCHEMAS)
    except fstqcodec.DecodeError:
        return
    assert report is not None, "decode accepted a message inspect refused"
    assert [t["name"] for t in report["tensors"]] == list(decoded)
    for entry in report["tensors"]:
        assert tuple(entry["shape"]) == decoded[entry["name"]].shape


def main() -> None:
    run_fuzzer(test_one_input)


if __name__ == "__main__":
    main()
