"""``fstq simulate``'s options are generated from ``SimConfig``: one source of defaults and help."""

import argparse
import dataclasses

import pytest

from fstqcodec.sim import cli as sim_cli
from fstqcodec.sim.config import QUICK_SETTINGS, SimConfig


def _parse(argv):
    parser = argparse.ArgumentParser()
    sim_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_every_setting_has_an_option_with_its_help_and_default():
    parser = argparse.ArgumentParser()
    sim_cli.add_arguments(parser)
    actions = {action.dest: action for action in parser._actions}
    for spec in dataclasses.fields(SimConfig):
        if not spec.metadata["cli"]:
            continue
        action = actions[spec.name]
        assert action.help.replace("%%", "%").startswith(spec.metadata["help"])
        if spec.default is not None and not isinstance(spec.default, bool):
            assert "(default: " in action.help
    assert sim_cli.config_from_args(_parse([])) == SimConfig()


def test_given_options_win_over_quick_which_wins_over_defaults():
    config = sim_cli.config_from_args(_parse(["--quick", "--rounds", "5", "--methods", "fp32,topk",
                                              "--uplink-mbps", "2", "--fraction", "0.5"]))
    assert config.rounds == 5 and config.clients == QUICK_SETTINGS["clients"]
    assert config.eval_size == QUICK_SETTINGS["eval_size"] and config.quick
    assert config.methods == ("fp32", "topk") and config.median_uplink_mbps == 2.0
    assert config.participation == 0.5 and config.lora_alpha == 2 * config.lora_rank


def test_the_default_run_is_one_seed_evaluated_on_the_whole_held_out_set():
    config = sim_cli.config_from_args(_parse([]))
    assert config.eval_size is None and config.seed == 0 and config.participation == 1.0
    assert config.methods == ("fp32", "nf4", "fstq")


@pytest.mark.parametrize("argv, message", [
    (["--methods", "fp32,nope"], "unknown method"),
    (["--clients", "0"], "clients"),
    (["--participation", "0"], "participation"),
    (["--seeds", "0,x"], "--seeds"),
    (["--seeds", "0,0"], "--seeds"),
    (["--seeds", "0,1", "--seed", "2"], "--seed or --seeds"),
    (["--seeds", "0,1", "--engine", "flower", "--methods", "fstq"], "one seed"),
    (["--engine", "flower", "--methods", "fp32,fstq"], "--methods fstq"),
    (["--engine", "flower", "--methods", "fstq", "--server-momentum", "0.5"], "FedAvg"),
    (["--block-size", "0"], "block"),
])
def test_bad_options_exit_with_status_2_and_one_line(capsys, argv, message):
    assert sim_cli.run(_parse(argv)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_seeds_parse():
    assert sim_cli.parse_seeds("0,1,2") == [0, 1, 2]
    assert sim_cli.parse_seeds(None) is None
