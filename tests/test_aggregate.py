"""The streaming aggregator: the weighted mean of the good messages, hostile ones dropped with their
reason, memory near one model whatever the number of clients."""

from __future__ import annotations

import struct

import numpy as np
import pytest

import fstqcodec
from common import peak_allocation, reframe, split

SHAPES = {"layer.0.lora_A": (8, 256), "layer.0.lora_B": (256, 8), "layer.1.lora_A": (8, 256), "layer.1.lora_B": (256, 8)}
MODEL = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}
BUDGET = fstqcodec.Budget(bits_per_param=1.0)


def update(seed: int, shapes=SHAPES, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * 1e-2).astype(dtype) for name, shape in shapes.items()}


def good_messages(count: int) -> list[tuple[bytes, float]]:
    return [(fstqcodec.encode(update(seed), budget=BUDGET, seed=seed), float(1 + seed % 5)) for seed in range(count)]


def nonfinite_message() -> bytes:
    """A well-formed message of the model whose largest scale times its codes overflows float32."""
    header, body = split(fstqcodec.encode(update(99), bits=4, compress_header=False))
    pieces, offset = [], 0
    for section in header["sections"]:
        pieces.append(body[offset : offset + section[1]])
        offset += section[1]
    scale_count = header["sections"][1][3] // 2
    pieces[1] = struct.pack("<H", 0x7F7F) * scale_count  # bfloat16 3.4e38, stored uncompressed
    header["sections"][1] = ["scales", len(pieces[1]), "none", len(pieces[1])]
    return reframe(header, b"".join(pieces))


def hostile_messages() -> list[tuple[str, bytes, str]]:
    """(client, message, expected reason) for each kind of bad reply."""
    valid = fstqcodec.encode(update(7), budget=BUDGET)
    other_model = {name.replace("layer", "block"): shape for name, shape in SHAPES.items()}
    return [
        ("garbage", np.random.default_rng(1).bytes(3000), "BadFormatError"),
        ("truncated", valid[: len(valid) // 2], "TruncatedError"),
        ("other-names", fstqcodec.encode(update(3, other_model), budget=BUDGET), "TensorMismatch"),
        ("other-shapes", fstqcodec.encode(update(3, {"x": (4, 4)})), "TensorMismatch"),
        ("float16", fstqcodec.encode(update(3, dtype=np.float16), budget=BUDGET), "TensorMismatch"),
        ("nonfinite", nonfinite_message(), "BadFormatError"),
        ("bitflip", valid[:100] + bytes([valid[100] ^ 1]) + valid[101:], "ChecksumError"),
    ]


def reference_mean(messages) -> dict:
    """Decode everything, then average in float64 in the same order."""
    totals = {name: np.zeros(shape) for name, shape in SHAPES.items()}
    for message, weight in messages:
        for name, array in fstqcodec.decode(message).items():
            totals[name] += weight * array.astype(np.float64)
    weight = sum(w for _, w in messages)
    return {name: (total / weight).astype(np.float32) for name, total in totals.items()}


def interleaved(good, hostile):
    """Hostile replies spread among the good ones."""
    stream = [(f"client-{i}", message, weight) for i, (message, weight) in enumerate(good)]
    for position, (client, message, _) in enumerate(hostile):
        stream.insert(1 + 2 * position, (client, message, 1.0))
    return stream


def test_hostile_messages_are_dropped_and_the_mean_is_that_of_the_good_ones():
    good, hostile = good_messages(10), hostile_messages()
    aggregator = fstqcodec.StreamingAggregator(MODEL)
    outcomes = [aggregator.add(message, weight, client=client) for client, message, weight in interleaved(good, hostile)]
    assert outcomes.count(True) == len(good) and outcomes.count(False) == len(hostile)
    assert [(r.client, r.reason) for r in aggregator.rejections] == [(client, reason) for client, _, reason in hostile]
    assert "non-finite" in aggregator.rejections[5].detail
    assert aggregator.accepted == len(good) and aggregator.total_weight == sum(w for _, w in good)
    mean, expected = aggregator.result(), reference_mean(good)
    for name in SHAPES:
        assert mean[name].dtype == np.float32
        np.testing.assert_array_equal(mean[name], expected[name])


def test_workers_give_the_same_mean_and_rejections():
    good, hostile = good_messages(10), hostile_messages()
    with fstqcodec.StreamingAggregator(MODEL, workers=2) as aggregator:
        for client, message, weight in interleaved(good, hostile):
            assert aggregator.add(message, weight, client=client) is None
    assert [(r.client, r.reason) for r in aggregator.rejections] == [(client, reason) for client, _, reason in hostile]
    mean, expected = aggregator.result(), reference_mean(good)
    assert aggregator.accepted == len(good)
    for name in SHAPES:
        np.testing.assert_allclose(mean[name], expected[name], rtol=1e-6, atol=1e-12)
    with pytest.raises(RuntimeError, match="closed"):
        aggregator.add(good[0][0])


def test_decoded_arrays_are_checked_like_messages():
    aggregator = fstqcodec.StreamingAggregator(MODEL, accumulate="float32")
    nan_update = update(1)
    nan_update["layer.1.lora_B"][3, 3] = np.nan
    wrong_shape = dict(update(1), **{"layer.0.lora_A": np.zeros((256, 8), np.float32)})
    assert not aggregator.add_arrays(nan_update, client="nan")
    assert not aggregator.add_arrays(wrong_shape, client="shape")
    assert not aggregator.add_arrays(["not", "a", "mapping"], client="list")
    assert not aggregator.add_arrays(update(1), weight=0.0, client="zero-weight")
    assert not aggregator.add(fstqcodec.encode(update(1)), weight=float("nan"), client="nan-weight")
    assert [r.reason for r in aggregator.rejections] == ["NonFinite", "TensorMismatch", "TypeError", "BadWeight", "BadWeight"]
    with pytest.raises(ValueError, match="no update to average: 5 rejected"):
        aggregator.result()
    assert aggregator.add_arrays(update(1), weight=2.0) and aggregator.add_arrays(update(2), weight=6.0)
    mean = aggregator.result()
    for name in SHAPES:
        np.testing.assert_allclose(mean[name], (2 * update(1)[name] + 6 * update(2)[name]) / 8, rtol=1e-5, atol=1e-9)


def test_expected_model_forms_and_errors():
    pairs = {name: (shape, "float32") for name, shape in SHAPES.items()}
    assert fstqcodec.aggregate.expected_tensors(pairs) == fstqcodec.aggregate.expected_tensors(MODEL)
    assert fstqcodec.aggregate.expected_tensors({"w": ((2,), "bfloat16")}) == {"w": ((2,), "bfloat16")}
    with pytest.raises(ValueError, match="dtype int32"):
        fstqcodec.StreamingAggregator({"w": np.zeros(3, np.int32)})
    with pytest.raises(ValueError, match="no tensors"):
        fstqcodec.StreamingAggregator({})
    with pytest.raises(TypeError, match="mapping"):
        fstqcodec.StreamingAggregator([np.zeros(3)])
    with pytest.raises(ValueError, match="workers"):
        fstqcodec.StreamingAggregator(MODEL, workers=-1)
    with pytest.raises(ValueError, match="accumulate"):
        fstqcodec.StreamingAggregator(MODEL, accumulate="float16")


def test_memory_stays_near_one_model_whatever_the_number_of_clients():
    shapes = {f"t{i}": (1024, 256) for i in range(4)}  # 1M parameters, 4 MiB in float32
    model_bytes = 4 * sum(np.prod(s) for s in shapes.values())
    messages = [fstqcodec.encode(update(seed, shapes), budget=BUDGET, seed=seed) for seed in range(3)]

    def aggregate(count):
        aggregator = fstqcodec.StreamingAggregator({name: (shape, "float32") for name, shape in shapes.items()})
        for index in range(count):
            assert aggregator.add(messages[index % len(messages)], weight=1.0 + index)
        return aggregator.result()

    _, peak_few = peak_allocation(aggregate, 2)
    _, peak_many = peak_allocation(aggregate, 24)
    # The float64 sum (2x) and one decode (2.7x measured: its output and its dequantization chunks
    # of 2**20 elements, a fixed 8 MiB that weighs less on larger models).
    assert peak_many < 5 * model_bytes, (peak_many, model_bytes)
    assert peak_many < 1.1 * peak_few, (peak_few, peak_many)


def test_decoding_in_threads_gives_the_same_arrays():
    # The C rANS loops run without the GIL: concurrent decodes must not disturb each other.
    from concurrent.futures import ThreadPoolExecutor

    messages = [fstqcodec.encode(update(seed), budget=fstqcodec.Budget(bits_per_param=3.0)) for seed in range(6)]
    assert any(context[0] == "rans" for context in fstqcodec.inspect(messages[0])["contexts"])
    serial = [fstqcodec.decode(m) for m in messages]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(fstqcodec.decode, messages * 4))
    for index, arrays in enumerate(parallel):
        for name, array in serial[index % len(messages)].items():
            np.testing.assert_array_equal(arrays[name], array)


def test_a_killed_worker_is_reported_not_waited_for():
    aggregator = fstqcodec.StreamingAggregator(MODEL, workers=1)
    worker = aggregator._pool[2][0]
    worker.kill()
    worker.join()
    with pytest.raises(RuntimeError, match="decoding worker exited"):
        aggregator.close()
