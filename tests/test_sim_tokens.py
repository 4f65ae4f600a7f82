"""Token selection in the reference loop (``--token-keep``, ``--token-select``; fstqcodec.sim.token_selection).

The first tests need only numpy (settings, records with the option off, on the stand-in loop of
test_sim_loop); the others train the packaged classifier on BBC and skip without it.
"""

import argparse
import dataclasses

import numpy as np
import pytest

from fstqcodec.sim.bandwidth import LinkModel
from common import check_kept_tokens_rank_highest
from fstqcodec.sim.config import SimConfig
from fstqcodec.sim.loop import MethodRun
from fstqcodec.sim.methods import make_method

#: A round's entry as the loop has always written it; token selection adds to it only when on.
ROUND_KEYS_WITHOUT_SELECTION = {"round", "accuracy", "uplink_bytes", "cumulative_uplink_bytes", "downlink_bytes",
                                "sim_time_s", "round_time_s", "max_compute_s", "max_upload_s"}


@pytest.mark.parametrize("settings, message", [
    ({"token_keep": 0.0}, "token_keep must be in (0, 1], got 0.0"),
    ({"token_keep": 1.5}, "token_keep must be in (0, 1], got 1.5"),
    ({"token_keep": float("nan")}, "token_keep must be in (0, 1], got nan"),
    ({"token_keep": 0.5, "token_select": "best"}, "token_select must be one of fisher, random, attention, got 'best'"),
    ({"token_select": "random"}, "token_select needs token_keep"),
    ({"token_keep": 0.5, "task": "chatterbot-qa", "clients": 4}, "trains the classifier tasks"),
])
def test_invalid_token_settings_are_refused_with_a_clear_error(settings, message):
    with pytest.raises(ValueError) as caught:
        SimConfig(**settings).validate()
    assert message in str(caught.value)


def test_cli_refuses_bad_token_options_in_one_line_with_status_2(capsys):
    from fstqcodec.sim import cli as sim_cli

    def run(argv):
        parser = argparse.ArgumentParser()
        sim_cli.add_arguments(parser)
        return sim_cli.run(parser.parse_args(argv))

    assert run(["--token-keep", "-0.5"]) == 2
    assert capsys.readouterr().err.strip() == "fstq simulate: token_keep must be in (0, 1], got -0.5"
    assert run(["--token-keep", "0.5", "--token-select", "gradient"]) == 2
    assert "token_select must be one of fisher, random, attention" in capsys.readouterr().err
    assert run(["--token-keep", "0.5", "--engine", "flower", "--methods", "fstq"]) == 2
    assert "--token-keep runs with --engine in-process" in capsys.readouterr().err


def test_config_record_has_the_token_settings_only_when_selection_is_on():
    off = SimConfig().record()
    assert "token_keep" not in off and "token_select" not in off
    everything_else = {k: v for k, v in dataclasses.asdict(SimConfig()).items() if not k.startswith("token_")}
    assert off == {k: list(v) if isinstance(v, tuple) else v for k, v in everything_else.items()}
    on = SimConfig(token_keep=0.5, token_select="random").record()
    assert on["token_keep"] == 0.5 and on["token_select"] == "random"


def test_rounds_are_recorded_as_before_with_the_option_off():
    from test_sim_loop import StepBench  # the numpy stand-in workbench: it knows nothing of tokens

    config = SimConfig(methods=("fstq",), clients=3, rounds=2, step_time_s=0.0, budget_bpp=1.0)
    bench = StepBench(config)
    method = make_method("fstq", bench.layout, config.encode_config())
    run = MethodRun(bench, LinkModel(seed=1).draw(config.clients), method, initial_accuracy=0.5)
    record = run.run()
    for entry in record["rounds"][1:]:
        assert set(entry) == ROUND_KEYS_WITHOUT_SELECTION


# --- the packaged classifier ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from common import BBC_PACKAGES, skip_without_packages

    skip_without_packages(BBC_PACKAGES)
    from fstqcodec.sim.client import Workbench

    config = SimConfig(methods=("fstq",), clients=3, local_steps=2, batch_size=4, eval_size=16, threads=1,
                       token_keep=0.5, token_select="fisher", step_time_s=0.3)
    workbench = Workbench(config)
    yield workbench
    workbench.close()


def _trained_widths(bench, state, client, round_number, tokens):
    """Train one round; the adapter it gave and the widths of the batches the model was called on."""
    widths = []
    handle = bench.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        local = bench.train(state, client, round_number, with_fisher=False, tokens=tokens)
    finally:
        handle.remove()
    return local, widths


def test_selection_changes_what_is_trained(bench):
    tokens = bench.new_token_state()
    state = bench.initial_state
    warm, warm_widths = _trained_widths(bench, state, 0, 1, tokens)  # first round: full sequences
    full, full_widths = _trained_widths(bench, state, 0, 2, None)
    selected, selected_widths = _trained_widths(bench, state, 0, 2, tokens)
    assert warm_widths == [64, 64] and full_widths == [64, 64]
    assert selected_widths == [32, 32]  # ceil(0.5 x 64) tokens of every 64-token article
    assert warm.cost.tokens > 0.9 * 2 * 4 * 64 and selected.cost.tokens <= 0.5 * 2 * 4 * 64
    assert any(not np.array_equal(selected.trained[n], full.trained[n]) for n in bench.layout.names)
    assert selected.cost.flops < 0.55 * selected.cost.full_flops
    assert selected.cost.full_step_equivalents == pytest.approx(2 * selected.cost.flops / selected.cost.full_flops)


def test_keep_one_trains_exactly_as_without_selection_and_counts_the_compute(bench):
    from fstqcodec.sim.token_selection import TokenSelector

    selector = bench.token_selector
    bench.token_selector = TokenSelector(bench.model, 1.0, "fisher", special_ids=selector.special_ids, pad_id=0)
    try:
        tokens = bench.new_token_state()
        tokens.rounds_trained = 3
        counted, widths = _trained_widths(bench, bench.initial_state, 1, 5, tokens)
    finally:
        bench.token_selector = selector
    plain, _ = _trained_widths(bench, bench.initial_state, 1, 5, None)
    assert widths == [64, 64]
    for name in bench.layout.names:
        np.testing.assert_array_equal(counted.trained[name], plain.trained[name])
    assert counted.cost.flops == counted.cost.full_flops > 0 and counted.cost.seconds > 0


def _kept_ids(bench, selection_name, tokens, batch):
    from fstqcodec.sim.token_selection import TokenSelector

    selector = TokenSelector(bench.model, 0.5, selection_name, special_ids=bench.token_selector.special_ids, pad_id=0)
    with selector.round(tokens, seed=11) as selection:
        return selection.select(dict(batch))


def test_fisher_random_and_attention_keep_different_tokens(bench):
    tokens = bench.new_token_state()
    bench.train(bench.initial_state, 2, 1, with_fisher=False, tokens=tokens)  # learns the client's prior
    batch = bench.train_data.batch(bench.partition[2][:6])
    kept = {name: _kept_ids(bench, name, tokens, batch) for name in ("fisher", "random", "attention")}
    for name, reduced in kept.items():
        assert reduced["input_ids"].shape == (6, 32), name
    assert not np.array_equal(kept["fisher"]["position_ids"], kept["random"]["position_ids"])
    assert not np.array_equal(kept["attention"]["position_ids"], kept["random"]["position_ids"])
    assert not np.array_equal(kept["fisher"]["position_ids"], kept["attention"]["position_ids"])


def test_fisher_keeps_the_tokens_its_prior_ranks_highest(bench):
    from fstqcodec import tokens as token_api

    state = bench.new_token_state()
    bench.train(bench.initial_state, 1, 1, with_fisher=False, tokens=state)
    assert state.accumulator.sequences == 2 * 4  # the warm-up round's backward passes, recorded
    batch = bench.train_data.batch(bench.partition[1][:6])
    reduced = _kept_ids(bench, "fisher", state, batch)
    scores = token_api.prior_scores(state.accumulator.prior(), batch["input_ids"], use="both").numpy()
    check_kept_tokens_rank_highest(scores, reduced, batch["input_ids"].numpy(), bench.token_selector.special_ids)


def test_a_round_records_the_client_compute_and_models_its_time_from_the_flops(bench):
    from fstqcodec.sim.report import summarize

    method = make_method("fstq", bench.layout, bench.config.encode_config())
    run = MethodRun(bench, LinkModel(seed=1).draw(bench.config.clients), method, initial_accuracy=0.25)
    first, second = run.play_round(1), run.play_round(2)
    assert first["client_train_flops"] == first["client_train_flops_full"]  # every client's first round
    assert 0.45 < second["client_train_tokens"] / first["client_train_tokens"] <= 0.52
    assert second["client_train_flops"] < 0.55 * second["client_train_flops_full"]
    # The modelled clock: 2 steps of 0.3 s each client, scaled by the FLOPs; plus measured encoding.
    assert 3 * 2 * 0.3 <= first["client_compute_s"] < 3 * 2 * 0.3 + 1.0
    assert 3 * 2 * 0.3 * 0.45 <= second["client_compute_s"] < 3 * 2 * 0.3 * 0.55 + 1.0
    results = {"target_accuracy": 0.0, "methods": {"fstq": {"rounds": run.rounds}}}
    summary = summarize(results)["methods"]["fstq"]["summary"]
    assert summary["total_client_train_flops"] == first["client_train_flops"] + second["client_train_flops"]
    assert summary["client_train_flops_to_target"] == 0  # round 0 reaches a target of 0
    assert 0.2 < summary["client_train_flops_saved"] < 0.3
