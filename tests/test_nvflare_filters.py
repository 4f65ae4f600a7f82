"""The NVFLARE filters on their own (no simulator): what the client sends, what the server hands on."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

pytest.importorskip("nvflare")

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable  # noqa: E402
from nvflare.apis.fl_constant import ReservedKey, ReturnCode  # noqa: E402
from nvflare.apis.fl_context import FLContext  # noqa: E402
from nvflare.app_common.app_constant import AppConstants  # noqa: E402

import fstqcodec  # noqa: E402
from fstqcodec.nvflare import (  # noqa: E402
    FISHER_META_KEY,
    PAYLOAD_KEY,
    FstqModelReceiver,
    FstqModelSender,
    FstqUpdateDecoder,
    FstqUpdateEncoder,
)

CONFIG = fstqcodec.EncodeConfig(budget=fstqcodec.Budget(bits_per_param=1.0), fisher_power=0.5)
SHAPES = {"a.lora_A": (8, 512), "a.lora_B": (512, 8), "b.lora_A": (8, 512), "b.lora_B": (512, 8)}
_jobs = itertools.count()


def arrays(seed: int, scale: float = 1e-2) -> dict:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * scale).astype(np.float32) for name, shape in SHAPES.items()}


def context(job: str, site: str, peer: str | None = None) -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.RUN_NUM, job, private=False, sticky=False)
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    if peer is not None:
        fl_ctx.set_peer_context(context(job, peer))
    return fl_ctx


def send_global(job: str, model: dict, sender=None):
    """The server's task data for one client, through the sender (returns the filtered shareable)."""
    return (sender or FstqModelSender()).process(DXO(DataKind.WEIGHTS, dict(model)).to_shareable(), context(job, "server"))


def client_result(job, site, data, kind=DataKind.WEIGHT_DIFF, fisher=None, encoder=None, steps=5):
    meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: steps}
    if fisher is not None:
        meta[FISHER_META_KEY] = fisher
    return (encoder or FstqUpdateEncoder(CONFIG)).process(DXO(kind, dict(data), meta).to_shareable(), context(job, site))


def server_receive(job, site, shareable, decoder=None, round_number=0):
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_number)
    return (decoder or FstqUpdateDecoder()).process(shareable, context(job, "server", peer=site))


def test_weight_diff_travels_as_one_message_and_comes_back_decoded():
    job, update, fisher = f"job{next(_jobs)}", arrays(1), {name: a**2 for name, a in arrays(2).items()}
    send_global(job, arrays(0, scale=1.0))
    sent = from_shareable(client_result(job, "site-1", update, fisher=fisher))
    assert list(sent.data) == [PAYLOAD_KEY] and sent.data[PAYLOAD_KEY].dtype == np.uint8
    assert FISHER_META_KEY not in sent.meta and sent.meta[MetaKey.NUM_STEPS_CURRENT_ROUND] == 5
    message = sent.data[PAYLOAD_KEY].tobytes()
    assert len(message) <= 16384 / 8  # 1 bit per parameter
    # The learner's Fisher and the per-site error feedback are what the encoder used.
    assert message == fstqcodec.ErrorFeedback(CONFIG).encode(update, fisher=fisher)
    assert message != fstqcodec.ErrorFeedback(CONFIG).encode(update)
    received = from_shareable(server_receive(job, "site-1", sent.to_shareable()))
    assert received.data_kind == DataKind.WEIGHT_DIFF and PAYLOAD_KEY not in received.meta
    for name, array in fstqcodec.decode(message).items():
        np.testing.assert_array_equal(received.data[name], array)


def test_error_feedback_is_kept_per_site_across_rounds():
    job, update = f"job{next(_jobs)}", arrays(3)
    encoder = FstqUpdateEncoder(CONFIG)
    reference = fstqcodec.ErrorFeedback(CONFIG)
    expected = [reference.encode(update), reference.encode(update)]
    first = from_shareable(client_result(job, "site-1", update, encoder=encoder)).data[PAYLOAD_KEY].tobytes()
    other_site = from_shareable(client_result(job, "site-2", update, encoder=encoder)).data[PAYLOAD_KEY].tobytes()
    second = from_shareable(client_result(job, "site-1", update, encoder=encoder)).data[PAYLOAD_KEY].tobytes()
    assert [first, second] == expected and other_site == expected[0] and second != first


def test_weights_are_sent_as_a_delta_and_rebuilt_on_the_server():
    job, global_model = f"job{next(_jobs)}", arrays(4, scale=1.0)
    task = send_global(job, global_model)
    FstqModelReceiver().process(task, context(job, "site-1"))
    local = {name: array + arrays(5)[name] for name, array in global_model.items()}
    sent = from_shareable(client_result(job, "site-1", local, kind=DataKind.WEIGHTS))
    delta = fstqcodec.decode(sent.data[PAYLOAD_KEY].tobytes())
    received = from_shareable(server_receive(job, "site-1", sent.to_shareable()))
    assert received.data_kind == DataKind.WEIGHTS
    for name in SHAPES:
        np.testing.assert_array_equal(received.data[name], global_model[name] + delta[name])
        assert np.abs(received.data[name] - local[name]).max() < 0.05


def test_compressed_downlink_is_decoded_by_the_client_and_is_the_servers_reference():
    job, global_model = f"job{next(_jobs)}", arrays(6, scale=1.0)
    sender = FstqModelSender(fstqcodec.EncodeConfig(bits=8).get_config())
    task = send_global(job, global_model, sender)
    message = from_shareable(task).data[PAYLOAD_KEY].tobytes()
    assert len(message) < 16384 * 4 * 0.3  # 8 of 32 bits, plus scales
    assert send_global(job, global_model, sender) is not None  # the next client: same bytes, from the cache
    delivered = from_shareable(FstqModelReceiver().process(task, context(job, "site-1")))
    decoded = fstqcodec.decode(message)
    for name in SHAPES:
        np.testing.assert_array_equal(delivered.data[name], decoded[name])
    # A WEIGHTS result is rebuilt on what the client received, not on the exact model.
    local = {name: decoded[name] + arrays(7)[name] for name in SHAPES}
    sent = from_shareable(client_result(job, "site-1", local, kind=DataKind.WEIGHTS))
    delta = fstqcodec.decode(sent.data[PAYLOAD_KEY].tobytes())
    received = from_shareable(server_receive(job, "site-1", sent.to_shareable()))
    for name in SHAPES:
        np.testing.assert_array_equal(received.data[name], decoded[name] + delta[name])


def bad_result(job, payload) -> object:
    sent = from_shareable(client_result(job, "site-9", arrays(8)))
    sent.data[PAYLOAD_KEY] = payload
    return sent.to_shareable()


def test_bad_results_are_dropped_with_their_reason():
    job = f"job{next(_jobs)}"
    decoder = FstqUpdateDecoder()
    no_model = server_receive(job, "site-9", bad_result(job, np.zeros(3, np.uint8)), decoder)
    send_global(job, arrays(0, scale=1.0))
    valid = from_shareable(client_result(job, "site-8", arrays(9))).data[PAYLOAD_KEY].tobytes()
    other = fstqcodec.encode({name.replace("lora", "dora"): a for name, a in arrays(1).items()}, budget=fstqcodec.Budget(bits_per_param=1))
    replies = [
        no_model,
        server_receive(job, "site-9", bad_result(job, np.frombuffer(b"\x00" * 500, np.uint8)), decoder),
        server_receive(job, "site-9", bad_result(job, np.frombuffer(valid[:-7], np.uint8)), decoder),
        server_receive(job, "site-9", bad_result(job, np.frombuffer(other, np.uint8)), decoder),
        server_receive(job, "site-9", bad_result(job, np.arange(5, dtype=np.float32)), decoder),
    ]
    assert [reply.get_return_code() for reply in replies] == [ReturnCode.TASK_RESULT_FILTER_ERROR] * 5
    assert [r.reason for r in decoder.rejections] == ["NoExpectedModel", "BadFormatError", "TruncatedError", "TensorMismatch", "TypeError"]
    assert decoder.rejections[1].client == "site-9@round0"


def test_uncompressed_results_are_checked_too():
    job = f"job{next(_jobs)}"
    send_global(job, arrays(0, scale=1.0))
    plain = arrays(10)
    passed = server_receive(job, "site-1", DXO(DataKind.WEIGHT_DIFF, dict(plain)).to_shareable())
    np.testing.assert_array_equal(from_shareable(passed).data["a.lora_A"], plain["a.lora_A"])
    plain["b.lora_B"][0, 0] = np.inf
    decoder = FstqUpdateDecoder()
    assert server_receive(job, "site-1", DXO(DataKind.WEIGHT_DIFF, plain).to_shareable(), decoder).get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    strict = FstqUpdateDecoder(require_compressed=True)
    assert server_receive(job, "site-1", DXO(DataKind.WEIGHT_DIFF, arrays(10)).to_shareable(), strict).get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert [r.reason for r in decoder.rejections + strict.rejections] == ["NonFinite", "NotCompressed"]


def test_config_forms():
    assert FstqUpdateEncoder(CONFIG.get_config()).encode_config == CONFIG
    assert FstqUpdateEncoder().encode_config.fisher_power == fstqcodec.FEDERATED_FISHER_POWER
    with pytest.raises(TypeError, match="EncodeConfig"):
        FstqUpdateEncoder("1 bit")
    with pytest.raises(ValueError, match="unknown encoder option"):
        FstqModelSender({"id": "fstq", "bitz": 3})
    with pytest.raises(RuntimeError, match="FstqModelReceiver"):
        FstqUpdateEncoder(CONFIG).process_dxo(DXO(DataKind.WEIGHTS, arrays(1)), None, context(f"job{next(_jobs)}", "site-1"))
