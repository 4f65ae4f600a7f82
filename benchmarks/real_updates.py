"""fstq and its peers on real client updates (the corpus in benchmarks/real_updates/).

For every capture (one round of the reference loop: a few clients' LoRA updates, their Fisher and
the held-out gradient g at the round's global adapter) and every rate, each method encodes each
client's update to real bytes, which are decoded and compared with the update:

* rel MSE      mean over clients of |xhat - x|**2 / |x|**2
* Fisher err   mean over clients of sum F (xhat - x)**2 / sum F x**2 (F: the client's own Fisher)
* bits/param   8 * len(message) / elements, every byte counted (mean over clients)
* give-back    first-order loss increase of the server's FedAvg average over the exact average,
               relative to the size of the update's own first-order change:
               g . (mean xhat - mean x) / |g . mean x|. 0 is lossless; 1 (when the update lowers
               the loss) gives back the whole round's progress; < 0 does better than the update.
               It sees bias only: an unbiased code's noise averages out of it (its cost is second
               order, in the MSE columns).

Methods: fstq without Fisher, with Fisher**0.5 (the loop's default) and Fisher**1, all under
``Budget(bits_per_param=rate)`` with the tensors named by a schema digest (as the loop sends them);
fstq's unbiased mode (``unbiased=True``, Fisher**0.5);
DRIVE/EDEN with unbiased and least-squares scales (sub-bit rates by shared-random subsampling);
scaled sign at 1 bit; top-k (uint32 index + float32 value); QSGD and NF4 at 4 bits. One shot:
every error-feedback memory starts empty, as in a client's first round.

    python benchmarks/real_updates.py                       # every capture, every rate
    python benchmarks/real_updates.py --regime bbc-s2 --rates 0.25,1
    python benchmarks/real_updates.py --fill                # budget fill, 0.1-8 bits/param
    python benchmarks/real_updates.py --draws 20            # give-back over 20 draws of the random codes

One draw of an unbiased code gives back a random amount (zero in expectation): ``--draws N`` repeats
the random methods (EDEN unbiased, fstq unbiased) with N seeds per client and prints the give-back's
mean and standard deviation over the draws, beside the deterministic methods' single value.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from real_corpus import corpus_files, load_capture  # noqa: E402

import fstqcodec  # noqa: E402
from fstqcodec.sim import peers  # noqa: E402
from fstqcodec.sim.methods import UpdateLayout, make_method  # noqa: E402

RATES = (0.25, 0.5, 1.0, 2.0, 4.0)


def _fstq(power, unbiased=False):
    def encode(capture, client, rate, schema, draw=0):
        fisher = None if power is None else capture.fishers[client]
        message = fstqcodec.encode(capture.updates[client], fisher=fisher, fisher_power=power or 1.0,
                                   budget=fstqcodec.Budget(bits_per_param=rate), schema=schema,
                                   unbiased=unbiased, seed=_draw_seed(client, draw) if unbiased else 0)
        return message, fstqcodec.decode(message, schemas=schema)
    return encode


def _draw_seed(client: int, draw: int) -> int:
    """The random methods' seed for one client's message in one draw (draw 0: the tables')."""
    return 1000 + client + 100 * draw


def _eden(scale):
    def encode(capture, client, rate, schema, draw=0):
        names = capture.names
        flat = np.concatenate([capture.updates[client][n].ravel() for n in names])
        bits, fraction = (1, rate) if rate < 1 else (int(rate), 1.0)
        message = peers.eden_encode(flat, bits=bits, fraction=fraction, scale=scale, seed=_draw_seed(client, draw))
        return message, _unflatten(capture, peers.eden_decode(message))
    return encode


def _sign(capture, client, rate, schema, draw=0):
    if rate != 1:
        return None
    names = capture.names
    message = peers.sign_encode([capture.updates[client][n] for n in names])
    decoded = peers.sign_decode(message, [capture.updates[client][n].size for n in names])
    return message, {n: d.reshape(capture.updates[client][n].shape) for n, d in zip(names, decoded)}


def _sim_method(name, only_rate=None):
    def encode(capture, client, rate, schema, draw=0):
        if only_rate is not None and rate != only_rate:
            return None
        layout = UpdateLayout({n: capture.updates[client][n].shape for n in capture.names})
        method = make_method(name, layout, fstqcodec.EncodeConfig(budget=fstqcodec.Budget(bits_per_param=rate)))
        message = method.encode(capture.updates[client], fisher=None, state=method.new_client_state(), seed=client)
        return message, method.decode(message)
    return encode


METHODS = {
    "fstq-nofisher": _fstq(None),
    "fstq F^0.5": _fstq(0.5),
    "fstq F^1": _fstq(1.0),
    "fstq unbiased": _fstq(0.5, unbiased=True),
    "eden-unbiased": _eden("unbiased"),
    "eden-ls": _eden("ls"),
    "scaled sign": _sign,
    "topk": _sim_method("topk"),
    "qsgd4": _sim_method("qsgd4", 4.0),
    "nf4": _sim_method("nf4", 4.0),
}


def _unflatten(capture, flat):
    out, offset = {}, 0
    for name in capture.names:
        shape = capture.updates[0][name].shape
        size = int(np.prod(shape))
        out[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    return out


def _dot(a, b, names):
    return sum(float(np.dot(a[n].ravel().astype(np.float64), b[n].ravel().astype(np.float64))) for n in names)


def measure(capture, method, rate, draw: int = 0) -> dict | None:
    """The four figures of one method at one rate on one capture (None: not at this rate)."""
    names = capture.names
    schema = fstqcodec.Schema.of(capture.updates[0])
    elements = sum(capture.updates[0][n].size for n in names)
    weights = capture.weights / capture.weights.sum()
    rel, fisher_err, bits = [], [], []
    mean_x = {n: np.zeros(capture.updates[0][n].shape) for n in names}
    mean_xhat = {n: np.zeros(capture.updates[0][n].shape) for n in names}
    for client, (x, fisher) in enumerate(zip(capture.updates, capture.fishers)):
        result = method(capture, client, rate, schema, draw=draw)
        if result is None:
            return None
        message, xhat = result
        error = {n: xhat[n].astype(np.float64) - x[n] for n in names}
        rel.append(_dot(error, error, names) / _dot(x, x, names))
        weighted = {n: fisher[n] * error[n] for n in names}
        fisher_x = {n: fisher[n] * x[n] for n in names}
        fisher_err.append(_dot(weighted, error, names) / _dot(fisher_x, x, names))
        bits.append(8.0 * len(message) / elements)
        for n in names:
            mean_x[n] += weights[client] * x[n]
            mean_xhat[n] += weights[client] * xhat[n]
    gain = abs(_dot(capture.gradient, mean_x, names))
    change = _dot(capture.gradient, {n: mean_xhat[n] - mean_x[n] for n in names}, names)
    return {"rel_mse": float(np.mean(rel)), "fisher_err": float(np.mean(fisher_err)),
            "bits": float(np.mean(bits)), "change": change, "gain": gain}


FILL_BUDGETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def fill_table(files) -> None:
    """Spent over budget of fstq on every client update of ``files``, per budget and Fisher power."""
    print(f"| {'capture':<22} | {'Fisher':>6} | " + " | ".join(f"{b:>5}" for b in FILL_BUDGETS) + " |  min  |")
    print(f"|{'-' * 24}|{'-' * 8}|" + "|".join("-" * 7 for _ in FILL_BUDGETS) + "|-------|")
    worst = 1.0
    for path in files:
        capture = load_capture(path)
        elements = sum(v.size for v in capture.updates[0].values())
        for power in (None, 0.5, 1.0):
            fills = []
            for bits in FILL_BUDGETS:
                limit = int(bits * elements // 8)
                per_client = [len(fstqcodec.encode(x, fisher=None if power is None else f, fisher_power=power or 1.0,
                                                   budget=limit)) / limit
                              for x, f in zip(capture.updates, capture.fishers)]
                fills.append(min(per_client))
            worst = min(worst, min(fills))
            label = "none" if power is None else f"^{power:g}"
            print(f"| {path.stem:<22} | {label:>6} | " + " | ".join(f"{v:>5.3f}" for v in fills)
                  + f" | {min(fills):.3f} |", flush=True)
    print(f"\nsmallest fill (spent / budget, worst client): {worst:.3f}")


#: The methods whose messages depend on the seed (the others give the same bytes every draw).
RANDOM_METHODS = ("eden-unbiased", "eden-ls", "fstq unbiased")


def _give_back(results) -> float:
    # Pooled over the captures (a round whose update barely moves the loss would otherwise
    # dominate a mean of ratios).
    return sum(r["change"] for r in results) / sum(r["gain"] for r in results)


def draws_table(files, regimes, rates, methods, draws: int) -> None:
    """Give-back per regime, rate and method: mean +- std over ``draws`` seeds for random methods."""
    print(f"| {'regime':<14} | {'rate':>4} | {'method':<14} | {'draws':>5} | {'give-back mean':>14} | {'std':>6} |")
    print(f"|{'-' * 16}|{'-' * 6}|{'-' * 16}|{'-' * 7}|{'-' * 16}|{'-' * 8}|")
    for regime in regimes:
        captures = [load_capture(p) for p in files if _regime(p) == regime]
        for rate in rates:
            for name in methods:
                count = draws if name in RANDOM_METHODS else 1
                values = []
                for draw in range(count):
                    results = [measure(c, METHODS[name], rate, draw) for c in captures]
                    if any(r is None for r in results):
                        break
                    values.append(_give_back(results))
                if values:
                    print(f"| {regime:<14} | {rate:>4} | {name:<14} | {len(values):>5} | {np.mean(values):>14.3f} | "
                          f"{np.std(values):>6.3f} |", flush=True)


def _regime(path: pathlib.Path) -> str:
    return path.stem.rsplit("-r", 1)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", action="append", help="e.g. bbc-s2 (default: every regime)")
    parser.add_argument("--rates", default=",".join(str(r) for r in RATES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--fill", action="store_true", help="print the budget fill table instead")
    parser.add_argument("--draws", type=int, default=0, help="give-back over this many draws of the random methods")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    files = [p for p in corpus_files() if args.regime is None or _regime(p) in args.regime]
    if args.fill:
        fill_table(files)
        return 0
    regimes = sorted({_regime(p) for p in files})
    if args.draws:
        draws_table(files, regimes, rates, methods, args.draws)
        return 0
    for regime in regimes:
        captures = [load_capture(p) for p in files if _regime(p) == regime]
        rounds = ", ".join(f"r{c.meta['round']}" for c in captures)
        elements = sum(v.size for v in captures[0].updates[0].values())
        print(f"\n## {regime} ({rounds}; {len(captures[0].updates)} clients each; {elements} parameters); "
              "mean over captures and clients, give-back pooled over captures")
        print(f"| {'rate':>4} | {'method':<14} | {'bits/param':>10} | {'rel MSE':>8} | {'Fisher err':>10} | {'give-back':>9} |")
        print(f"|{'-' * 6}|{'-' * 16}|{'-' * 12}|{'-' * 10}|{'-' * 12}|{'-' * 11}|")
        for rate in rates:
            for name in methods:
                results = [measure(c, METHODS[name], rate) for c in captures]
                if any(r is None for r in results):
                    continue
                mean = {k: float(np.mean([r[k] for r in results])) for k in ("rel_mse", "fisher_err", "bits")}
                mean["give_back"] = _give_back(results)
                print(f"| {rate:>4} | {name:<14} | {mean['bits']:>10.3f} | {mean['rel_mse']:>8.4f} | "
                      f"{mean['fisher_err']:>10.4f} | {mean['give_back']:>9.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
