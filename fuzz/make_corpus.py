"""Build the seed corpora under fuzz/corpus/<target>/ from valid messages.

Deterministic: the same library version writes the same files (named by their SHA-1, as
libFuzzer names corpus files). Run from the repository root: ``python fuzz/make_corpus.py``.
Messages from ``spec/vectors/`` (``*.fstq``), where present, are added to the decode and inspect
corpora as they are.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import struct
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fstqcodec  # noqa: E402
from fuzzlib import FUZZ_SCHEMAS, to_mode2  # noqa: E402


#: Inputs above this are left out (the fuzzers run with -max_len=8192; a header bomb's mode-2 form,
#: with its header decompressed, can be a megabyte).
MAX_INPUT = 16384


def valid_messages() -> list[bytes]:
    """A small, varied set of valid messages: every context kind, dtype and header form."""
    rng = np.random.default_rng(20261121)
    update = {
        "layer.lora_A": (rng.standard_normal((8, 48)) * 0.01).astype(np.float32),
        "layer.lora_B": (rng.standard_normal((48, 8)) * np.exp(rng.standard_normal((48, 1)))).astype(np.float32),
    }
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 3.4028235e38, -3.4028235e38, 1.0, -1.0], np.float32)
    messages = [
        fstqcodec.encode({}),
        fstqcodec.encode({"s": np.float32(1.5)}),
        fstqcodec.encode({"empty": np.zeros((0, 3), np.float32)}),
        fstqcodec.encode({"special": special, "h": np.array([0.0, -0.0, 6e-8, -6e-8, 65504, -65504], np.float16), "d": special.astype(np.float64)}),
        fstqcodec.encode({"odd": rng.standard_normal((3, 5, 7)).astype(np.float32)}, block_size=16),
        fstqcodec.encode(update),
        fstqcodec.encode(update, compress_header=False, meta={"round": 3, "client": "c7"}),
        fstqcodec.encode(update, bits=3),
        fstqcodec.encode(update, bits=8, rounding="stochastic", seed=5),
        fstqcodec.encode(update, codebook="nf4"),
        fstqcodec.encode(update, budget=fstqcodec.Budget(bits_per_param=2.5)),
        fstqcodec.encode(update, budget=fstqcodec.Budget(bits_per_param=2)),
        fstqcodec.encode(update, budget=fstqcodec.Budget(bits_per_param=4), rounding="stochastic"),
        fstqcodec.encode({"big": rng.standard_normal(1 << 14).astype(np.float32)}, budget=fstqcodec.Budget(bits_per_param=0.5)),
        fstqcodec.encode({f"t{i}": rng.standard_normal(5).astype(np.float16) for i in range(12)}, block_size=2),
        # Tensors named by schema digest (the decode and inspect targets pass FUZZ_SCHEMAS).
        fstqcodec.encode(update, schema=FUZZ_SCHEMAS[0]),
        fstqcodec.encode(update, schema=FUZZ_SCHEMAS[0], budget=fstqcodec.Budget(bits_per_param=3), compress_header=False),
        fstqcodec.encode({"w": rng.standard_normal((3, 5)).astype(np.float16)}, schema=FUZZ_SCHEMAS[1], block_size=4, bits=4),
    ]
    vectors = HERE.parent / "spec" / "vectors"
    if vectors.is_dir():
        # Large vectors add little a small one does not: the fuzzers cap inputs at 8 KiB.
        messages.extend(p.read_bytes() for p in sorted(vectors.rglob("*.fstq")) if p.stat().st_size <= 8192)
    return messages


def roundtrip_seeds() -> list[bytes]:
    """Inputs for fuzz_roundtrip: one per encode mode and dtype, then a few random ones."""
    seeds = []
    for mode in range(6):
        for dtype in range(3):
            # 1 tensor, dtype, ndim 2, shape (8, 9), name "0", gaussian, seed, magnitude, block 64 ...
            seeds.append(bytes([1, dtype, 2, 8, 9, 0, 0]) + struct.pack("<I", 7 + mode) + bytes([30, 6, 0, mode, 0]) + b"\x01\x02\x03\x04")
    rng = np.random.default_rng(7)
    seeds.extend(rng.integers(0, 256, size=int(n), dtype=np.uint8).tobytes() for n in rng.integers(8, 200, size=16))
    return seeds


def write(target: str, inputs: list[bytes]) -> int:
    directory = HERE / "corpus" / target
    directory.mkdir(parents=True, exist_ok=True)
    written = 0
    for data in inputs:
        if len(data) > MAX_INPUT:
            continue
        path = directory / hashlib.sha1(data).hexdigest()
        if not path.exists():
            path.write_bytes(data)
            written += 1
    return written


def main() -> None:
    messages = valid_messages()
    decode_inputs = []
    for message in messages:
        decode_inputs += [b"\x00" + message, b"\x01" + message]
        try:
            decode_inputs.append(to_mode2(message))
        except Exception:  # an invalid test vector whose framing cannot be split: modes 0 and 1 only
            pass
    for target in ("fuzz_decode", "fuzz_inspect"):
        print(target, write(target, decode_inputs), "new files")
    print("fuzz_roundtrip", write("fuzz_roundtrip", roundtrip_seeds()), "new files")


if __name__ == "__main__":
    os.chdir(HERE.parent)
    main()
