"""Downlink proxies (fstqcodec.proxy): what each client's bytes hold, masked FedAvg, fills."""

from __future__ import annotations

import numpy as np
import pytest

import fstqcodec
from fstqcodec.proxy import MaskedAverage, ProxyServer, cosine_similarity, decode_proxy

SHAPES = {"lora_A": (8, 384), "lora_B": (384, 8), "bias": (384,)}


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


@pytest.mark.parametrize("granularity", ["element", "row", "column"])
def test_no_client_ever_receives_a_server_masked_entry(granularity):
    server = ProxyServer(SHAPES, server_keep=0.7, client_keep=0.9, granularity=granularity, seed=5)
    hidden = {name: ~seen for name, seen in server.server_visible().items()}
    params = _params()
    # The same model with every server-masked entry replaced by other values.
    altered = {name: np.where(hidden[name], 1e3 + np.arange(value.size).reshape(value.shape), value).astype(np.float32)
               for name, value in params.items()}
    for round_number in (1, 2, 3):
        for client in range(4):
            message = server.downlink(params, client, round_number)
            # The bytes are a function of the server-visible entries alone ...
            assert server.downlink(altered, client, round_number) == message
            # ... and what the client decodes is zero on every server-masked entry.
            proxy, visible = decode_proxy(message)
            for name in SHAPES:
                assert not np.any(visible[name] & hidden[name])
                assert np.all(proxy[name][hidden[name]] == 0)
                assert np.array_equal(visible[name], server.visible(client, round_number)[name])


def test_client_masks_change_server_mask_does_not():
    server = ProxyServer(SHAPES, server_keep=0.6, client_keep=0.8, seed=1)
    a, b, c = server.visible(0, 1)["lora_A"], server.visible(1, 1)["lora_A"], server.visible(0, 2)["lora_A"]
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    fixed = server.server_visible()["lora_A"]
    assert np.all(fixed[a | b | c]) and abs(fixed.mean() - 0.6) < 0.06
    assert abs(a.mean() - 0.48) < 0.06


def test_downlink_is_at_least_8x_below_fp32():
    server = ProxyServer(SHAPES, server_keep=0.7, client_keep=0.9, budget=fstqcodec.Budget(bits_per_param=4))
    fp32 = 4 * sum(int(np.prod(s)) for s in SHAPES.values())
    message = server.downlink(_params(), 0, 1)
    assert 8 * len(message) <= fp32
    proxy, visible = decode_proxy(message)
    truth = _params()
    err = sum(float(np.sum((proxy[n] - truth[n])[visible[n]] ** 2)) for n in SHAPES)
    energy = sum(float(np.sum(truth[n][visible[n]] ** 2)) for n in SHAPES)
    assert err < 0.05 * energy  # the visible entries arrive close to their values
    assert 0.5 < cosine_similarity(proxy, truth) < 0.9


def test_fill_previous_keeps_the_clients_values_where_hidden():
    server = ProxyServer(SHAPES, server_keep=0.5, client_keep=0.5, seed=2)
    previous = _params(seed=9)
    proxy, visible = decode_proxy(server.downlink(_params(), 1, 1), previous=previous, fill="previous")
    for name in SHAPES:
        assert np.array_equal(proxy[name][~visible[name]], previous[name][~visible[name]])
    with pytest.raises(ValueError):
        decode_proxy(server.downlink(_params(), 1, 1), fill="previous")
    with pytest.raises(ValueError):
        decode_proxy(server.downlink(_params(), 1, 1), fill="mean")


def test_fill_received_chains_each_entry_to_the_last_value_sent():
    server = ProxyServer(SHAPES, server_keep=0.7, client_keep=0.5, seed=2, budget=None)  # exact values
    initial = _params(seed=9)
    first, seen_first = decode_proxy(server.downlink(_params(1), 1, 1), previous=initial, fill="received")
    second, seen_second = decode_proxy(server.downlink(_params(2), 1, 2), previous=first, fill="received")
    for name in SHAPES:
        hidden_now = ~seen_second[name]
        never = hidden_now & ~seen_first[name]
        assert np.array_equal(second[name][never], initial[name][never])  # server-masked entries among them
        assert np.any(hidden_now & seen_first[name])
        sent_before = hidden_now & seen_first[name]
        assert np.array_equal(second[name][sent_before], _params(1)[name][sent_before])
        assert np.array_equal(second[name][seen_second[name]], _params(2)[name][seen_second[name]])
    with pytest.raises(ValueError, match="previous values of every tensor"):
        decode_proxy(server.downlink(_params(), 1, 1), fill="received")


def test_masked_average_counts_each_client_where_it_saw():
    shapes = {"w": (2, 3)}
    average = MaskedAverage(shapes)
    seen_a = np.array([[1, 1, 0], [1, 0, 0]], bool)
    seen_b = np.array([[1, 0, 1], [1, 0, 0]], bool)
    average.add({"w": np.full((2, 3), 1.0)}, {"w": seen_a}, weight=1.0)
    average.add({"w": np.full((2, 3), 4.0)}, {"w": seen_b}, weight=3.0)
    expected = np.array([[13 / 4, 1.0, 4.0], [13 / 4, 0.0, 0.0]], dtype=np.float32)
    assert np.allclose(average.result()["w"], expected)


def test_bad_settings_refused():
    with pytest.raises(ValueError):
        ProxyServer(SHAPES, server_keep=0.0)
    with pytest.raises(ValueError):
        ProxyServer(SHAPES, client_keep=1.2)
    with pytest.raises(ValueError):
        ProxyServer(SHAPES, granularity="block")
    with pytest.raises(ValueError):
        ProxyServer(SHAPES).downlink({**_params(), "bias": np.zeros(3, np.float32)}, 0, 1)


def test_server_exempt_tensors_carry_only_the_client_mask():
    masked = ProxyServer(SHAPES, server_keep=0.7, client_keep=0.9, seed=5)
    exempt = ProxyServer(SHAPES, server_keep=0.7, client_keep=0.9, seed=5, server_exempt=("bi*",))
    assert exempt.exempt("bias") and not exempt.exempt("lora_A")
    assert np.all(exempt.server_visible()["bias"]) and not np.all(masked.server_visible()["bias"])
    # The other tensors keep the very same server mask (their seeds do not depend on the exemption).
    for name in ("lora_A", "lora_B"):
        assert np.array_equal(exempt.server_visible()[name], masked.server_visible()[name])
    proxy, visible = decode_proxy(exempt.downlink(_params(), 2, 1))
    assert 0.8 < visible["bias"].mean() < 0.97  # the client mask still hides about 10%
    truth = _params()["bias"][visible["bias"]]
    assert np.sum((proxy["bias"][visible["bias"]] - truth) ** 2) < 0.05 * np.sum(truth**2)
    assert [m.keep for m in exempt.masks(2, 1)["bias"]] == [0.9]


def test_server_exempt_refuses_patterns_that_match_nothing():
    with pytest.raises(ValueError, match="match no tensor"):
        ProxyServer(SHAPES, server_exempt=("classifier*",))
    with pytest.raises(TypeError, match="glob patterns"):
        ProxyServer(SHAPES, server_exempt="bias")
