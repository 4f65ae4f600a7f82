"""Gap to the rate-distortion bound, and what Fisher buys (README figures 3 and 4).

Source (issue 2): 2**20 float32 elements in blocks of 64; block j has standard deviation
exp(N(0, 1)) and Fisher weight exp(N(0, 1.5)), the same for every element of the block; elements
i.i.d. Gaussian. Distortion is the Fisher-weighted squared error. The bound is reverse
water-filling over the blocks, with their true variances and weights, at the rate the message
actually spends (every byte of it, 8 * len(message) bits).

Run: python benchmarks/rd_bound.py [--seed 0] [--elements 1048576]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

import fstqcodec

BLOCK = 64


def make_source(elements: int, seed: int):
    rng = np.random.default_rng(seed)
    blocks = elements // BLOCK
    std = np.exp(rng.normal(0.0, 1.0, blocks))
    weight = np.exp(rng.normal(0.0, 1.5, blocks))
    x = (rng.standard_normal((blocks, BLOCK)) * std[:, None]).astype(np.float32)
    fisher = np.repeat(weight, BLOCK).astype(np.float32)
    return x.reshape(-1), fisher, std**2, weight


def water_filling_distortion(variance: np.ndarray, weight: np.ndarray, bits: float) -> float:
    """Smallest weighted distortion at ``bits`` total for Gaussian blocks of BLOCK elements."""
    energy = weight * variance  # w s^2: distortion of a dropped block, per element

    def rate(theta):
        return BLOCK * np.sum(np.maximum(0.0, 0.5 * np.log2(energy / theta)))

    low, high = math.log(energy.min()) - 60, math.log(energy.max())
    for _ in range(200):
        middle = 0.5 * (low + high)
        if rate(math.exp(middle)) > bits:
            low = middle
        else:
            high = middle
    theta = math.exp(high)
    return float(BLOCK * np.sum(np.minimum(theta, energy)))


def weighted_error(x, y, fisher) -> float:
    d = x.astype(np.float64) - y.astype(np.float64)
    return float(np.sum(fisher * d * d))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--elements", type=int, default=1 << 20)
    args = parser.parse_args(argv)
    x, fisher, variance, weight = make_source(args.elements, args.seed)
    n = len(x)
    print(f"source: {n} elements, {n // BLOCK} blocks of {BLOCK}, seed {args.seed}")
    print(f"{'bits/param':>10} {'spent':>8} {'fill':>6} {'D(fstq)':>12} {'D(bound)':>12} {'gap dB':>7} {'D(no Fisher)':>13} {'Fisher gain dB':>15} {'enc s':>6}")
    for bpp in (0.25, 0.5, 1, 2, 4):
        budget = fstqcodec.Budget(bits_per_param=bpp)
        start = time.perf_counter()
        message = fstqcodec.encode({"x": x}, fisher={"x": fisher}, budget=budget)
        seconds = time.perf_counter() - start
        y = fstqcodec.decode(message)["x"]
        spent = 8 * len(message)
        d = weighted_error(x, y, fisher)
        bound = water_filling_distortion(variance, weight, spent)
        plain = fstqcodec.encode({"x": x}, budget=budget)
        d_plain = weighted_error(x, fstqcodec.decode(plain)["x"], fisher)
        print(
            f"{bpp:>10} {spent / n:>8.4f} {spent / (bpp * n):>6.1%} {d:>12.5g} {bound:>12.5g} "
            f"{10 * math.log10(d / bound):>7.2f} {d_plain:>13.5g} {10 * math.log10(d_plain / d):>15.2f} {seconds:>6.2f}"
        )


if __name__ == "__main__":
    main()
