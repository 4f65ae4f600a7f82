"""The loop's downlink proxies (fstq simulate --server-mask/--client-mask)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from common import BBC_PACKAGES, skip_without_packages

from fstqcodec.sim.downlink import ProxyDownlink

SHAPES = {"lora_A": (8, 384), "lora_B": (384, 8)}


def _state(seed):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def test_round_figures_and_masked_aggregation():
    initial = _state(0)
    downlink = ProxyDownlink(SHAPES, initial, server_mask=0.3, client_mask=0.1, bits_per_param=4, fill="zero", seed=3)
    server_hidden = {n: ~v for n, v in downlink.server.server_visible().items()}
    visibles = []
    for client in range(3):
        proxy, visible = downlink.receive(initial, client, 1)
        visibles.append(visible)
        downlink.add({n: np.ones(s, np.float32) for n, s in SHAPES.items()}, visible, weight=1.0)
    new_state, figures = downlink.finish_round(initial)
    for name in SHAPES:
        seen = np.logical_or.reduce([v[name] for v in visibles])
        # +1 where some client saw the entry, unchanged elsewhere (server-masked entries included).
        assert np.allclose(new_state[name][seen], initial[name][seen] + 1)
        assert np.array_equal(new_state[name][~seen], initial[name][~seen])
        assert not np.any(seen & server_hidden[name])
    fp32 = 4 * sum(int(np.prod(s)) for s in SHAPES.values())
    assert 8 * figures["proxy_downlink_bytes"] <= 3 * fp32
    assert 0.6 < figures["fraction_ever_seen"] <= 0.7 + 0.02
    assert 0.6 < figures["proxy_cosine_mean"] < 0.85


def test_fill_previous_uses_the_clients_last_model():
    initial = _state(0)
    downlink = ProxyDownlink(SHAPES, initial, server_mask=0.3, client_mask=0.1, bits_per_param=4, fill="previous", seed=3)
    proxy, visible = downlink.receive(_state(1), 0, 1)
    assert np.array_equal(proxy["lora_A"][~visible["lora_A"]], initial["lora_A"][~visible["lora_A"]])
    mine = _state(2)
    downlink.keep_local(0, mine)
    proxy, visible = downlink.receive(_state(1), 0, 2)
    assert np.array_equal(proxy["lora_A"][~visible["lora_A"]], mine["lora_A"][~visible["lora_A"]])


def test_fill_received_keeps_the_last_values_sent_not_the_trained_model():
    initial = _state(0)
    downlink = ProxyDownlink(SHAPES, initial, server_mask=0.3, client_mask=0.3, bits_per_param=4, fill="received", seed=3)
    server_hidden = {n: ~v for n, v in downlink.server.server_visible().items()}
    first, seen_first = downlink.receive(_state(1), 0, 1)
    downlink.keep_local(0, _state(2))  # the client's training must not leak into its hidden entries
    second, seen_second = downlink.receive(_state(3), 0, 2)
    for name in SHAPES:
        # Never sent: still the shared initial value (server-masked entries always are).
        never = ~seen_first[name] & ~seen_second[name]
        assert np.array_equal(second[name][never], initial[name][never])
        assert np.all(never[server_hidden[name]])
        # Sent in round 1 only: the value decoded then, not the trained model nor round 2's global.
        only_first = seen_first[name] & ~seen_second[name]
        assert np.any(only_first)
        assert np.array_equal(second[name][only_first], first[name][only_first])
        assert np.allclose(first[name][only_first], _state(1)[name][only_first], atol=0.5)
        # Sent now: the new global model's value (4-bit quantized).
        assert np.allclose(second[name][seen_second[name]], _state(3)[name][seen_second[name]], atol=0.5)
    # Each client keeps its own estimate: client 1's first proxy fills from the initial model.
    other, seen_other = downlink.receive(_state(3), 1, 2)
    assert np.array_equal(other["lora_A"][~seen_other["lora_A"]], initial["lora_A"][~seen_other["lora_A"]])


def _parse(argv):
    from fstqcodec.sim import cli as sim_cli

    parser = argparse.ArgumentParser()
    sim_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_bad_mask_options_exit_with_status_2(capsys):
    pytest.importorskip("torch")
    from fstqcodec.sim import cli as sim_cli

    assert sim_cli.run(_parse(["--server-mask", "1.0"])) == 2
    assert "server_mask" in capsys.readouterr().err
    assert sim_cli.run(_parse(["--client-mask", "-0.1"])) == 2
    capsys.readouterr()
    assert sim_cli.run(_parse(["--server-mask", "0.3", "--proxy-fill", "mean"])) == 2
    assert "proxy_fill must be one of zero, previous, received, got 'mean'" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_with_proxies(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from fstqcodec.sim import cli as sim_cli

    skip_without_packages(BBC_PACKAGES)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "sim"
    argv = ["--quick", "--rounds", "2", "--out", str(out), "--no-progress", "--no-plots", "--methods", "fp32",
            "--workers", "1", "--server-mask", "0.3", "--client-mask", "0.1"]
    assert sim_cli.run(_parse(argv)) == 0
    results = json.loads((out / "results.json").read_text())
    params = results["config"]["trainable_parameters"]
    for entry in results["methods"]["fp32"]["rounds"][1:]:
        assert 8 * entry["downlink_bytes"] <= 4 * params * results["config"]["clients_per_round"]
        assert 0.5 < entry["proxy_cosine_mean"] < 0.95
        assert 0.6 < entry["fraction_ever_seen"] <= 0.72
