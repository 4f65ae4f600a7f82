"""The client stage of the reference loop: local training, evaluation, faults and delivery.

:class:`Workbench` holds what one process needs to play any client (the model with its adapter,
the tokenized data, the partition) and trains or evaluates an adapter state. :func:`client_round`
is one client's turn in a round: train on the global adapter, encode the update with the method,
and decide whether and how the message reaches the server (dropout, loss, corruption, deadline).
The Flower App's ClientApp trains with the same :class:`Workbench`, so both engines run the same
experiment: same split, partition, initial adapter, batches and dropout masks.

torch, transformers and peft are imported when a :class:`Workbench` is built, not with this module
(the fault and delivery functions need only numpy).

Seeds are derived from the run's seed with :func:`seed_for` and a stream number: 1 the evaluation
subset, 2 the links, 3 the sampling of a round, 4 a client's batches, dropout masks and encoding,
6 a client's faults, 8 the random token selection of a client's round.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fstqcodec.sim.config import SimConfig
from fstqcodec.sim.methods import Method, UpdateLayout

if TYPE_CHECKING:  # token_selection imports torch, which this module leaves to the Workbench
    from fstqcodec.sim.token_selection import TrainingCost

__all__ = ["seed_for", "Workbench", "make_workbench", "LocalTraining", "Faults", "draw_faults", "ClientReply",
           "client_round", "corrupt_in_transit"]


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers, stable across runs and platforms."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1)


@dataclass
class LocalTraining:
    """What one client's local training produced."""

    trained: dict[str, np.ndarray]  # the adapter after training (float32)
    fisher: dict[str, np.ndarray] | None  # diagonal Fisher accumulated while training, if asked for
    num_examples: int  # the partition's size (FedAvg's weight)
    mean_loss: float
    cost: TrainingCost | None = None  # with token selection on: the tokens, FLOPs and seconds it took


class Workbench:
    """The model and tokenized data of one process, loaded once and reused for every client.

    Parameters
    ----------
    config : SimConfig
        Task, model, split, partition and LoRA settings; ``threads`` sets torch's threads.

    Raises
    ------
    RuntimeError
        If a task or model package is missing.
    """

    def __init__(self, config: SimConfig) -> None:
        import torch

        from fstqcodec.sim.data import load_task, train_test_split
        from fstqcodec.sim.models import load_lora_classifier, tokenize
        from fstqcodec.sim.partition import dirichlet_partition

        self.config = config
        torch.set_num_threads(config.threads or max(1, os.cpu_count() or 1))
        self.task = task = load_task(config.task, text_column=config.text_column, label_column=config.label_column)
        self.train_idx, self.test_idx = train_test_split(task.labels, config.test_fraction, config.seed)
        # A fixed random subset of the held-out split when eval_size caps it; all of it otherwise.
        eval_rng = np.random.default_rng(seed_for(config.seed, 1))
        self.eval_idx = np.sort(eval_rng.permutation(self.test_idx)[: config.eval_size])
        self.partition = dirichlet_partition(task.labels[self.train_idx], config.clients, config.alpha, config.seed)
        self.model, tokenizer = load_lora_classifier(
            config.model, task.num_labels, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
            target_modules=config.target_modules, seed=config.seed,
        )
        self.train_data = tokenize(tokenizer, [task.texts[i] for i in self.train_idx],
                                   task.labels[self.train_idx], config.max_length)
        self.eval_data = tokenize(tokenizer, [task.texts[i] for i in self.eval_idx],
                                  task.labels[self.eval_idx], config.max_length)
        self._bind_adapter()
        self.token_selector = None
        if config.token_keep is not None:
            from fstqcodec.sim.token_selection import TokenSelector

            self.token_selector = TokenSelector(self.model, config.token_keep, config.token_select,
                                                special_ids=tokenizer.all_special_ids,
                                                pad_id=tokenizer.pad_token_id or 0)

    def _bind_adapter(self) -> None:
        """The adapter as a client holds it: peft's state-dict names mapped to the live parameters,
        its layout and initial values, the clients' sizes and a Fisher accumulator on the model."""
        from fstqcodec.peft import adapter_state, state_names
        from fstqcodec.torch import FisherAccumulator

        parameters = dict(self.model.named_parameters())
        self.params_by_state = {state: parameters[param] for param, state in state_names(self.model).items()}
        initial = adapter_state(self.model)
        self.layout = UpdateLayout({name: tuple(t.shape) for name, t in initial.items()})
        self.initial_state = {name: t.float().numpy().copy() for name, t in initial.items()}
        self.client_sizes = np.array([len(p) for p in self.partition], dtype=np.float64)
        self.accumulator = FisherAccumulator(self.model)

    def adapter(self) -> dict[str, np.ndarray]:
        """The current adapter as float32 arrays, keyed like PEFT's adapter state dict."""
        return {name: self.params_by_state[name].detach().numpy().astype(np.float32) for name in self.layout.names}

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        """Make ``state`` the model's adapter."""
        import torch

        with torch.no_grad():
            for name in self.layout.names:
                self.params_by_state[name].copy_(torch.from_numpy(np.asarray(state[name])))

    def new_token_state(self):
        """A client's token-selection state for a run (``config.token_keep`` set), before its first round."""
        if self.token_selector is None:
            raise ValueError("token selection is off (token_keep is not set)")
        return self.token_selector.new_client_state()

    def train(self, state: Mapping[str, np.ndarray], client: int, round_number: int, *,
              with_fisher: bool = True, tokens=None) -> LocalTraining:
        """Train the adapter ``state`` on ``client``'s partition for one round.

        The batches and dropout masks come from ``seed_for(seed, 4, round_number, client)``, so
        every method (and either engine) sees the same ones. With ``tokens`` (the client's
        :meth:`new_token_state`, token selection on), each step trains on the tokens the config's
        selection keeps (random scores from ``seed_for(seed, 8, round_number, client)``) and the
        result carries the round's :class:`TrainingCost`.
        """
        import contextlib

        import torch

        from fstqcodec.peft import adapter_fisher

        config = self.config
        client_seed = seed_for(config.seed, 4, round_number, client)
        self.load(state)
        self.model.train()
        optimizer = torch.optim.AdamW([self.params_by_state[n] for n in self.layout.names],
                                      lr=config.lr, weight_decay=0.0)
        self.accumulator.reset()
        torch.manual_seed(client_seed)  # the same dropout masks for every method
        batch_rng = np.random.default_rng(client_seed)
        local = self.partition[client]
        losses = []
        selection = None if tokens is None else self.token_selector.round(
            tokens, seed_for(config.seed, 8, round_number, client))
        with selection or contextlib.nullcontext():
            for _ in range(config.local_steps):
                # A batch without repeats; `local` indexes the tokenized train split.
                picked = local[batch_rng.choice(len(local), min(config.batch_size, len(local)), replace=False)]
                batch = self.train_data.batch(picked)
                step_started = time.perf_counter()
                if selection is not None:
                    batch = selection.select(batch)
                loss = self.model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                if selection is not None:
                    selection.add_seconds(time.perf_counter() - step_started)
        fisher = adapter_fisher(self.accumulator, self.model) if with_fisher else None
        return LocalTraining(self.adapter(), fisher, len(local), float(np.mean(losses)),
                             cost=None if selection is None else selection.cost)

    def evaluate(self, state: Mapping[str, np.ndarray] | None = None) -> float:
        """Accuracy of the adapter ``state`` (default: the loaded one) on the evaluation set."""
        if state is not None:
            self.load(state)
        import torch

        batch_size = self.config.eval_batch_size
        self.model.eval()
        correct = 0
        with torch.inference_mode():
            for start in range(0, len(self.eval_data), batch_size):
                batch = self.eval_data.batch(np.arange(start, min(start + batch_size, len(self.eval_data))))
                labels = batch.pop("labels")
                correct += int((self.model(**batch).logits.argmax(dim=-1) == labels).sum())
        self.model.train()
        return correct / len(self.eval_data)

    def round_metrics(self) -> dict:
        """Metrics of the last evaluation besides the returned one, for the round's record (none here)."""
        return {}

    def describe(self) -> dict:
        """What this workbench adds to the run's description (nothing for a classifier)."""
        return {}

    def close(self) -> None:
        """Remove the Fisher hooks from the model."""
        self.accumulator.remove()


def make_workbench(config: SimConfig) -> Workbench:
    """The workbench for ``config.task``: a causal LM for the generative QA tasks, else a classifier.

    Raises
    ------
    RuntimeError
        If a task or model package is missing.
    """
    from fstqcodec.sim.causal_data import QA_TASKS

    if config.task in QA_TASKS:
        from fstqcodec.sim.causal_workbench import CausalWorkbench

        return CausalWorkbench(config)
    return Workbench(config)


@dataclass
class Faults:
    """What goes wrong for one client in one round, drawn before it trains."""

    dropout: bool  # the client drops out before training
    lost: bool  # its message is lost in transit
    corrupted: bool  # its message arrives with bits flipped
    rng: np.random.Generator  # the rest of the stream: which bits


def draw_faults(config: SimConfig, round_number: int, client: int) -> Faults:
    """The client's faults, from their own stream: every method meets the same ones."""
    rng = np.random.default_rng(seed_for(config.seed, 6, round_number, client))
    dropout, lost, corrupted = rng.random(3) < (config.dropout, config.uplink_loss, config.uplink_corruption)
    return Faults(bool(dropout), bool(lost), bool(corrupted), rng)


def corrupt_in_transit(message: bytes, rng: np.random.Generator, flips: int = 8) -> bytes:
    """``message`` with ``flips`` random bits flipped, as a noisy link would deliver it."""
    if not message:
        return message
    damaged = bytearray(message)
    for position in rng.integers(0, 8 * len(damaged), size=flips):
        damaged[position // 8] ^= 1 << (position % 8)
    return bytes(damaged)


@dataclass
class ClientReply:
    """One client's turn in a round, as the round loop books it."""

    client: int
    sent: bytes = b""  # the message as sent (counted against the uplink); empty after a dropout
    received: bytes | None = None  # what reached the server before the deadline, if anything
    fault: str | None = None  # "dropout", "straggler", "lost" or "corrupted"
    compute_s: float = 0.0
    download_s: float = 0.0
    upload_s: float = 0.0
    finish_s: float = 0.0
    weight: float = 0.0  # FedAvg weight: the client's examples
    visible: dict | None = None  # downlink proxies: the entries the client received (None: all)
    cost: TrainingCost | None = None  # token selection on: what the local training cost
    prior_sent: bytes = b""  # federated token prior: the client's prior message, sent with the update
    prior_received: bytes | None = None  # what of it reached the server (it shares the update's fate)


def client_round(bench: Workbench, method: Method, state, links, global_state: Mapping[str, np.ndarray],
                 downlink_bytes: int, round_number: int, client: int, *, visible: Mapping | None = None,
                 on_trained: Callable | None = None, tokens=None) -> ClientReply:
    """Play ``client``'s turn: train, encode under ``method`` with its ``state``, send.

    A message that does not arrive (lost, or past the round deadline) is reported to the client's
    error-feedback memory, which keeps the whole update for a later round. With downlink proxies,
    ``global_state`` is the client's decoded proxy, ``visible`` the entries it carried (the update
    is sent on those only), and ``on_trained(client, adapter)`` sees the trained adapter. ``tokens``
    is the client's token-selection state when ``config.token_keep`` is set; the modelled clock
    (``step_time_s``) then counts each step at its FLOPs over the full batch's. With the federated
    token prior, the client's prior message (``reply.prior_sent``) goes up with the update and its
    bytes are in the upload time; ``downlink_bytes`` then includes the averaged prior it received.

    Raises
    ------
    fstqcodec.EncodeError
        If the method cannot encode the update (a budget below the smallest message, say).
    """
    config = bench.config
    faults = draw_faults(config, round_number, client)
    if faults.dropout:
        return ClientReply(client, fault="dropout")
    started = time.perf_counter()
    # Only a run with token selection passes `tokens`: a Workbench-like stand-in need not know it.
    selection = {} if tokens is None else {"tokens": tokens}
    local = bench.train(global_state, client, round_number, with_fisher=method.uses_fisher, **selection)
    trained_at = time.perf_counter()
    update = {n: local.trained[n] - global_state[n] for n in bench.layout.names}
    if visible is not None:  # only what the client saw goes back: the server could not use the rest
        update = {n: np.where(visible[n], value, np.float32(0)) for n, value in update.items()}
    if on_trained is not None:
        on_trained(client, local.trained)
    budget_bytes = None
    if config.deadline_s is not None:
        budget_bytes = max(config.min_budget_bytes, links.budget_bytes(client, config.deadline_s))
    message = method.encode(update, fisher=local.fisher, state=state,
                            seed=seed_for(config.seed, 4, round_number, client), budget_bytes=budget_bytes)
    # The federated token prior rides with the update (b"" unless config.token_prior sends it now).
    prior = b"" if tokens is None else tokens.prior_message(config)
    encode_s = time.perf_counter() - trained_at
    if config.step_time_s is None:
        compute_s = time.perf_counter() - started
    elif local.cost is not None:  # steps on fewer tokens: modelled in proportion to their counted FLOPs
        compute_s = local.cost.full_step_equivalents * config.step_time_s + encode_s
    else:  # modelled training time (repeatable on a busy machine) + measured encoding
        compute_s = config.local_steps * config.step_time_s + encode_s
    down, up = links.transfer_time(client, len(message) + len(prior), downlink_bytes)
    reply = ClientReply(client, sent=message, compute_s=compute_s, download_s=down, upload_s=up,
                        finish_s=down + compute_s + up, weight=float(local.num_examples), visible=visible,
                        cost=local.cost, prior_sent=prior)
    return deliver(reply, faults, config.round_deadline_s, state)


def deliver(reply: ClientReply, faults: Faults, round_deadline_s: float | None, state) -> ClientReply:
    """Decide what of ``reply.sent`` reaches the server; tell ``state`` when nothing does."""
    if round_deadline_s is not None and reply.finish_s > round_deadline_s:
        reply.fault = "straggler"  # arrives after the server closed the round: discarded like a lost one
    elif faults.lost:
        reply.fault = "lost"  # never arrives; the client learns it (no acknowledgement)
    elif faults.corrupted:
        reply.fault, reply.received = "corrupted", corrupt_in_transit(reply.sent, faults.rng)
        # The prior travels in the same transmission: it arrives damaged too (drawn after the update's bits).
        reply.prior_received = corrupt_in_transit(reply.prior_sent, faults.rng) if reply.prior_sent else None
    else:
        reply.received = reply.sent
        reply.prior_received = reply.prior_sent or None
    if reply.received is None:
        message_lost(state)
    return reply


def message_lost(state) -> None:
    """Tell a client's error-feedback memory (if its method keeps one) that its message was lost."""
    handler = getattr(state, "message_lost", None)
    if handler is not None:
        handler()
