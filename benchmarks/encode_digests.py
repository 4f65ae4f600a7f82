"""SHA-256 of budgeted encodes, to show that an encoder change keeps (or changes) the bytes.

Every client update of the real-update corpus (benchmarks/real_updates/) and 8 MiB of the
throughput benchmark's LoRA-shaped input with its Fisher, at 0.25, 0.5, 1, 2 and 4 bits/param,
with no Fisher, Fisher powers 0.5 and 1, and the unbiased mode (seed 3): one line per message
(input, rate, mode, size, first 16 hex digits of its SHA-256). Run it on two checkouts and diff:
equal lines mean equal messages, so fill and error are equal too.

Run: python benchmarks/encode_digests.py   (output recorded in encode_digests.log)
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import fstqcodec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import lora_fisher, lora_update, real_corpus  # noqa: E402


def main() -> None:
    corpus = real_corpus()
    tensors = lora_update(8)
    corpus.append((tensors, lora_fisher(tensors)))
    for index, (tensors, fisher) in enumerate(corpus):
        for rate in (0.25, 0.5, 1, 2, 4):
            for mode in ("none", "p0.5", "p1", "unbiased"):
                options = dict(budget=fstqcodec.Budget(bits_per_param=rate))
                if mode != "none":
                    options.update(fisher=fisher, fisher_power=1.0 if mode == "p1" else 0.5)
                if mode == "unbiased":
                    options.update(unbiased=True, seed=3)
                message = fstqcodec.encode(tensors, **options)
                print(index, rate, mode, len(message), hashlib.sha256(message).hexdigest()[:16])


if __name__ == "__main__":
    main()
