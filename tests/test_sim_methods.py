"""fstqcodec.sim building blocks that need only numpy: encodings, partitions, links, reports."""

import json

import numpy as np
import pytest

import fstqcodec

from fstqcodec.sim.bandwidth import LinkModel, round_time
from fstqcodec.sim.methods import (
    METHOD_NAMES,
    NF4_LEVELS,
    UpdateLayout,
    make_method,
    parse_methods,
)
from fstqcodec.sim.partition import dirichlet_partition
from common import fake_rounds
from fstqcodec.sim.report import ROUND_FIELDS, format_table, summarize, validate_results, write_outputs

SHAPES = {"layer.lora_A.weight": (8, 96), "layer.lora_B.weight": (96, 8), "classifier.bias": (5,)}


def _update(seed=0, scale=1e-2):
    rng = np.random.default_rng(seed)
    return {name: (scale * rng.standard_normal(shape)).astype(np.float32) for name, shape in SHAPES.items()}


@pytest.fixture
def schema():
    return UpdateLayout(SHAPES)


def _config(bits_per_param):
    return fstqcodec.EncodeConfig(budget=fstqcodec.Budget(bits_per_param=bits_per_param),
                                  fisher_power=fstqcodec.FEDERATED_FISHER_POWER)


def _round_trip(name, schema, update, state=None, seed=0, **kw):
    method = make_method(name, schema, _config(kw.pop("bits_per_param", 2.0)))
    state = method.new_client_state() if state is None else state
    message = method.encode(update, fisher=None, state=state, seed=seed)
    assert isinstance(message, bytes)
    return method, message, method.decode(message), state


def test_fp32_is_exact_and_sized_as_raw_values_plus_header(schema):
    update = _update()
    _, message, decoded, _ = _round_trip("fp32", schema, update)
    assert len(message) == 8 + 4 * schema.total
    for name in update:
        np.testing.assert_array_equal(decoded[name], update[name])


def test_fp16_matches_half_precision(schema):
    update = _update()
    _, message, decoded, _ = _round_trip("fp16", schema, update)
    assert len(message) == 8 + 2 * schema.total
    for name in update:
        np.testing.assert_array_equal(decoded[name], update[name].astype(np.float16).astype(np.float32))


def test_nf4_layout_and_error_bound(schema):
    update = _update()
    _, message, decoded, _ = _round_trip("nf4", schema, update)
    expected_size = 8 + sum(4 * -(-n // 64) + (n + 1) // 2 for n in schema.sizes.values())
    assert len(message) == expected_size
    largest_gap = np.max(np.diff(NF4_LEVELS))
    for name, values in update.items():
        flat = values.ravel()
        blocks = [flat[i:i + 64] for i in range(0, flat.size, 64)]
        bound = np.concatenate([np.full(b.size, np.abs(b).max() * largest_gap / 2) for b in blocks])
        assert np.all(np.abs(decoded[name].ravel() - flat) <= bound + 1e-7)
        # each block's largest magnitude is represented exactly (code +-1 times the absmax)
        assert np.isclose(np.abs(decoded[name]).max(), np.abs(values).max())


@pytest.mark.parametrize("bits", [8, 4])
def test_qsgd_is_unbiased_and_on_its_grid(schema, bits):
    update = _update()
    name = f"qsgd{bits}"
    levels = 2 ** (bits - 1) - 1
    _, message, decoded, _ = _round_trip(name, schema, update)
    per_value = 1 if bits == 8 else 0.5
    assert len(message) == 8 + sum(4 + int(np.ceil(n * per_value)) for n in schema.sizes.values())
    for tensor, values in update.items():
        grid = np.abs(values).max() / levels
        np.testing.assert_allclose(decoded[tensor] / grid, np.round(decoded[tensor] / grid), atol=1e-3)
    # unbiased: the mean over many seeds approaches the input
    samples = [_round_trip(name, schema, update, seed=s)[2]["layer.lora_A.weight"] for s in range(300)]
    error = np.abs(np.mean(samples, axis=0) - update["layer.lora_A.weight"]).max()
    assert error < 0.2 * np.abs(update["layer.lora_A.weight"]).max() / levels + 1e-6


def test_topk_keeps_largest_and_feeds_back_the_rest(schema):
    update = _update()
    method, message, decoded, state = _round_trip("topk", schema, update, bits_per_param=2.0)
    k = method.k
    assert len(message) == 8 + 4 + 8 * k
    flat = schema.flatten(update)
    sent = schema.flatten(decoded)
    assert np.count_nonzero(sent) == k
    threshold = np.sort(np.abs(flat))[-k]
    assert np.all(np.abs(flat[sent != 0]) >= threshold)
    np.testing.assert_allclose(state["residual"] + sent, flat, atol=0)
    # next round: the residual is added before choosing
    second = method.decode(method.encode(_update(1), fisher=None, state=state, seed=1))
    assert np.count_nonzero(schema.flatten(second)) == k


@pytest.mark.parametrize("name", ["fp32", "fp16", "nf4", "qsgd8", "qsgd4", "topk"])
def test_baselines_reject_damaged_messages(schema, name):
    method, message, _, _ = _round_trip(name, schema, _update())
    with pytest.raises(ValueError):
        method.decode(message[:-1])
    with pytest.raises(ValueError):
        method.decode(message + b"\0")
    with pytest.raises(ValueError):
        method.decode(b"XX" + message[2:])
    with pytest.raises(ValueError):
        method.encode({"other": np.zeros(3, np.float32)}, fisher=None, state=method.new_client_state(), seed=0)


def test_fstq_methods_use_the_budget_and_error_feedback(schema):
    pytest.importorskip("fstqcodec.codec")
    update = _update()
    fisher = {n: np.abs(v) + 1e-3 for n, v in _update(5).items()}
    for name in ("fstq", "fstq-nofisher"):
        method = make_method(name, schema, _config(2.0))
        assert method.uses_fisher is (name == "fstq")
        state = method.new_client_state()
        message = method.encode(update, fisher=fisher, state=state, seed=0)
        assert len(message) <= 2.0 * schema.total / 8
        decoded = method.decode(message)
        for tensor in update:
            np.testing.assert_allclose(state.residual[tensor], update[tensor] - decoded[tensor], atol=1e-7)


def test_parse_methods():
    assert parse_methods("all") == list(METHOD_NAMES)
    assert parse_methods("fp32, fstq") == ["fp32", "fstq"]
    assert parse_methods("qsgd") == ["qsgd8", "qsgd4"]
    for bad in ("fp8", "fp32,fp32", " , "):
        with pytest.raises(ValueError):
            parse_methods(bad)


def test_dirichlet_partition_is_a_seeded_cover_and_skewed():
    labels = np.repeat(np.arange(5), 100)
    parts = dirichlet_partition(labels, 10, alpha=0.1, seed=3)
    assert len(parts) == 10 and min(len(p) for p in parts) >= 2
    joined = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(joined, np.arange(labels.size))
    again = dirichlet_partition(labels, 10, alpha=0.1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    # alpha 0.1: most clients are dominated by one label; alpha 100: close to uniform
    dominant = np.mean([np.bincount(labels[p], minlength=5).max() / len(p) for p in parts])
    uniform = dirichlet_partition(labels, 10, alpha=100.0, seed=3)
    dominant_iid = np.mean([np.bincount(labels[p], minlength=5).max() / len(p) for p in uniform])
    assert dominant > 0.6 > 0.35 > dominant_iid
    with pytest.raises(ValueError):
        dirichlet_partition(labels, 0, alpha=0.5, seed=0)
    with pytest.raises(ValueError):
        dirichlet_partition(labels, 10, alpha=0.0, seed=0)


def test_link_model_is_seeded_lognormal_and_round_waits_for_slowest():
    model = LinkModel(median_uplink_mbps=1.0, sigma=1.0, seed=7)
    a, b = model.draw(2000), model.draw(2000)
    np.testing.assert_array_equal(a.uplink_bps, b.uplink_bps)
    assert 0.85e6 < np.median(a.uplink_bps) < 1.15e6
    assert 0.9 < np.std(np.log(a.uplink_bps)) < 1.1
    down, up = a.transfer_time(0, uplink_bytes=125_000, downlink_bytes=0)
    assert up == pytest.approx(model.latency_s + 1e6 / a.uplink_bps[0])
    assert round_time([1.0, 2.0], [0.5, 0.1], [3.0, 0.2]) == pytest.approx(4.5)
    assert round_time([], [], []) == 0.0
    with pytest.raises(ValueError):
        LinkModel(median_uplink_mbps=0)


def _fake_results():
    return {
        "config": {"task": "bbc", "model": "m", "clients": 2, "alpha": 0.5, "rounds": 3},
        "target_accuracy": 0.85,
        "methods": {
            "fp32": {"rounds": fake_rounds([0.3, 0.7, 0.86, 0.9], 1000, 10.0), "mean_message_bytes": 500,
                     "mean_bits_per_param": 32.0},
            "fstq": {"rounds": fake_rounds([0.3, 0.6, 0.8, 0.85], 10, 2.0), "mean_message_bytes": 5,
                     "mean_bits_per_param": 0.5},
            "bad": {"rounds": fake_rounds([0.3, 0.4, 0.5, 0.6], 10, 1.0), "mean_message_bytes": 5,
                    "mean_bits_per_param": 0.5},
        },
    }


def test_summary_ratios_and_table(tmp_path):
    results = summarize(_fake_results())
    validate_results(results)
    fp32, fstq, bad = (results["methods"][n]["summary"] for n in ("fp32", "fstq", "bad"))
    assert fp32["uplink_to_target_bytes"] == 2000 and fp32["rounds_to_target"] == 2
    assert fstq["uplink_to_target_bytes"] == 30 and fstq["uplink_ratio_vs_fp32"] == pytest.approx(2000 / 30)
    assert fstq["time_reduction_vs_fp32"] == pytest.approx(1 - 6.0 / 20.0)
    assert bad["reached_target"] is False and bad["uplink_ratio_vs_fp32"] is None
    table = format_table(results)
    assert "66.7x" in table and "not reached" in table
    written = write_outputs(results, tmp_path, plots=False)
    loaded = json.loads((tmp_path / "results.json").read_text())
    validate_results(loaded)
    assert (tmp_path / "fstq.csv").read_text().splitlines()[0] == ",".join(ROUND_FIELDS)
    assert len(written) == 5


def test_validate_results_catches_inconsistent_records():
    results = summarize(_fake_results())
    results["methods"]["fp32"]["rounds"][2]["cumulative_uplink_bytes"] += 1
    with pytest.raises(ValueError, match="cumulative"):
        validate_results(results)
    with pytest.raises(ValueError):
        validate_results({"config": {}, "methods": {}})


def test_fstq_per_client_byte_budget_overrides_bits_per_param(schema):
    pytest.importorskip("fstqcodec.codec")
    method = make_method("fstq", schema, _config(2.0))
    update = _update()
    small = method.encode(update, fisher=None, state=method.new_client_state(), seed=0)
    large = method.encode(update, fisher=None, state=method.new_client_state(), seed=0, budget_bytes=1500)
    assert len(small) <= 2.0 * schema.total / 8 < len(large) <= 1500
    # fixed-rate baselines ignore a byte budget
    nf4 = make_method("nf4", schema, _config(0.5))
    assert nf4.encode(update, fisher=None, state=None, seed=0, budget_bytes=10) == nf4.encode(
        update, fisher=None, state=None, seed=0)


def test_merge_results_combines_methods_of_identical_setups():
    from fstqcodec.sim.report import merge_results

    whole = _fake_results()
    first = {**whole, "methods": {"fp32": whole["methods"]["fp32"]}}
    second = {**whole, "methods": {k: v for k, v in whole["methods"].items() if k != "fp32"}}
    merged = merge_results([first, second])
    validate_results(merged)
    assert list(merged["methods"]) == ["fp32", "fstq", "bad"]
    assert merged["methods"]["fstq"]["summary"]["uplink_ratio_vs_fp32"] == pytest.approx(2000 / 30)
    other = {**second, "config": {**second["config"], "alpha": 0.1}}
    with pytest.raises(ValueError, match="alpha"):
        merge_results([first, other])
    with pytest.raises(ValueError, match="more than one"):
        merge_results([first, first])


def test_fixed_rate_runs_merge_with_any_budget_and_budgeted_runs_must_agree():
    from fstqcodec.sim.report import merge_results

    whole = _fake_results()
    fp32 = {**whole, "methods": {"fp32": whole["methods"]["fp32"]},
            "config": {**whole["config"], "methods": ["fp32"], "budget_bpp": 0.3}}
    fstq = {**whole, "methods": {"fstq": whole["methods"]["fstq"]},
            "config": {**whole["config"], "methods": ["fstq"], "budget_bpp": 0.6}}
    merged = merge_results([fp32, fstq])  # fp32 read no budget: its 0.3 is not a setting of the comparison
    assert merged["config"]["budget_bpp"] == 0.6  # the record names the budget the fstq run had
    bad = {**whole, "methods": {"bad": whole["methods"]["bad"]},
           "config": {**whole["config"], "methods": ["topk"], "budget_bpp": 0.3}}
    with pytest.raises(ValueError, match="budget_bpp"):
        merge_results([fp32, fstq, bad])  # topk at 0.3 against fstq at 0.6: not the same bytes budget
    with pytest.raises(ValueError, match="alpha"):
        merge_results([fp32, {**fstq, "config": {**fstq["config"], "alpha": 0.1}}])


def test_merge_counts_a_setting_a_run_predates_as_its_default():
    from fstqcodec.sim.report import merge_results

    whole = _fake_results()
    older = {**whole, "methods": {"fp32": whole["methods"]["fp32"]},
             "config": {k: v for k, v in whole["config"].items() if k != "server_momentum"}}
    newer = {**whole, "methods": {"fstq": whole["methods"]["fstq"]},
             "config": {**whole["config"], "server_momentum": 0.0}}
    assert list(merge_results([older, newer])["methods"]) == ["fp32", "fstq"]
    with pytest.raises(ValueError, match="server_momentum"):
        merge_results([older, {**newer, "config": {**newer["config"], "server_momentum": 0.5}}])


def test_merge_ignores_the_generations_a_causal_run_recorded():
    from fstqcodec.sim.report import merge_results

    whole = _fake_results()
    first = {**whole, "methods": {"fp32": whole["methods"]["fp32"]},
             "config": {**whole["config"], "sample_generations_last_eval": [["prompt", "Depression"]]}}
    second = {**whole, "methods": {"fstq": whole["methods"]["fstq"]},
              "config": {**whole["config"], "sample_generations_last_eval": [["prompt", "Birth Control"]]}}
    assert list(merge_results([first, second])["methods"]) == ["fp32", "fstq"]
