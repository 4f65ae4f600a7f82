"""Inference token reduction on BBC News: Fisher-prior selection against random and attention scores.

all-MiniLM-L6-v2 gets a trained classification head (pooler and classifier, encoder frozen) on the
training split at 256 tokens; the token-importance prior is accumulated from the token Fisher
(``fstqcodec.torch.token_fisher``) of training articles; which part of the prior ranks tokens
(vocabulary id, position, both) is chosen on training articles the head did not see. Then, on the
whole held-out split, each method runs end to end (raw text in, tokeniser, selection, model, labels
out) at each keep ratio (with plain truncation to the first tokens beside them), timed against the unpruned model in the same run, interleaved, repeated.

    python benchmarks/token_pruning.py            # about 20 minutes on 2 busy cores

Writes ``benchmarks/token_pruning_results/records.json`` and ``token_pruning.png``; prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from fstqcodec import tokens  # noqa: E402
from fstqcodec.sim.data import load_task, train_test_split  # noqa: E402
from fstqcodec.sim.models import resolve_model_path  # noqa: E402
from fstqcodec.torch import token_fisher  # noqa: E402

METHODS = ("fisher", "random", "attention", "truncate")
RESULTS = pathlib.Path(__file__).resolve().parent / "token_pruning_results"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--head-examples", type=int, default=640, help="training articles for the head")
    parser.add_argument("--fisher-examples", type=int, default=320, help="training articles for the prior")
    parser.add_argument("--select-examples", type=int, default=160, help="training articles to choose the prior's use")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.4, 0.3, 0.2])
    parser.add_argument("--repeats", type=int, default=1, help="timed passes over the held-out set")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    parser.add_argument("--test-limit", type=int, default=None, help="development only: fewer held-out articles")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--save", type=pathlib.Path, default=None,
                        help="also save the trained classifier and the prior message here (for `fstq prune`)")
    return parser.parse_args(argv)


def load_model():
    path = resolve_model_path("all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    model.eval()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(("bert.pooler", "classifier")))
    return model, tokenizer


def encode_texts(tokenizer, texts, max_length):
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")


@torch.inference_mode()
def cls_features(model, tokenizer, texts, max_length, batch_size):
    out = []
    for start in range(0, len(texts), batch_size):
        batch = encode_texts(tokenizer, texts[start:start + batch_size], max_length)
        out.append(model.bert(**batch).last_hidden_state[:, 0].clone())
    return torch.cat(out)


def train_head(model, features, labels, seed, epochs=60):
    """Pooler and classifier on cached [CLS] states (the encoder is frozen, so this is exact)."""
    torch.manual_seed(seed)
    head = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(head, lr=2e-3, weight_decay=0.01)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(labels)).split(32):
            pooled = model.bert.pooler(features[index].unsqueeze(1))
            logits = model.classifier(model.dropout(pooled))
            loss = torch.nn.functional.cross_entropy(logits, labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def build_prior(model, tokenizer, texts, labels, max_length, batch_size=16):
    config = model.config
    accumulator = tokens.TokenPriorAccumulator(config.vocab_size, config.max_position_embeddings)
    for start in range(0, len(texts), batch_size):
        batch = dict(encode_texts(tokenizer, texts[start:start + batch_size], max_length))
        batch["labels"] = labels[start:start + batch_size]
        scores = token_fisher(model, batch)
        accumulator.observe(batch["input_ids"], batch["attention_mask"], scores)
    return accumulator.prior()


def make_scorer(method, model, prior, use, seed):
    generator = torch.Generator().manual_seed(seed)
    if method == "fisher":
        return lambda ids, mask: tokens.prior_scores(prior, ids, use=use)
    if method == "random":
        return lambda ids, mask: tokens.random_scores(ids, generator=generator)
    if method == "attention":
        return lambda ids, mask: tokens.first_layer_attention_scores(model, ids, mask)
    if method == "truncate":  # the first tokens: plain truncation to the kept length
        return lambda ids, mask: -torch.arange(ids.shape[1], dtype=torch.float32).expand(ids.shape)
    raise ValueError(method)


@torch.inference_mode()
def predict_batch(model, tokenizer, texts, *, max_length, keep_ratio=1.0, scorer=None):
    """Raw text in, labels out for one batch; returns (labels, seconds, tokens kept, tokens in)."""
    start_time = time.perf_counter()
    batch = encode_texts(tokenizer, texts, max_length)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    inputs = {"input_ids": ids, "attention_mask": mask}
    if scorer is not None and keep_ratio < 1.0:
        inputs = tokens.select_tokens(ids, mask, scorer(ids, mask), keep_ratio,
                                      special_ids=tokenizer.all_special_ids, pad_id=tokenizer.pad_token_id)
    labels = model(**inputs).logits.argmax(dim=-1)
    seconds = time.perf_counter() - start_time
    return labels.numpy(), seconds, int(inputs["attention_mask"].sum()), int(mask.sum())


def predict(model, tokenizer, texts, *, max_length, batch_size, keep_ratio=1.0, scorer=None):
    """Labels for all texts (used to choose the prior's use)."""
    return np.concatenate([
        predict_batch(model, tokenizer, texts[s:s + batch_size], max_length=max_length,
                      keep_ratio=keep_ratio, scorer=scorer)[0]
        for s in range(0, len(texts), batch_size)
    ])


def choose_use(model, tokenizer, prior, texts, labels, args):
    """Pick vocab / position / both by accuracy on training articles unseen by the head (ratio 0.3)."""
    scores = {}
    for use in ("vocab", "position", "both"):
        scorer = make_scorer("fisher", model, prior, use, args.seed)
        predicted = predict(model, tokenizer, texts, max_length=args.max_length,
                                  batch_size=args.batch_size, keep_ratio=min(args.ratios), scorer=scorer)
        scores[use] = float(np.mean(predicted == labels))
        print(f"  choose prior use on {len(texts)} training articles at keep {min(args.ratios)}: {use} {scores[use]:.4f}", flush=True)
    return max(scores, key=lambda use: (scores[use], use == "vocab")), scores


def run_grid(model, tokenizer, prior, use, texts, labels, args):
    """Every method and ratio on every held-out batch, interleaved batch by batch (rotating the order)
    so that the load of a shared machine falls alike on all; repeated ``args.repeats`` times."""
    configs = [("full", 1.0)] + [(m, r) for r in args.ratios for m in METHODS]
    scorers = {c: None if c[0] == "full" else make_scorer(c[0], model, prior, use, args.seed) for c in configs}
    rows = {c: {"method": c[0], "keep_ratio": c[1], "seconds": [0.0] * args.repeats, "batch_seconds": [],
                "predicted": [], "kept": 0, "total": 0} for c in configs}
    starts = list(range(0, len(texts), args.batch_size))
    for repeat in range(args.repeats):
        for number, start in enumerate(starts):
            chunk = texts[start:start + args.batch_size]
            shift = (number + repeat) % len(configs)
            for config in configs[shift:] + configs[:shift]:
                predicted, seconds, kept, total = predict_batch(
                    model, tokenizer, chunk, max_length=args.max_length, keep_ratio=config[1], scorer=scorers[config])
                row = rows[config]
                row["seconds"][repeat] += seconds
                row["batch_seconds"].append(seconds)
                if repeat == 0:
                    row["predicted"].append(predicted)
                    row["kept"] += kept
                    row["total"] += total
            print(f"  repeat {repeat} batch {number + 1}/{len(starts)}: full {rows[configs[0]]['batch_seconds'][-1]:.1f} s",
                  flush=True)
    return summarise(rows, configs, labels)


def summarise(rows, configs, labels):
    full = rows[configs[0]]
    out = []
    for config in configs:
        row = rows[config]
        row["accuracy"] = float(np.mean(np.concatenate(row.pop("predicted")) == labels))
        row["tokens_kept"] = row.pop("kept") / row.pop("total")
        # One paired ratio per batch (same batch, same moment): the spread shows the machine's noise.
        per_batch = np.array(full["batch_seconds"]) / np.array(row["batch_seconds"])
        row["speedup"] = float(sum(full["seconds"]) / sum(row["seconds"]))
        row["speedup_batch_quartiles"] = [float(q) for q in np.percentile(per_batch, [25, 50, 75])]
        out.append(row)
    for row in out:
        row["accuracy_loss_points"] = 100 * (full["accuracy"] - row["accuracy"])
    return out


def through_codec(prior, bits_per_param):
    """The prior as a client would send it: encoded under a budget, decoded by the server."""
    import fstqcodec

    message = fstqcodec.encode(prior, budget=fstqcodec.Budget(bits_per_param=bits_per_param))
    decoded = fstqcodec.decode(message)
    raw = sum(value.nbytes for value in prior.values())
    return decoded, message, {"bits_per_param": bits_per_param, "message_bytes": len(message), "raw_float32_bytes": raw}


def print_table(rows):
    print(f"\n{'method':10s} {'keep':>5s} {'tokens':>7s} {'accuracy':>9s} {'loss pts':>9s} {'speedup':>8s} {'batch quartiles':>18s}")
    for row in rows:
        quartiles = "/".join(f"{q:.2f}" for q in row["speedup_batch_quartiles"])
        print(f"{row['method']:10s} {row['keep_ratio']:5.2f} {row['tokens_kept']:7.3f} {row['accuracy']:9.4f} "
              f"{row['accuracy_loss_points']:9.2f} {row['speedup']:7.2f}x {quartiles:>18s}")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next(r for r in rows if r["method"] == "full")
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, style in (("fisher", "o-"), ("random", "s--"), ("attention", "^:"), ("truncate", "d-.")):
        chosen = sorted((r for r in rows if r["method"] == method), key=lambda r: -r["keep_ratio"])
        chosen = [full] + chosen
        axes[0].plot([r["keep_ratio"] for r in chosen], [100 * r["accuracy"] for r in chosen], style, label=method)
        axes[1].plot([r["speedup"] for r in chosen], [100 * r["accuracy"] for r in chosen], style, label=method)
    for axis in axes:
        axis.axhline(100 * full["accuracy"] - 1, color="grey", lw=0.8, ls="--")
        axis.set_ylabel("held-out accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend()
    axes[0].set_xlabel("keep ratio (share of tokens kept)")
    axes[0].invert_xaxis()
    axes[1].set_xlabel("end-to-end speedup vs. unpruned (text in, labels out)")
    axes[1].axvline(2.0, color="grey", lw=0.8, ls="--")
    figure.suptitle("all-MiniLM-L6-v2 on BBC News, 256 tokens: token reduction before the encoder")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    task = load_task("bbc")
    train, test = train_test_split(task.labels, 0.2, args.seed)
    rng = np.random.default_rng(args.seed)
    pool = rng.permutation(train)
    head_idx = pool[:args.head_examples]
    fisher_idx = pool[args.head_examples:args.head_examples + args.fisher_examples]
    select_idx = pool[args.head_examples + args.fisher_examples:][:args.select_examples]
    if args.test_limit:
        test = test[:args.test_limit]
    texts = lambda idx: [task.texts[i] for i in idx]  # noqa: E731
    labels = torch.as_tensor(task.labels)
    torch.manual_seed(args.seed)  # the new classifier's initial weights
    model, tokenizer = load_model()
    timings = {}

    t = time.perf_counter()
    features = cls_features(model, tokenizer, texts(head_idx), args.max_length, args.batch_size)
    train_head(model, features, labels[head_idx], args.seed)
    timings["head_seconds"] = time.perf_counter() - t
    print(f"head trained on {len(head_idx)} articles in {timings['head_seconds']:.0f} s", flush=True)

    t = time.perf_counter()
    prior = build_prior(model, tokenizer, texts(fisher_idx), labels[fisher_idx], args.max_length)
    timings["prior_seconds"] = time.perf_counter() - t
    prior, message, codec = through_codec(prior, bits_per_param=4)
    if args.save:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
        (args.save / "token_prior.fstq").write_bytes(message)
    print(f"prior from {len(fisher_idx)} articles in {timings['prior_seconds']:.0f} s; "
          f"{codec['message_bytes']} bytes on the wire ({codec['raw_float32_bytes']} raw)", flush=True)

    use, use_scores = choose_use(model, tokenizer, prior, texts(select_idx), task.labels[select_idx], args)
    rows = run_grid(model, tokenizer, prior, use, texts(test), task.labels[test], args)
    print_table(rows)
    timings["total_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "token_pruning", "command": "python benchmarks/token_pruning.py " + " ".join(argv or sys.argv[1:]),
        "model": "all-MiniLM-L6-v2", "task": "bbc", "held_out_articles": len(test),
        "settings": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
        "prior_use": use, "prior_use_selection_accuracy": use_scores, "prior_codec": codec,
        "timings": timings, "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    (args.out / "records.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(rows, args.out / "token_pruning.png")
    print(f"wrote {args.out / 'records.json'} and token_pruning.png in {timings['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
