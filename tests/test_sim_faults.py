"""Faults in the reference loop: corrupted uplink messages are never averaged into the model."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

import fstqcodec  # noqa: E402
from common import BBC_PACKAGES, skip_without_packages  # noqa: E402
from fstqcodec.sim.client import corrupt_in_transit, message_lost  # noqa: E402
from fstqcodec.sim.loop import SimConfig, run_simulation  # noqa: E402

skip_without_packages(BBC_PACKAGES, module_level=True)


def test_bit_flips_in_transit_never_decode():
    rng = np.random.default_rng(7)
    update = {"a": rng.standard_normal((8, 384)).astype(np.float32), "b": rng.standard_normal(384).astype(np.float32)}
    message = fstqcodec.encode(update, budget=fstqcodec.Budget(bits_per_param=1))
    for seed in range(300):
        damaged = corrupt_in_transit(message, np.random.default_rng(seed), flips=1 + seed % 8)
        assert damaged != message
        with pytest.raises(fstqcodec.DecodeError):
            fstqcodec.decode(damaged)


def test_corrupted_fstq_messages_are_dropped_and_fp32_ones_are_averaged_in(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = SimConfig(
        clients=2, rounds=2, local_steps=1, eval_size=32, methods=("fp32", "fstq"),
        uplink_corruption=1.0, step_time_s=0.0, threads=1,
    )
    results = run_simulation(config, progress=False, workers=1)
    fstq, fp32 = results["methods"]["fstq"], results["methods"]["fp32"]
    # Every fstq message was corrupted, detected by its checksum and dropped, so the model never
    # moved: each round's accuracy is the initial one, and the client kept its update (lost()).
    assert len(fstq["dropped_messages"]) == config.clients * config.rounds
    assert all("ChecksumError" in entry["error"] for entry in fstq["dropped_messages"])
    assert {r["accuracy"] for r in fstq["rounds"]} == {fstq["rounds"][0]["accuracy"]}
    # Raw float32 bytes have no checksum: the same bit flips decode and are averaged in, unless
    # they make a value NaN or infinite, which the server's StreamingAggregator refuses.
    corrupted = sum(1 for f in fp32["faults"] if f["fault"] == "corrupted")
    assert corrupted == config.clients * config.rounds
    assert len(fp32["dropped_messages"]) < corrupted
    assert all(entry["error"].startswith("NonFinite(") for entry in fp32["dropped_messages"])


def test_stragglers_past_the_round_deadline_are_discarded_and_the_round_is_cut_short(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Every transfer alone takes the 0.05 s link latency twice: nobody can make a 0.06 s deadline.
    config = SimConfig(
        clients=2, rounds=2, local_steps=1, eval_size=32, methods=("fstq",),
        step_time_s=0.0, threads=1, round_deadline_s=0.06,
    )
    results = run_simulation(config, progress=False, workers=1)
    fstq = results["methods"]["fstq"]
    stragglers = [f for f in fstq["faults"] if f["fault"] == "straggler"]
    assert len(stragglers) == config.clients * config.rounds
    assert all(f["finish_s"] > config.round_deadline_s for f in stragglers)
    # Nothing arrived in time, so the model never moved, and every round lasted the deadline.
    assert {r["accuracy"] for r in fstq["rounds"]} == {fstq["rounds"][0]["accuracy"]}
    assert [r["round_time_s"] for r in fstq["rounds"][1:]] == [config.round_deadline_s] * config.rounds
    # The messages were still sent: their bytes count against the uplink.
    assert fstq["rounds"][-1]["cumulative_uplink_bytes"] > 0


def test_error_feedback_keeps_a_stragglers_update():
    memory = fstqcodec.ErrorFeedback()
    update = {"w": np.linspace(-1, 1, 4096, dtype=np.float32)}
    memory.encode(update, budget=fstqcodec.Budget(bits_per_param=0.5))
    message_lost(memory)  # what the loop does for a straggler, a lost or a rejected message
    np.testing.assert_array_equal(memory.residual["w"], update["w"])
