"""The real-update corpus: client updates, their Fisher and the held-out gradient (reading and writing).

A capture is one round of the reference loop (``fstq simulate``'s FedAvg over LoRA adapters, fp32
uplink so nothing is lost): the round's global adapter is fixed, a few clients train from it, and
the file keeps what each client would send (its update, float16), the diagonal Fisher its
accumulator collected during those local steps, the client's FedAvg weight (its example count),
and the gradient of the held-out loss at the global adapter (over the loop's evaluation set),
which gives the first-order loss change of any reconstruction of the server average.

File layout (``numpy.savez_compressed``)::

    meta            JSON (task, local_steps, round, losses, how the arrays are stored)
    names           tensor names (str array), in the adapter's state-dict order
    x{c}_{t}        update of client c, tensor t: float16
    f{c}_{t}        Fisher of client c, tensor t: uint8 log code (see below)
    f{c}_max        float64 max of client c's Fisher
    g_{t}           held-out gradient, tensor t, divided by g_max: float16
    g_max           float64 max |gradient|
    weights         float64 FedAvg weights (client example counts)

The Fisher spans many octaves and only its ratios matter to an encoder, so it is stored as
``q = round(-8 log2(F / max F))`` clamped to 0..254 (1/8 octave, 31.75 octaves below the max;
255 means zero): a fourth of float32's bytes, within 4.4% of every value it keeps.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

__all__ = ["Capture", "load_capture", "save_capture", "save_fixture", "corpus_files", "CORPUS_DIR"]

CORPUS_DIR = pathlib.Path(__file__).resolve().parent / "real_updates"
_ZERO_CODE = 255


@dataclasses.dataclass
class Capture:
    """One round's client updates, Fisher, FedAvg weights and the held-out gradient."""

    meta: dict
    names: list[str]
    updates: list[dict[str, np.ndarray]]
    fishers: list[dict[str, np.ndarray]]
    gradient: dict[str, np.ndarray]
    weights: np.ndarray

    @property
    def label(self) -> str:
        m = self.meta
        return f"{m['task']} {m['local_steps']}-step r{m['round']}"


def _fisher_codes(fisher: np.ndarray, top: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        q = np.rint(-8.0 * np.log2(fisher.astype(np.float64) / top))
    return np.where(fisher > 0, np.clip(q, 0, 254), _ZERO_CODE).astype(np.uint8)


def _fisher_values(codes: np.ndarray, top: float) -> np.ndarray:
    values = top * np.exp2(-codes.astype(np.float64) / 8.0)
    return np.where(codes == _ZERO_CODE, 0.0, values).astype(np.float32)


def save_capture(path, capture: Capture) -> None:
    """Write ``capture`` to ``path`` (an ``.npz``) in the layout of this module."""
    arrays = {"meta": np.array(json.dumps(capture.meta, sort_keys=True)), "names": np.array(capture.names),
              "weights": np.asarray(capture.weights, dtype=np.float64)}
    for c, (update, fisher) in enumerate(zip(capture.updates, capture.fishers)):
        top = max(float(np.max(f)) for f in fisher.values())
        arrays[f"f{c}_max"] = np.array(top if top > 0 else 1.0)
        for t, name in enumerate(capture.names):
            arrays[f"x{c}_{t}"] = update[name].astype(np.float16)
            arrays[f"f{c}_{t}"] = _fisher_codes(fisher[name], float(arrays[f"f{c}_max"]))
    # Normalised so float16 (with its subnormals) keeps 24 octaves below the largest component.
    g_max = max(float(np.max(np.abs(g))) for g in capture.gradient.values()) or 1.0
    arrays["g_max"] = np.array(g_max)
    for t, name in enumerate(capture.names):
        arrays[f"g_{t}"] = (capture.gradient[name] / g_max).astype(np.float16)
    np.savez_compressed(path, **arrays)


def load_capture(path) -> Capture:
    """Read a capture written by :func:`save_capture` (updates and Fisher as float32)."""
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        names = [str(n) for n in data["names"]]
        weights = data["weights"].astype(np.float64)
        updates, fishers = [], []
        for c in range(len(weights)):
            top = float(data[f"f{c}_max"])
            updates.append({n: data[f"x{c}_{t}"].astype(np.float32) for t, n in enumerate(names)})
            fishers.append({n: _fisher_values(data[f"f{c}_{t}"], top) for t, n in enumerate(names)})
        g_max = float(data["g_max"])
        gradient = {n: data[f"g_{t}"].astype(np.float32) * np.float32(g_max) for t, n in enumerate(names)}
    return Capture(meta, names, updates, fishers, gradient, weights)


def corpus_files(directory=CORPUS_DIR) -> list[pathlib.Path]:
    """The corpus's captures, sorted by name."""
    return sorted(pathlib.Path(directory).glob("*.npz"))


def save_fixture(path, capture: Capture, client: int) -> None:
    """One client's update as a test fixture (tests/data): ``names``, ``x_{t}`` (float16 update)
    and ``s_{t}`` (float16 ``sqrt(F / max F)``; the test squares it back)."""
    update, fisher = capture.updates[client], capture.fishers[client]
    top = max(float(np.max(f)) for f in fisher.values()) or 1.0
    arrays = {"names": np.array(capture.names)}
    for t, name in enumerate(capture.names):
        arrays[f"x_{t}"] = update[name].astype(np.float16)
        arrays[f"s_{t}"] = np.sqrt(fisher[name] / top).astype(np.float16)
    np.savez_compressed(path, **arrays)
