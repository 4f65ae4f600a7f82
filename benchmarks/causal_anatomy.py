"""Message anatomy on a causal LM's LoRA update: where the bytes of an fstq message go.

Trains one round of the README's drug-condition run in process (SmolLM2-135M-Instruct, LoRA r=8 on
all projections: 2,442,240 parameters in 420 tensors; seed 0, 2 clients, 2 local AdamW steps of 4
at lr 2e-3, max length 64), takes each client's real update and diagonal Fisher as the loop does
(``fstqcodec.sim.client``), and encodes it at 0.3 bit/param with the loop's methods:

* ``fstq`` and ``fstq-unbiased`` as ``fstq simulate`` sends them (tensors named by the schema's
  digest: both ends know the model);
* ``fstq`` as the Flower App sends it (no schema: the header names all 420 tensors).

For each message it prints the bits per parameter spent and the bytes (and shares) of the framing
(preamble + checksum), the header, the block table, the scales and the codes, with the
Fisher-weighted and plain relative squared error of the decoded update. Round 1 of a run: the
error-feedback memory is empty, so ``fstq`` encodes the update itself.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/causal_anatomy.py   # ~1-3 min on 2 cores

The output is recorded in ``benchmarks/causal_anatomy.log``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _anatomy(method, message: bytes) -> dict[str, int]:
    import fstqcodec

    report = fstqcodec.inspect(message, schemas=getattr(method, "wire_schema", None))
    parts = {"framing": report["framing_size"], "header": report["header_size"]}
    for section in report["sections"]:
        parts[section["kind"]] = parts.get(section["kind"], 0) + section["stored"]
    return parts


def _errors(update, decoded, fisher) -> tuple[float, float]:
    """Plain and Fisher-weighted relative squared error of ``decoded`` against ``update``."""
    plain = weighted = plain_ref = weighted_ref = 0.0
    for name, value in update.items():
        diff = (np.asarray(decoded[name], np.float64) - value) ** 2
        plain += float(diff.sum())
        plain_ref += float((np.asarray(value, np.float64) ** 2).sum())
        weighted += float((fisher[name] * diff).sum())
        weighted_ref += float((fisher[name] * np.asarray(value, np.float64) ** 2).sum())
    return plain / plain_ref, weighted / weighted_ref


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="drug-condition", choices=["drug-condition", "chatterbot-qa"])
    parser.add_argument("--budget-bpp", type=float, default=0.3)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()

    import fstqcodec
    from fstqcodec.sim.causal_data import CAUSAL_DEFAULTS
    from fstqcodec.sim.client import make_workbench, seed_for
    from fstqcodec.sim.config import SimConfig
    from fstqcodec.sim.methods import Fstq, make_method

    config = SimConfig(task=args.task, methods=("fstq",), seed=0, lr=args.lr, budget_bpp=args.budget_bpp,
                       threads=1, eval_size=10, **CAUSAL_DEFAULTS)
    started = time.perf_counter()
    bench = make_workbench(config)
    layout = bench.layout
    print(f"{args.task}: {layout.total:,} LoRA parameters in {len(layout.names)} tensors "
          f"(loaded in {time.perf_counter() - started:.0f} s); {config.clients} clients, round 1, "
          f"{config.local_steps} AdamW steps of {config.batch_size} at lr {config.lr}; budget {config.budget_bpp} "
          f"bit/param = {config.budget_bpp * layout.total / 8:,.0f} bytes")
    encode_config = config.encode_config()
    methods = [
        ("fstq (schema digest, fstq simulate)", make_method("fstq", layout, encode_config)),
        ("fstq-unbiased (schema digest)", make_method("fstq-unbiased", layout, encode_config)),
        ("fstq (tensors named, Flower App)", None),
    ]
    header = ("| client | message | bits/param | bytes | framing | header | block table | scales | codes "
              "| rel. error | Fisher-weighted rel. error |")
    print()
    print(header)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for client in range(config.clients):
        started = time.perf_counter()
        local = bench.train(bench.initial_state, client, 1)
        trained_s = time.perf_counter() - started
        update = {n: local.trained[n] - bench.initial_state[n] for n in layout.names}
        seed = seed_for(config.seed, 4, 1, client)
        for label, method in methods:
            if method is None:  # the Flower App's FstqMod: fstqcodec.encode without a schema
                message = fstqcodec.encode(update, fisher=local.fisher, config=encode_config.replace(seed=seed))
                decoded = fstqcodec.decode(message)
                parts = _anatomy(None, message)
            else:
                assert isinstance(method, Fstq)
                message = method.encode(update, fisher=local.fisher, state=method.new_client_state(), seed=seed)
                decoded = method.decode(message)
                parts = _anatomy(method, message)
            total = len(message)
            assert sum(parts.values()) == total, (parts, total)
            plain, weighted = _errors(update, decoded, local.fisher)

            def cell(part: str) -> str:
                return f"{parts.get(part, 0):,} ({parts.get(part, 0) / total:.2%})"

            print(f"| {client} | {label} | {8 * total / layout.total:.4f} | {total:,} | {cell('framing')} "
                  f"| {cell('header')} | {cell('blocks')} | {cell('scales')} | {cell('codes')} "
                  f"| {plain:.3f} | {weighted:.3f} |")
            other = sorted(set(parts) - {"framing", "header", "blocks", "scales", "codes"})
            if other:
                print(f"|   | (other sections: {', '.join(f'{k} {parts[k]:,}' for k in other)}) |")
        print(f"<!-- client {client}: trained in {trained_s:.0f} s, mean loss {local.mean_loss:.3f} -->")
    bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
