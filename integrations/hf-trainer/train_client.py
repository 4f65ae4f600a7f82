"""One federated client round with the Hugging Face Trainer, compressed with fstqcodec.

A client receives the global LoRA adapter, fine-tunes it on its own data with ``transformers.Trainer``
(the Fisher is accumulated by a callback from the training backward passes, at no extra cost),
and sends its update as an fstq message under a byte budget, keeping what the message lost in an
error-feedback memory for its next round. The "server" decodes the message and applies it.

Runs offline on the packaged all-MiniLM-L6-v2 and BBC News (see README.md next to this file)::

    HF_HUB_OFFLINE=1 python integrations/hf-trainer/train_client.py --steps 20 --bits-per-param 0.5
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import fstqcodec  # noqa: E402
import fstqcodec.peft as fstq_peft  # noqa: E402
from fstqcodec.sim.data import load_task, train_test_split  # noqa: E402
from fstqcodec.sim.models import load_lora_classifier, tokenize  # noqa: E402


class Examples(torch.utils.data.Dataset):
    """Pre-tokenized examples as the dicts the Trainer collates."""

    def __init__(self, data, indices):
        self.data, self.indices = data, np.asarray(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        return {"input_ids": self.data.input_ids[j], "attention_mask": self.data.attention_mask[j],
                "labels": self.data.labels[j]}


def accuracy(model, data, indices, batch_size=64):
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(indices), batch_size):
            batch = data.batch(indices[start:start + batch_size])
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    model.train()
    return correct / len(indices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="local training steps")
    parser.add_argument("--bits-per-param", type=float, default=0.5, help="uplink budget")
    parser.add_argument("--fisher-power", type=float, default=fstqcodec.FEDERATED_FISHER_POWER,
                        help="weigh the error by Fisher ** this (default: fstqcodec.FEDERATED_FISHER_POWER, "
                             "what the reference loop measured best for federated updates; fstqcodec.encode's is 1)")
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    task = load_task("bbc")
    train_idx, test_idx = train_test_split(task.labels, 0.2, args.seed)
    client_model, tokenizer = load_lora_classifier("all-MiniLM-L6-v2", task.num_labels, seed=args.seed)
    server_model, _ = load_lora_classifier("all-MiniLM-L6-v2", task.num_labels, seed=args.seed)
    data = tokenize(tokenizer, task.texts, task.labels, max_length=64)
    eval_idx = np.random.default_rng(args.seed).permutation(test_idx)[: args.eval_size]

    # The round starts from the global adapter the server sent (here: the same initialisation).
    global_state = fstq_peft.adapter_state(server_model)
    fstq_peft.load_adapter_state(client_model, global_state)
    print(f"global adapter accuracy: {accuracy(server_model, data, eval_idx):.3f}")

    fisher_callback = fstq_peft.FisherCallback()
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=8, learning_rate=2e-3, max_steps=args.steps,
            report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
            seed=args.seed,
        )
        Trainer(model=client_model, args=training_args, train_dataset=Examples(data, train_idx),
                callbacks=[fisher_callback]).train()

    # Client side: update = local - global, Fisher-weighted allocation under the budget.
    config = fstqcodec.EncodeConfig(budget=fstqcodec.Budget(bits_per_param=args.bits_per_param),
                                    fisher_power=args.fisher_power)
    error_feedback = fstqcodec.ErrorFeedback(config)  # keep this object across rounds
    message = fstq_peft.client_message(
        global_state, fstq_peft.adapter_state(client_model), fisher=fisher_callback.fisher(),
        error_feedback=error_feedback,
    )
    parameters = sum(t.numel() for t in global_state.values())
    print(f"uplink message: {len(message)} bytes for {parameters} parameters "
          f"({8 * len(message) / parameters:.3f} bits/param; fp32 would be {4 * parameters} bytes)")
    info = fstqcodec.inspect(message)
    print(f"block bit-widths (width: blocks): {info['width_histogram']}")

    # Server side: decode (safe on untrusted bytes) and apply. One client, so FedAvg is the update.
    fstq_peft.apply_update(server_model, fstqcodec.decode(message))
    print(f"client adapter accuracy: {accuracy(client_model, data, eval_idx):.3f}")
    print(f"server adapter after applying the compressed update: {accuracy(server_model, data, eval_idx):.3f}")


if __name__ == "__main__":
    main()
