"""Encode/decode throughput against zstd level 3, and peak memory during encode (README figure 5).

Input: 64 MiB of LoRA-shaped float32 tensors (rank-16 A and B matrices of a 4096-wide model,
Gaussian values with a per-tensor scale), encoded at 1 bit/param. zstd level 3 compresses and
decompresses the same raw bytes in the same run, one thread. Throughput is input (raw float32)
megabytes per second. Peak memory growth is measured by tracemalloc (numpy reports its buffers to
it) in a separate encode, as a multiple of the input size.

Run: python benchmarks/throughput.py [--mib 64] [--bpp 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import zstandard

import fstqcodec


def lora_update(mib: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tensors = {}
    elements_per_pair = 2 * 16 * 4096
    pairs = (mib << 20) // (4 * elements_per_pair)
    for layer in range(pairs):
        scale = float(np.exp(rng.normal(-6, 0.5)))
        tensors[f"model.layers.{layer}.self_attn.q_proj.lora_A.weight"] = (rng.standard_normal((16, 4096)) * scale).astype(np.float32)
        tensors[f"model.layers.{layer}.self_attn.q_proj.lora_B.weight"] = (rng.standard_normal((4096, 16)) * scale * 0.3).astype(np.float32)
    return tensors


def best_time(function, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--bpp", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    tensors = lora_update(args.mib)
    raw = b"".join(t.tobytes() for t in tensors.values())
    megabytes = len(raw) / 1e6
    print(f"input: {len(tensors)} tensors, {len(raw) / 2**20:.1f} MiB float32; best of {args.repeat}")

    compressor = zstandard.ZstdCompressor(level=3)
    t_zc, frame = best_time(lambda: compressor.compress(raw), args.repeat)
    decompressor = zstandard.ZstdDecompressor()
    t_zd, _ = best_time(lambda: decompressor.decompress(frame), args.repeat)

    budget = fstqcodec.Budget(bits_per_param=args.bpp)
    t_fe, message = best_time(lambda: fstqcodec.encode(tensors, budget=budget), args.repeat)
    t_fd, _ = best_time(lambda: fstqcodec.decode(message), args.repeat)
    t_le, lossless = best_time(lambda: fstqcodec.encode(tensors), args.repeat)
    t_ld, _ = best_time(lambda: fstqcodec.decode(lossless), args.repeat)

    print(f"{'':28} {'MB/s':>8} {'x zstd-3':>9} {'size':>12}")
    print(f"{'zstd-3 compress':28} {megabytes / t_zc:>8.0f} {'':>9} {len(frame):>12}")
    print(f"{'zstd-3 decompress':28} {megabytes / t_zd:>8.0f}")
    print(f"{f'fstq encode {args.bpp:g} bit/param':28} {megabytes / t_fe:>8.0f} {t_zc / t_fe:>9.2f} {len(message):>12}")
    print(f"{f'fstq decode {args.bpp:g} bit/param':28} {megabytes / t_fd:>8.0f} {t_zd / t_fd:>9.2f}")
    print(f"{'fstq encode lossless':28} {megabytes / t_le:>8.0f} {t_zc / t_le:>9.2f} {len(lossless):>12}")
    print(f"{'fstq decode lossless':28} {megabytes / t_ld:>8.0f} {t_zd / t_ld:>9.2f}")

    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    fstqcodec.encode(tensors, budget=budget)
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    print(f"peak memory growth during encode: {peak / 2**20:.1f} MiB = {peak / len(raw):.2f}x the input")


if __name__ == "__main__":
    main()
