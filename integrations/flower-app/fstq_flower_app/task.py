"""Model, data and local training: the reference loop's experiment, one client at a time.

Built from the same pieces as ``fstq simulate`` (:mod:`fstqcodec.sim`): the packaged
all-MiniLM-L6-v2 with a LoRA adapter, BBC News split non-IID with a Dirichlet partition over
labels, AdamW local steps, and the diagonal Fisher accumulated during those steps. Seeds are
derived exactly as the in-process loop derives them, so that both engines run the same
experiment: same split, same partition, same initial adapter, same batches and dropout masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from fstqcodec.peft import adapter_fisher, adapter_state, state_names
from fstqcodec.sim.data import load_task, train_test_split
from fstqcodec.sim.models import load_lora_classifier, tokenize
from fstqcodec.sim.partition import dirichlet_partition
from fstqcodec.torch import FisherAccumulator

__all__ = ["Settings", "Workbench", "workbench", "seed_for"]


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers; the same derivation as ``fstqcodec.sim.loop``."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What defines the experiment; read from the app's ``run_config`` (``pyproject.toml``)."""

    task: str = "bbc"
    model: str = "all-MiniLM-L6-v2"
    num_partitions: int = 4
    alpha: float = 0.5
    seed: int = 0
    local_steps: int = 2
    batch_size: int = 8
    lr: float = 2e-3
    max_length: int = 64
    test_fraction: float = 0.2
    eval_size: int = 320
    eval_batch_size: int = 64
    lora_rank: int = 8
    lora_alpha: int = 16
    threads: int = 1

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], *, num_partitions: int) -> "Settings":
        """Settings from a Flower ``run_config`` (keys spelled with dashes, as in TOML)."""
        values: dict[str, Any] = {"num_partitions": int(num_partitions)}
        for field in dataclasses.fields(cls):
            key = field.name.replace("_", "-")
            if field.name != "num_partitions" and key in run_config:
                values[field.name] = type(field.default)(run_config[key])
        return cls(**values)


class Workbench:
    """The model and tokenized data of one process, loaded once and reused every round.

    A Flower simulation runs each ClientApp call in a long-lived Ray actor; loading the model and
    tokenizing the corpus once per actor (see :func:`workbench`) keeps a round to its training.
    """

    def __init__(self, settings: Settings) -> None:
        torch.set_num_threads(max(1, settings.threads))
        self.settings = settings
        task = load_task(settings.task)
        train_idx, test_idx = train_test_split(task.labels, settings.test_fraction, settings.seed)
        eval_rng = np.random.default_rng(seed_for(settings.seed, 1))
        eval_idx = np.sort(eval_rng.permutation(test_idx)[: settings.eval_size])
        self.partition = dirichlet_partition(
            task.labels[train_idx], settings.num_partitions, settings.alpha, settings.seed
        )
        self.model, tokenizer = load_lora_classifier(
            settings.model,
            task.num_labels,
            lora_rank=settings.lora_rank,
            lora_alpha=settings.lora_alpha,
            seed=settings.seed,
        )
        self.train_data = tokenize(
            tokenizer, [task.texts[i] for i in train_idx], task.labels[train_idx], settings.max_length
        )
        self.eval_data = tokenize(
            tokenizer, [task.texts[i] for i in eval_idx], task.labels[eval_idx], settings.max_length
        )
        parameters = dict(self.model.named_parameters())
        self.params_by_state = {state: parameters[param] for param, state in state_names(self.model).items()}
        self.names = list(adapter_state(self.model))
        self.accumulator = FisherAccumulator(self.model)

    def adapter(self) -> dict[str, np.ndarray]:
        """The current adapter as float32 arrays, keyed like PEFT's adapter state dict."""
        return {name: self.params_by_state[name].detach().numpy().astype(np.float32) for name in self.names}

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name in self.names:
                self.params_by_state[name].copy_(torch.from_numpy(np.asarray(state[name])))

    def train(
        self, state: Mapping[str, np.ndarray], partition_id: int, server_round: int
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int, float]:
        """Train the adapter ``state`` on one partition for one round.

        Returns
        -------
        (trained, fisher, num_examples, mean_loss)
            The trained adapter, the diagonal Fisher accumulated while training it (same names),
            the partition's size (FedAvg's weight) and the mean training loss.
        """
        settings = self.settings
        client_seed = seed_for(settings.seed, 4, server_round, partition_id)
        self.load(state)
        self.model.train()
        optimizer = torch.optim.AdamW(
            [self.params_by_state[name] for name in self.names], lr=settings.lr, weight_decay=0.0
        )
        self.accumulator.reset()
        torch.manual_seed(client_seed)  # the loop's dropout masks
        batch_rng = np.random.default_rng(client_seed)
        local = self.partition[partition_id]
        losses = []
        for _ in range(settings.local_steps):
            picked = local[batch_rng.choice(len(local), min(settings.batch_size, len(local)), replace=False)]
            loss = self.model(**self.train_data.batch(picked)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        fisher = adapter_fisher(self.accumulator, self.model)
        return self.adapter(), fisher, len(local), float(np.mean(losses))

    def evaluate(self, state: Mapping[str, np.ndarray]) -> float:
        """Accuracy of the adapter ``state`` on the held-out evaluation subset."""
        self.load(state)
        self.model.eval()
        correct = 0
        batch_size = self.settings.eval_batch_size
        with torch.inference_mode():
            for start in range(0, len(self.eval_data), batch_size):
                batch = self.eval_data.batch(np.arange(start, min(start + batch_size, len(self.eval_data))))
                labels = batch.pop("labels")
                correct += int((self.model(**batch).logits.argmax(dim=-1) == labels).sum())
        self.model.train()
        return correct / len(self.eval_data)


@lru_cache(maxsize=2)
def workbench(settings: Settings) -> Workbench:
    """The process's :class:`Workbench` for ``settings`` (built on first use)."""
    return Workbench(settings)
