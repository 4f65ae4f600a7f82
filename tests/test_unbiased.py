"""The unbiased budget mode (``EncodeConfig(unbiased=True)``): E[decode(encode(x))] = x over seeds,
within the budget, in format 1.0."""

import numpy as np
import pytest

import fstqcodec
from common import load_real_update


def _sign_like(n: int, seed: int = 0) -> np.ndarray:
    """An AdamW-like update: every element about +-lr, a few tensors' worth of spread."""
    rng = np.random.default_rng(seed)
    return (np.sign(rng.standard_normal(n)) * (1 + 0.3 * rng.random(n)) * 1e-3).astype(np.float32)


def _average(tensors, fisher, bpp: float, seeds: int, **options) -> tuple[np.ndarray, float]:
    """(mean of the decoded flat vectors over ``seeds`` seeds, mean squared error of one)."""
    names = list(tensors)
    x = np.concatenate([np.ravel(tensors[n]) for n in names]).astype(np.float64)
    total, squared = np.zeros_like(x), 0.0
    for seed in range(seeds):
        message = fstqcodec.encode(tensors, fisher=fisher, budget=fstqcodec.Budget(bits_per_param=bpp), seed=seed, **options)
        decoded = fstqcodec.decode(message)
        flat = np.concatenate([np.ravel(decoded[n]) for n in names]).astype(np.float64)
        total += flat
        squared += float(np.sum((flat - x) ** 2))
    return total / seeds, squared / seeds


@pytest.mark.parametrize("bpp", [0.25, 1.0])
def test_average_over_seeds_converges_to_the_input(bpp):
    tensors = {"a": _sign_like(64 * 160, 1).reshape(160, 64), "b": _sign_like(12000, 2)}
    fisher = {"a": np.full((160, 64), 4.0, np.float32), "b": np.random.default_rng(3).random(12000).astype(np.float32)}
    x = np.concatenate([tensors["a"].ravel(), tensors["b"]]).astype(np.float64)
    seeds = 200
    mean, mse = _average(tensors, fisher, bpp, seeds, unbiased=True)
    # Unbiased: the mean's squared error is the variance over the number of seeds (expected
    # mse / seeds); a bias would add a term that does not shrink with the seeds.
    assert np.sum((mean - x) ** 2) < 2.0 * mse / seeds
    # The default mode is biased (it shrinks toward zero): the same check fails there.
    biased_mean, biased_mse = _average(tensors, fisher, bpp, seeds)
    assert np.sum((biased_mean - x) ** 2) > 5.0 * biased_mse / seeds


def test_fisher_decides_the_probabilities():
    rng = np.random.default_rng(0)
    tensors = {"head": _sign_like(2048, 4), "body": _sign_like(64 * 400, 5)}
    fisher = {"head": np.float32(100.0), "body": np.float32(0.01)}
    message = fstqcodec.encode(tensors, fisher=fisher, budget=fstqcodec.Budget(bits_per_param=0.3), unbiased=True, seed=int(rng.integers(1000)))
    decoded = fstqcodec.decode(message)
    sent = {name: np.mean(np.any(decoded[name].reshape(-1, 64) != 0, axis=1)) for name in tensors}
    assert sent["head"] == 1.0 and 0 < sent["body"] < 0.3


@pytest.mark.parametrize("name", ["real_update_bbc.npz", "real_update_drugreview.npz"])
@pytest.mark.parametrize("bpp", [0.1, 0.25, 0.5, 1, 2, 4])
def test_budget_is_kept_and_filled_on_real_updates(name, bpp):
    update, fisher = load_real_update(name)
    budget = fstqcodec.Budget(bits_per_param=bpp)
    limit = budget.resolve(elements=sum(v.size for v in update.values()), raw_bytes=sum(v.nbytes for v in update.values()))
    for seed in range(3):
        size = len(fstqcodec.encode(update, fisher=fisher, fisher_power=0.5, budget=budget, unbiased=True, seed=seed))
        assert 0.95 * limit <= size <= limit


def test_same_seed_same_bytes_other_seed_other_draws():
    tensors = {"w": _sign_like(8192)}
    config = fstqcodec.EncodeConfig(budget=fstqcodec.Budget(bits_per_param=0.5), unbiased=True, seed=7)
    assert fstqcodec.encode(tensors, config=config) == fstqcodec.encode(tensors, config=config)
    assert fstqcodec.encode(tensors, config=config) != fstqcodec.encode(tensors, config=config.replace(seed=8))


def test_scales_stay_within_a_float16_tensors_range():
    # Rarely sent blocks are scaled up by 1/p: near float16's largest value that would overflow.
    tensors = {"w": np.full(64 * 64, 60000.0, np.float16), "tiny": np.full(64 * 64, 1e-3, np.float32)}
    fisher = {"w": np.float32(1e-9), "tiny": np.float32(1e9)}
    for seed in range(5):
        decoded = fstqcodec.decode(fstqcodec.encode(tensors, fisher=fisher, budget=fstqcodec.Budget(bits_per_param=0.5),
                                                    unbiased=True, seed=seed))
        assert np.all(np.isfinite(decoded["w"]))


def test_all_zero_input_is_all_dropped():
    message = fstqcodec.encode({"w": np.zeros(4096, np.float32)}, budget=fstqcodec.Budget(bits_per_param=0.5), unbiased=True)
    assert np.all(fstqcodec.decode(message)["w"] == 0)


def test_config_checks_and_round_trip():
    with pytest.raises(ValueError, match="needs a budget"):
        fstqcodec.EncodeConfig(unbiased=True)
    with pytest.raises(TypeError, match="unbiased must be a bool"):
        fstqcodec.EncodeConfig(budget=1000, unbiased=1)
    plain = fstqcodec.EncodeConfig(budget=1000)
    assert "unbiased" not in plain.get_config()  # configs read the same as before the option
    config = plain.replace(unbiased=True)
    assert config.get_config()["unbiased"] is True
    assert fstqcodec.EncodeConfig.from_config(config.get_config()) == config
