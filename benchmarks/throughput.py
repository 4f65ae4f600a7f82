"""Encode/decode throughput on the paths users take, against zstd level 3 on the same bytes (README, "Speed").

Two inputs, each timed against zstd level 3 compressing and decompressing the same raw float32
bytes in the same run, one thread:

- ``gaussian``: 64 MiB of LoRA-shaped float32 tensors (rank-16 A and B matrices of a 4096-wide
  model, Gaussian values with a per-tensor scale) with a per-element Fisher ``(g * s_t)**2``,
  ``g`` standard normal per element and ``s_t = e**N(0, 1)`` per tensor (the hardest Fisher row of
  issue 17), encoded at 1 bit/param as one message;
- ``real``: the real-update corpus (benchmarks/real_updates/: every client update of every
  capture with its own accumulated Fisher), each update encoded as one message, as a client
  sends it; throughput over the whole corpus.

Rows: per-element Fisher at powers 1 and 0.5 (what ``fstq simulate`` and
``fstqcodec.peft.client_message`` use), no Fisher, fixed-rate (``bits=4``) and lossless, each with
its decode. Throughput counts input (raw float32) bytes; "x zstd-3" is zstd-3's time over fstq's
(above 1: faster than zstd-3). Every figure is the best of ``--repeat`` runs (wall clock); the
"cpu" column is the same ratio from process CPU time, which a shared machine disturbs less.
With ``--threads N`` the Fisher and no-Fisher encodes and the decodes are timed again with
``threads=N`` (zstd-3 stays single-threaded).

Peak memory growth during an encode with per-element Fisher is measured by tracemalloc (numpy
reports its buffers to it) in a separate run, as a multiple of the tensors' raw size.

Run: python benchmarks/throughput.py [--mib 64] [--bpp 1] [--repeat 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import zstandard

import fstqcodec
from fstqcodec.stages import rans

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_corpus import corpus_files, load_capture  # noqa: E402


def lora_update(mib: int, seed: int = 0) -> dict:
    """LoRA-shaped float32 tensors of about ``mib`` MiB."""
    rng = np.random.default_rng(seed)
    tensors = {}
    elements_per_pair = 2 * 16 * 4096
    pairs = (mib << 20) // (4 * elements_per_pair)
    for layer in range(pairs):
        scale = float(np.exp(rng.normal(-6, 0.5)))
        tensors[f"model.layers.{layer}.self_attn.q_proj.lora_A.weight"] = (rng.standard_normal((16, 4096)) * scale).astype(np.float32)
        tensors[f"model.layers.{layer}.self_attn.q_proj.lora_B.weight"] = (rng.standard_normal((4096, 16)) * scale * 0.3).astype(np.float32)
    return tensors


def lora_fisher(tensors: dict, seed: int = 1) -> dict:
    """Per-element Fisher whose per-tensor scales differ by e**N(0, 1)."""
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(t.shape).astype(np.float32) * np.float32(np.exp(rng.normal()))) ** 2
            for name, t in tensors.items()}


def real_corpus() -> list[tuple[dict, dict]]:
    """(update, Fisher) of every client of every capture in the corpus."""
    pairs = []
    for path in corpus_files():
        capture = load_capture(path)
        pairs.extend(zip(capture.updates, capture.fishers))
    return pairs


def best_time(function, repeat: int) -> tuple[float, float, object]:
    """(best wall seconds, best CPU seconds, last result) over ``repeat`` runs."""
    wall, cpu, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = function()
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return wall, cpu, result


class Table:
    """Rows of throughput against a zstd-3 reference time measured in the same run."""

    def __init__(self, megabytes: float):
        self.megabytes = megabytes
        print(f"{'':44} {'MB/s':>7} {'x zstd-3':>9} {'(cpu)':>7} {'message':>11}")

    def row(self, label: str, timing: tuple, reference: tuple | None = None, size: int | None = None) -> None:
        wall, cpu = timing[0], timing[1]
        ratio = f"{reference[0] / wall:>9.2f} {reference[1] / cpu:>7.2f}" if reference else f"{'':>9} {'':>7}"
        print(f"{label:44} {self.megabytes / wall:>7.0f} {ratio} {'' if size is None else size:>11}")


def run_all(messages_of, inputs: list[tuple[dict, dict]], args) -> None:
    """Time zstd-3 and every fstq row on ``inputs`` (each pair one message) and print the table."""
    raws = [b"".join(t.tobytes() for t in tensors.values()) for tensors, _ in inputs]
    table = Table(sum(len(r) for r in raws) / 1e6)
    compressor, decompressor = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
    zc = best_time(lambda: [compressor.compress(r) for r in raws], args.repeat)
    frames = zc[2]
    zd = best_time(lambda: [decompressor.decompress(f) for f in frames], args.repeat)
    budget = fstqcodec.Budget(bits_per_param=args.bpp)
    rows = [
        (f"encode, per-element Fisher, power 1, {args.bpp:g} bit/param", dict(budget=budget, fisher_power=1.0), True),
        (f"encode, per-element Fisher, power 0.5, {args.bpp:g} bit/param", dict(budget=budget, fisher_power=0.5), True),
        (f"encode, no Fisher, {args.bpp:g} bit/param", dict(budget=budget), False),
        ("encode, fixed-rate bits=4", dict(bits=4), False),
        ("encode, lossless", dict(), False),
    ]
    table.row("zstd-3 compress", zc, size=sum(len(f) for f in frames))
    table.row("zstd-3 decompress", zd)
    for label, options, with_fisher in rows:
        timing = best_time(lambda: messages_of(inputs, options, with_fisher), args.repeat)
        messages = timing[2]
        table.row(label, timing, zc, sum(len(m) for m in messages))
        table.row("  decode", best_time(lambda: [fstqcodec.decode(m) for m in messages], args.repeat), zd)
        if args.threads > 1 and "budget" in options:
            threaded = dict(options, threads=args.threads)
            table.row(f"  encode, threads={args.threads}", best_time(lambda: messages_of(inputs, threaded, with_fisher), args.repeat), zc)
            table.row(f"  decode, threads={args.threads}",
                      best_time(lambda: [fstqcodec.decode(m, threads=args.threads) for m in messages], args.repeat), zd)


def encode_each(inputs, options, with_fisher) -> list[bytes]:
    return [fstqcodec.encode(tensors, fisher=fisher if with_fisher else None, **options) for tensors, fisher in inputs]


def peak_memory(tensors: dict, fisher: dict, bpp: float) -> None:
    raw_bytes = sum(t.nbytes for t in tensors.values())
    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    fstqcodec.encode(tensors, fisher=fisher, budget=fstqcodec.Budget(bits_per_param=bpp))
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    print(f"peak memory growth during an encode with per-element Fisher: {peak / 2**20:.1f} MiB = "
          f"{peak / raw_bytes:.2f}x the tensors ({raw_bytes / 2**20:.0f} MiB; the Fisher is as large again)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--bpp", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="also time encode/decode with threads=N")
    parser.add_argument("--inputs", default="gaussian,real", help="comma-separated: gaussian, real")
    args = parser.parse_args(argv)
    print(f"fstqcodec C accelerator: {rans.ACCELERATED}; best of {args.repeat}; one thread unless a row says otherwise")
    chosen = args.inputs.split(",")
    if "gaussian" in chosen:
        tensors = lora_update(args.mib)
        fisher = lora_fisher(tensors)
        print(f"\ngaussian: {len(tensors)} LoRA-shaped tensors, {sum(t.nbytes for t in tensors.values()) / 2**20:.1f} MiB float32, one message")
        run_all(encode_each, [(tensors, fisher)], args)
        peak_memory(tensors, fisher, args.bpp)
    if "real" in chosen:
        corpus = real_corpus()
        elements = sum(t.size for tensors, _ in corpus for t in tensors.values())
        print(f"\nreal: {len(corpus)} captured client updates of {elements // len(corpus):,} parameters, one message each")
        run_all(encode_each, corpus, args)


if __name__ == "__main__":
    main()
