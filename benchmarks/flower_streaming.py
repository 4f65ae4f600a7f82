"""Server memory of FstqStrategy.aggregate_train: streaming against decode-all (README, "Streaming aggregation").

Input: a 1,048,576-parameter LoRA-shaped update (rank-16 A and B matrices of a 4096-wide model, 8
pairs, float32: 4 MiB), encoded at 0.3 bit/param. DISTINCT client updates are encoded once and
reused round-robin, with different weights (num-examples), to make CLIENTS train replies as
FstqMod sends them (an ArrayRecord holding one fstq array, a MetricRecord); the strategy decodes
every one of them.

The same replies go through FstqStrategy(FedAvg) twice, in one process:
1. streaming=True: each update is added into one float64 sum as it is read;
2. streaming=False: each reply is rebuilt into the client's model (plain arrays) and the wrapped
   FedAvg averages them, as before streaming existed.
For each: peak traced memory of aggregate_train (tracemalloc, which sees numpy's buffers; the
compressed replies were made before and are not counted) and its time (traced, so pessimistic).
The two aggregates must agree to float32 rounding; the script exits with status 1 if not.

Run: python benchmarks/flower_streaming.py [--clients 200] [--distinct 8]
Writes benchmarks/flower_streaming.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import tracemalloc

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, Metadata, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.serverapp.strategy import FedAvg

import fstqcodec
from fstqcodec.flower import MESSAGE_ARRAY, STYPE_UPDATE, FstqStrategy

RANK, WIDTH, PAIRS, BITS_PER_PARAM = 16, 4096, 8, 0.3


def shapes() -> dict:
    return {
        f"model.layers.{layer}.self_attn.q_proj.{name}.weight": shape
        for layer in range(PAIRS)
        for name, shape in (("lora_A", (RANK, WIDTH)), ("lora_B", (WIDTH, RANK)))
    }


def lora_update(seed: int) -> dict:
    """A shared direction plus per-client noise, with per-tensor scales."""
    base, rng = np.random.default_rng(0), np.random.default_rng(seed)
    return {
        name: (float(np.exp(rng.normal(-6, 0.5))) * (0.7 * base.standard_normal(shape, dtype=np.float32)
                                                     + 0.7 * rng.standard_normal(shape, dtype=np.float32))).astype(np.float32)
        for name, shape in shapes().items()
    }


def metadata(src: int, dst: int, message_type: str = MessageType.TRAIN) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{src}-{dst}", src_node_id=src, dst_node_id=dst,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
                    message_type=message_type)


class LocalFedAvg(FedAvg):
    """FedAvg whose configure_train needs no Flower runtime (its aggregation is FedAvg's own)."""

    def __init__(self, nodes: list[int]):
        super().__init__()
        self.nodes = nodes

    def configure_train(self, server_round, arrays, config, grid):
        content = RecordDict({"arrays": arrays, "config": config})
        return [make_message(metadata(0, node), content) for node in self.nodes]


def replies_for(messages: list[bytes], clients: int) -> list:
    replies = []
    for node in range(clients):
        data = messages[node % len(messages)]
        array = Array(dtype="uint8", shape=(len(data),), stype=STYPE_UPDATE, data=data)
        content = RecordDict({"arrays": ArrayRecord({MESSAGE_ARRAY: array}),
                              "metrics": MetricRecord({"num-examples": 10 + node % 7, "loss": 1.0 / (1 + node)})})
        replies.append(make_message(metadata(node, 0), content))
    return replies


def run(streaming: bool, global_model: dict, messages: list[bytes], clients: int) -> tuple[dict, dict]:
    strategy = FstqStrategy(LocalFedAvg(list(range(clients))), streaming=streaming,
                            budget=fstqcodec.Budget(bits_per_param=BITS_PER_PARAM))
    strategy.configure_train(1, ArrayRecord({n: Array(v) for n, v in global_model.items()}), ConfigRecord(), grid=None)
    replies = replies_for(messages, clients)
    tracemalloc.start()
    start = time.perf_counter()
    arrays, metrics = strategy.aggregate_train(1, replies)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert metrics["fstq.replies-accepted"] == clients, dict(metrics)
    return {name: array.numpy() for name, array in arrays.items()}, {"peak_bytes": peak, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--distinct", type=int, default=8)
    args = parser.parse_args()

    global_model = {name: np.zeros(shape, np.float32) for name, shape in shapes().items()}
    params = sum(v.size for v in global_model.values())
    model_bytes = 4 * params
    budget = fstqcodec.Budget(bits_per_param=BITS_PER_PARAM)
    messages = [fstqcodec.encode(lora_update(seed), budget=budget) for seed in range(1, args.distinct + 1)]
    print(f"{args.clients} replies of a {params:,}-parameter update ({model_bytes / 2**20:.1f} MiB float32) "
          f"at {BITS_PER_PARAM} bit/param: {np.mean([len(m) for m in messages]):,.0f} bytes each "
          f"({args.distinct} distinct updates), load average {os.getloadavg()[0]:.1f}")

    rows, results = {}, {}
    for label, streaming in (("streaming", True), ("decode-all", False)):
        results[label], rows[label] = run(streaming, global_model, messages, args.clients)
        peak = rows[label]["peak_bytes"]
        print(f"{label:>10}: peak {peak / 2**20:8.1f} MiB ({peak / model_bytes:6.1f}x the float32 model), "
              f"{1000 * rows[label]['seconds'] / args.clients:5.1f} ms per reply (traced)")
    largest = max(float(np.abs(v).max()) for v in results["decode-all"].values())
    difference = max(float(np.abs(results["streaming"][n] - results["decode-all"][n]).max()) for n in global_model)
    ratio = rows["decode-all"]["peak_bytes"] / rows["streaming"]["peak_bytes"]
    print(f"streaming peak {ratio:.1f}x smaller; aggregates differ by {difference:.2e} "
          f"({difference / largest:.1e} of the largest value)")

    record = {"clients": args.clients, "distinct": args.distinct, "parameters": params,
              "bits_per_param": BITS_PER_PARAM, "message_bytes": [len(m) for m in messages],
              "paths": rows, "max_abs_difference": difference, "max_abs_value": largest,
              "load_average": os.getloadavg()[0]}
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "flower_streaming.json"), "w") as out:
        json.dump(record, out, indent=1)
    return 0 if difference <= 1e-6 * largest else 1


if __name__ == "__main__":
    raise SystemExit(main())
