"""The round loop (``fstqcodec.sim.loop.MethodRun``) on a stand-in client stage that needs only numpy.

The workbench below trains nothing: a client's "training" adds a fixed, client- and round-specific
step to the adapter it receives, so what the server must compute from the replies is known exactly.
"""

import numpy as np
import pytest

from fstqcodec.sim.bandwidth import LinkModel
from fstqcodec.sim.client import LocalTraining
from fstqcodec.sim.config import SimConfig
from fstqcodec.sim.loop import MethodRun
from fstqcodec.sim.methods import UpdateLayout, make_method

SHAPES = {"layer.lora_A.weight": (8, 256), "layer.lora_B.weight": (256, 8)}


class StepBench:
    """A workbench whose clients each add ``step(client, round)`` to the adapter they receive."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.layout = UpdateLayout(SHAPES)
        self.initial_state = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}
        self.client_sizes = np.arange(1, config.clients + 1, dtype=np.float64) * 10
        self.trained_by: list[tuple[int, int]] = []

    def step(self, client: int, round_number: int) -> dict:
        rng = np.random.default_rng(1000 * client + round_number)
        return {name: (0.01 * rng.standard_normal(shape)).astype(np.float32) for name, shape in SHAPES.items()}

    def train(self, state, client, round_number, *, with_fisher=True):
        self.trained_by.append((round_number, client))
        step = self.step(client, round_number)
        trained = {name: state[name] + step[name] for name in SHAPES}
        fisher = {name: np.ones(shape, np.float32) for name, shape in SHAPES.items()} if with_fisher else None
        return LocalTraining(trained, fisher, int(self.client_sizes[client]), 0.0)

    def evaluate(self, state):
        return 0.5


def _run(method_name: str, **settings) -> MethodRun:
    config = SimConfig(methods=(method_name,), step_time_s=0.0, **{"budget_bpp": 1.0, **settings})
    config.validate()
    bench = StepBench(config)
    links = LinkModel(seed=1).draw(config.clients)
    method = make_method(method_name, bench.layout, config.encode_config())
    return MethodRun(bench, links, method, initial_accuracy=0.5)


def test_fp32_round_is_fedavg_of_the_client_updates_weighted_by_examples():
    run = _run("fp32", clients=4, rounds=1)
    entry = run.play_round(1)
    bench = run.bench
    weights = bench.client_sizes
    for name in SHAPES:
        expected = sum(w * bench.step(c, 1)[name].astype(np.float64) for c, w in enumerate(weights)) / weights.sum()
        np.testing.assert_allclose(run.global_state[name], expected.astype(np.float32), rtol=1e-6, atol=1e-9)
    message_bytes = 8 + 4 * bench.layout.total
    assert entry["uplink_bytes"] == 4 * message_bytes == entry["cumulative_uplink_bytes"]
    assert run.record(1.0)["mean_message_bytes"] == message_bytes


def test_a_lost_message_stays_in_error_feedback_and_is_not_averaged():
    run = _run("fstq", clients=3, rounds=1, uplink_loss=0.99)
    run.play_round(1)
    assert {f["fault"] for f in run.faults} == {"lost"} and len(run.faults) == 3
    for name in SHAPES:  # nothing arrived: the model did not move
        np.testing.assert_array_equal(run.global_state[name], 0.0)
    for client, state in enumerate(run.client_states):  # and each client kept its whole update
        for name in SHAPES:
            np.testing.assert_allclose(state.residual[name], run.bench.step(client, 1)[name], rtol=1e-6)


def test_methods_are_compared_on_the_same_clients_and_batches():
    fp32, fstq = _run("fp32", clients=5, rounds=2, participation=0.6), _run("fstq", clients=5, rounds=2, participation=0.6)
    for run in (fp32, fstq):
        run.run()
    assert fp32.bench.trained_by == fstq.bench.trained_by
    assert len(fp32.bench.trained_by) == 2 * 3


@pytest.mark.parametrize("name", ["fstq", "topk"])
def test_compressed_rounds_stay_within_the_budget(name):
    run = _run(name, clients=2, rounds=1, budget_bpp=0.5)
    run.play_round(1)
    assert max(run.message_sizes) <= 0.5 * run.bench.layout.total / 8


def test_partial_participation_samples_a_seeded_fraction_each_round():
    run = _run("fp32", clients=30, rounds=3, participation=0.3)
    rounds = [run.participants(r) for r in (1, 2, 3)]
    assert all(len(chosen) == 9 == len(set(chosen)) for chosen in rounds)
    assert len({tuple(chosen) for chosen in rounds}) == 3  # a new draw each round
    assert rounds == [_run("fstq", clients=30, participation=0.3).participants(r) for r in (1, 2, 3)]
    assert rounds != [_run("fp32", clients=30, participation=0.3, seed=1).participants(r) for r in (1, 2, 3)]
    run.play_round(1)
    assert sorted(round_number for round_number, _ in run.bench.trained_by) == [1] * 9
    assert sorted(client for _, client in run.bench.trained_by) == rounds[0]


def test_a_client_not_sampled_keeps_its_error_feedback_until_it_is_sampled_again():
    run = _run("fstq", clients=10, rounds=3, participation=0.3, budget_bpp=0.5)
    first, second = set(run.participants(1)), set(run.participants(2))
    waiting = sorted(first - second)  # sampled in round 1, not in round 2
    assert waiting, "the seed should give a client that sits out round 2"
    run.play_round(1)
    kept = {c: {n: a.copy() for n, a in run.client_states[c].residual.items()} for c in waiting}
    assert all(np.abs(kept[c][n]).sum() > 0 for c in waiting for n in SHAPES)  # 0.5 bit/param left a residual
    run.play_round(2)
    for client in waiting:
        for name in SHAPES:
            np.testing.assert_array_equal(run.client_states[client].residual[name], kept[client][name])
    # Sampled again later, the client's message carries its new update plus what it kept.
    client = waiting[0]
    later = next(r for r in range(3, 50) if client in run.participants(r) and r > 2)
    for round_number in range(3, later + 1):
        run.play_round(round_number)
    sent = run.client_states[client].last_update  # what the last message encoded in full
    for name in SHAPES:
        np.testing.assert_allclose(sent[name], run.bench.step(client, later)[name] + kept[client][name],
                                   rtol=1e-5, atol=1e-7)


def test_server_momentum_moves_the_model_by_the_velocity_of_the_averaged_updates():
    plain, fedavgm = _run("fp32", clients=3, rounds=2), _run("fp32", clients=3, rounds=2, server_lr=0.5,
                                                            server_momentum=0.9)
    means = []
    for round_number in (1, 2):
        before = {name: a.copy() for name, a in plain.global_state.items()}
        plain.play_round(round_number)
        means.append({name: plain.global_state[name] - before[name] for name in SHAPES})
        fedavgm.play_round(round_number)
    for name in SHAPES:  # v1 = m1, v2 = 0.9 v1 + m2; the model moved by 0.5 (v1 + v2)
        expected = 0.5 * (means[0][name] + 0.9 * means[0][name] + means[1][name])
        np.testing.assert_allclose(fedavgm.global_state[name], expected, rtol=1e-5, atol=1e-8)


def test_the_server_optimizer_rejects_invalid_settings():
    for settings, message in (({"server_lr": 0.0}, "server_lr"), ({"server_momentum": 1.0}, "server_momentum")):
        with pytest.raises(ValueError, match=message):
            SimConfig(**settings).validate()


def test_ef21_client_and_server_hold_the_same_reference_and_the_server_averages_references():
    run = _run("fstq-ef21", clients=3, rounds=2, budget_bpp=2.0)
    before = {name: a.copy() for name, a in run.global_state.items()}
    run.play_round(1)
    for client in range(3):
        for name in SHAPES:
            np.testing.assert_array_equal(run.client_states[client].reference[name],
                                          run.server_references[client][name])
    weights = run.bench.client_sizes[:3]
    for name in SHAPES:  # round 1: the references are the decoded messages; the model moved by their mean
        expected = sum(w * run.server_references[c][name].astype(np.float64) for c, w in enumerate(weights))
        np.testing.assert_allclose(run.global_state[name] - before[name], expected / weights.sum(), rtol=1e-5,
                                   atol=1e-7)
    # Round 2 codes the change: the reference moves toward the client's new update.
    first = {c: {n: a.copy() for n, a in run.server_references[c].items()} for c in range(3)}
    run.play_round(2)
    for client in range(3):
        target = run.bench.step(client, 2)
        for name in SHAPES:
            after = np.linalg.norm(run.server_references[client][name] - target[name])
            assert after < np.linalg.norm(first[client][name] - target[name])


def test_ef21_a_lost_message_moves_neither_reference():
    run = _run("fstq-ef21", clients=3, rounds=1, uplink_loss=0.99)
    run.play_round(1)
    assert len(run.faults) == 3 and run.server_references == {}
    assert all(state.reference == {} for state in run.client_states)
    for name in SHAPES:
        np.testing.assert_array_equal(run.global_state[name], 0.0)


def test_fstq_unbiased_keeps_no_residual_and_the_server_averages_its_unbiased_messages():
    run = _run("fstq-unbiased", clients=3, rounds=1, budget_bpp=0.5)
    assert run.method.encode_config.unbiased and run.method.config()["error_feedback"] is False
    assert all(state is None for state in run.client_states)  # nothing held back on average
    before = {name: a.copy() for name, a in run.global_state.items()}
    run.play_round(1)
    weights = run.bench.client_sizes[:3]
    moved = {name: run.global_state[name] - before[name] for name in SHAPES}
    # The round moved the model by some average of sampled messages: not all zero, not the exact mean.
    exact = {name: sum(w * run.bench.step(c, 1)[name] for c, w in enumerate(weights)) / weights.sum() for name in SHAPES}
    assert any(np.any(moved[name] != 0) for name in SHAPES)
    assert any(not np.allclose(moved[name], exact[name]) for name in SHAPES)
