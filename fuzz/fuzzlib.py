"""Helpers shared by the fuzz targets (pure Python: replay under pytest needs no atheris).

The fuzz targets take raw bytes. The first byte picks how the rest becomes a message, so that
mutations reach the parsers behind the CRC-32 instead of all dying at the checksum:

* mode 0: the rest, as is (framing, magic, lengths, checksum are all exposed to mutation);
* mode 1: the rest with its trailing CRC-32 recomputed (mutations reach the header and body);
* mode 2: the rest is ``u32 LE header length | msgpack header | body``, framed with a correct
  preamble and CRC-32 (mutations reach the header parser with consistent lengths);
* mode 3: as mode 2, with the header stored zstd-compressed.
"""

from __future__ import annotations

import struct
import zlib

import zstandard

import fstqcodec

MAGIC = b"\x89FSQ\r\n\x1a\n"
#: magic, major, minor, header encoding, reserved, header stored length, header length, body length
PREAMBLE = struct.Struct("<8sBBBBIIQ")

#: Limits the fuzzers decode under: small enough that a run's memory stays bounded (a target's
#: RSS is checked against these by libFuzzer's -rss_limit_mb), large enough for every seed.
FUZZ_LIMITS = fstqcodec.Limits(
    max_message_size=1 << 22,
    max_header_size=1 << 20,
    max_tensors=256,
    max_ndim=8,
    max_name_length=256,
    max_output_size=1 << 24,
    max_contexts=256,
    max_codebook_entries=4096,
    max_rans_lanes=4096,
)


#: Schemas the decode and inspect targets pass to the decoder, so that messages naming their
#: tensors by schema digest (``encode(..., schema=...)``) decode; make_corpus.py seeds with them.
FUZZ_SCHEMAS = [
    fstqcodec.Schema([("layer.lora_A", "float32", (8, 48), 64), ("layer.lora_B", "float32", (48, 8), 64)]),
    fstqcodec.Schema([("w", "float16", (3, 5), 4)]),
]


def with_crc(message: bytes) -> bytes:
    """``message`` with its last 4 bytes replaced by the CRC-32 of everything before them."""
    if len(message) < 4:
        return message
    body = message[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def frame(header_bytes: bytes, body: bytes, *, compress_header: bool = False, major: int = 1, minor: int = 0) -> bytes:
    """A message with ``header_bytes`` (msgpack) and ``body`` and a consistent preamble and CRC."""
    stored = header_bytes
    encoding = 0
    if compress_header:
        stored = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(header_bytes)
        encoding = 1
    preamble = PREAMBLE.pack(MAGIC, major, minor, encoding, 0, len(stored), len(header_bytes), len(body))
    return with_crc(preamble + stored + body + b"\0\0\0\0")


def split(message: bytes) -> tuple[bytes, bytes]:
    """(raw msgpack header, body) of a well-framed message (inverse of :func:`frame`)."""
    _, _, _, encoding, _, stored, length, body_length = PREAMBLE.unpack_from(message, 0)
    header = message[PREAMBLE.size : PREAMBLE.size + stored]
    if encoding == 1:
        header = zstandard.ZstdDecompressor().decompress(header, max_output_size=length)
    start = PREAMBLE.size + stored
    return header, message[start : start + body_length]


def to_mode2(message: bytes) -> bytes:
    """The mode-2 fuzz input that frames back to ``message`` (with a raw header)."""
    header, body = split(message)
    return b"\x02" + struct.pack("<I", len(header)) + header + body


def message_from_input(data: bytes) -> bytes:
    """Turn a fuzz input into the bytes handed to the decoder (see the module docstring)."""
    if not data:
        return b""
    mode, rest = data[0] & 3, data[1:]
    if mode == 0:
        return rest
    if mode == 1:
        return with_crc(rest) if len(rest) >= PREAMBLE.size + 4 else rest
    if len(rest) < 4:
        return rest
    (header_length,) = struct.unpack_from("<I", rest, 0)
    header_length = min(header_length, len(rest) - 4)
    header, body = rest[4 : 4 + header_length], rest[4 + header_length :]
    return frame(header, body, compress_header=mode == 3)


class ByteReader:
    """A tiny stand-in for atheris.FuzzedDataProvider: reads choices from the fuzz input.

    Past the end of the input every read returns zeros, so any input gives a valid draw.
    """

    def __init__(self, data: bytes):
        self.data = data
        self.position = 0

    def take(self, count: int) -> bytes:
        chunk = self.data[self.position : self.position + count]
        self.position += len(chunk)
        return chunk + b"\0" * (count - len(chunk))

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes), "little")

    def int_in(self, low: int, high: int) -> int:
        """An int in [low, high]."""
        span = high - low + 1
        nbytes = max(1, (span - 1).bit_length() + 7 >> 3)
        return low + self.uint(nbytes) % span

    def choice(self, options):
        return options[self.int_in(0, len(options) - 1)]

    def flag(self) -> bool:
        return bool(self.uint(1) & 1)


#: Modules whose code gets coverage instrumentation: the codec and the harness's own input parsing.
#: numpy's and the standard library's Python layers are left alone: instrumenting them
#: (``atheris.instrument_all()``) made the encode-heavy target several times slower for coverage
#: of code that is not ours.
INSTRUMENTED_PREFIXES = ("fstqcodec", "fuzzlib", "fuzz_", "__main__")


def instrument_ours(atheris) -> int:
    """Instrument every loaded function of the modules in :data:`INSTRUMENTED_PREFIXES`; returns the count."""
    import gc
    import sys
    import types

    count = 0
    for obj in gc.get_objects():
        if not isinstance(obj, types.FunctionType) or not isinstance(obj.__code__, types.CodeType):
            continue
        module = getattr(obj, "__module__", None) or ""
        if module in sys.modules and module.startswith(INSTRUMENTED_PREFIXES):
            atheris.instrument_func(obj)
            count += 1
    return count


def run_fuzzer(test_one_input) -> None:
    """Run ``test_one_input`` under atheris with libFuzzer's command line (``sys.argv``).

    atheris is imported here, not at module level, so the targets replay under plain pytest.
    Only our own code is instrumented (:func:`instrument_ours`).
    """
    import sys

    import atheris

    print(f"INFO: instrumented {instrument_ours(atheris)} functions of {INSTRUMENTED_PREFIXES}", file=sys.stderr)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
