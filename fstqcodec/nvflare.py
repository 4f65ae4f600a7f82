"""NVIDIA FLARE filters: fstq-compressed task results (and, optionally, task data).

Four :class:`nvflare.apis.dxo_filter.DXOFilter` s, one per chain (needs ``fstqcodec[nvflare]``):

=====================  =============================  ==============================================
filter                 where                          what it does
=====================  =============================  ==============================================
FstqModelReceiver      client ``task_data_filters``   keeps the global model the client received (the
                                                      reference of a WEIGHTS result); decodes an
                                                      fstq-compressed downlink
FstqUpdateEncoder      client ``task_result_filters`` turns the WEIGHT_DIFF (or WEIGHTS minus the
                                                      received global) into one fstq message, with
                                                      error feedback kept per site across rounds
FstqModelSender        server ``task_data_filters``   records the model the results must match;
                                                      optionally compresses the downlink
FstqUpdateDecoder      server ``task_result_filters`` decodes, validates and hands the aggregator
                                                      the arrays it expects; drops a bad result
=====================  =============================  ==============================================

The message travels as one ``np.uint8`` array under the key ``"fstq"`` of the DXO (as NVFLARE's
AdaQuant carries its bytes), with the DXO's kind kept and its meta (``NUM_STEPS_CURRENT_ROUND``,
the aggregation weight) passed on; the key ``"fstq"`` of the meta marks the DXO as compressed.

Fisher: a learner that has per-parameter importance (e.g. squared gradients, see
``integrations/nvflare-job/README.md``) puts ``{name: array}`` under :data:`FISHER_META_KEY` in the
result's DXO meta (with the Client API: ``FLModel(meta={FISHER_META_KEY: fisher, ...})``). The
encoder uses it and removes it, so it never travels.

A dropped result becomes a ``TASK_RESULT_FILTER_ERROR`` reply, which the workflow treats as a
failed client (ScatterAndGather: set ``ignore_result_error=True``, or leave it None and keep enough
clients above ``min_clients``); the reason (a DecodeError subclass name, ``TensorMismatch``,
``NoExpectedModel``, ...) is logged, kept in :attr:`FstqUpdateDecoder.rejections` and, with
``record_dir``, written to ``events.jsonl``.

State (the residual of each site, the expected model of each job) is kept per process in a table
keyed by job id and site, because NVFLARE instantiates each configured filter separately.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import make_reply
from nvflare.app_common.app_constant import AppConstants

from .aggregate import Rejection, _mismatch, _Rejected, decode_expected, expected_tensors
from .codec import decode, encode
from .config import FEDERATED_FISHER_POWER, EncodeConfig
from .feedback import ErrorFeedback
from .limits import Limits
from .policy.budget import Budget

__all__ = ["FstqModelReceiver", "FstqUpdateEncoder", "FstqModelSender", "FstqUpdateDecoder", "FISHER_META_KEY", "PAYLOAD_KEY"]

#: DXO data key of the message (a uint8 array) and DXO meta key marking a compressed DXO.
PAYLOAD_KEY = "fstq"
#: DXO meta key under which a learner may give ``{name: importance array}`` (removed before sending).
FISHER_META_KEY = "fstq_fisher"
_KINDS = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]

#: The uplink's default: 1 bit per parameter, Fisher power 0.5 (the federated default).
DEFAULT_UPLINK = EncodeConfig(budget=Budget(bits_per_param=1.0), fisher_power=FEDERATED_FISHER_POWER)

_STATE: dict = {}
_STATE_LOCK = threading.Lock()


class _Dropped(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _state(fl_ctx, site: str | None = None) -> dict:
    """This process's state for the job and site (the server's site is ``"server"``)."""
    key = (fl_ctx.get_job_id(), site or fl_ctx.get_identity_name())
    with _STATE_LOCK:
        return _STATE.setdefault(key, {})


def _config(config) -> EncodeConfig | None:
    if config is None or isinstance(config, EncodeConfig):
        return config
    if isinstance(config, dict):
        return EncodeConfig.from_config(config)
    raise TypeError(f"config must be a fstqcodec.EncodeConfig, its get_config() dict or None, got {type(config).__name__}")


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch is not imported here
        value = value.detach().float().cpu().numpy() if str(value.dtype) == "torch.bfloat16" else value.detach().cpu().numpy()
    return np.asarray(value)


def _split_floating(data: dict) -> tuple[dict, dict]:
    """(floating-point arrays the codec carries, other entries passed on as they are)."""
    floating, others = {}, {}
    for name, value in data.items():
        array = _numpy(value) if hasattr(value, "dtype") else None
        if array is not None and array.dtype.kind == "f" and array.dtype.itemsize in (2, 4, 8):
            floating[name] = array
        else:
            others[name] = value
    return floating, others


def _payload(message: bytes) -> dict:
    return {PAYLOAD_KEY: np.frombuffer(message, dtype=np.uint8)}


def _message_of(dxo: DXO) -> bytes:
    payload = dxo.data.get(PAYLOAD_KEY)
    if not isinstance(payload, np.ndarray) or payload.dtype != np.uint8 or payload.ndim != 1:
        raise _Dropped("TypeError", f"the DXO's {PAYLOAD_KEY!r} entry is not a 1-D uint8 array")
    return payload.tobytes()


def _marker(dxo: DXO):
    return dxo.get_meta_prop(PAYLOAD_KEY)


class FstqModelReceiver(DXOFilter):
    """Client task-data filter: remembers the received global model; decodes a compressed downlink.

    Put it in the client's ``task_data_filters`` whenever a learner returns WEIGHTS (their delta
    to this model is what gets encoded) or the server compresses the downlink.
    """

    def __init__(self):
        super().__init__(supported_data_kinds=_KINDS, data_kinds_to_filter=[DataKind.WEIGHTS])

    def process_dxo(self, dxo: DXO, shareable, fl_ctx):
        result = None
        if _marker(dxo) is not None:
            # The server is trusted less than blindly: the decoder's default limits apply.
            arrays = decode(_message_of(dxo))
            others = {k: v for k, v in dxo.data.items() if k != PAYLOAD_KEY}
            meta = {k: v for k, v in dxo.meta.items() if k != PAYLOAD_KEY}
            result = dxo = DXO(dxo.data_kind, data={**arrays, **others}, meta=meta)
        floating, _ = _split_floating(dxo.data)
        # A copy: the learner may update the received arrays in place.
        _state(fl_ctx)["reference"] = {name: np.array(array, copy=True) for name, array in floating.items()}
        return result


class FstqUpdateEncoder(DXOFilter):
    """Client task-result filter: the update as one fstq message, with per-site error feedback.

    Parameters
    ----------
    config : EncodeConfig or dict, optional
        The encoder's options, or their :meth:`EncodeConfig.get_config` dict (how NVFLARE's job
        config stores them). None: 1 bit per parameter with Fisher power 0.5.

    Raises
    ------
    TypeError, ValueError
        On an invalid config.

    Notes
    -----
    A WEIGHTS result is encoded as its difference from the global model the client received
    (:class:`FstqModelReceiver` must be in the client's task-data chain); the server adds it back.
    Entries that are not float16/32/64 arrays travel unchanged beside the message.
    """

    def __init__(self, config=None):
        super().__init__(supported_data_kinds=_KINDS, data_kinds_to_filter=_KINDS)
        resolved = _config(config) or DEFAULT_UPLINK
        self.encode_config = resolved
        # NVFLARE's job config stores constructor arguments as plain data.
        self.config = resolved.get_config()

    def process_dxo(self, dxo: DXO, shareable, fl_ctx):
        if _marker(dxo) is not None:
            return None
        state = _state(fl_ctx)
        floating, others = _split_floating(dxo.data)
        if dxo.data_kind == DataKind.WEIGHTS:
            reference = state.get("reference")
            if reference is None:
                raise RuntimeError("a WEIGHTS result needs the received global model: add FstqModelReceiver to the client's task_data_filters")
            floating = {name: array - reference[name].astype(array.dtype) if name in reference else array for name, array in floating.items()}
        meta = dict(dxo.meta)
        fisher = meta.pop(FISHER_META_KEY, None)
        if fisher is not None:
            fisher = {name: _numpy(value) for name, value in fisher.items() if name in floating}
        feedback = state.get("feedback")
        if feedback is None:
            feedback = state["feedback"] = ErrorFeedback(self.encode_config)
        message = feedback.encode(floating, fisher=fisher)
        raw_bytes = sum(array.nbytes for array in floating.values())
        meta[PAYLOAD_KEY] = {"raw_bytes": int(raw_bytes), "message_bytes": len(message)}
        self.log_info(fl_ctx, f"fstq: {len(floating)} tensors, {raw_bytes:,} bytes -> {len(message):,} bytes")
        return DXO(dxo.data_kind, data={**_payload(message), **others}, meta=meta)


class FstqModelSender(DXOFilter):
    """Server task-data filter: records the model results must match; optionally compresses it.

    Parameters
    ----------
    config : EncodeConfig or dict, optional
        Compress the outgoing global model (WEIGHTS) with these options; the clients'
        :class:`FstqModelReceiver` decodes it. None (default) sends it as it is. A lossy config
        makes the clients train from the decoded model; the server then rebuilds WEIGHTS results
        on that same decoded model.

    Raises
    ------
    TypeError, ValueError
        On an invalid config.
    """

    def __init__(self, config=None):
        super().__init__(supported_data_kinds=_KINDS, data_kinds_to_filter=[DataKind.WEIGHTS])
        self.encode_config = _config(config)
        self.config = None if self.encode_config is None else self.encode_config.get_config()
        self._cache_lock = threading.Lock()

    def process_dxo(self, dxo: DXO, shareable, fl_ctx):
        state = _state(fl_ctx, "server")
        if _marker(dxo) is not None:
            return None  # the same task data, already compressed for another client
        floating, others = _split_floating(dxo.data)
        if self.encode_config is None:
            state["expected"] = _expected_on_the_wire(floating)
            # A copy: the workflow may update its global model in place before a late result.
            state["reference"] = {name: np.array(array, copy=True) for name, array in floating.items()}
            return None
        with self._cache_lock:
            # One encoding per model: every client of the round gets the same bytes.
            cached = state.get("downlink")
            if cached is None or cached[0] is not dxo.data:
                message = encode(floating, config=self.encode_config)
                decoded = decode(message)
                cached = state["downlink"] = (dxo.data, message)
                state["expected"] = _expected_on_the_wire(decoded)
                state["reference"] = decoded
        meta = dict(dxo.meta)
        meta[PAYLOAD_KEY] = {"message_bytes": len(cached[1])}
        return DXO(dxo.data_kind, data={**_payload(cached[1]), **others}, meta=meta)


class FstqUpdateDecoder(DXOFilter):
    """Server task-result filter: decodes and validates each result; drops a bad one with its reason.

    A compressed result is checked against the model the server sent (names, shapes, dtypes, via
    :class:`FstqModelSender`, which must be in the server's ``task_data_filters``) under the
    decoder's limits, decoded, and handed on as the arrays the aggregator expects: the
    WEIGHT_DIFF, or for WEIGHTS the sent model plus the decoded difference. An uncompressed result
    is checked the same way (names, shapes, finite values) unless ``require_compressed``.

    Parameters
    ----------
    max_message_size : int
        Largest message accepted, in bytes (a decoder limit; the others are the defaults, and the
        output is bounded by the expected model anyway).
    require_compressed : bool
        Drop results that are not fstq messages.
    record_dir : str, optional
        Write ``events.jsonl`` (one line per result: round, site, accepted, reason, sizes) and each
        accepted decoded update as ``round<r>-<site>.npz`` here, for auditing and tests.

    Attributes
    ----------
    rejections : list of fstqcodec.Rejection
        The dropped results of this process (client: ``"<site>@round<r>"``).
    """

    def __init__(self, max_message_size: int = 1 << 31, require_compressed: bool = False, record_dir: str | None = None):
        super().__init__(supported_data_kinds=_KINDS, data_kinds_to_filter=_KINDS)
        self.max_message_size = max_message_size
        self.require_compressed = require_compressed
        self.record_dir = record_dir
        self.limits = Limits(max_message_size=max_message_size)
        self.rejections: list[Rejection] = []

    def process(self, shareable, fl_ctx):
        round_number, site = _round_and_site(shareable, fl_ctx)
        try:
            return super().process(shareable, fl_ctx)
        except _Dropped as dropped:
            self.rejections.append(Rejection(f"{site}@round{round_number}", dropped.reason, dropped.detail))
            self.log_warning(fl_ctx, f"fstq: dropped the result of {site} (round {round_number}): {dropped.reason}: {dropped.detail}")
            self._record(round_number, site, {"accepted": False, "reason": dropped.reason, "detail": dropped.detail})
            return make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)

    def process_dxo(self, dxo: DXO, shareable, fl_ctx):
        state = _state(fl_ctx, "server")
        expected = state.get("expected")
        if expected is None:
            raise _Dropped("NoExpectedModel", "no global model was recorded: add FstqModelSender to the server's task_data_filters")
        marker = _marker(dxo)
        if marker is None:
            if self.require_compressed:
                raise _Dropped("NotCompressed", "the result is not an fstq message")
            floating, _ = _split_floating(dxo.data)
            self._check_plain(floating, expected)
            return None
        message = _message_of(dxo)
        try:
            update = decode_expected(message, expected, self.limits)
        except _Rejected as rejected:
            raise _Dropped(rejected.reason, rejected.detail) from None
        arrays = update
        if dxo.data_kind == DataKind.WEIGHTS:
            reference = state["reference"]
            arrays = {name: (reference[name] + value).astype(reference[name].dtype) for name, value in update.items()}
        others = {k: v for k, v in dxo.data.items() if k != PAYLOAD_KEY}
        meta = {k: v for k, v in dxo.meta.items() if k != PAYLOAD_KEY}
        round_number, site = _round_and_site(shareable, fl_ctx)
        self._record(round_number, site, {"accepted": True, "message_bytes": len(message), "weight": meta.get(MetaKey.NUM_STEPS_CURRENT_ROUND)}, update)
        return DXO(dxo.data_kind, data={**arrays, **others}, meta=meta)

    @staticmethod
    def _check_plain(floating: dict, expected: dict) -> None:
        # Names and shapes: an uncompressed result may keep the model's own float dtype.
        described = [(name, tuple(a.shape), expected.get(name, (None, a.dtype.name))[1]) for name, a in floating.items()]
        problem = _mismatch(described, expected)
        if problem is not None:
            raise _Dropped("TensorMismatch", problem)
        for name, array in floating.items():
            if not np.isfinite(array).all():
                raise _Dropped("NonFinite", f"tensor {name!r} holds NaN or infinity")

    def _record(self, round_number, site, event: dict, update: dict | None = None) -> None:
        if self.record_dir is None:
            return
        os.makedirs(self.record_dir, exist_ok=True)
        with open(os.path.join(self.record_dir, "events.jsonl"), "a") as handle:
            handle.write(json.dumps({"round": round_number, "site": site, **event}) + "\n")
        if update is not None:
            np.savez(os.path.join(self.record_dir, f"round{round_number}-{site}.npz"), **update)


def _round_and_site(shareable, fl_ctx) -> tuple:
    """The round a result belongs to (its contribution cookie) and the site that sent it."""
    peer = fl_ctx.get_peer_context()
    site = peer.get_identity_name() if peer is not None else "?"
    return shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND, shareable.get_header(AppConstants.CURRENT_ROUND)), site


def _expected_on_the_wire(arrays: dict) -> dict:
    """What results must carry: the client's error feedback encodes float16/bfloat16 as float32."""
    return {name: (shape, "float64" if dtype == "float64" else "float32") for name, (shape, dtype) in expected_tensors(arrays).items()}
