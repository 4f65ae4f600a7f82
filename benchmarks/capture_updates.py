"""Regenerate the real-update corpus (benchmarks/real_updates/) from the reference loop.

Runs FedAvg with an fp32 (lossless) uplink, exactly as ``fstq simulate`` trains (same data split,
Dirichlet partition, LoRA model, AdamW per round, batch 8, lr 2e-3), and at chosen rounds keeps the
first ``--keep`` clients' updates and Fisher, their FedAvg weights and the held-out gradient at
the round's global adapter (see benchmarks/real_corpus.py for the file layout).

    python benchmarks/capture_updates.py                 # the committed corpus (~10 min on 2 cores)
    python benchmarks/capture_updates.py --only bbc-s2   # one regime
    python benchmarks/capture_updates.py --fixtures      # tests/data fixtures from the corpus

Regimes: ``bbc-s2`` (the default loop: BBC, 2 local steps), ``bbc-s10`` (10 local steps),
``drugreview-s8`` (the medical task at the 8 local steps it learns with); each captured at an early
and a late round.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from real_corpus import CORPUS_DIR, Capture, load_capture, save_capture, save_fixture  # noqa: E402

#: Test fixtures (tests/data/...): client 0 of a late-round capture of two tasks.
FIXTURES = {"real_update_bbc.npz": "bbc-s2-r10.npz", "real_update_drugreview.npz": "drugreview-s8-r06.npz"}

#: name -> (task, local steps, rounds captured)
REGIMES = {
    "bbc-s2": ("bbc", 2, (2, 10)),
    "bbc-s10": ("bbc", 10, (2, 6)),
    "drugreview-s8": ("drugreview", 8, (2, 6)),
}


def _seed_for(*parts: int) -> int:
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1)


class _Loop:
    """The reference loop's data, model and partition, built as fstq simulate builds them."""

    def __init__(self, task_name: str, seed: int = 0, clients: int = 10, alpha: float = 0.5):
        import torch

        from fstqcodec.peft import adapter_state, state_names
        from fstqcodec.sim.data import load_task, train_test_split
        from fstqcodec.sim.models import load_lora_classifier, tokenize
        from fstqcodec.sim.partition import dirichlet_partition
        from fstqcodec.torch import FisherAccumulator

        self.torch = torch
        task = load_task(task_name)
        train_idx, test_idx = train_test_split(task.labels, 0.2, seed)
        eval_idx = np.sort(np.random.default_rng(_seed_for(seed, 1)).permutation(test_idx)[:320])
        self.partition = dirichlet_partition(task.labels[train_idx], clients, alpha, seed)
        self.model, tokenizer = load_lora_classifier("all-MiniLM-L6-v2", task.num_labels, seed=seed)
        self.train = tokenize(tokenizer, [task.texts[i] for i in train_idx], task.labels[train_idx], 64)
        self.eval = tokenize(tokenizer, [task.texts[i] for i in eval_idx], task.labels[eval_idx], 64)
        names = state_names(self.model)
        parameters = dict(self.model.named_parameters())
        self.params = {state: parameters[param] for param, state in names.items()}
        self.names = list(adapter_state(self.model))
        self.global_state = {n: self.params[n].detach().numpy().astype(np.float32).copy() for n in self.names}
        self.accumulator = FisherAccumulator(self.model)
        self.seed = seed

    def load(self, state):
        with self.torch.no_grad():
            for n in self.names:
                self.params[n].copy_(self.torch.from_numpy(state[n]))

    def heldout_loss_and_gradient(self, state, with_gradient: bool):
        """Mean held-out loss at ``state`` and (optionally) its gradient; the Fisher is not touched."""
        self.load(state)
        self.model.eval()  # no dropout: the gradient of the loss the evaluation measures
        self.model.zero_grad(set_to_none=True)
        total = 0.0
        with self.accumulator.paused():
            for start in range(0, len(self.eval), 64):
                index = np.arange(start, min(start + 64, len(self.eval)))
                loss = self.model(**self.eval.batch(index)).loss * (len(index) / len(self.eval))
                if with_gradient:
                    loss.backward()
                total += float(loss.detach())
        self.model.train()
        gradient = None
        if with_gradient:
            gradient = {n: self.params[n].grad.detach().numpy().astype(np.float32).copy() for n in self.names}
            self.model.zero_grad(set_to_none=True)
        return total, gradient

    def client_update(self, client: int, round_number: int, local_steps: int):
        """(update, Fisher) of one client trained from the global adapter, as the loop trains it."""
        from fstqcodec.peft import adapter_fisher

        torch = self.torch
        self.load(self.global_state)
        optimizer = torch.optim.AdamW([self.params[n] for n in self.names], lr=2e-3, weight_decay=0.0)
        self.accumulator.reset()
        client_seed = _seed_for(self.seed, 4, round_number, client)
        torch.manual_seed(client_seed)
        rng = np.random.default_rng(client_seed)
        local = self.partition[client]
        for _ in range(local_steps):
            picked = local[rng.choice(len(local), min(8, len(local)), replace=False)]
            self.model(**self.train.batch(picked)).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        update = {n: self.params[n].detach().numpy().astype(np.float32) - self.global_state[n] for n in self.names}
        return update, adapter_fisher(self.accumulator, self.model)


def capture_regime(name: str, keep: int, out: pathlib.Path) -> None:
    task, local_steps, capture_rounds = REGIMES[name]
    loop = _Loop(task)
    sizes = np.array([len(p) for p in loop.partition], dtype=np.float64)
    for round_number in range(1, max(capture_rounds) + 1):
        started = time.perf_counter()
        capturing = round_number in capture_rounds
        if capturing:
            loss_before, gradient = loop.heldout_loss_and_gradient(loop.global_state, True)
        updates, fishers = [], []
        for client in range(len(loop.partition)):
            update, fisher = loop.client_update(client, round_number, local_steps)
            updates.append(update)
            fishers.append(fisher)
        average = {n: sum(sizes[c] * updates[c][n] for c in range(len(updates))) / sizes.sum() for n in loop.names}
        if capturing:
            # The kept clients' own FedAvg average, the thing a benchmark reconstructs.
            w = sizes[:keep] / sizes[:keep].sum()
            kept_average = {n: sum(w[c] * updates[c][n] for c in range(keep)) for n in loop.names}
            loss_after, _ = loop.heldout_loss_and_gradient(
                {n: loop.global_state[n] + kept_average[n] for n in loop.names}, False)
            meta = {"task": task, "local_steps": local_steps, "round": round_number, "clients": keep,
                    "of_clients": len(loop.partition), "alpha": 0.5, "seed": 0, "lr": 2e-3, "batch_size": 8,
                    "heldout_loss": loss_before, "heldout_loss_after_kept_average": loss_after,
                    "gradient": "held-out loss (320 evaluation examples, no dropout) at the round's global adapter",
                    "fisher": "mean squared gradient over the client's local steps (FisherAccumulator)"}
            capture = Capture(meta, loop.names, updates[:keep], fishers[:keep], gradient, sizes[:keep])
            path = out / f"{name}-r{round_number:02d}.npz"
            save_capture(path, capture)
            print(f"{path.name}: loss {loss_before:.4f} -> {loss_after:.4f}, {path.stat().st_size / 1e3:.0f} kB")
        loop.global_state = {n: (loop.global_state[n] + average[n]).astype(np.float32) for n in loop.names}
        print(f"{name} round {round_number} ({time.perf_counter() - started:.1f} s)", flush=True)
    loop.accumulator.remove()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(REGIMES), action="append")
    parser.add_argument("--keep", type=int, default=3, help="clients kept per capture (default 3)")
    parser.add_argument("--out", type=pathlib.Path, default=CORPUS_DIR)
    parser.add_argument("--fixtures", action="store_true", help="write the test fixtures from the corpus")
    args = parser.parse_args(argv)
    if args.fixtures:
        tests_data = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data"
        for fixture, capture in FIXTURES.items():
            save_fixture(tests_data / fixture, load_capture(args.out / capture), 0)
        return 0
    import torch

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or REGIMES:
        capture_regime(name, args.keep, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
