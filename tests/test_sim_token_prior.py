"""The federated token prior in the reference loop (``--token-prior federated``; fstqcodec.sim.prior_exchange).

The first tests need numpy and torch only (settings, the schedule, the server's average and what it
refuses, on small synthetic priors); the last ones train the packaged classifier on BBC and skip
without it.
"""

import argparse
import types

import numpy as np
import pytest

from common import check_kept_tokens_rank_highest
from fstqcodec.sim.config import SimConfig

pytest.importorskip("torch")

from fstqcodec import tokens  # noqa: E402  (needs torch)
from fstqcodec.sim.client import ClientReply, Faults, deliver  # noqa: E402
from fstqcodec.sim.prior_exchange import PriorExchange, decode_prior, encode_prior  # noqa: E402
from fstqcodec.sim.token_selection import ClientTokens  # noqa: E402

VOCAB, POSITIONS = 4000, 64  # large enough for a 1-bit message above its header
FEDERATED = dict(token_keep=0.5, token_select="fisher", token_prior="federated")


@pytest.mark.parametrize("settings, message", [
    ({**FEDERATED, "token_prior": "global"}, "token_prior must be one of local, federated, got 'global'"),
    ({**FEDERATED, "token_prior_bpp": 0.0}, "token_prior_bpp must be in (0, 32], got 0.0"),
    ({**FEDERATED, "token_prior_bpp": float("nan")}, "token_prior_bpp must be in (0, 32], got nan"),
    ({**FEDERATED, "token_prior_every": 0}, "token_prior_every must be an integer >= 1, got 0"),
    ({"token_prior": "federated"}, "token_prior federated needs token_keep below 1 and token_select fisher"),
    ({**FEDERATED, "token_keep": 1.0}, "token_prior federated needs token_keep below 1"),
    ({**FEDERATED, "token_select": "random"}, "token_prior federated needs token_keep below 1 and token_select fisher"),
    ({"token_keep": 0.5, "token_prior_bpp": 2.0}, "token_prior_bpp and token_prior_every need token_prior federated"),
    ({"token_keep": 0.5, "token_prior_every": 3}, "token_prior_bpp and token_prior_every need token_prior federated"),
])
def test_invalid_prior_settings_are_refused_naming_the_option(settings, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        SimConfig(**settings).validate()


def test_cli_refuses_bad_prior_options_in_one_line_with_status_2(capsys):
    from fstqcodec.sim.cli import add_arguments, run as run_from_args

    def run(argv):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return run_from_args(parser.parse_args(argv))

    assert run(["--token-keep", "0.5", "--token-prior", "federated", "--token-prior-bpp", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "fstq simulate: token_prior_bpp must be in (0, 32], got -1.0"
    assert run(["--token-prior", "federated"]) == 2
    assert "token_prior federated needs token_keep" in capsys.readouterr().err


def test_the_record_names_the_prior_settings_only_when_federated():
    local = SimConfig(token_keep=0.5).record()
    assert not any(key.startswith("token_prior") for key in local)
    assert set(local) == set(SimConfig(token_keep=0.5, token_prior="local").record())
    federated = SimConfig(**FEDERATED, token_prior_every=5).record()
    assert (federated["token_prior"], federated["token_prior_bpp"], federated["token_prior_every"]) == (
        "federated", 1.0, 5)


def _client_state(seed: int, sequences: int = 40) -> ClientTokens:
    """A client state whose own prior comes from random token Fisher on random sequences."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = ClientTokens(VOCAB, POSITIONS)
    ids = torch.randint(0, VOCAB, (sequences, POSITIONS), generator=generator)
    state.accumulator.observe(ids, None, torch.rand(ids.shape, generator=generator) ** 3)
    return state


def test_a_client_sends_its_prior_after_its_first_round_and_then_every_n():
    state = _client_state(0)
    once, every_two = SimConfig(**FEDERATED), SimConfig(**FEDERATED, token_prior_every=2)
    sent_once, sent_every_two = [], []
    for rounds_trained in range(1, 7):
        state.rounds_trained = rounds_trained
        sent_once.append(bool(state.prior_message(once)))
        sent_every_two.append(bool(state.prior_message(every_two)))
    assert sent_once == [True, False, False, False, False, False]
    assert sent_every_two == [True, False, True, False, True, False]
    assert state.prior_message(SimConfig(token_keep=0.5)) == b""  # local: never sent
    state.rounds_trained = 1
    decoded = decode_prior(state.prior_message(once), vocab_size=VOCAB, max_positions=POSITIONS)
    own = state.accumulator.prior()
    assert set(decoded) == set(own)
    assert state.prior_message(once) == encode_prior(own, once.token_prior_bpp)
    assert np.corrcoef(decoded[tokens.VOCAB_KEY], own[tokens.VOCAB_KEY])[0, 1] > 0.5  # 1 bit a value: lossy


def _reply(client: int, state: ClientTokens, *, corrupted: bool = False) -> ClientReply:
    """A client's reply carrying its prior message, delivered intact or with bits flipped."""
    reply = ClientReply(client, sent=b"update", prior_sent=state.prior_message(SimConfig(**FEDERATED)))
    faults = Faults(dropout=False, lost=False, corrupted=corrupted, rng=np.random.default_rng(client))
    return deliver(reply, faults, None, state=None)


def _exchange(sizes=(10.0, 30.0, 20.0)) -> PriorExchange:
    model_config = types.SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=POSITIONS)
    return PriorExchange(SimConfig(**FEDERATED), model_config, sizes)


def test_the_server_averages_the_decoded_priors_by_example_count_and_sends_the_average_down():
    states = [_client_state(seed) for seed in range(3)]
    for state in states:
        state.rounds_trained = 1
    replies = [_reply(client, state) for client, state in enumerate(states)]
    exchange = _exchange()
    figures, dropped = exchange.collect(replies, round_number=1)
    assert dropped == [] and figures == {"prior_uplink_bytes": sum(len(r.prior_sent) for r in replies),
                                         "prior_messages_averaged": 3, "prior_clients": 3}
    decoded = [decode_prior(r.prior_received, vocab_size=VOCAB, max_positions=POSITIONS) for r in replies]
    expected = tokens.average_priors(decoded, [10.0, 30.0, 20.0])
    for key in expected:
        np.testing.assert_array_equal(exchange.average[key], expected[key])
    # Down: each client gets the average decoded from one message, once per version.
    receiver = states[0]
    assert exchange.send_down(receiver) == len(exchange.message) > 0
    assert exchange.send_down(receiver) == 0
    down = decode_prior(exchange.message, vocab_size=VOCAB, max_positions=POSITIONS)
    for key in down:
        np.testing.assert_array_equal(receiver.ranking_prior()[key], down[key])
    assert np.corrcoef(down[tokens.VOCAB_KEY], expected[tokens.VOCAB_KEY])[0, 1] > 0.5  # 1 bit a value: lossy


def test_a_corrupted_prior_is_refused_and_left_out_of_the_average():
    states = [_client_state(seed) for seed in range(3)]
    for state in states:
        state.rounds_trained = 1
    replies = [_reply(0, states[0]), _reply(1, states[1], corrupted=True), _reply(2, states[2])]
    assert replies[1].fault == "corrupted" and replies[1].prior_received != replies[1].prior_sent
    exchange = _exchange()
    figures, dropped = exchange.collect(replies, round_number=4)
    assert figures["prior_messages_averaged"] == 2 and figures["prior_clients"] == 2
    assert [(d["round"], d["client"], d["message"]) for d in dropped] == [(4, 1, "token_prior")]
    assert "Error" in dropped[0]["error"]
    kept = [decode_prior(replies[c].prior_received, vocab_size=VOCAB, max_positions=POSITIONS) for c in (0, 2)]
    expected = tokens.average_priors(kept, [10.0, 20.0])
    for key in expected:
        np.testing.assert_array_equal(exchange.average[key], expected[key])


def test_a_prior_of_another_vocabulary_is_refused():
    state = _client_state(0)
    state.rounds_trained = 1
    message = state.prior_message(SimConfig(**FEDERATED))
    with pytest.raises(ValueError, match="model's vocabulary has 5000 entries"):
        decode_prior(message, vocab_size=5000, max_positions=POSITIONS)
    exchange = PriorExchange(SimConfig(**FEDERATED), types.SimpleNamespace(
        vocab_size=5000, max_position_embeddings=POSITIONS), [1.0])
    figures, dropped = exchange.collect([_reply(0, state)], round_number=1)
    assert figures["prior_messages_averaged"] == 0 and exchange.average is None and exchange.version == 0
    assert "vocabulary" in dropped[0]["error"]


def test_a_budget_below_the_smallest_prior_message_names_the_option():
    import fstqcodec

    with pytest.raises(fstqcodec.BudgetError, match=r"^token_prior_bpp 0.01 is too low for a prior of 4064 values"):
        encode_prior(_client_state(0).accumulator.prior(), 0.01)


def test_a_lost_update_loses_its_prior_too():
    state = _client_state(0)
    state.rounds_trained = 1
    reply = ClientReply(0, sent=b"update", prior_sent=state.prior_message(SimConfig(**FEDERATED)))
    deliver(reply, Faults(False, True, False, np.random.default_rng(0)), None, state=None)
    assert reply.fault == "lost" and reply.prior_received is None


# --- the packaged classifier ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("peft")
    from common import BBC_PACKAGES, skip_without_packages

    skip_without_packages(BBC_PACKAGES)
    from fstqcodec.sim.client import Workbench

    config = SimConfig(methods=("fstq",), clients=3, local_steps=2, batch_size=4, eval_size=16, threads=1,
                       step_time_s=0.3, **FEDERATED)
    workbench = Workbench(config)
    yield workbench
    workbench.close()


def test_the_loop_counts_the_prior_bytes_and_clients_rank_by_the_received_average(bench):
    from fstqcodec.sim.bandwidth import LinkModel
    from fstqcodec.sim.loop import MethodRun
    from fstqcodec.sim.methods import make_method
    from fstqcodec.sim.report import summarize

    method = make_method("fstq", bench.layout, bench.config.encode_config())
    run = MethodRun(bench, LinkModel(seed=1).draw(bench.config.clients), method, initial_accuracy=0.25)
    first = run.play_round(1)
    # Up: every client's prior, counted in the round's uplink beside the updates.
    assert first["prior_messages_averaged"] == 3 and first["prior_uplink_bytes"] > 3 * 1000
    assert first["uplink_bytes"] == sum(run.message_sizes) + first["prior_uplink_bytes"]
    own = [state.accumulator.prior() for state in run.token_states]
    sent = [decode_prior(state.prior_message(bench.config), vocab_size=bench.model.config.vocab_size,
                         max_positions=bench.model.config.max_position_embeddings) for state in run.token_states]
    expected = tokens.average_priors(sent, bench.client_sizes)
    for key in expected:
        np.testing.assert_array_equal(run.priors.average[key], expected[key])
    second = run.play_round(2)
    # Down: the average to each of the three, counted in the downlink; no prior goes up this round.
    assert second["prior_downlink_bytes"] == 3 * len(run.priors.message)
    assert second["prior_uplink_bytes"] == 0 and second["uplink_bytes"] == sum(run.message_sizes[3:])
    down = decode_prior(run.priors.message, vocab_size=bench.model.config.vocab_size,
                        max_positions=bench.model.config.max_position_embeddings)
    for state, own_prior in zip(run.token_states, own):
        assert state.prior_version == 1
        np.testing.assert_array_equal(state.ranking_prior()[tokens.VOCAB_KEY], down[tokens.VOCAB_KEY])
        assert not np.array_equal(state.ranking_prior()[tokens.VOCAB_KEY], own_prior[tokens.VOCAB_KEY])
    summary = summarize({"target_accuracy": 0.0, "methods": {"fstq": {"rounds": run.rounds}}})["methods"]["fstq"]["summary"]
    assert summary["total_prior_uplink_bytes"] == first["prior_uplink_bytes"]
    assert summary["total_prior_downlink_bytes"] == second["prior_downlink_bytes"]


def test_a_fisher_selection_keeps_the_tokens_the_received_prior_ranks_highest(bench):
    from fstqcodec.sim.token_selection import TokenSelector

    state = bench.new_token_state()
    bench.train(bench.initial_state, 1, 1, with_fisher=False, tokens=state)
    # A received average that ranks opposite to the client's own prior: selection must follow it.
    received = {key: -value for key, value in state.accumulator.prior().items()}
    state.receive_prior(received, version=1)
    batch = bench.train_data.batch(bench.partition[1][:6])
    selector = TokenSelector(bench.model, 0.5, "fisher", special_ids=bench.token_selector.special_ids, pad_id=0)
    with selector.round(state, seed=11) as selection:
        reduced = selection.select(dict(batch))
    scores = tokens.prior_scores(received, batch["input_ids"], use="both").numpy()
    check_kept_tokens_rank_highest(scores, reduced, batch["input_ids"].numpy(), bench.token_selector.special_ids)
