"""Budget fill and error of budgeted encodes of the throughput benchmark's LoRA-shaped input.

The quality side of the speed work of issue 17: an encoder made faster must not fill less of the
budget or give a larger error. For 4 and 32 MiB of ``throughput.lora_update`` with its
per-element Fisher (``throughput.lora_fisher``), no Fisher and Fisher powers 0.5 and 1, at 0.5, 1
and 2 bits/param, prints the fill (message size over the budget), the relative MSE
``|xhat - x|**2 / |x|**2`` and the Fisher error ``sum F (xhat - x)**2 / sum F x**2``.

Run: python benchmarks/lora_fill_quality.py   (output recorded in lora_fill_quality.log)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import fstqcodec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import lora_fisher, lora_update  # noqa: E402


def main() -> None:
    for mib in (4, 32):
        tensors = lora_update(mib)
        fisher = lora_fisher(tensors)
        elements = sum(t.size for t in tensors.values())
        for mode in ("none", "p0.5", "p1"):
            for bpp in (0.5, 1, 2):
                options = {"budget": fstqcodec.Budget(bits_per_param=bpp)}
                if mode != "none":
                    options.update(fisher=fisher, fisher_power=1.0 if mode == "p1" else 0.5)
                message = fstqcodec.encode(tensors, **options)
                decoded = fstqcodec.decode(message)
                error = {k: (decoded[k].astype(np.float64) - tensors[k]) ** 2 for k in tensors}
                mse = sum(float(e.sum()) for e in error.values()) / sum(float((t.astype(np.float64) ** 2).sum()) for t in tensors.values())
                weighted = (sum(float((fisher[k] * error[k]).sum()) for k in tensors)
                            / sum(float((fisher[k] * tensors[k].astype(np.float64) ** 2).sum()) for k in tensors))
                print(f"{mib:3d}MiB {mode:5} bpp={bpp:<4} fill={8 * len(message) / (bpp * elements):.4f} "
                      f"relMSE={mse:.5f} FisherErr={weighted:.5f}")


if __name__ == "__main__":
    main()
