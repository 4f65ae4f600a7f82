"""``fstq prune``: accuracy and end-to-end speed of a classifier with its lowest-prior tokens dropped.

Kept free of torch imports at module level so ``fstq --help`` stays fast; torch and transformers load
only when the command runs. Bad input gets one line on stderr and exit status 2.

    fstq prune --model DIR --prior token_prior.fstq --keep-ratio 0.4
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

__all__ = ["add_arguments", "run", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``fstq prune`` to ``parser``."""
    parser.add_argument("--model", required=True,
                        help="a transformers sequence classifier (directory or packaged name), e.g. saved by "
                             "benchmarks/token_pruning.py --save")
    parser.add_argument("--prior", required=True, help="the token-importance prior: an fstq message or a .npz")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--keep-ratio", type=float, help="share of each input's tokens to keep, in (0, 1]")
    target.add_argument("--speedup", type=float, help="encoder-FLOPs reduction wanted (>= 1) instead of a keep ratio")
    parser.add_argument("--use", choices=["vocab", "position", "both"], default="both",
                        help="which part of the prior ranks tokens (default: both, the best on BBC training articles)")
    parser.add_argument("--task", default="bbc", help="labelled texts to evaluate on (default: bbc)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="held-out share (default: 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default: 0)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N held-out texts")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per text after truncation (default: 256)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _check_arguments(args: argparse.Namespace) -> None:
    if args.keep_ratio is not None and not 0.0 < args.keep_ratio <= 1.0:
        raise ValueError(f"--keep-ratio must be in (0, 1], got {args.keep_ratio}")
    if args.speedup is not None and not args.speedup >= 1.0:
        raise ValueError(f"--speedup must be >= 1, got {args.speedup}")
    for name in ("batch_size", "threads", "max_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if not pathlib.Path(args.prior).is_file():
        raise ValueError(f"{args.prior}: no such file")


def _load_prior(path: str) -> dict:
    import numpy as np

    import fstqcodec

    data = pathlib.Path(path).read_bytes()
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    try:
        return fstqcodec.decode(data)
    except fstqcodec.DecodeError as error:
        raise ValueError(f"{path}: not a valid fstq message or .npz ({error})") from None


def _load(args: argparse.Namespace, prior: dict):
    """Model, tokenizer and held-out texts; the prior is checked against the model's config first."""
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from fstqcodec import tokens

    from fstqcodec.sim.data import load_task, train_test_split
    from fstqcodec.sim.models import resolve_model_path

    path = resolve_model_path(args.model)
    if path == args.model and not pathlib.Path(path).is_dir():
        raise ValueError(f"{args.model}: no such model directory")
    config = AutoConfig.from_pretrained(path)
    tokens.check_prior(prior, vocab_size=config.vocab_size,
                       max_positions=getattr(config, "max_position_embeddings", None), use=args.use)
    task = load_task(args.task)
    if config.num_labels != task.num_labels:
        raise ValueError(f"the model has {config.num_labels} labels but task {args.task!r} has {task.num_labels}")
    _, test = train_test_split(task.labels, args.test_fraction, args.seed)
    test = test[: args.limit] if args.limit else test
    transformers.utils.logging.disable_progress_bar()  # stderr is for the one-line error
    transformers.utils.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    return model, tokenizer, [task.texts[i] for i in test], task.labels[test]


def measure(pruned, tokenizer, texts, labels, *, max_length: int, batch_size: int) -> dict:
    """Unpruned and pruned, text in and labels out, interleaved batch by batch; returns the report.

    Raises
    ------
    ValueError
        If ``texts`` is empty.
    """
    import numpy as np
    import torch

    if not texts:
        raise ValueError("nothing to evaluate: the held-out split is empty")
    seconds = {"unpruned": 0.0, "pruned": 0.0}
    correct = {"unpruned": 0, "pruned": 0}
    kept = total = 0
    for number, start in enumerate(range(0, len(texts), batch_size)):
        order = ("unpruned", "pruned") if number % 2 == 0 else ("pruned", "unpruned")
        for variant in order:
            began = time.perf_counter()
            batch = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length,
                              padding=True, return_tensors="pt")
            with torch.inference_mode():
                if variant == "pruned":
                    inputs = pruned.prune(batch["input_ids"], batch["attention_mask"])
                    kept += int(inputs["attention_mask"].sum())
                    total += int(batch["attention_mask"].sum())
                    predicted = pruned.model(**inputs).logits.argmax(dim=-1)
                else:
                    predicted = pruned.model(**batch).logits.argmax(dim=-1)
            seconds[variant] += time.perf_counter() - began
            correct[variant] += int((predicted.numpy() == np.asarray(labels[start:start + batch_size])).sum())
    n = len(texts)
    return {
        "examples": n, "tokens_kept": kept / total,
        "accuracy_unpruned": correct["unpruned"] / n, "accuracy_pruned": correct["pruned"] / n,
        "seconds_unpruned": seconds["unpruned"], "seconds_pruned": seconds["pruned"],
        "speedup": seconds["unpruned"] / seconds["pruned"],
    }


def run(args: argparse.Namespace) -> int:
    """Run ``fstq prune`` with parsed arguments; returns the process exit status."""
    try:
        _check_arguments(args)
    except ValueError as error:
        print(f"fstq prune: {error}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import torch

        from fstqcodec import tokens
    except ImportError as error:
        print(f"fstq prune needs torch and transformers (pip install 'fstqcodec[peft]'): {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        prior = _load_prior(args.prior)
        model, tokenizer, texts, labels = _load(args, prior)
        pruned = tokens.PrunedClassifier(model, prior, keep_ratio=args.keep_ratio, speedup=args.speedup,
                                         special_ids=tokenizer.all_special_ids, use=args.use)
        report = measure(pruned, tokenizer, texts, labels, max_length=args.max_length, batch_size=args.batch_size)
    except (ValueError, RuntimeError, OSError) as error:
        print(f"fstq prune: {error}".splitlines()[0], file=sys.stderr)
        return 2
    report.update(model=args.model, task=args.task, keep_ratio=args.keep_ratio, speedup_target=args.speedup,
                  use=args.use, max_length=args.max_length, batch_size=args.batch_size, threads=args.threads)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['examples']} held-out texts of {args.task}, {report['tokens_kept']:.1%} of tokens kept\n"
              f"  unpruned: accuracy {report['accuracy_unpruned']:.4f}, {report['seconds_unpruned']:.2f} s\n"
              f"  pruned:   accuracy {report['accuracy_pruned']:.4f}, {report['seconds_pruned']:.2f} s\n"
              f"  end-to-end speedup {report['speedup']:.2f}x, accuracy change "
              f"{100 * (report['accuracy_pruned'] - report['accuracy_unpruned']):+.2f} points")
    return 0


def main(argv=None) -> int:
    """Entry point of ``fstq prune`` (also ``python -m fstqcodec.prune_cli``)."""
    parser = argparse.ArgumentParser(prog="fstq prune", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
