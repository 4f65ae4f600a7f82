"""The reference loop's workbench for generative QA tasks (a causal LM with LoRA).

Local training (batches, AdamW steps, Fisher accumulation) is the classification workbench's,
unchanged; this class loads a causal LM and a QA task instead, and its :meth:`evaluate` returns the
ROUGE-L F1 of greedy generations on the held-out pairs (the loop records it where a classifier's
accuracy goes; exact match rides along through :meth:`round_metrics`).

Splits: the held-out split is stratified by group (language or condition), ``test_fraction`` of each,
except for ``chatterbot-xl``, whose held-out pairs are one version of ``test_fraction`` of its
translation units (:func:`~fstqcodec.sim.causal_data.translated_split`); ``eval_size`` caps the pairs
scored each round (none: all of them). Clients: the chatterbot tasks give client ``c`` every training
pair of the languages ``c, c + clients, ...`` (so ``clients`` must not exceed the languages);
``drug-condition`` splits conditions among clients by Dirichlet(``alpha``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from .causal_data import CAUSAL_TARGET_MODULES, DEFAULT_CAUSAL_MODEL, load_qa_task
from .client import Workbench, seed_for
from .config import SimConfig

__all__ = ["CausalWorkbench", "group_partition"]

_CLASSIFIER_DEFAULTS = {spec.name: spec.default for spec in SimConfig.__dataclass_fields__.values()}


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


class CausalWorkbench(Workbench):
    """A :class:`~fstqcodec.sim.client.Workbench` for a causal LM on a QA task.

    A config that leaves ``model`` or ``target_modules`` at the classifier's defaults gets
    SmolLM2-135M-Instruct and LoRA on every attention and MLP projection.

    Raises
    ------
    RuntimeError
        If the task's or the model's package is missing.
    ValueError
        If the clients cannot be formed (more clients than languages).
    """

    def __init__(self, config: SimConfig) -> None:  # noqa: D107 - documented on the class
        import torch

        from fstqcodec.sim.causal import load_causal_lm, tokenize_qa
        from fstqcodec.sim.partition import dirichlet_partition

        self.config = config
        torch.set_num_threads(config.threads or max(1, os.cpu_count() or 1))
        self.task = task = load_qa_task(config.task)
        self.train_idx, self.test_idx = task.held_out_split(config.test_fraction, config.seed)
        eval_rng = np.random.default_rng(seed_for(config.seed, 1))
        self.eval_idx = np.sort(eval_rng.permutation(self.test_idx)[: config.eval_size])
        if task.split == "by-group":
            self.partition = group_partition(task.labels[self.train_idx], config.clients)
        else:
            self.partition = dirichlet_partition(task.labels[self.train_idx], config.clients, config.alpha, config.seed)
        self.model_name = DEFAULT_CAUSAL_MODEL if config.model == _CLASSIFIER_DEFAULTS["model"] else config.model
        self.target_modules = (CAUSAL_TARGET_MODULES if config.target_modules == _CLASSIFIER_DEFAULTS["target_modules"]
                               else config.target_modules)
        self.model, self.tokenizer = load_causal_lm(
            self.model_name, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
            target_modules=self.target_modules, seed=config.seed)
        self.train_data = tokenize_qa(self.tokenizer, task, self.train_idx, config.max_length)
        self.eval_data = tokenize_qa(self.tokenizer, task, self.eval_idx, config.max_length)
        self.max_new_tokens = config.max_new_tokens or task.max_new_tokens
        self._bind_adapter()
        self.last_metrics: dict = {}
        self.samples: list[dict] = []

    def evaluate(self, state: Mapping[str, np.ndarray] | None = None) -> float:
        """ROUGE-L F1 of greedy answers on the evaluated held-out pairs (exact match kept aside)."""
        from fstqcodec.sim.causal import generate_answers, score_answers

        if state is not None:
            self.load(state)
        answers = generate_answers(self.model, self.tokenizer, self.eval_data,
                                   max_new_tokens=self.max_new_tokens, batch_size=self.config.eval_batch_size)
        scores = score_answers(answers, self.eval_data)
        self.last_metrics = {"rouge_l": scores["rouge_l"], "exact_match": scores["exact_match"]}
        self.samples = [{"prompt": self.task.prompts[int(i)][:200], "reference": ref, "generated": out}
                        for i, ref, out in zip(self.eval_idx[:4], self.eval_data.references, answers)]
        return scores["rouge_l"]

    def round_metrics(self) -> dict:
        """ROUGE-L and exact match of the last evaluation, for the round's record."""
        return dict(self.last_metrics)

    def describe(self) -> dict:
        """What a generative task adds to the run's description."""
        data = self.train_data
        return {
            "causal_model": self.model_name,
            "quality_metric": "ROUGE-L F1 of greedy generations (recorded as 'accuracy'); exact match per round",
            "model_kind": "causal LM + LoRA, next-token loss on answer tokens only, tokenizer chat template",
            "target_modules": list(self.target_modules),
            "client_split": ("by language: client c gets languages c, c+clients, ..." if self.task.split == "by-group"
                             else f"Dirichlet(alpha={self.config.alpha}) over conditions"),
            "max_new_tokens": self.max_new_tokens,
            "mean_train_tokens": float(np.mean([len(p) + len(a) for p, a in zip(data.prompt_ids, data.answer_ids)])),
            "mean_answer_tokens": float(np.mean([len(a) for a in data.answer_ids])),
            "sample_generations_last_eval": self.samples,
        }
