"""The federated token-importance prior (``SimConfig.token_prior="federated"``): sent, averaged, sent back.

With token selection by the Fisher prior (``token_select="fisher"``) each client learns a prior
(:class:`fstqcodec.tokens.TokenPriorAccumulator`, per vocabulary id and per position) from the
backward passes of its own training. Kept local (the default), it ranks only that client's tokens.
Federated, it travels through the codec like any update:

- a client sends its prior with its update after its first round (and after every
  ``token_prior_every`` of its rounds, if set), encoded by :func:`fstqcodec.encode` at
  ``token_prior_bpp`` bits per value; the message shares the update's fate in transit (lost,
  late or corrupted with it) and its bytes are counted in the round's uplink;
- the server decodes each prior that arrives (:func:`fstqcodec.decode`, then
  :func:`fstqcodec.tokens.check_prior`); one that fails is dropped and recorded, never averaged.
  It keeps each client's latest prior and averages them with :func:`fstqcodec.tokens.average_priors`,
  weighted by the clients' example counts (FedAvg's weights);
- the average is encoded the same way and sent down to each sampled client that does not hold it
  yet (its bytes counted in the round's downlink); the client decodes it and ranks its tokens by it.
  A client that holds no average yet ranks by its own prior.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

import fstqcodec
from fstqcodec import tokens

__all__ = ["encode_prior", "decode_prior", "PriorExchange", "describe"]


def encode_prior(prior: Mapping[str, np.ndarray], bits_per_param: float) -> bytes:
    """A prior as one codec message at ``bits_per_param`` bits per value (no Fisher: every value alike).

    Raises
    ------
    fstqcodec.BudgetError
        If the budget is below the smallest message of the prior (the message names token_prior_bpp).
    """
    try:
        return fstqcodec.encode(dict(prior), budget=fstqcodec.Budget(bits_per_param=bits_per_param))
    except fstqcodec.BudgetError as error:
        values = sum(np.size(value) for value in prior.values())
        raise fstqcodec.BudgetError(f"token_prior_bpp {bits_per_param:g} is too low for a prior of {values} values: "
                                    f"{error}", budget=error.budget, minimum=error.minimum) from error


def decode_prior(message: bytes, *, vocab_size: int, max_positions: int) -> dict[str, np.ndarray]:
    """A prior message decoded and checked against the model's vocabulary and positions.

    Raises
    ------
    ValueError
        :class:`fstqcodec.DecodeError` for a damaged message, or a ``ValueError`` naming what does not
        fit the model (a missing key, a shape, non-finite values).
    """
    prior = fstqcodec.decode(message)
    tokens.check_prior(prior, vocab_size=vocab_size, max_positions=max_positions, use="both")
    return prior


class PriorExchange:
    """The server's side of the federated prior for one method's run.

    Parameters
    ----------
    config : SimConfig
        ``token_prior_bpp`` sets the downlink message's budget.
    model_config
        The model's ``vocab_size`` and ``max_position_embeddings`` (what a prior must fit).
    client_sizes : sequence of float
        Each client's examples: the weight of its prior in the average.
    """

    def __init__(self, config, model_config, client_sizes):
        self.bits_per_param = float(config.token_prior_bpp)
        self.vocab_size = int(model_config.vocab_size)
        self.max_positions = int(model_config.max_position_embeddings)
        self.client_sizes = [float(size) for size in client_sizes]
        self.client_priors: dict[int, dict[str, np.ndarray]] = {}  # each client's latest decoded prior
        self.average: dict[str, np.ndarray] | None = None
        self.message = b""  # the average, encoded for the downlink
        self.version = 0  # bumped whenever the average changes

    def send_down(self, state) -> int:
        """Give a sampled client (its ``ClientTokens``) the current average if it lacks it; bytes sent."""
        if self.version == 0 or state.prior_version == self.version:
            return 0
        state.receive_prior(decode_prior(self.message, vocab_size=self.vocab_size,
                                         max_positions=self.max_positions), self.version)
        return len(self.message)

    def collect(self, replies, round_number: int) -> tuple[dict, list[dict]]:
        """Decode the priors that arrived with ``replies`` and re-average; the round's figures and drops.

        A prior that fails to decode or does not fit the model is left out (the client's previous
        prior, if any, stays in the average) and listed in the drops.
        """
        accepted, dropped = 0, []
        for reply in replies:
            if reply.prior_received is None:
                continue
            try:
                prior = decode_prior(reply.prior_received, vocab_size=self.vocab_size,
                                     max_positions=self.max_positions)
            except ValueError as error:  # fstqcodec.DecodeError is a ValueError too
                dropped.append({"round": round_number, "client": reply.client, "message": "token_prior",
                                "error": repr(error)})
                continue
            self.client_priors[reply.client] = prior
            accepted += 1
        if accepted:
            self._average()
        figures = {"prior_uplink_bytes": sum(len(reply.prior_sent) for reply in replies),
                   "prior_messages_averaged": accepted, "prior_clients": len(self.client_priors)}
        return figures, dropped

    def _average(self) -> None:
        clients = sorted(self.client_priors)
        self.average = tokens.average_priors([self.client_priors[c] for c in clients],
                                             [self.client_sizes[c] for c in clients])
        self.message = encode_prior(self.average, self.bits_per_param)
        self.version += 1


def describe(config) -> dict:
    """How the run's token prior travelled, for the results' ``config`` (runs with ``federated``)."""
    every = config.token_prior_every
    return {
        "mode": "federated",
        "message": f"fstqcodec.encode of the prior (vocabulary ids and positions), {config.token_prior_bpp} "
                   "bits per value, up and down",
        "uplink": "with the update after a client's first round" + (
            "" if every is None else f" and after every {every} of its rounds") + "; counted in uplink_bytes "
            "and in prior_uplink_bytes",
        "server": "each client's latest decoded prior, averaged weighted by example count; a prior that "
                  "fails to decode is dropped, never averaged",
        "downlink": "the average, to each sampled client that lacks it; counted in downlink_bytes and "
                    "prior_downlink_bytes",
        "ranking": "by the received average; by the client's own prior until it has received one",
    }
