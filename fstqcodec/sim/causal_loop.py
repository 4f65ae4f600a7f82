"""The reference loop's federation for generative QA tasks (a causal LM with LoRA).

Everything the classification federation does (client sampling, local AdamW steps, Fisher
accumulation, the uplink methods, FedAvg, links, faults) is inherited unchanged; this class loads a
causal LM and a QA task instead, and its quality metric is the ROUGE-L F1 of greedy generations on
the held-out split (the loop records it where a classifier's accuracy goes; exact match rides along).

Splits: the held-out split is stratified by group (language or condition), ``test_fraction`` of each;
at most ``eval_size`` held-out pairs are scored each round. Clients: ``chatterbot-qa`` gives client
``c`` every training pair of the languages ``c, c + clients, ...`` (so ``clients`` must not exceed
the six languages); ``drug-condition`` splits conditions among clients by Dirichlet(``alpha``).
"""

from __future__ import annotations

import os

import numpy as np

from .causal import CAUSAL_TARGET_MODULES, generate_answers, load_causal_lm, score_answers, tokenize_qa
from .causal_data import QA_TASKS, load_qa_task
from .loop import SimConfig, _Federation, _seed_for

__all__ = ["CausalFederation", "is_causal_task", "group_partition"]

_CLASSIFIER_MODULES = SimConfig.target_modules  # the loop's default, meant for the encoder classifier


def is_causal_task(name: str) -> bool:
    """Whether ``name`` is a generative QA task (run by :class:`CausalFederation`)."""
    return name in QA_TASKS


def group_partition(groups: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Client ``c`` gets every example of groups ``c, c + num_clients, ...``.

    Raises
    ------
    ValueError
        If there are more clients than groups (a client would be empty).
    """
    distinct = np.unique(groups)
    if num_clients > distinct.size:
        raise ValueError(f"this task splits clients by group: at most {distinct.size} clients, got {num_clients}")
    return [np.flatnonzero(np.isin(groups, distinct[c::num_clients])) for c in range(num_clients)]


class CausalFederation(_Federation):
    """A :class:`~fstqcodec.sim.loop._Federation` for a causal LM on a QA task."""

    def __init__(self, config: SimConfig):  # noqa: PLR0915 - mirrors the parent's set-up
        import torch

        from fstqcodec.peft import adapter_state, state_names
        from fstqcodec.sim.bandwidth import LinkModel
        from fstqcodec.sim.data import train_test_split
        from fstqcodec.sim.methods import Schema, make_method
        from fstqcodec.sim.partition import dirichlet_partition
        from fstqcodec.torch import FisherAccumulator

        self.config = config
        self.torch = torch
        self.threads = config.threads or max(1, os.cpu_count() or 1)
        torch.set_num_threads(self.threads)
        self.task = load_qa_task(config.task)
        labels = self.task.labels
        self.train_idx, self.test_idx = train_test_split(labels, config.test_fraction, config.seed)
        eval_rng = np.random.default_rng(_seed_for(config.seed, 1))
        self.eval_idx = np.sort(eval_rng.permutation(self.test_idx)[: config.eval_size])
        if self.task.split == "by-group":
            self.partition = group_partition(labels[self.train_idx], config.clients)
        else:
            self.partition = dirichlet_partition(labels[self.train_idx], config.clients, config.alpha, config.seed)
        self.target_modules = (CAUSAL_TARGET_MODULES if tuple(config.target_modules) == _CLASSIFIER_MODULES
                               else tuple(config.target_modules))
        self.model, self.tokenizer = load_causal_lm(
            config.model, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
            target_modules=self.target_modules, seed=config.seed)
        self.train_data = tokenize_qa(self.tokenizer, self.task, self.train_idx, config.max_length)
        self.eval_data = tokenize_qa(self.tokenizer, self.task, self.eval_idx, config.max_length)
        self.max_new_tokens = int(config.extra.get("max_new_tokens") or self.task.max_new_tokens)
        names = state_names(self.model)
        parameters = dict(self.model.named_parameters())
        self.params_by_state = {state: parameters[param] for param, state in names.items()}
        initial = adapter_state(self.model)
        self.schema = Schema({name: tuple(t.shape) for name, t in initial.items()})
        self.initial_state = {name: t.float().numpy().copy() for name, t in initial.items()}
        self.downlink_codec = make_method("fp32", self.schema, bits_per_param=config.budget_bpp)
        self.link_model = LinkModel(config.median_uplink_mbps, config.median_downlink_mbps,
                                    config.bandwidth_sigma, config.latency_s, seed=_seed_for(config.seed, 2))
        self.links = self.link_model.draw(config.clients)
        self.client_sizes = np.array([len(p) for p in self.partition], dtype=np.float64)
        self.per_round = max(1, int(round(config.fraction * config.clients)))
        self.accumulator = FisherAccumulator(self.model)
        self.initial_accuracy: float | None = None
        self.last_metrics: dict = {}
        self.samples: list[dict] = []

    def evaluate(self) -> float:
        """ROUGE-L F1 of greedy answers on the evaluated held-out pairs (exact match kept aside)."""
        answers = generate_answers(self.model, self.tokenizer, self.eval_data,
                                   max_new_tokens=self.max_new_tokens,
                                   batch_size=self.config.eval_batch_size)
        scores = score_answers(answers, self.eval_data)
        self.last_metrics = {"rouge_l": scores["rouge_l"], "exact_match": scores["exact_match"]}
        self.samples = [{"prompt": self.task.prompts[int(i)][:200], "reference": ref, "generated": out}
                        for i, ref, out in zip(self.eval_idx[:4], self.eval_data.references, answers)]
        return scores["rouge_l"]

    def round_metrics(self) -> dict:
        """Metrics of the last evaluation besides the main one, for the round's record."""
        return dict(self.last_metrics)

    def describe(self) -> dict:
        """The parent's description, with what a generative task adds."""
        described = super().describe()
        data = self.train_data
        described.update({
            "quality_metric": "ROUGE-L F1 of greedy generations (recorded as 'accuracy'); exact match per round",
            "model_kind": "causal LM + LoRA, next-token loss on answer tokens only, tokenizer chat template",
            "target_modules": list(self.target_modules),
            "client_split": ("by language: client c gets languages c, c+clients, ..." if self.task.split == "by-group"
                             else f"Dirichlet(alpha={self.config.alpha}) over conditions"),
            "max_new_tokens": self.max_new_tokens,
            "mean_train_tokens": float(np.mean([len(p) + len(a) for p, a in zip(data.prompt_ids, data.answer_ids)])),
            "mean_answer_tokens": float(np.mean([len(a) for a in data.answer_ids])),
            "sample_generations_last_eval": self.samples,
        })
        return described
