"""Downlink proxies (FedQSN in fstq): bytes, privacy figures and accuracy against mask rates.

Two parts, both written to ``--out`` (``records.json`` and ``proxy_privacy.png``):

1. **Grid** (no training; seconds): for server mask rates 0-50% and client mask rates 0-20%, on the
   default task's LoRA adapter (``all-MiniLM-L6-v2``, rank 8, query/value: the adapter ``fstq
   simulate`` trains), the downlink bytes per client against fp32, the cosine similarity between the
   proxy a client decodes and the true adapter, and the share of the adapter any of 10 clients has
   seen after 20 rounds. The adapter is the initial one with lora_B filled with Gaussian values of
   lora_A's scale (lora_B starts at zero, which would make every proxy of it trivially exact).
2. **Accuracy** (training, ``fstq simulate`` in small settings): a few mask settings, both fills,
   against the plain fp32 downlink, all with the fp32 uplink so that only the downlink differs.

    python benchmarks/proxy_privacy.py --out benchmarks/proxy_results            # both parts
    python benchmarks/proxy_privacy.py --out benchmarks/proxy_results --grid-only

The accuracy part uses small settings (``--clients 4 --rounds 8 --local-steps 2``, eval 128
examples, one seed) to fit a busy 2-core machine; it is not the issue's 3-seed default-task run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import time

import numpy as np

SERVER_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
CLIENT_RATES = (0.0, 0.05, 0.1, 0.2)
#: (server mask, client mask, fill) of the accuracy runs; (0, 0) is the plain fp32 downlink.
ACCURACY_RUNS = ((0.0, 0.0, "zero"), (0.3, 0.1, "zero"), (0.3, 0.1, "previous"), (0.5, 0.2, "zero"))


def adapter_state(seed: int = 0) -> dict:
    """The default task's LoRA adapter (initial lora_A, Gaussian lora_B of lora_A's scale)."""
    from fstqcodec.peft import adapter_state as peft_adapter_state
    from fstqcodec.sim.models import load_lora_classifier

    model, _ = load_lora_classifier("all-MiniLM-L6-v2", 5, lora_rank=8, lora_alpha=16, target_modules=("query", "value"), seed=seed)
    state = {name: t.float().numpy().copy() for name, t in peft_adapter_state(model).items()}
    rng = np.random.default_rng(seed)
    scale = float(np.std(np.concatenate([v.ravel() for n, v in state.items() if "lora_A" in n])))
    for name, value in state.items():
        if "lora_B" in name or not np.any(value):
            state[name] = (rng.standard_normal(value.shape) * scale).astype(np.float32)
    return state


def grid(state: dict, *, bits_per_param: float, clients: int = 10, rounds: int = 20) -> list:
    from fstqcodec.proxy import ProxyServer, cosine_similarity, decode_proxy

    shapes = {name: value.shape for name, value in state.items()}
    fp32 = 4 * sum(value.size for value in state.values())
    rows = []
    for server_rate in SERVER_RATES:
        for client_rate in CLIENT_RATES:
            if server_rate == 0 and client_rate == 0:
                continue
            server = ProxyServer(shapes, server_keep=1 - server_rate, client_keep=1 - client_rate, seed=1,
                                 budget=_budget(bits_per_param))
            sizes, cosines = [], []
            for client in range(3):  # bytes and cosine: three clients of round 1
                message = server.downlink(state, client, 1)
                proxy, _ = decode_proxy(message)
                sizes.append(len(message))
                cosines.append(cosine_similarity(proxy, state))
            ever = {name: np.zeros(shape, bool) for name, shape in shapes.items()}
            for round_number in range(1, rounds + 1):
                for client in range(clients):
                    for name, seen in server.visible(client, round_number).items():
                        ever[name] |= seen
            seen_share = sum(int(v.sum()) for v in ever.values()) / sum(v.size for v in ever.values())
            rows.append({
                "server_mask": server_rate, "client_mask": client_rate, "bits_per_entry_sent": bits_per_param,
                "downlink_bytes": float(np.mean(sizes)), "fp32_bytes": fp32, "ratio_vs_fp32": fp32 / float(np.mean(sizes)),
                "cosine_mean": float(np.mean(cosines)), "fraction_ever_seen": seen_share,
                "ever_seen_after": f"{rounds} rounds x {clients} clients",
            })
            print(f"server {server_rate:.2f} client {client_rate:.2f}: {rows[-1]['downlink_bytes']:8.0f} B "
                  f"({rows[-1]['ratio_vs_fp32']:5.1f}x below fp32), cosine {rows[-1]['cosine_mean']:.3f}, "
                  f"ever seen {seen_share:.3f}", flush=True)
    return rows


def _budget(bits_per_param: float):
    from fstqcodec import Budget

    return Budget(bits_per_param=bits_per_param)


def accuracy_runs(bits_per_param: float, settings: dict, on_row=None) -> list:
    from fstqcodec.sim.loop import SimConfig, run_simulation

    rows = []
    for server_rate, client_rate, fill in ACCURACY_RUNS:
        started = time.perf_counter()
        config = SimConfig(methods=("fp32",), server_mask=server_rate, client_mask=client_rate, proxy_fill=fill,
                           downlink_bpp=bits_per_param, **settings)
        results = run_simulation(config, progress=False, workers=1)
        record = results["methods"]["fp32"]
        rounds = record["rounds"]
        params = results["config"]["trainable_parameters"]
        per_client = [r["downlink_bytes"] / results["config"]["clients_per_round"] for r in rounds[1:]]
        rows.append({
            "server_mask": server_rate, "client_mask": client_rate, "fill": fill,
            "final_accuracy": rounds[-1]["accuracy"], "curve": [r["accuracy"] for r in rounds],
            "downlink_bytes_per_client": float(np.mean(per_client)), "fp32_bytes": 4 * params,
            "ratio_vs_fp32": 4 * params / float(np.mean(per_client)),
            "cosine_per_round": [r.get("proxy_cosine_mean") for r in rounds[1:]],
            "fraction_ever_seen_per_round": [r.get("fraction_ever_seen") for r in rounds[1:]],
            "wall_s": time.perf_counter() - started,
        })
        row = rows[-1]
        print(f"server {server_rate} client {client_rate} fill {fill}: final accuracy {row['final_accuracy']:.3f}, "
              f"downlink {row['downlink_bytes_per_client']:.0f} B/client ({row['ratio_vs_fp32']:.1f}x below fp32), "
              f"{row['wall_s']:.0f} s", flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


_LOG_LINE = re.compile(r"server (?P<server>[\d.]+) client (?P<client>[\d.]+) fill (?P<fill>\w+): final accuracy "
                       r"(?P<accuracy>[\d.]+), downlink (?P<bytes>\d+) B/client \((?P<ratio>[\d.]+)x below fp32\), (?P<wall>\d+) s")


def accuracy_from_log(path: pathlib.Path) -> list:
    """The accuracy rows an interrupted run printed (final figures only: its curves were not kept)."""
    rows = []
    for line in path.read_text().splitlines():
        match = _LOG_LINE.fullmatch(line.strip())
        if match:
            rows.append({"server_mask": float(match["server"]), "client_mask": float(match["client"]), "fill": match["fill"],
                         "final_accuracy": float(match["accuracy"]), "curve": None,
                         "downlink_bytes_per_client": float(match["bytes"]), "ratio_vs_fp32": float(match["ratio"]),
                         "wall_s": float(match["wall"]), "source": f"parsed from {path.name}"})
    return rows


def plot(records: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for client_rate in CLIENT_RATES:
        rows = [r for r in records["grid"] if r["client_mask"] == client_rate]
        x = [r["server_mask"] for r in rows]
        axes[0].plot(x, [r["cosine_mean"] for r in rows], marker="o", label=f"client mask {client_rate:.0%}")
        axes[1].plot(x, [r["ratio_vs_fp32"] for r in rows], marker="o", label=f"client mask {client_rate:.0%}")
    axes[0].set(xlabel="server mask rate", ylabel="cosine(proxy, global adapter)", title="What a client's proxy reveals")
    axes[1].axhline(8, color="grey", linestyle="--", label="8x target")
    axes[1].set(xlabel="server mask rate", ylabel="fp32 bytes / proxy bytes", title="Downlink reduction per client")
    for axis in axes[:2]:
        axis.legend(fontsize=8)
    for row in records.get("accuracy", []):
        if row["curve"] is None:
            continue
        label = "fp32 downlink" if row["server_mask"] == 0 else f"server {row['server_mask']:.0%}, client {row['client_mask']:.0%}, {row['fill']}"
        axes[2].plot(range(len(row["curve"])), row["curve"], marker=".", label=label)
    logged = [r for r in records.get("accuracy", []) if r["curve"] is None]
    if logged:  # final accuracies only
        axes[2].barh([f"server {r['server_mask']:.0%}, client {r['client_mask']:.0%}, {r['fill']}" if r["server_mask"]
                      else "fp32 downlink" for r in logged], [r["final_accuracy"] for r in logged])
        axes[2].set(xlim=(0, 1), xlabel="final accuracy", title="Final accuracy (small settings, 1 seed)")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        return
    axes[2].set(xlabel="round", ylabel="accuracy", title="Accuracy (small settings, 1 seed)")
    axes[2].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--bits", type=float, default=4.0, help="downlink bits per entry sent (default 4)")
    parser.add_argument("--grid-only", action="store_true", help="skip the training runs")
    parser.add_argument("--accuracy-from-log", type=pathlib.Path, default=None,
                        help="with --grid-only: take the accuracy rows from the log of an interrupted full run")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    records_path = args.out / "records.json"
    records = json.loads(records_path.read_text()) if records_path.exists() else {}
    records["grid"] = grid(adapter_state(), bits_per_param=args.bits)
    if args.accuracy_from_log is not None:
        records["accuracy"] = accuracy_from_log(args.accuracy_from_log)
    if not args.grid_only:
        settings = {"clients": args.clients, "rounds": args.rounds, "local_steps": args.local_steps, "eval_size": 128}
        records["accuracy_settings"] = {**settings, "task": "bbc", "uplink": "fp32", "seed": 0, "downlink_bits": args.bits}

        def save(rows):  # after every run: a long sweep interrupted keeps what it measured
            records["accuracy"] = rows
            records_path.write_text(json.dumps(records, indent=1) + "\n")

        accuracy_runs(args.bits, settings, on_row=save)
    records_path.write_text(json.dumps(records, indent=1) + "\n")
    plot(records, args.out / "proxy_privacy.png")
    print(f"wrote {records_path} and {args.out / 'proxy_privacy.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
