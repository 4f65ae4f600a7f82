"""Training each client on the most informative tokens of its sequences (``SimConfig.token_keep``).

With ``token_keep`` set, every local step of a client runs on that share of each sequence's tokens
(:func:`fstqcodec.tokens.reduce_batch`: the special tokens always, the kept tokens in their order and
at their original positions), ranked by ``token_select``:

- ``fisher``: the client's own token-importance prior (:class:`fstqcodec.tokens.TokenPriorRecorder`),
  learnt from the token Fisher of the backward passes its training runs anyway and kept by the
  client from round to round; ranking a batch is a lookup (:func:`fstqcodec.tokens.prior_scores`,
  vocabulary id plus position, the combination that ranked best for inference). With
  ``token_prior="federated"`` the clients' priors travel and the clients rank by the server's
  average of them (:mod:`fstqcodec.sim.prior_exchange`).
- ``random``: uniform random scores, seeded per client and round (the ablation).
- ``attention``: the attention [CLS] pays each token in the first layer
  (:func:`fstqcodec.tokens.first_layer_attention_scores`, a partial forward counted in the compute).

A client's first round runs on full sequences whatever the selection: the Fisher prior is learnt
from it, and random and attention follow the same schedule, so that every selection trains on the
same number of tokens. ``token_keep=1`` selects nothing and records the compute (the baseline).

The compute is counted per step (:class:`TrainingCost`): real tokens trained on; encoder FLOPs of the
batch as the model computes it (padded to its longest kept sequence, forward and backward counted as
three forwards, selection included), beside those of the full batch; and the measured seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from fstqcodec import tokens

__all__ = ["TrainingCost", "ClientTokens", "TokenSelector", "RoundSelection", "round_compute", "describe",
           "TRAINING_FORWARDS_PER_STEP"]

#: A training step counted as this many forward passes (the backward costs about two).
TRAINING_FORWARDS_PER_STEP = 3


@dataclass
class TrainingCost:
    """What one client's local training cost in a round, counted and measured."""

    tokens: int = 0  # real (unpadded) tokens in the batches trained on
    flops: float = 0.0  # counted multiply-adds of the steps, token selection included
    full_flops: float = 0.0  # the same steps on the full batches
    full_step_equivalents: float = 0.0  # sum over steps of flops / full flops (the modelled clock's steps)
    seconds: float = 0.0  # measured: selection, forward, backward and optimizer step


class ClientTokens:
    """One client's token selection across a run: its token prior and how many rounds it has trained.

    With the federated prior (:mod:`fstqcodec.sim.prior_exchange`) it also holds the server's
    averaged prior it last received, and ranks by that one.
    """

    def __init__(self, vocab_size: int, max_positions: int):
        self.accumulator = tokens.TokenPriorAccumulator(vocab_size, max_positions)
        self.rounds_trained = 0
        self.received_prior: dict | None = None  # the server's average, decoded (federated prior only)
        self.prior_version = 0  # which average it is (0: none yet)

    def receive_prior(self, prior: dict, version: int) -> None:
        """Keep the server's averaged prior (decoded from its downlink message) to rank by."""
        self.received_prior, self.prior_version = prior, int(version)

    def ranking_prior(self) -> dict:
        """The prior a Fisher selection ranks by: the received average, else the client's own."""
        return self.received_prior if self.received_prior is not None else self.accumulator.prior()

    def prior_message(self, config) -> bytes:
        """The client's own prior encoded for the uplink when ``config`` has it sent this round, else b"".

        Called after the round's training: sent after the client's first round and after every
        ``config.token_prior_every`` of its rounds (never with ``token_prior="local"``).
        """
        if config.token_prior != "federated" or self.rounds_trained < 1:
            return b""
        every = config.token_prior_every
        if self.rounds_trained != 1 and (every is None or (self.rounds_trained - 1) % every):
            return b""
        from fstqcodec.sim.prior_exchange import encode_prior

        return encode_prior(self.accumulator.prior(), config.token_prior_bpp)


class TokenSelector:
    """Chooses the tokens a client trains on, for a :class:`fstqcodec.sim.client.Workbench`.

    Parameters
    ----------
    model : peft.PeftModel
        The LoRA classifier of the workbench (a BERT-like encoder).
    keep_ratio : float
        Share of each sequence's tokens kept, in (0, 1].
    selection : {"fisher", "random", "attention"}
    special_ids : Iterable[int]
        Token ids always kept ([CLS], [SEP], ...).
    pad_id : int
        Id that pads the shortened sequences.

    Raises
    ------
    ValueError
        If ``keep_ratio`` or ``selection`` is out of range.
    """

    def __init__(self, model, keep_ratio: float, selection: str, *, special_ids: Iterable[int], pad_id: int):
        from fstqcodec.sim.config import TOKEN_SELECTIONS

        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if selection not in TOKEN_SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(TOKEN_SELECTIONS)}, got {selection!r}")
        self.model, self.keep_ratio, self.selection = model, float(keep_ratio), selection
        self.special_ids, self.pad_id = tuple(int(i) for i in special_ids), int(pad_id)
        self.model_config = model.config
        # The transformers model under the adapter: first_layer_attention_scores reads its encoder.
        self.encoder_model = model.get_base_model() if hasattr(model, "get_base_model") else model

    def new_client_state(self) -> ClientTokens:
        """A client's state before its first round (no prior yet)."""
        return ClientTokens(self.model_config.vocab_size, self.model_config.max_position_embeddings)

    def round(self, state: ClientTokens, seed: int) -> "RoundSelection":
        """The selection of one client's round; use it as a context manager around the round's steps."""
        return RoundSelection(self, state, seed)

    def step_flops(self, batch_size: int, width: int) -> float:
        """Counted FLOPs of one training step on ``batch_size`` sequences of ``width`` tokens."""
        return TRAINING_FORWARDS_PER_STEP * batch_size * tokens.encoder_flops(self.model_config, width)

    def attention_scoring_flops(self, batch_size: int, width: int) -> float:
        """FLOPs of the first-layer [CLS] attention: keys of every token, one query, the logits."""
        hidden = self.model_config.hidden_size
        return batch_size * (width * hidden * hidden + hidden * hidden + width * hidden)

    def attention_scores(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """First-layer [CLS] attention, computed without dropout (the model in eval mode for it)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return tokens.first_layer_attention_scores(self.encoder_model, batch["input_ids"],
                                                       batch["attention_mask"])
        finally:
            self.model.train(was_training)


class RoundSelection:
    """One client's round: selects each step's tokens, records the Fisher prior, counts the cost."""

    def __init__(self, selector: TokenSelector, state: ClientTokens, seed: int):
        self.selector, self.state = selector, state
        self.cost = TrainingCost()
        # The first round trains on full sequences (the prior is learnt from it), whatever the selection.
        self.active = selector.keep_ratio < 1.0 and state.rounds_trained > 0
        self.prior = state.ranking_prior() if self.active and selector.selection == "fisher" else None
        self.generator = torch.Generator().manual_seed(seed)
        self._recorder = None

    def __enter__(self) -> "RoundSelection":
        if self.selector.selection == "fisher" and self.selector.keep_ratio < 1.0:
            self._recorder = tokens.TokenPriorRecorder(self.selector.model)
            self._recorder.accumulator = self.state.accumulator  # the client's own prior, across rounds
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None
        self.state.rounds_trained += 1

    def select(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch cut to the kept tokens (unchanged before the client's first round ends); counted."""
        selector = self.selector
        size, full_width = batch["input_ids"].shape
        full_flops = selector.step_flops(size, full_width)
        flops = 0.0
        if self.active:
            if selector.selection == "fisher":
                scores = tokens.prior_scores(self.prior, batch["input_ids"], use="both")
            elif selector.selection == "random":
                scores = tokens.random_scores(batch["input_ids"], generator=self.generator)
            else:
                scores = selector.attention_scores(batch)
                flops += selector.attention_scoring_flops(size, full_width)
            batch = tokens.reduce_batch(batch, scores, selector.keep_ratio, special_ids=selector.special_ids,
                                        pad_id=selector.pad_id)
        flops += selector.step_flops(size, batch["input_ids"].shape[1])
        self.cost.tokens += int(batch["attention_mask"].sum())
        self.cost.flops += flops
        self.cost.full_flops += full_flops
        self.cost.full_step_equivalents += flops / full_flops
        return batch

    def add_seconds(self, seconds: float) -> None:
        """Book a step's measured time (its selection included)."""
        self.cost.seconds += seconds


def round_compute(sent) -> dict:
    """A round's client compute, summed over the replies ``sent`` (its clients that trained)."""
    costs = [reply.cost for reply in sent if reply.cost is not None]
    return {
        "client_compute_s": sum(reply.compute_s for reply in sent),
        "client_train_measured_s": sum(cost.seconds for cost in costs),
        "client_train_tokens": sum(cost.tokens for cost in costs),
        "client_train_flops": sum(cost.flops for cost in costs),
        "client_train_flops_full": sum(cost.full_flops for cost in costs),
    }


def describe(config) -> dict:
    """How the run's clients chose their training tokens and how their compute is counted (``SimConfig``)."""
    return {
        "keep_ratio": config.token_keep,
        "selection": config.token_select if config.token_keep < 1 else "none (every token kept)",
        "schedule": "a client's first round on full sequences (the Fisher prior is learnt from it; every "
                    "selection alike), its later rounds on the kept tokens",
        "special_tokens": "always kept, in order, at their original positions",
        "flops": "encoder multiply-adds of each step's batch as computed (padded to its longest kept sequence), "
                 "3 x forward per step, attention scoring included; the full batches' beside them",
        "compute_s": ("measured wall time of local training and encoding" if config.step_time_s is None else
                      f"{config.step_time_s} s x each step's FLOPs over its full batch's + measured encoding"),
    }
