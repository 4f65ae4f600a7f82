"""Several seeds of one configuration: the aggregated record, its table and its plots."""

import statistics

import pytest

from common import fake_rounds
from fstqcodec.sim.report import aggregate_seeds, format_table, summarize, validate_results, write_outputs


def _run(seed, fp32_accuracies, fstq_accuracies, fstq_bytes):
    run = {
        "config": {"task": "bbc", "model": "m", "clients": 2, "alpha": 0.5, "rounds": 3, "seed": seed},
        "target_accuracy": 0.85,
        "methods": {
            "fp32": {"rounds": fake_rounds(fp32_accuracies, 1000, 10.0), "mean_message_bytes": 500,
                     "mean_bits_per_param": 32.0},
            "fstq": {"rounds": fake_rounds(fstq_accuracies, fstq_bytes, 2.0), "mean_message_bytes": fstq_bytes / 2,
                     "mean_bits_per_param": 0.5},
        },
    }
    return summarize(run)


def _three_seeds():
    return [
        _run(0, [0.3, 0.7, 0.86, 0.90], [0.3, 0.6, 0.85, 0.88], 10),   # fstq reaches at round 2
        _run(1, [0.3, 0.86, 0.88, 0.92], [0.3, 0.5, 0.8, 0.86], 20),   # fstq reaches at round 3
        _run(2, [0.3, 0.8, 0.87, 0.91], [0.3, 0.7, 0.86, 0.87], 10),   # fstq reaches at round 2
    ]


def test_seeds_are_reported_as_mean_and_sample_std_with_their_count():
    runs = _three_seeds()
    merged = aggregate_seeds(runs)
    validate_results(merged)
    assert merged["seeds"] == [0, 1, 2]
    fstq = merged["methods"]["fstq"]["summary"]
    finals = [0.88, 0.86, 0.87]
    assert fstq["seeds"] == 3 and fstq["seeds_reaching_target"] == 3
    assert fstq["final_accuracy"] == pytest.approx(statistics.fmean(finals))
    assert fstq["spread"]["final_accuracy"]["std"] == pytest.approx(statistics.stdev(finals))
    assert fstq["spread"]["final_accuracy"]["values"] == finals
    # Uplink to 0.85: fstq 20, 60, 20 bytes (mean 100/3); fp32 2000, 1000, 2000 (mean 5000/3).
    assert fstq["uplink_to_target_bytes"] == pytest.approx(100 / 3)
    assert fstq["uplink_ratio_vs_fp32"] == pytest.approx(50.0)  # the ratio of the means
    assert fstq["spread"]["uplink_ratio_vs_fp32"]["min"] == pytest.approx(1000 / 60)  # seed 1's own ratio
    # Round by round: the mean accuracy and its spread, and bytes that add up.
    second = merged["methods"]["fstq"]["rounds"][2]
    assert second["accuracy"] == pytest.approx(statistics.fmean([0.85, 0.8, 0.86]))
    assert second["accuracy_std"] == pytest.approx(statistics.stdev([0.85, 0.8, 0.86]))
    assert second["cumulative_uplink_bytes"] == pytest.approx(2 * 40 / 3)


def test_the_seed_table_says_mean_pm_std_and_the_number_of_seeds():
    table = format_table(aggregate_seeds(_three_seeds()))
    header, _, fp32, fstq = table.splitlines()
    assert "seeds" in header
    cells = [cell.strip() for cell in fstq.strip("|").split("|")]
    assert cells[:3] == ["fstq", "3", f"{statistics.fmean([0.88, 0.86, 0.87]):.3f} ± {statistics.stdev([0.88, 0.86, 0.87]):.3f}"]
    assert cells[7] == f"50.0x (min {1000 / 60:.1f}x)"


def test_last_rounds_accuracy_averages_the_last_rounds_after_round_zero():
    run = _run(0, [0.1] + [0.5] * 3 + [0.6, 0.7, 0.8, 0.9, 1.0], [0.1, 0.2, 0.3], 10)
    summary = run["methods"]["fp32"]["summary"]
    assert summary["last_rounds_accuracy"] == pytest.approx(0.8)  # rounds 4-8: the last five
    assert summary["final_accuracy"] == 1.0
    short = run["methods"]["fstq"]["summary"]
    assert short["last_rounds_accuracy"] == pytest.approx(0.25)  # only rounds 1-2 exist; round 0 left out
    merged = aggregate_seeds(_three_seeds())
    fstq = merged["methods"]["fstq"]["summary"]
    per_seed = [statistics.fmean([0.6, 0.85, 0.88]), statistics.fmean([0.5, 0.8, 0.86]), statistics.fmean([0.7, 0.86, 0.87])]
    assert fstq["spread"]["last_rounds_accuracy"]["values"] == pytest.approx(per_seed)
    header, _, _, row = format_table(merged).splitlines()
    assert "last 5 acc" in header
    assert f"{statistics.fmean(per_seed):.3f} ± {statistics.stdev(per_seed):.3f}" in row


def test_a_seed_that_misses_the_target_is_counted_and_no_ratio_of_means_is_claimed():
    runs = _three_seeds()
    runs[1] = _run(1, [0.3, 0.86, 0.88, 0.92], [0.3, 0.5, 0.8, 0.84], 20)  # fstq never reaches 0.85
    merged = aggregate_seeds(runs)
    fstq = merged["methods"]["fstq"]["summary"]
    assert fstq["seeds_reaching_target"] == 2 and not fstq["reached_target"]
    assert fstq["uplink_ratio_vs_fp32"] is None
    assert "(2/3 seeds)" in format_table(merged)


def test_runs_against_different_targets_do_not_aggregate():
    runs = _three_seeds()
    runs[2]["target_accuracy"] = 0.8
    with pytest.raises(ValueError, match="target"):
        aggregate_seeds(runs)


def test_seed_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    written = write_outputs(aggregate_seeds(_three_seeds()), tmp_path)
    pngs = [path for path in written if path.suffix == ".png"]
    assert len(pngs) == 2 and all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in pngs)


def test_run_seeds_runs_every_seed_and_summarises_all_against_one_target(monkeypatch):
    import math

    from fstqcodec.sim import loop
    from fstqcodec.sim.config import SimConfig

    finals = {0: 0.80, 1: 0.84, 2: 0.82}
    calls = []

    def one_seed(config, *, progress, workers, label):
        calls.append((config.seed, label))
        run = _run(config.seed, [0.3, 0.6, 0.7, finals[config.seed]], [0.3, 0.5, 0.7, finals[config.seed] - 0.01], 10)
        run["config"] = config.record()
        run["target_accuracy"] = 0.5  # the run's own target; the seeds share the one chosen over all
        return summarize(run)

    monkeypatch.setattr(loop, "run_simulation", one_seed)
    merged, runs = loop.run_seeds(SimConfig(target_of_fp32=0.95, methods=("fp32", "fstq")), [0, 1, 2],
                                  progress=False)
    assert calls == [(0, "seed 0 "), (1, "seed 1 "), (2, "seed 2 ")]
    target = math.floor(95 * statistics.fmean(finals.values())) / 100
    assert target == 0.77
    assert merged["target_accuracy"] == target and all(run["target_accuracy"] == target for run in runs)
    assert "mean over the seeds" in merged["target_rule"]
    assert merged["methods"]["fstq"]["summary"]["seeds_reaching_target"] == 3
    with pytest.raises(ValueError, match="distinct"):
        loop.run_seeds(SimConfig(), [1, 1])
