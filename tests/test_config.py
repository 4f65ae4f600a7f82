"""EncodeConfig: one frozen object for the encoder's options (issue 9)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fstqcodec
from fstqcodec import Budget, EncodeConfig

OPTION_SETS = [
    {},
    {"budget": Budget(bits_per_param=1.5), "fisher_power": 0.5},
    {"budget": Budget(max_bytes=700), "block_size": 32},
    {"budget": 900},
    {"budget": Budget(ratio=12.5), "rounding": "stochastic", "seed": 11},
    {"bits": 3, "nonfinite": "zero"},
    {"codebook": "nf4", "compress_header": False},
    {"codebook": [-1.0, -0.3, 0.3, 1.0]},
    {"codebook": np.linspace(-1, 1, 16)},
]


def _update():
    rng = np.random.default_rng(3)
    return {"a": (rng.standard_normal((16, 64)) * 1e-3).astype(np.float32), "b": rng.standard_normal(300).astype(np.float32)}


@pytest.mark.parametrize("options", OPTION_SETS, ids=repr)
def test_config_survives_json(options):
    config = EncodeConfig(**options)
    again = EncodeConfig.from_config(json.loads(json.dumps(config.get_config())))
    assert again == config
    assert hash(again) == hash(config)
    assert repr(again) == repr(config)


@pytest.mark.parametrize("options", OPTION_SETS, ids=repr)
def test_config_gives_the_bytes_of_the_keyword_options(options):
    update = _update()
    fisher = {name: np.abs(value) + 1e-6 for name, value in update.items()}
    assert fstqcodec.encode(update, fisher=fisher, config=EncodeConfig(**options)) == fstqcodec.encode(update, fisher=fisher, **options)


def test_config_is_frozen_and_replace_validates():
    config = EncodeConfig(budget=Budget(bits_per_param=1))
    with pytest.raises(AttributeError):
        config.block_size = 32
    assert config.replace(block_size=32).block_size == 32
    with pytest.raises(ValueError, match="block_size"):
        config.replace(block_size=0)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"block_size": 0}, ValueError, "block_size"),
        ({"bits": 9}, ValueError, "bits"),
        ({"bits": 4, "budget": 100}, TypeError, "at most one"),
        ({"rounding": "up"}, ValueError, "rounding"),
        ({"nonfinite": "nan"}, ValueError, "nonfinite"),
        ({"fisher_power": -1}, ValueError, "fisher_power"),
        ({"seed": -1}, ValueError, "seed"),
        ({"codebook": "nf5"}, ValueError, "unknown codebook"),
        ({"codebook": [1.0, 0.0]}, ValueError, "increasing"),
        ({"budget": "1 bit"}, TypeError, "budget"),
    ],
)
def test_bad_options_fail_at_construction(options, error, match):
    with pytest.raises(error, match=match):
        EncodeConfig(**options)


def test_from_config_refuses_unknown_keys_and_other_codecs():
    with pytest.raises(ValueError, match="unknown encoder option"):
        EncodeConfig.from_config({"id": "fstq", "bitz": 3})
    with pytest.raises(ValueError, match="not an fstq"):
        EncodeConfig.from_config({"id": "zstd"})
    with pytest.raises(TypeError, match="unknown budget"):
        Budget.from_config({"bytes": 3})


def test_config_and_keyword_options_are_not_mixed():
    with pytest.raises(TypeError, match="either in config"):
        fstqcodec.encode(_update(), config=EncodeConfig(), bits=4)


def test_error_feedback_carries_a_config_and_its_state():
    config = EncodeConfig(budget=Budget(bits_per_param=1), fisher_power=0.5)
    update = _update()
    feedback = fstqcodec.ErrorFeedback(config)
    first = feedback.encode(update)
    assert first == fstqcodec.ErrorFeedback().encode(update, config=config)
    state = feedback.state()
    restored = fstqcodec.ErrorFeedback.from_state(state, config)
    assert restored.encode(update) == feedback.encode(update)
    restored.message_lost()
    assert set(restored.residual) == set(update)


def test_error_feedback_state_needs_its_parts():
    with pytest.raises(ValueError, match="residual"):
        fstqcodec.ErrorFeedback.from_state({})
    with pytest.raises(ValueError, match="neither"):
        fstqcodec.ErrorFeedback.from_state({"residual": {}, "last_update": {}})
