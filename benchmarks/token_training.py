"""Training on the most informative tokens: client compute saved, and accuracy, against full sequences.

One client's local training, centrally (not the federated loop): all-MiniLM-L6-v2 with LoRA on BBC
News at 128 tokens. Warm-up steps on full sequences record the token Fisher with
``TokenFisherRecorder`` (from the backward passes training runs anyway) into a token-importance
prior, which is sent through the codec at 4 bits/param (bytes counted) and decoded, as a server
would receive it. Then, from the same state, the same number of steps three ways: full sequences,
the prior's top tokens at a keep ratio, random tokens at that ratio, with the seconds of every step
measured (interleaved step by step) and held-out accuracy after.

    python benchmarks/token_training.py            # about 10 minutes on 2 busy cores

Writes ``benchmarks/token_pruning_results/training_records.json``; prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import fstqcodec  # noqa: E402
from fstqcodec import tokens  # noqa: E402
from fstqcodec.sim.data import load_task, train_test_split  # noqa: E402
from fstqcodec.sim.models import load_lora_classifier, tokenize  # noqa: E402
from fstqcodec.torch import TokenFisherRecorder  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "token_pruning_results"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--warmup-steps", type=int, default=24, help="full-sequence steps that record the prior")
    parser.add_argument("--steps", type=int, default=30, help="steps of each variant after the warm-up")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-size", type=int, default=240, help="held-out articles for accuracy")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    return parser.parse_args(argv)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model, optimizer, batch):
    began = time.perf_counter()
    loss = model(**batch).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - began


@torch.inference_mode()
def accuracy(model, data, indices, batch_size=32):
    model.eval()
    correct = 0
    for start in range(0, len(indices), batch_size):
        batch = data.batch(indices[start:start + batch_size])
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(dim=-1) == labels).sum())
    model.train()
    return correct / len(indices)


def warm_up(model, data, order, args):
    """Full-sequence steps; the token Fisher of their backward passes becomes the prior."""
    config = model.config
    accumulator = tokens.TokenPriorAccumulator(config.vocab_size, config.max_position_embeddings)
    optimizer = torch.optim.AdamW(trainable(model), lr=args.lr)
    seconds = 0.0
    with TokenFisherRecorder(model.get_input_embeddings()) as recorder:
        for step in range(args.warmup_steps):
            batch = data.batch(order[step * args.batch_size:(step + 1) * args.batch_size])
            seconds += train_step(model, optimizer, batch)
            accumulator.observe(batch["input_ids"], batch["attention_mask"], recorder.last)
    return accumulator.prior(), optimizer, seconds


def compare(model, optimizer, prior, data, order, special_ids, args):
    variants = {name: (copy.deepcopy(model), None) for name in ("full", "fisher", "random")}
    for name, (copy_model, _) in variants.items():
        copied = torch.optim.AdamW(trainable(copy_model), lr=args.lr)
        copied.load_state_dict(optimizer.state_dict())
        variants[name] = (copy_model, copied)
    generator = torch.Generator().manual_seed(args.seed)
    seconds = {name: [] for name in variants}
    tokens_seen = {name: 0 for name in variants}
    offset = args.warmup_steps * args.batch_size
    for step in range(args.steps):
        batch = data.batch(order[offset + step * args.batch_size:offset + (step + 1) * args.batch_size])
        names = list(variants)[step % 3:] + list(variants)[:step % 3]
        for name in names:
            copy_model, copied = variants[name]
            began = time.perf_counter()  # the selection is part of the client's compute
            if name == "fisher":
                scores = tokens.prior_scores(prior, batch["input_ids"], use="both")
            elif name == "random":
                scores = tokens.random_scores(batch["input_ids"], generator=generator)
            chosen = batch if name == "full" else tokens.reduce_batch(
                batch, scores, args.keep_ratio, special_ids=special_ids)
            selection = time.perf_counter() - began
            seconds[name].append(selection + train_step(copy_model, copied, chosen))
            tokens_seen[name] += int(chosen["attention_mask"].sum())
    return variants, seconds, tokens_seen


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    task = load_task("bbc")
    train, test = train_test_split(task.labels, 0.2, args.seed)
    model, tokenizer = load_lora_classifier("all-MiniLM-L6-v2", task.num_labels, seed=args.seed)
    model.train()
    data = tokenize(tokenizer, task.texts, task.labels, args.max_length)
    order = np.random.default_rng(args.seed).permutation(train)
    evaluation = np.random.default_rng(args.seed + 1).permutation(test)[:args.eval_size]

    prior, optimizer, warm_seconds = warm_up(model, data, order, args)
    message = fstqcodec.encode(prior, budget=fstqcodec.Budget(bits_per_param=4))
    prior = fstqcodec.decode(message)
    start_accuracy = accuracy(model, data, evaluation)
    print(f"warm-up {args.warmup_steps} steps in {warm_seconds:.0f} s, accuracy {start_accuracy:.4f}; "
          f"prior {len(message)} bytes through the codec", flush=True)

    variants, seconds, tokens_seen = compare(model, optimizer, prior, data, order, tokenizer.all_special_ids, args)
    rows = []
    for name, (trained, _) in variants.items():
        rows.append({"selection": name, "keep_ratio": 1.0 if name == "full" else args.keep_ratio,
                     "accuracy": accuracy(trained, data, evaluation), "seconds": float(sum(seconds[name])),
                     "tokens": tokens_seen[name], "step_seconds": seconds[name]})
    full = rows[0]
    print(f"\n{'selection':10s} {'keep':>5s} {'tokens':>8s} {'seconds':>8s} {'compute saved':>14s} {'accuracy':>9s}")
    for row in rows:
        row["compute_saved"] = 1 - row["seconds"] / full["seconds"]
        print(f"{row['selection']:10s} {row['keep_ratio']:5.2f} {row['tokens']:8d} {row['seconds']:8.1f} "
              f"{row['compute_saved']:13.1%} {row['accuracy']:9.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "token_training", "command": "python benchmarks/token_training.py " + " ".join(argv or sys.argv[1:]),
              "settings": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
              "eval_articles": len(evaluation), "warmup_seconds": warm_seconds, "accuracy_after_warmup": start_accuracy,
              "prior_message_bytes": len(message), "rows": rows}
    (args.out / "training_records.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
