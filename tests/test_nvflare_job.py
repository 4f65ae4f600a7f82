"""A real NVIDIA FLARE simulator job with the fstq filters (integrations/nvflare-job/fstq_job.py).

Two honest sites and one hostile site, three rounds of ScatterAndGather with NVFLARE's own
InTimeAccumulateWeightedAggregator: the task results shrink by the budget's ratio, each round's
global model is the previous one plus the weighted mean of the decoded updates, and the hostile
site's garbage, truncated bytes and another model's message are dropped with their reasons while
every round completes.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("nvflare")

import fstqcodec  # noqa: E402

JOB_DIR = os.path.join(os.path.dirname(__file__), "..", "integrations", "nvflare-job")
BITS_PER_PARAM = 1.0
ROUNDS = 3


def read_jsonl(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def job_run(tmp_path_factory):
    sys.path.insert(0, JOB_DIR)
    try:
        import fstq_job
    finally:
        sys.path.remove(JOB_DIR)
    workspace = tmp_path_factory.mktemp("nvflare")
    record_dir = str(workspace / "records")
    config = fstqcodec.EncodeConfig(budget=fstqcodec.Budget(bits_per_param=BITS_PER_PARAM), fisher_power=0.5)
    job, sites = fstq_job.build_job(record_dir, clients=2, hostile_sites=1, rounds=ROUNDS, config=config)
    job.simulator_run(str(workspace / "simulator"), threads=len(sites))
    return fstq_job, record_dir


@pytest.mark.slow
def test_results_shrink_by_the_budget_ratio(job_run):
    fstq_job, record_dir = job_run
    parameters = sum(a.size for a in fstq_job.initial_model().values())
    sizes = [s for s in read_jsonl(os.path.join(record_dir, "sizes.jsonl")) if s["site"] != "site-3"]
    raw = [s["bytes"] for s in sizes if s["label"] == "raw"]
    sent = [s["bytes"] for s in sizes if s["label"] == "sent"]
    assert len(raw) == len(sent) == 2 * ROUNDS
    budget = parameters * BITS_PER_PARAM / 8
    # What crosses the network: the serialized Shareable, its headers and meta included.
    assert max(sent) <= budget + 2048, (max(sent), budget)
    assert min(raw) >= 4 * parameters
    ratio = min(raw) / max(sent)
    assert ratio >= 0.9 * 32 / BITS_PER_PARAM, ratio


@pytest.mark.slow
def test_global_model_is_the_weighted_mean_of_the_decoded_updates(job_run):
    fstq_job, record_dir = job_run
    events = read_jsonl(os.path.join(record_dir, "events.jsonl"))
    previous = dict(np.load(os.path.join(record_dir, "global-initial.npz")))
    for round_number in range(ROUNDS):
        accepted = [e for e in events if e["round"] == round_number and e["accepted"]]
        assert sorted(e["site"] for e in accepted) == ["site-1", "site-2"]
        total_weight = sum(e["weight"] for e in accepted)
        updates = [(dict(np.load(os.path.join(record_dir, f"round{round_number}-{e['site']}.npz"))), e["weight"]) for e in accepted]
        current = dict(np.load(os.path.join(record_dir, f"global-round{round_number}.npz")))
        for name, before in previous.items():
            mean = sum(w * u[name].astype(np.float64) for u, w in updates) / total_weight
            np.testing.assert_allclose(current[name], before + mean, rtol=1e-5, atol=1e-7)
            assert np.abs(mean).max() > 0
        previous = current


@pytest.mark.slow
def test_hostile_results_are_dropped_with_their_reason_and_rounds_complete(job_run):
    _, record_dir = job_run
    events = read_jsonl(os.path.join(record_dir, "events.jsonl"))
    dropped = [(e["round"], e["site"], e["reason"]) for e in events if not e["accepted"]]
    assert sorted(dropped) == [(0, "site-3", "BadFormatError"), (1, "site-3", "TruncatedError"), (2, "site-3", "TensorMismatch")]
    assert all(os.path.exists(os.path.join(record_dir, f"global-round{r}.npz")) for r in range(ROUNDS))
