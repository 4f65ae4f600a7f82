"""`fstq simulate --quick` end to end: a real (tiny) federated run writes a valid results.json."""

import argparse
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from common import BBC_PACKAGES, skip_without_packages  # noqa: E402

skip_without_packages(BBC_PACKAGES, module_level=True)

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


def _load_report(rows: list[str]) -> str:
    """transformers' load report, as it logs it (ANSI bold title, a Key | Status table, notes)."""
    table = "\n".join(f"{key:<18}| {status:<8}| " for key, status in (r.split(":") for r in rows))
    return ("\x1b[1mBertForSequenceClassification LOAD REPORT\x1b[0m from: /some/model\n"
            f"Key               | Status  | \n------------------+---------+-\n{table}\n\nNotes:\n- ...")


def test_only_the_expected_new_head_report_is_silenced():
    import logging

    from fstqcodec.sim.models import NewHeadReportFilter

    def kept(message: str) -> bool:
        record = logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1, message, None, None)
        return NewHeadReportFilter().filter(record)

    assert not kept(_load_report(["classifier.weight:MISSING", "classifier.bias:MISSING"]))
    assert kept(_load_report(["classifier.weight:MISSING", "bert.pooler.dense.weight:UNEXPECTED"]))
    assert kept(_load_report(["bert.encoder.layer.0.attention.self.query.weight:MISSING"]))
    assert kept("some other warning")


def test_loading_the_packaged_model_prints_none_of_the_known_noise(capfd):
    import warnings

    from fstqcodec.sim.models import load_lora_classifier

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_lora_classifier("all-MiniLM-L6-v2", num_labels=5)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "Loading weights" not in err, err


def test_each_method_has_its_own_progress_bar_counting_its_rounds(monkeypatch):
    from fstqcodec.sim import loop
    from fstqcodec.sim.config import SimConfig

    opened = []

    class RecordingBar:
        def __init__(self, **options):
            self.options, self.n, self.closed = options, 0, False
            opened.append(self)

        def set_postfix(self, **_):
            pass

        def update(self, steps):
            self.n += steps

        def close(self):
            self.closed = True

    config = SimConfig(methods=("fp32", "fstq"), rounds=4)
    bars = loop._ProgressBars(config, label="seed 1 ")
    bars._tqdm = RecordingBar
    for method in ("fp32", "fstq"):
        bars.update(method, 0, 0.2, 0)  # the method starts: its bar opens, at zero
    assert [bar.n for bar in opened] == [0, 0]
    for round_number in range(1, 5):
        bars.update("fstq", round_number, 0.5, 1000 * round_number)
    bars.close()
    assert [bar.options["desc"] for bar in opened] == ["seed 1 fp32", "seed 1 fstq"]
    assert [bar.options["total"] for bar in opened] == [4, 4] and [bar.n for bar in opened] == [0, 4]
    assert all(bar.closed for bar in opened)
