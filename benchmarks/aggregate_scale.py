"""Server-side aggregation at scale: streaming against decode-everything-then-average (README, "Streaming aggregation").

Input: a 4,194,304-parameter LoRA-shaped update (rank-16 A and B matrices of a 4096-wide model, 32
pairs, float32: 16 MiB), encoded at 0.3 bit/param. DISTINCT client updates (a shared direction plus
per-client noise, each with its own per-tensor scales) are encoded once and reused round-robin with
different weights to make 1,000 client messages, so that encoding takes seconds, not minutes; the
aggregator sees 1,000 messages and decodes each one.

Runs, in one process:
1. streaming: 1,000 messages through StreamingAggregator (float64 sum, decoding in the calling
   thread); peak traced memory (tracemalloc: numpy reports its buffers) and time per message;
   the peak again with a float32 sum. The messages themselves are not counted (they were made
   before; a real server holds each one until it is decoded).
2. decode-all: 100 messages decoded into a list, then averaged; the same figures. Its memory grows
   with the number of clients (x10 for 1,000).
3. hostile mix: the 1,000 messages with HOSTILE bad replies spread among them (garbage, truncated,
   another model's tensor names, a message decoding to non-finite values); they must be dropped
   and counted, and the mean must equal the one of run 1 bit for bit.
4. workers: the 1,000 messages with 1 and 2 worker processes (time per message, from the first
   add to the result, process start-up included).
The streaming mean is checked against a float64 reference built from the distinct decoded updates.

Run: python benchmarks/aggregate_scale.py [--clients 1000] [--decode-all 100] [--distinct 20]
Writes benchmarks/aggregate_scale.json (``--parallel-only``: run 4 alone, print, write nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import fstqcodec

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import reframe, split  # noqa: E402  (the tests' framing helpers craft the non-finite message)

RANK, WIDTH, PAIRS, BITS_PER_PARAM = 16, 4096, 32, 0.3
HOSTILE = 20


def lora_update(seed: int, base_seed: int = 0) -> dict:
    """A shared direction (base_seed) plus per-client noise and per-tensor scales (seed)."""
    base, rng = np.random.default_rng(base_seed), np.random.default_rng(seed)
    tensors = {}
    for layer in range(PAIRS):
        for name, shape in (("lora_A", (RANK, WIDTH)), ("lora_B", (WIDTH, RANK))):
            scale = float(np.exp(rng.normal(-6, 0.5)))
            direction = base.standard_normal(shape, dtype=np.float32)
            noise = rng.standard_normal(shape, dtype=np.float32)
            tensors[f"model.layers.{layer}.self_attn.q_proj.{name}.weight"] = (scale * (0.7 * direction + 0.7 * noise)).astype(np.float32)
    return tensors


def nonfinite_message(update: dict) -> bytes:
    """A well-formed message of the model whose scales times its codes overflow float32."""
    header, body = split(fstqcodec.encode(update, bits=4, compress_header=False))
    pieces, offset = [], 0
    for section in header["sections"]:
        pieces.append(body[offset : offset + section[1]])
        offset += section[1]
    pieces[1] = struct.pack("<H", 0x7F7F) * (header["sections"][1][3] // 2)
    header["sections"][1] = ["scales", len(pieces[1]), "none", len(pieces[1])]
    return reframe(header, b"".join(pieces))


def traced(function):
    """(result, seconds, peak traced bytes above the start) of one call."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    try:
        result = function()
    finally:
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    return result, seconds, peak


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def stream(model, replies, workers=0):
    aggregator = fstqcodec.StreamingAggregator(model, workers=workers)
    for client, message, weight in replies:
        aggregator.add(message, weight, client=client)
    return aggregator.result(), aggregator


def stream_float32(model, replies):
    aggregator = fstqcodec.StreamingAggregator(model, accumulate="float32")
    for client, message, weight in replies:
        aggregator.add(message, weight, client=client)
    return aggregator.result(), aggregator


def decode_all_then_average(replies):
    decoded = [(fstqcodec.decode(message), weight) for _, message, weight in replies]
    total_weight = sum(weight for _, weight in decoded)
    mean = {}
    for name in decoded[0][0]:
        total = np.zeros(decoded[0][0][name].shape)
        for arrays, weight in decoded:
            total += weight * arrays[name].astype(np.float64)
        mean[name] = (total / total_weight).astype(np.float32)
    return mean


def max_difference(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[name].astype(np.float64) - b[name]))) for name in a)


def build_replies(clients: int, distinct: int):
    """(replies, distinct decoded updates, weights per distinct update, message size, model)."""
    budget = fstqcodec.Budget(bits_per_param=BITS_PER_PARAM)
    updates = [lora_update(seed=1 + k) for k in range(distinct)]
    messages = [fstqcodec.encode(update, budget=budget, fisher_power=fstqcodec.FEDERATED_FISHER_POWER) for update in updates]
    replies, weight_of = [], [0.0] * distinct
    for index in range(clients):
        weight = float(1 + index % 7)  # e.g. local examples, in units
        replies.append((f"site-{index}", messages[index % distinct], weight))
        weight_of[index % distinct] += weight
    decoded = [fstqcodec.decode(message) for message in messages]
    model = {name: array for name, array in updates[0].items()}
    return replies, decoded, weight_of, len(messages[0]), model


def hostile_replies(model: dict, good_message: bytes) -> list:
    other_model = {name.replace("q_proj", "k_proj"): array for name, array in model.items()}
    kinds = [
        ("garbage", np.random.default_rng(5).bytes(len(good_message))),
        ("truncated", good_message[: len(good_message) // 3]),
        ("other-model", fstqcodec.encode(other_model, budget=fstqcodec.Budget(bits_per_param=BITS_PER_PARAM))),
        ("non-finite", nonfinite_message(model)),
    ]
    return [(f"hostile-{kinds[i % 4][0]}-{i}", kinds[i % 4][1], 1.0) for i in range(HOSTILE)]


def reference_mean(decoded, weight_of) -> dict:
    total_weight = sum(weight_of)
    return {
        name: sum(w * arrays[name].astype(np.float64) for arrays, w in zip(decoded, weight_of)) / total_weight
        for name in decoded[0]
    }


def parallel_runs(shape, replies, reference):
    """Streaming with 1 and 2 worker processes; decoding alone with 1 and 2 threads."""
    per_worker = {}
    for workers in (1, 2):
        (worker_mean, _), seconds = timed(lambda: stream(shape, replies, workers=workers))
        per_worker[workers] = {"ms_per_message": 1e3 * seconds / len(replies), "max_relative_difference": max_difference(worker_mean, reference) / max(float(np.max(np.abs(r))) for r in reference.values())}
        print(f"{workers} worker process(es): {per_worker[workers]['ms_per_message']:.1f} ms/message (start-up included)")
    threads = {}
    for count in (1, 2):
        with ThreadPoolExecutor(count) as pool:
            _, seconds = timed(lambda: sum(1 for _ in pool.map(fstqcodec.decode, [m for _, m, _ in replies[:200]])))
        threads[count] = 1e3 * seconds / 200
    print(f"decode only, threads (the GIL is released in the rANS loops, not in the numpy-level steps): "
          f"1 thread {threads[1]:.1f} ms/message, 2 threads {threads[2]:.1f} ms/message")
    speedup = per_worker[1]["ms_per_message"] / per_worker[2]["ms_per_message"]
    print(f"speedup 1 -> 2 workers: {speedup:.2f}x on {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f})")
    return per_worker, threads, speedup


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--decode-all", type=int, default=100)
    parser.add_argument("--distinct", type=int, default=20)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "aggregate_scale.json"))
    parser.add_argument("--parallel-only", action="store_true", help="only run 4 (workers, threads); write nothing")
    args = parser.parse_args(argv)
    MiB = float(1 << 20)

    (replies, decoded, weight_of, message_size, model), encode_seconds = timed(lambda: build_replies(args.clients, args.distinct))
    parameters = sum(a.size for a in model.values())
    model_mib = 4 * parameters / MiB
    shape = {name: (a.shape, "float32") for name, a in model.items()}
    print(f"model: {parameters:,} parameters ({model_mib:.0f} MiB float32), {len(model)} tensors; message {message_size:,} bytes "
          f"({8 * message_size / parameters:.3f} bit/param); {args.distinct} distinct updates encoded in {encode_seconds:.1f} s")
    del model
    if args.parallel_only:
        parallel_runs(shape, replies, reference_mean(decoded, weight_of))
        return {}

    (mean, aggregator), _, stream_peak = traced(lambda: stream(shape, replies))
    del mean
    (mean, aggregator), stream_seconds = timed(lambda: stream(shape, replies))
    reference = reference_mean(decoded, weight_of)
    stream_error = max_difference(mean, reference) / max(float(np.max(np.abs(r))) for r in reference.values())
    print(f"streaming, {len(replies)} messages: peak {stream_peak / MiB:.1f} MiB ({stream_peak / MiB / model_mib:.2f}x the float32 model), "
          f"{1e3 * stream_seconds / len(replies):.1f} ms/message; max |mean - reference| / max |reference| = {stream_error:.1e}")

    (_, aggregator32), _, stream32_peak = traced(lambda: stream_float32(shape, replies))
    print(f"streaming with a float32 sum: peak {stream32_peak / MiB:.1f} MiB ({stream32_peak / MiB / model_mib:.2f}x the model)")

    subset = replies[: args.decode_all]
    _, _, all_peak = traced(lambda: decode_all_then_average(subset))
    _, all_seconds = timed(lambda: decode_all_then_average(subset))
    print(f"decode-all, {len(subset)} messages: peak {all_peak / MiB:.1f} MiB ({all_peak / MiB / model_mib:.1f}x the model; "
          f"about {all_peak * len(replies) / len(subset) / MiB / 1024:.1f} GiB for {len(replies)}), {1e3 * all_seconds / len(subset):.1f} ms/message")

    hostile = hostile_replies(decoded[0], replies[0][1])
    mixed = list(replies)
    for position, reply in enumerate(hostile):
        mixed.insert((position + 1) * len(replies) // (len(hostile) + 1) + position, reply)
    (hostile_mean, hostile_aggregator), hostile_seconds = timed(lambda: stream(shape, mixed))
    reasons = {}
    for rejection in hostile_aggregator.rejections:
        kind = rejection.client.split("-", 1)[1].rsplit("-", 1)[0]
        key = f"{kind}: {rejection.reason}"
        reasons[key] = reasons.get(key, 0) + 1
    identical = all(np.array_equal(hostile_mean[name], mean[name]) for name in mean)
    print(f"hostile mix, {len(mixed)} messages: {hostile_aggregator.accepted} accepted, {len(hostile_aggregator.rejections)} dropped {reasons}; "
          f"mean identical to the clean run: {identical}; {1e3 * hostile_seconds / len(mixed):.1f} ms/message")

    per_worker, threads, speedup = parallel_runs(shape, replies, reference)

    record = {
        "parameters": parameters, "tensors": len(shape), "bits_per_param": BITS_PER_PARAM, "message_bytes": message_size,
        "clients": len(replies), "distinct_updates": args.distinct,
        "streaming_float32_sum": {"peak_mib": stream32_peak / MiB, "peak_model_multiple": stream32_peak / MiB / model_mib},
        "streaming": {"peak_mib": stream_peak / MiB, "peak_model_multiple": stream_peak / MiB / model_mib, "ms_per_message": 1e3 * stream_seconds / len(replies), "max_relative_difference": stream_error},
        "decode_all": {"messages": len(subset), "peak_mib": all_peak / MiB, "peak_model_multiple": all_peak / MiB / model_mib, "ms_per_message": 1e3 * all_seconds / len(subset)},
        "hostile": {"messages": len(mixed), "accepted": hostile_aggregator.accepted, "dropped": reasons, "mean_identical": identical, "ms_per_message": 1e3 * hostile_seconds / len(mixed)},
        "workers": per_worker, "decode_threads_ms_per_message": threads, "speedup_1_to_2": speedup, "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0],
    }
    with open(args.output, "w") as handle:
        json.dump(record, handle, indent=1)
    if not identical or hostile_aggregator.accepted != len(replies) or stream_error > 1e-6:
        raise SystemExit("the streaming aggregate does not match the reference")
    return record


if __name__ == "__main__":
    main()
