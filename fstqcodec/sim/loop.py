"""The reference federated loop: FedAvg over LoRA adapters with a compressed uplink.

One process simulates every client in turn on one model (the frozen base is shared; only the
adapter, which is what a client would hold, is swapped). Every method starts from the same
pretrained model and adapter initialisation, sees the same client sampling, the same local batches
and the same dropout masks, so differences between methods come from their encodings alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["SimConfig", "TASK_TARGETS", "run_simulation"]

#: Default target accuracy per built-in task (``--target`` overrides). The BBC target is the one the
#: issue fixes; the others sit a few points under what fp32 reaches with the default settings.
TASK_TARGETS = {"bbc": 0.85}


@dataclass
class SimConfig:
    """Everything that defines a run; recorded verbatim in ``results.json``."""

    task: str = "bbc"
    model: str = "all-MiniLM-L6-v2"
    clients: int = 10
    rounds: int = 20
    fraction: float = 1.0  # clients sampled per round
    local_steps: int = 2
    batch_size: int = 8
    lr: float = 2e-3
    max_length: int = 64
    alpha: float = 0.5  # Dirichlet concentration over labels
    seed: int = 0
    budget_bpp: float = 0.5  # bits per parameter for fstq / fstq-nofisher / topk
    block_size: int = 64
    target_accuracy: float | None = None
    test_fraction: float = 0.2
    eval_size: int = 320  # cap on the held-out examples evaluated each round
    eval_batch_size: int = 64
    lora_rank: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("query", "value")
    median_uplink_mbps: float = 1.0
    median_downlink_mbps: float = 10.0
    bandwidth_sigma: float = 1.0
    latency_s: float = 0.05
    threads: int | None = None
    text_column: str = "text"
    label_column: str = "label"
    methods: tuple[str, ...] = ("fp32", "nf4", "fstq")
    quick: bool = False
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``ValueError`` with a clear message on an invalid setting."""
        checks = [
            (self.clients >= 1, "clients must be >= 1"),
            (self.rounds >= 1, "rounds must be >= 1"),
            (0 < self.fraction <= 1, "fraction must be in (0, 1]"),
            (self.local_steps >= 1, "local_steps must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.max_length >= 8, "max_length must be >= 8"),
            (self.alpha > 0, "alpha must be > 0"),
            (self.budget_bpp > 0, "budget_bpp must be > 0"),
            (self.eval_size >= 10, "eval_size must be >= 10"),
            (self.target_accuracy is None or 0 < self.target_accuracy <= 1, "target must be in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def _seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers, stable across runs and platforms."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1)


def run_simulation(config: SimConfig, *, progress: bool = True,
                   log: Callable[[str], None] | None = None) -> dict:
    """Run every method in ``config.methods`` and return the results record.

    Parameters
    ----------
    config : SimConfig
    progress : bool
        Show a tqdm progress bar.
    log : callable, optional
        Receives one-line status messages (``print`` by default; pass ``lambda s: None`` to silence).

    Returns
    -------
    dict
        ``{"config", "target_accuracy", "methods": {name: {"rounds": [...], "summary": {...}}}, ...}``;
        see :mod:`fstqcodec.sim.report`.

    Raises
    ------
    ValueError
        On an invalid configuration.
    RuntimeError
        If a task or model package is missing.
    """
    import torch

    from fstqcodec.peft import adapter_fisher, adapter_state, state_names
    from fstqcodec.sim.bandwidth import LinkModel, round_time
    from fstqcodec.sim.data import load_task, train_test_split
    from fstqcodec.sim.methods import Schema, make_method
    from fstqcodec.sim.models import load_lora_classifier, tokenize
    from fstqcodec.sim.partition import dirichlet_partition, label_histogram
    from fstqcodec.torch import FisherAccumulator

    config.validate()
    log = log or print
    started = time.perf_counter()
    threads = config.threads or max(1, os.cpu_count() or 1)
    torch.set_num_threads(threads)

    task = load_task(config.task, text_column=config.text_column, label_column=config.label_column)
    train_idx, test_idx = train_test_split(task.labels, config.test_fraction, config.seed)
    # Evaluate on a fixed, stratified-by-shuffle subset of the held-out split, to keep eval cheap.
    eval_rng = np.random.default_rng(_seed_for(config.seed, 1))
    eval_idx = np.sort(eval_rng.permutation(test_idx)[: config.eval_size])
    partition = dirichlet_partition(task.labels[train_idx], config.clients, config.alpha, config.seed)

    model, tokenizer = load_lora_classifier(
        config.model, task.num_labels, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
        target_modules=config.target_modules, seed=config.seed,
    )
    train_data = tokenize(tokenizer, [task.texts[i] for i in train_idx], task.labels[train_idx], config.max_length)
    eval_data = tokenize(tokenizer, [task.texts[i] for i in eval_idx], task.labels[eval_idx], config.max_length)

    # The adapter as a client holds it: peft's state-dict names, mapped to the live parameters.
    names = state_names(model)
    params_by_state = {state: dict(model.named_parameters())[param] for param, state in names.items()}
    initial_state = {name: t.float() for name, t in adapter_state(model).items()}
    schema = Schema({name: tuple(t.shape) for name, t in initial_state.items()})
    downlink_codec = make_method("fp32", schema, bits_per_param=config.budget_bpp)
    links = LinkModel(config.median_uplink_mbps, config.median_downlink_mbps, config.bandwidth_sigma,
                      config.latency_s, seed=_seed_for(config.seed, 2)).draw(config.clients)
    client_sizes = np.array([len(p) for p in partition], dtype=np.float64)
    per_round = max(1, int(round(config.fraction * config.clients)))
    trainable = [params_by_state[name] for name in schema.names]
    accumulator = FisherAccumulator(model)

    def load_global(state: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name in schema.names:
                params_by_state[name].copy_(torch.from_numpy(state[name]))

    def evaluate() -> float:
        model.eval()
        correct = 0
        with torch.inference_mode():
            for start in range(0, len(eval_data), config.eval_batch_size):
                batch = eval_data.batch(np.arange(start, min(start + config.eval_batch_size, len(eval_data))))
                labels = batch.pop("labels")
                logits = model(**batch).logits
                correct += int((logits.argmax(dim=-1) == labels).sum())
        model.train()
        return correct / len(eval_data)

    methods = [make_method(name, schema, bits_per_param=config.budget_bpp,
                           fstq_options={"block_size": config.block_size}) for name in config.methods]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(methods) * config.rounds, unit="round", dynamic_ncols=True)

    initial_numpy = {name: t.numpy().copy() for name, t in initial_state.items()}
    load_global(initial_numpy)
    initial_accuracy = evaluate()
    results_methods: dict[str, Any] = {}
    for method in methods:
        method_started = time.perf_counter()
        global_state = {name: a.copy() for name, a in initial_numpy.items()}
        client_states = [method.new_client_state() for _ in range(config.clients)]
        rounds = [{"round": 0, "accuracy": initial_accuracy, "uplink_bytes": 0, "cumulative_uplink_bytes": 0,
                   "downlink_bytes": 0, "sim_time_s": 0.0}]
        cumulative_uplink = 0
        sim_time = 0.0
        message_sizes: list[int] = []
        dropped: list[dict] = []
        if bar is not None:
            bar.set_description(method.name)
        for round_number in range(1, config.rounds + 1):
            sampler = np.random.default_rng(_seed_for(config.seed, 3, round_number))
            participants = np.sort(sampler.choice(config.clients, per_round, replace=False))
            downlink_message = downlink_codec.encode(global_state, fisher=None, state=None, seed=0)
            delta_sum = {name: np.zeros(schema.shapes[name], dtype=np.float64) for name in schema.names}
            weight_sum = 0.0
            uplink_bytes = 0
            compute_s, download_s, upload_s = [], [], []
            for client in participants:
                client = int(client)
                client_seed = _seed_for(config.seed, 4, round_number, client)
                client_started = time.perf_counter()
                load_global(global_state)  # what the client decoded from the (lossless) downlink
                optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
                accumulator.reset()
                torch.manual_seed(client_seed)  # same dropout masks for every method
                batch_rng = np.random.default_rng(client_seed)
                local = partition[client]
                for _ in range(config.local_steps):
                    # A batch without repeats; `local` indexes the tokenized train split.
                    picked = local[batch_rng.choice(len(local), min(config.batch_size, len(local)), replace=False)]
                    loss = model(**train_data.batch(picked)).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                update = {name: params_by_state[name].detach().numpy().astype(np.float32) - global_state[name]
                          for name in schema.names}
                fisher = adapter_fisher(accumulator, model) if method.uses_fisher else None
                message = method.encode(update, fisher=fisher, state=client_states[client], seed=client_seed)
                compute_s.append(time.perf_counter() - client_started)
                down, up = links.transfer_time(client, len(message), len(downlink_message))
                download_s.append(down)
                upload_s.append(up)
                uplink_bytes += len(message)
                message_sizes.append(len(message))
                # Server side: a message that fails to decode is dropped and recorded, the round goes on.
                try:
                    decoded = method.decode(message)
                    schema.check(decoded)
                except ValueError as error:  # fstqcodec.DecodeError is a ValueError
                    dropped.append({"round": round_number, "client": client, "error": repr(error)})
                    continue
                weight = float(client_sizes[client])
                for name in schema.names:
                    delta_sum[name] += weight * decoded[name]
                weight_sum += weight
            if weight_sum > 0:
                for name in schema.names:
                    global_state[name] = (global_state[name] + delta_sum[name] / weight_sum).astype(np.float32)
            load_global(global_state)
            accuracy = evaluate()
            cumulative_uplink += uplink_bytes
            sim_time += round_time(compute_s, download_s, upload_s)
            rounds.append({
                "round": round_number,
                "accuracy": accuracy,
                "uplink_bytes": uplink_bytes,
                "cumulative_uplink_bytes": cumulative_uplink,
                "downlink_bytes": len(downlink_message) * len(participants),
                "sim_time_s": sim_time,
            })
            if bar is not None:
                bar.set_postfix(acc=f"{accuracy:.3f}", up=f"{cumulative_uplink / 1e6:.2f}MB")
                bar.update(1)
        results_methods[method.name] = {
            "config": method.config(),
            "rounds": rounds,
            "wall_time_s": time.perf_counter() - method_started,
            "mean_message_bytes": float(np.mean(message_sizes)) if message_sizes else 0.0,
            "mean_bits_per_param": (8.0 * float(np.mean(message_sizes)) / schema.total) if message_sizes else 0.0,
            "dropped_messages": dropped,
        }
    if bar is not None:
        bar.close()
    accumulator.remove()

    from fstqcodec.sim.report import summarize

    record_config = dataclasses.asdict(config)
    record_config["target_modules"] = list(config.target_modules)
    record_config["methods"] = list(config.methods)
    record_config.update({
        "threads": threads,
        "trainable_parameters": schema.total,
        "trainable_tensors": len(schema.names),
        "num_labels": task.num_labels,
        "label_names": task.label_names,
        "data_source": task.source,
        "task_notes": task.notes,
        "train_examples": int(train_idx.size),
        "test_examples": int(test_idx.size),
        "eval_examples": int(eval_idx.size),
        "client_examples": [int(n) for n in client_sizes],
        "client_label_histogram": label_histogram(task.labels[train_idx], partition, task.num_labels),
        "clients_per_round": per_round,
        "fedavg_weighting": "client example count",
        "local_optimizer": "AdamW (fresh each round), weight_decay=0",
        "downlink": "fp32 global adapter (lossless), same for every method",
        "bandwidth_model": {
            **LinkModel(config.median_uplink_mbps, config.median_downlink_mbps, config.bandwidth_sigma,
                        config.latency_s, seed=_seed_for(config.seed, 2)).config(),
            "uplink_mbps": [round(float(b) / 1e6, 4) for b in links.uplink_bps],
            "downlink_mbps": [round(float(b) / 1e6, 4) for b in links.downlink_bps],
            "round_time": "max over participants of (download + measured compute + upload)",
            "compute_time": "measured wall time of local training and encoding on this machine",
        },
        "platform": {"python": platform.python_version(), "torch": torch.__version__,
                     "machine": platform.machine(), "cpu_count": os.cpu_count()},
    })
    target = config.target_accuracy
    target_rule = "given"
    if target is None:
        target = TASK_TARGETS.get(config.task)
        target_rule = f"task default for {config.task!r}"
    if target is None:
        # No preset: 95% of the best final accuracy among lossless-ish references, floored to 0.01.
        reference = results_methods.get("fp32") or next(iter(results_methods.values()))
        target = math.floor(95 * reference["rounds"][-1]["accuracy"]) / 100
        target_rule = "0.95 x final accuracy of fp32 (or the first method), floored to 0.01"
    results = {
        "config": record_config,
        "target_accuracy": target,
        "target_rule": target_rule,
        "methods": results_methods,
        "wall_time_s": time.perf_counter() - started,
    }
    summarize(results)
    return results
