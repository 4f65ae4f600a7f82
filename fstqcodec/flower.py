"""Flower adapter: compressed uplink (and optionally downlink) for Flower's Message API.

Two halves that talk through the train message's records, in the pattern of Flower's own
differential-privacy wrappers (a strategy wrapper on the server, a mod on the client):

* :class:`FstqStrategy` wraps any server strategy (``FedAvg`` or another, unchanged). Each round it
  adds a ``ConfigRecord`` named ``"fstq"`` to every train message, with that client's budget; if
  asked, it also replaces the global model by one fstq message (packed once per round). On the way
  back it decodes and validates every reply, rebuilds the plain arrays the wrapped strategy expects,
  drops what is malformed (with the reason logged and counted), and records the bytes moved.
* :class:`FstqMod` is a client mod (``ClientApp(mods=[FstqMod()])``). It decodes a compressed
  model, lets the app train on plain arrays, then replaces the reply's arrays with one fstq message
  of the update (trained model minus the model it received), with error feedback kept in the
  client's ``Context.state``. When the server did not ask for compression it changes nothing, so
  the mod can be deployed before the server switches compression on.

What travels (the adapter's protocol, version :data:`PROTOCOL_VERSION`)
------------------------------------------------------------------------
Server to client, in the train message:

* ``ConfigRecord "fstq"``: ``version`` (int), ``uplink`` (``"lossless"`` or ``"budget"``),
  ``budget-unit`` (``"bits_per_param"``, ``"max_bytes"`` or ``"ratio"``) and ``budget-value`` when
  ``uplink == "budget"``, ``error-feedback`` (bool), ``seed`` (int), ``round`` (int, the server
  round), ``last-accepted-round`` (int: the latest round whose reply from this node the server
  accepted, 0 if none) and optionally ``block-size`` and ``fisher-power``. The mod removes this
  record before the app sees the message.
* When the downlink is compressed, the model's ``ArrayRecord`` holds a single ``Array`` named
  ``"fstq"`` whose ``stype`` is :data:`STYPE_MODEL` and whose data is the fstq message. An
  application without the mod fails loudly on it (``Array.numpy()`` raises ``TypeError``) rather
  than training on garbage.

Client to server, in the train reply:

* The reply's model ``ArrayRecord`` holds a single ``Array`` named ``"fstq"`` whose ``stype`` is
  :data:`STYPE_UPDATE` and whose data is an fstq message of the update ``trained - received``,
  keyed by the model's tensor names.

Fisher information from the application
---------------------------------------
An app that estimates a diagonal Fisher (for instance with the PEFT adapter's accumulator) puts it
in its reply as a second ``ArrayRecord`` named ``"fisher"`` (configurable), with the same names and
shapes as the model's arrays. The mod hands it to the encoder and strips it from the reply, so it
never leaves the client. Without it the encoder weighs every parameter alike. With a PEFT model::

    accumulator = fstqcodec.torch.FisherAccumulator(model)     # before local training
    ...                                                        # train as usual
    fisher = fstqcodec.peft.adapter_fisher(accumulator, model)  # keyed like the adapter state
    content["fisher"] = ArrayRecord({k: Array(v) for k, v in fisher.items()})

``integrations/flower-app`` is a complete app built this way.

FlowerTune's communication tracker
----------------------------------
FlowerTune's ``CommunicationTracker`` sums ``len(array.data)`` of the messages returned by
``configure_train`` and of the replies given to ``aggregate_train``. To make it count the bytes
that actually travel, subclass :class:`FstqStrategy` (instead of ``FedAvg``) and call the tracker
*after* ``super().configure_train(...)`` and *before* ``super().aggregate_train(...)``; pass the
``FedAvg`` as the wrapped strategy. Wrapping a tracking ``FedAvg`` subclass inside
``FstqStrategy`` instead would make it count decoded, uncompressed arrays::

    class FlowerTuneLlm(FstqStrategy):
        def __init__(self, budget, **fedavg_kwargs):
            super().__init__(FedAvg(**fedavg_kwargs), budget=budget)
            self.comm_tracker = CommunicationTracker()

        def configure_train(self, server_round, arrays, config, grid):
            messages = list(super().configure_train(server_round, arrays, config, grid))
            self.comm_tracker.track(messages)  # compressed downlink (or plain, if not compressed)
            return messages

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            self.comm_tracker.track(replies)  # compressed uplink, as received
            return super().aggregate_train(server_round, replies)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, Union

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

import fstqcodec
from fstqcodec.policy.fisher import check_fisher_power

__all__ = [
    "FstqMod",
    "FstqStrategy",
    "LinkBudget",
    "DroppedReply",
    "RoundTraffic",
    "PROTOCOL_VERSION",
    "CONFIG_RECORD",
    "FISHER_RECORD",
    "MESSAGE_ARRAY",
    "STYPE_MODEL",
    "STYPE_UPDATE",
]

# A child of Flower's logger: what the adapter reports (dropped replies above all) shows up in
# Flower's console and in the logs `flwr run --stream` / `flwr log` relay from a ServerApp.
logger = logging.getLogger("flwr").getChild("fstqcodec")

#: Version of the adapter's protocol (the record names and config keys below). A mod refuses a
#: train message that declares a newer version instead of guessing what it means.
PROTOCOL_VERSION = 1
#: Name of the ``ConfigRecord`` that carries the server's compression request.
CONFIG_RECORD = "fstq"
#: Default name of the ``ArrayRecord`` in which an app hands its diagonal Fisher to the mod.
FISHER_RECORD = "fisher"
#: Name of the single ``Array`` that holds an fstq message inside an ``ArrayRecord``.
MESSAGE_ARRAY = "fstq"
#: ``Array.stype`` of a compressed global model (downlink).
STYPE_MODEL = "fstqcodec.model"
#: ``Array.stype`` of a compressed client update, trained minus received model (uplink).
STYPE_UPDATE = "fstqcodec.update"
#: Default key under which the mod keeps its error-feedback residual in ``Context.state``.
RESIDUAL_STATE = "fstq.residual"

# Flower's ErrorCode.MOD_FAILED_PRECONDITION (flwr.common.constant), the code Flower's own mods
# use for replies they refuse to produce; copied because flwr.common is not part of Flower's
# stable ``flwr.app`` surface.
_MOD_FAILED_PRECONDITION = 6

_BUDGET_UNITS = ("bits_per_param", "max_bytes", "ratio")

#: What a client mod calls next: the next mod, or the app (Flower's ``ClientAppCallable``, restated
#: here because its module is not part of Flower's stable ``flwr.app`` surface).
ClientAppCallable = Callable[[Message, Context], Message]

BudgetSpec = Union["fstqcodec.Budget", None, Callable[[int, int], "fstqcodec.Budget | None"]]


# --------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinkBudget:
    """Give each client the bytes its uplink can carry within the round's deadline.

    An instance is a callable ``(node_id, server_round) -> Budget`` and can be passed as
    ``FstqStrategy(budget=...)``. Each client's budget is
    ``fstqcodec.Budget.for_link(bandwidth_bps, deadline_s)``: the whole fstq message, every byte
    counted, fits in what its link carries before the deadline.

    Parameters
    ----------
    bandwidth_bps : Mapping[int, float] or Callable[[int], float]
        The uplink bandwidth of each client in bits per second, by Flower node id.
    deadline_s : float
        Seconds each client may spend sending its update.
    default_bps : float or None
        Bandwidth assumed for a node missing from the mapping; ``None`` makes a missing node an
        error (``KeyError``), so that a mistake in the node ids does not pass silently.

    Raises
    ------
    ValueError
        If ``deadline_s`` or ``default_bps`` is not positive and finite.

    Examples
    --------
    >>> budget = LinkBudget({101: 8e6, 202: 1e6}, deadline_s=2.0)
    >>> budget(202, server_round=1)
    Budget(max_bytes=250000)
    """

    bandwidth_bps: Mapping[int, float] | Callable[[int], float]
    deadline_s: float
    default_bps: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.deadline_s) and self.deadline_s > 0):
            raise ValueError(f"deadline_s must be positive and finite, got {self.deadline_s!r}")
        if self.default_bps is not None and not (
            math.isfinite(self.default_bps) and self.default_bps > 0
        ):
            raise ValueError(f"default_bps must be positive and finite, got {self.default_bps!r}")

    def __call__(self, node_id: int, server_round: int) -> fstqcodec.Budget:
        """Return the budget of ``node_id`` (the round does not change it)."""
        if callable(self.bandwidth_bps):
            bandwidth = self.bandwidth_bps(node_id)
        elif node_id in self.bandwidth_bps:
            bandwidth = self.bandwidth_bps[node_id]
        elif self.default_bps is not None:
            bandwidth = self.default_bps
        else:
            raise KeyError(f"LinkBudget has no bandwidth for node {node_id} and no default")
        if not (math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"bandwidth of node {node_id} must be positive, got {bandwidth!r}")
        return fstqcodec.Budget.for_link(bandwidth_bps=bandwidth, deadline_s=self.deadline_s)


def _budget_to_config(budget: fstqcodec.Budget | None) -> dict[str, str | float]:
    """Describe a budget (``None`` = lossless) as ConfigRecord entries."""
    if budget is None:
        return {"uplink": "lossless"}
    given = [(unit, getattr(budget, unit, None)) for unit in _BUDGET_UNITS]
    given = [(unit, value) for unit, value in given if value is not None]
    if len(given) != 1:
        raise TypeError(f"expected an fstqcodec.Budget with exactly one unit set, got {budget!r}")
    unit, value = given[0]
    return {"uplink": "budget", "budget-unit": unit, "budget-value": float(value)}


def _budget_from_config(config: ConfigRecord) -> fstqcodec.Budget | None:
    """Inverse of :func:`_budget_to_config`; raises ``ValueError`` on a malformed request."""
    uplink = config.get("uplink")
    if uplink == "lossless":
        return None
    if uplink != "budget":
        raise ValueError(f"unknown uplink mode {uplink!r} (expected 'lossless' or 'budget')")
    unit, value = config.get("budget-unit"), config.get("budget-value")
    if unit not in _BUDGET_UNITS:
        raise ValueError(f"unknown budget unit {unit!r} (expected one of {_BUDGET_UNITS})")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"budget-value must be a finite number, got {value!r}")
    if unit == "max_bytes":
        return fstqcodec.Budget(max_bytes=int(value))
    return fstqcodec.Budget(**{unit: float(value)})


# --------------------------------------------------------------------------------------------
# Records <-> fstq messages
# --------------------------------------------------------------------------------------------


def _message_record(data: bytes, stype: str) -> ArrayRecord:
    """Wrap an fstq message as an ArrayRecord with one opaque Array (bytes as uint8)."""
    return ArrayRecord(
        {MESSAGE_ARRAY: Array(dtype="uint8", shape=(len(data),), stype=stype, data=bytes(data))}
    )


def _message_bytes(record: ArrayRecord, stype: str) -> bytes | None:
    """The fstq message held by ``record``, or ``None`` if it holds plain arrays."""
    arrays = list(record.values())
    if any(array.stype == stype for array in arrays):
        if len(arrays) != 1 or MESSAGE_ARRAY not in record:
            raise _Rejected(
                f"an ArrayRecord with a {stype!r} Array must hold exactly that one Array, "
                f"named {MESSAGE_ARRAY!r}; found {sorted(record.keys())}"
            )
        return arrays[0].data
    return None


def _plain_tensors(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Tensors of an ArrayRecord of NumPy arrays, in the record's order."""
    return {name: array.numpy() for name, array in record.items()}


def _numpy_record(tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in tensors.items()})


def _update_dtype(dtype: np.dtype) -> np.dtype:
    """Arithmetic dtype of an update: float32, or float64 for float64 models."""
    return np.result_type(dtype, np.float32)


def _check_same_tensors(
    got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], what: str
) -> str | None:
    """Why ``got`` does not match ``expected`` by names, shapes and finiteness, or ``None``."""
    missing = [name for name in expected if name not in got]
    unexpected = [name for name in got if name not in expected]
    if missing or unexpected:
        return (
            f"wrong tensors in {what}: missing {_short_list(missing)}, "
            f"unexpected {_short_list(unexpected)}"
        )
    for name, reference in expected.items():
        value = got[name]
        if tuple(value.shape) != tuple(reference.shape):
            return (
                f"wrong shape in {what}: {name!r} is {tuple(value.shape)}, "
                f"expected {tuple(reference.shape)}"
            )
        if not np.issubdtype(value.dtype, np.floating):
            return f"{what}: {name!r} has dtype {value.dtype}, expected a floating-point dtype"
        if not np.all(np.isfinite(value)):
            return f"non-finite values in {what}: {name!r}"
    return None


def _short_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return f"[{shown}{more}]"


class _Rejected(Exception):
    """Internal: a record is not acceptable; ``args[0]`` is the reason, for logs and metrics."""


def _require_same_tensors(got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], what: str) -> None:
    """Raise :class:`_Rejected` unless ``got`` matches ``expected`` (see :func:`_check_same_tensors`)."""
    reason = _check_same_tensors(got, expected, what)
    if reason is not None:
        raise _Rejected(reason)


def _matching_tensors(record: ArrayRecord, expected: Mapping[str, np.ndarray], what: str, *, unreadable: str) -> dict:
    """The NumPy tensors of ``record``, which must match ``expected``; else :class:`_Rejected`."""
    try:
        tensors = _plain_tensors(record)
    except TypeError as err:
        raise _Rejected(f"{unreadable}: {err}") from None
    _require_same_tensors(tensors, expected, what)
    return tensors


# --------------------------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------------------------


class FstqMod:
    """Client mod that sends fstq-compressed updates when the server asks for them.

    On every message it decodes a compressed global model (an ``ArrayRecord`` whose ``Array`` has
    ``stype`` :data:`STYPE_MODEL`) into plain arrays before the app sees it. On a train message
    whose ``ConfigRecord "fstq"`` asks for compression, it then lets the app train and replaces the
    reply's model ``ArrayRecord`` by one fstq message of ``trained - received``, encoded under the
    budget the server chose for this client. Without that record the reply passes unchanged.

    Error feedback (when the server enables it): what the message lost is kept in
    ``context.state[state_key]`` (an ``ArrayRecord``) and added to the next round's update, so the
    compression error is not lost but delayed. The residual is discarded when the model's tensor
    names or shapes change. The mod also keeps the last message's whole update (in
    ``context.state[state_key + ".sent"]``, with its round): if the server's next request says
    that round's reply was never accepted (lost, late, or dropped as broken), that update goes
    back into the residual instead of being lost.

    Place it first (outermost) in ``ClientApp(mods=[...])``, outside clipping or local-DP mods,
    so that those see plain arrays. It cannot be combined with secure aggregation (SecAgg+), which
    needs the plain arrays on the wire. Flower's ``message_size_mod`` placed before it logs the
    compressed sizes that travel; placed after it, the plain sizes the app handles.

    Only floating-point arrays can be sent this way (an integer buffer in the model makes the mod
    answer with an error reply naming it).

    Parameters
    ----------
    limits : fstqcodec.Limits or None
        Limits for decoding the server's compressed model; ``None`` means the library's safe
        defaults.
    fisher_record : str
        Name of the ``ArrayRecord`` in the app's reply that holds its diagonal Fisher estimate
        (same names and shapes as the model). It is consumed and removed from the reply.
    state_key : str
        Key of the error-feedback residual in ``Context.state``.

    Examples
    --------
    >>> from flwr.clientapp import ClientApp
    >>> app = ClientApp(mods=[FstqMod()])  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        limits: fstqcodec.Limits | None = None,
        fisher_record: str = FISHER_RECORD,
        state_key: str = RESIDUAL_STATE,
    ) -> None:
        self.limits = limits
        self.fisher_record = fisher_record
        self.state_key = state_key

    def __repr__(self) -> str:
        return (
            f"FstqMod(limits={self.limits!r}, fisher_record={self.fisher_record!r}, "
            f"state_key={self.state_key!r})"
        )

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        """Decode the downlink, run the app, and compress its update if the server asked.

        Parameters
        ----------
        msg : Message
            The message from the ServerApp.
        ctxt : Context
            The ClientApp's context; its ``state`` keeps the error-feedback residual.
        call_next : ClientAppCallable
            The next mod, or the app itself.

        Returns
        -------
        Message
            The app's reply, its model replaced by an fstq message when compression was asked
            for; or an error reply (``MOD_FAILED_PRECONDITION``) saying why the mod could not do
            what was asked (an undecodable model, a reply with other tensors than the model, an
            update the encoder refuses such as one with NaNs, ...).
        """
        if not msg.has_content():
            return call_next(msg, ctxt)

        try:
            content, request = self._unpack_incoming(msg.content)
        except (fstqcodec.DecodeError, _Rejected, ValueError) as err:
            return _error_reply(msg, f"FstqMod could not read the server's message: {err}")

        if request is None or not _is_train(msg):
            return _call_with_content(call_next, msg, ctxt, content)

        try:
            budget = _budget_from_config(request)
            _, received = _the_model(content, "the train message")
        except (ValueError, _Rejected) as err:
            return _error_reply(msg, f"FstqMod: {err}")

        reply = _call_with_content(call_next, msg, ctxt, content)
        if reply.has_error():
            return reply

        try:
            return self._compress_reply(reply, ctxt, received, budget, request)
        except (_Rejected, fstqcodec.EncodeError, fstqcodec.DecodeError) as err:
            # DecodeError here would mean the encoder wrote a message it cannot read back (a
            # core bug); report it to the server instead of crashing the node.
            return _error_reply(msg, f"FstqMod could not compress the update: {err}")

    def _unpack_incoming(self, content: RecordDict) -> tuple[RecordDict, ConfigRecord | None]:
        """Decode compressed models and take out the "fstq" ConfigRecord."""
        request = content.config_records.get(CONFIG_RECORD)
        if request is not None:
            version = request.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise _Rejected(f"the {CONFIG_RECORD!r} ConfigRecord has no valid 'version'")
            if version > PROTOCOL_VERSION:
                raise _Rejected(
                    f"the server speaks fstq adapter protocol {version}, this client only "
                    f"{PROTOCOL_VERSION}; upgrade fstqcodec on the client"
                )
        unpacked = RecordDict()
        for key, record in content.items():
            if key == CONFIG_RECORD and request is not None:
                continue  # consumed here: the app sees the message it would have seen
            if isinstance(record, ArrayRecord):
                data = _message_bytes(record, STYPE_MODEL)
                if data is not None:
                    record = _numpy_record(fstqcodec.decode(data, limits=self.limits))
            unpacked[key] = record
        return unpacked, request

    def _compress_reply(
        self,
        reply: Message,
        ctxt: Context,
        received: dict[str, np.ndarray],
        budget: fstqcodec.Budget | None,
        request: ConfigRecord,
    ) -> Message:
        fisher_record = reply.content.array_records.get(self.fisher_record)
        model_records = {
            key: record
            for key, record in reply.content.array_records.items()
            if key != self.fisher_record
        }
        if len(model_records) != 1:
            raise _Rejected(
                "the app's reply must hold exactly one model ArrayRecord (besides "
                f"{self.fisher_record!r}), found {sorted(model_records)}"
            )
        (model_key, model_record), = model_records.items()
        trained = _matching_tensors(
            model_record, received, "the app's reply", unreadable="the app's reply does not hold NumPy arrays"
        )

        update = {
            name: np.subtract(trained[name], reference, dtype=_update_dtype(reference.dtype))
            for name, reference in received.items()
        }
        fisher = None
        if fisher_record is not None:
            what = f"the {self.fisher_record!r} record"
            fisher = _matching_tensors(fisher_record, received, what, unreadable=f"{what} is not NumPy")
            if any(np.any(values < 0) for values in fisher.values()):
                raise _Rejected(f"the {self.fisher_record!r} record has negative values")

        options = {}
        if "seed" in request:
            options["seed"] = int(request["seed"])
        if "block-size" in request:
            options["block_size"] = int(request["block-size"])
        if "fisher-power" in request:
            options["fisher_power"] = float(request["fisher-power"])

        if bool(request.get("error-feedback", False)):
            feedback = self._load_feedback(ctxt, update, request)
            data = feedback.encode(update, fisher=fisher, budget=budget, **options)
            ctxt.state[self.state_key] = _numpy_record(dict(feedback.residual))
            if "round" in request:
                # What this message carries in full (update + residual), in case it never arrives.
                ctxt.state[self._sent_key] = _numpy_record(dict(feedback.last_update))
                ctxt.state[self._sent_round_key] = ConfigRecord({"round": int(request["round"])})
        else:
            for key in (self.state_key, self._sent_key, self._sent_round_key):
                if key in ctxt.state:
                    del ctxt.state[key]  # a stale residual must not leak into a later run
            data = fstqcodec.encode(update, fisher=fisher, budget=budget, **options)

        compressed = RecordDict()
        for key, record in reply.content.items():
            if key == self.fisher_record and isinstance(record, ArrayRecord):
                continue  # Fisher stays on the client
            compressed[key] = _message_record(data, STYPE_UPDATE) if key == model_key else record
        reply.content = compressed
        return reply

    @property
    def _sent_key(self) -> str:
        return self.state_key + ".sent"

    @property
    def _sent_round_key(self) -> str:
        return self.state_key + ".sent-round"

    def _load_feedback(
        self, ctxt: Context, update: Mapping[str, np.ndarray], request: ConfigRecord
    ) -> fstqcodec.ErrorFeedback:
        """An ErrorFeedback holding the residual kept in the context, if it still fits.

        If the server says the last message sent was never accepted, the residual is that
        message's whole update instead (what :meth:`fstqcodec.ErrorFeedback.message_lost` does).
        """
        feedback = fstqcodec.ErrorFeedback()
        stored = ctxt.state.array_records.get(self.state_key)
        if stored is None:
            return feedback
        sent_round = ctxt.state.config_records.get(self._sent_round_key)
        accepted = request.get("last-accepted-round")
        if sent_round is not None and self._sent_key in ctxt.state and isinstance(accepted, int) \
                and accepted < int(sent_round["round"]):
            logger.info("FstqMod: the server never accepted the reply of round %s; keeping its update",
                        sent_round["round"])
            stored = ctxt.state.array_records[self._sent_key]
        residual = _plain_tensors(stored)
        if _check_same_tensors(residual, update, "the stored residual") is not None:
            logger.info("FstqMod: the model changed; discarding the error-feedback residual")
            return feedback
        _restore_residual(feedback, residual)
        return feedback


def _restore_residual(
    feedback: fstqcodec.ErrorFeedback, residual: Mapping[str, np.ndarray]
) -> None:
    """Put a residual saved in a previous round back into a fresh ErrorFeedback."""
    feedback.residual = {name: np.array(value) for name, value in residual.items()}


def _call_with_content(
    call_next: ClientAppCallable, msg: Message, ctxt: Context, content: RecordDict
) -> Message:
    """Run the rest of the chain on ``msg`` holding ``content``, then restore what it held.

    The incoming message is the runtime's object; it is lent to the app with the decoded content
    and handed back unchanged, so that nothing outside this mod sees the swap.
    """
    original = msg.content
    msg.content = content
    try:
        return call_next(msg, ctxt)
    finally:
        msg.content = original


def _is_train(msg: Message) -> bool:
    message_type = msg.metadata.message_type
    return message_type == MessageType.TRAIN or message_type.startswith(MessageType.TRAIN + ".")


def _the_model(content: RecordDict, what: str) -> tuple[str, dict[str, np.ndarray]]:
    """The one model ArrayRecord of a message, as NumPy arrays."""
    records = content.array_records
    if len(records) != 1:
        raise _Rejected(f"{what} must hold exactly one ArrayRecord, found {sorted(records)}")
    (key, record), = records.items()
    try:
        return key, _plain_tensors(record)
    except TypeError as err:
        raise _Rejected(f"{what} does not hold NumPy arrays: {err}") from None


def _error_reply(msg: Message, reason: str) -> Message:
    logger.error(reason)
    return Message(Error(code=_MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


# --------------------------------------------------------------------------------------------
# Server side
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DroppedReply:
    """A reply the server refused, and why.

    Attributes
    ----------
    server_round : int
        The round it belonged to.
    node_id : int
        The Flower node that sent it.
    reason : str
        Why it was dropped (decode error, wrong tensors, non-finite values, ...).
    """

    server_round: int
    node_id: int
    reason: str


@dataclasses.dataclass
class RoundTraffic:
    """Bytes moved in one round, as Flower counts them (``ArrayRecord.count_bytes()``).

    Attributes
    ----------
    downlink_bytes : int
        Array bytes of all train messages sent (the global model, compressed or not, once per
        client).
    evaluate_downlink_bytes : int
        Array bytes of all evaluate messages sent.
    uplink_bytes : int
        Array bytes of all train replies received with content, dropped ones included.
    uplink_bytes_decoded : int
        What the accepted replies weigh once decoded into plain arrays: what they would have cost
        uncompressed.
    replies_accepted : int
        Replies handed to the wrapped strategy.
    dropped : list of DroppedReply
        Replies refused, with their reasons.
    """

    downlink_bytes: int = 0
    evaluate_downlink_bytes: int = 0
    uplink_bytes: int = 0
    uplink_bytes_decoded: int = 0
    replies_accepted: int = 0
    dropped: list[DroppedReply] = dataclasses.field(default_factory=list)


class FstqStrategy(Strategy):
    """Strategy wrapper: ask clients for fstq-compressed updates and decode them for a strategy.

    ``configure_train`` asks the wrapped strategy for its messages, then gives each a copy of its
    records plus a ``ConfigRecord "fstq"`` with that client's budget (the wrapped strategy may
    share one ``RecordDict`` among all its messages, as ``FedAvg`` does, so nothing it built is
    modified). ``aggregate_train`` decodes each reply's update, checks its tensor names, shapes and
    values against the model the client received, rebuilds the client's model as
    ``received + update`` in plain arrays, and hands the accepted replies to the wrapped strategy.
    A reply that fails any check is dropped: the reason is logged, kept in :attr:`traffic` and
    counted in the round's metrics, and the round goes on with the others. A client without
    :class:`FstqMod` ignores the request and sends plain arrays; those are validated and accepted.

    Per round it adds to the train metrics returned by the wrapped strategy:
    ``fstq.uplink-bytes``, ``fstq.uplink-bytes-decoded``, ``fstq.downlink-bytes``,
    ``fstq.replies-accepted`` and ``fstq.replies-dropped``; and ``fstq.downlink-bytes`` to the
    evaluate metrics. All counts are Flower's own ``ArrayRecord.count_bytes()``.

    Parameters
    ----------
    strategy : Strategy
        The strategy to wrap (``FedAvg`` or any other); it receives plain arrays as usual.
    budget : fstqcodec.Budget, callable or None
        The uplink budget: one :class:`fstqcodec.Budget` for every client, or a callable
        ``(node_id, server_round) -> Budget | None`` (such as :class:`LinkBudget`) for a budget
        per client. ``None`` asks for lossless compression.
    downlink : {None, "lossless"} or fstqcodec.Budget
        How the global model travels to clients: plain arrays (``None``), one lossless fstq
        message, or one fstq message under that budget. A compressed downlink requires
        :class:`FstqMod` on every client. With a lossy downlink each client trains from the model
        it decoded, and the server rebuilds its model from that same decoded model (the server
        decodes its own message, which is deterministic), so the wrapped strategy sees exactly
        the models the clients hold.
    error_feedback : bool
        Whether clients keep what compression lost and add it to their next update.
    block_size : int or None
        Block size for the encoder; ``None`` leaves the encoder's default.
    fisher_power : float or None
        Clients weigh their Fisher as ``F ** fisher_power`` (see :func:`fstqcodec.encode`);
        ``None`` leaves the encoder's default (1).
    seed : int
        Base of the per-client, per-round encoder seeds, so runs are reproducible.
    limits : fstqcodec.Limits or None
        Limits for decoding replies (untrusted bytes); ``None`` means the library's safe defaults.

    Raises
    ------
    TypeError
        If ``strategy`` is not a Flower ``Strategy`` or ``downlink`` is not one of the values above.

    Attributes
    ----------
    traffic : dict[int, RoundTraffic]
        Bytes and dropped replies per round.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        budget: BudgetSpec = None,
        downlink: Literal["lossless"] | fstqcodec.Budget | None = None,
        error_feedback: bool = True,
        block_size: int | None = None,
        fisher_power: float | None = None,
        seed: int = 0,
        limits: fstqcodec.Limits | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a flwr Strategy, got {type(strategy).__name__}")
        if not (downlink is None or downlink == "lossless" or isinstance(downlink, fstqcodec.Budget)):
            raise TypeError(f"downlink must be None, 'lossless' or a Budget, got {downlink!r}")
        if budget is not None and not callable(budget):
            _budget_to_config(budget)  # fail now, not in round 1, on a malformed budget
        self.strategy = strategy
        self.budget = budget
        self.downlink = downlink
        self.error_feedback = error_feedback
        self.block_size = block_size
        # Checked now, not in every client's round 1.
        self.fisher_power = None if fisher_power is None else check_fisher_power(fisher_power)
        self.seed = seed
        self.limits = limits
        self.traffic: dict[int, RoundTraffic] = {}
        # node_id -> the latest round whose train reply from it was accepted (told to the client,
        # whose error feedback then keeps an update that never arrived).
        self._last_accepted: dict[int, int] = {}
        # server_round -> the model each client of that round received (decoded), which is the
        # reference its update is relative to.
        self._references: dict[int, dict[str, np.ndarray]] = {}
        # (global ArrayRecord, its downlink record or None, what clients decode): the global model
        # is packed once per round and reused for every message, train and evaluate alike.
        self._packed: tuple[ArrayRecord, ArrayRecord | None, dict[str, np.ndarray]] | None = None

    def __repr__(self) -> str:
        return (
            f"FstqStrategy({self.strategy!r}, budget={self.budget!r}, downlink={self.downlink!r}, "
            f"error_feedback={self.error_feedback!r})"
        )

    @property
    def dropped_replies(self) -> list[DroppedReply]:
        """Every reply dropped so far, in order."""
        return [drop for traffic in self.traffic.values() for drop in traffic.dropped]

    def summary(self) -> None:
        """Log the compression settings, then the wrapped strategy's summary."""
        logger.info(
            "FstqStrategy: uplink budget %r, downlink %r, error feedback %s",
            self.budget,
            self.downlink,
            self.error_feedback,
        )
        self.strategy.summary()

    # -- downlink ------------------------------------------------------------------------------

    def _pack(self, arrays: ArrayRecord) -> tuple[ArrayRecord | None, dict[str, np.ndarray]]:
        """The downlink record for ``arrays`` (None = send as is) and what clients will hold."""
        if self._packed is not None and self._packed[0] is arrays:
            return self._packed[1], self._packed[2]
        tensors = _plain_tensors(arrays)
        if self.downlink is None:
            record, received = None, tensors
        else:
            budget = None if self.downlink == "lossless" else self.downlink
            data = fstqcodec.encode(tensors, budget=budget, **self._encoder_options())
            record = _message_record(data, STYPE_MODEL)
            received = fstqcodec.decode(data, limits=self.limits)
        self._packed = (arrays, record, received)
        return record, received

    def _encoder_options(self) -> dict[str, int]:
        options = {"seed": self.seed}
        if self.block_size is not None:
            options["block_size"] = self.block_size
        return options

    def _client_request(self, server_round: int, node_id: int) -> ConfigRecord:
        budget = self.budget(node_id, server_round) if callable(self.budget) else self.budget
        request: dict[str, int | float | str | bool] = {"version": PROTOCOL_VERSION}
        request.update(_budget_to_config(budget))
        request["error-feedback"] = bool(self.error_feedback)
        # Distinct per client and round, reproducible across runs.
        request["seed"] = (self.seed * 1_000_003 + server_round * 10_007 + node_id) % (1 << 31)
        request["round"] = int(server_round)
        request["last-accepted-round"] = int(self._last_accepted.get(node_id, 0))
        if self.block_size is not None:
            request["block-size"] = int(self.block_size)
        if self.fisher_power is not None:
            request["fisher-power"] = float(self.fisher_power)
        return ConfigRecord(request)

    def _repack_messages(
        self,
        messages: Iterable[Message],
        arrays: ArrayRecord,
        downlink_record: ArrayRecord | None,
        request_for: Callable[[int], ConfigRecord] | None,
    ) -> tuple[list[Message], int]:
        """Give each message its own RecordDict with the downlink (and request) swapped in."""
        messages = list(messages)
        if downlink_record is None and request_for is None:
            # Nothing to swap in: send the wrapped strategy's messages as they are.
            sent = sum(r.count_bytes() for m in messages for r in m.content.array_records.values())
            return messages, sent
        sent_bytes = 0
        for message in messages:
            content = message.content
            if request_for is not None and CONFIG_RECORD in content:
                raise ValueError(
                    f"the wrapped strategy already uses the record name {CONFIG_RECORD!r}"
                )
            repacked = RecordDict()
            for key, record in content.items():
                if downlink_record is not None and _is_global_model(record, arrays):
                    record = downlink_record
                repacked[key] = record
            if request_for is not None:
                repacked[CONFIG_RECORD] = request_for(message.metadata.dst_node_id)
            message.content = repacked
            sent_bytes += sum(record.count_bytes() for record in repacked.array_records.values())
        return messages, sent_bytes

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the round with the wrapped strategy, then add compression to each message."""
        downlink_record, received = self._pack(arrays)
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        messages, sent_bytes = self._repack_messages(
            messages,
            arrays,
            downlink_record,
            lambda node_id: self._client_request(server_round, node_id),
        )
        self._references[server_round] = received
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        traffic.downlink_bytes += sent_bytes
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure evaluation with the wrapped strategy; compress its model if asked."""
        downlink_record, _ = self._pack(arrays)
        messages = self.strategy.configure_evaluate(server_round, arrays, config, grid)
        messages, sent_bytes = self._repack_messages(messages, arrays, downlink_record, None)
        self.traffic.setdefault(server_round, RoundTraffic()).evaluate_downlink_bytes += sent_bytes
        return messages

    # -- uplink --------------------------------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and validate the replies, then aggregate the accepted ones.

        Raises
        ------
        RuntimeError
            If ``configure_train`` did not configure ``server_round`` on this instance.
        """
        if server_round not in self._references:
            raise RuntimeError(
                f"FstqStrategy.aggregate_train: round {server_round} was not configured by this "
                "strategy's configure_train, so there is no reference model for its updates"
            )
        received = self._references.pop(server_round)
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        accepted: list[Message] = []
        for reply in replies:
            if reply.has_error():
                accepted.append(reply)  # the wrapped strategy logs and counts failures its way
                continue
            traffic.uplink_bytes += sum(r.count_bytes() for r in reply.content.array_records.values())
            try:
                reply.content = self._restore(reply.content, received)
            except _Rejected as rejection:
                drop = DroppedReply(server_round, reply.metadata.src_node_id, str(rejection))
                traffic.dropped.append(drop)
                logger.warning(
                    "FstqStrategy: round %d: dropped the reply of node %d: %s",
                    drop.server_round,
                    drop.node_id,
                    drop.reason,
                )
                continue
            traffic.uplink_bytes_decoded += sum(
                r.count_bytes() for r in reply.content.array_records.values()
            )
            traffic.replies_accepted += 1
            node = reply.metadata.src_node_id
            self._last_accepted[node] = max(server_round, self._last_accepted.get(node, 0))
            accepted.append(reply)

        arrays, metrics = self.strategy.aggregate_train(server_round, accepted)
        metrics = MetricRecord() if metrics is None else metrics
        metrics["fstq.uplink-bytes"] = traffic.uplink_bytes
        metrics["fstq.uplink-bytes-decoded"] = traffic.uplink_bytes_decoded
        metrics["fstq.downlink-bytes"] = traffic.downlink_bytes
        metrics["fstq.replies-accepted"] = traffic.replies_accepted
        metrics["fstq.replies-dropped"] = len(traffic.dropped)
        return arrays, metrics

    def _restore(self, content: RecordDict, received: dict[str, np.ndarray]) -> RecordDict:
        """The reply's content with its update rebuilt into the client's model (plain arrays)."""
        records = content.array_records
        if len(records) != 1:
            raise _Rejected(f"expected exactly one ArrayRecord in the reply, found {sorted(records)}")
        (key, record), = records.items()
        data = _message_bytes(record, STYPE_UPDATE)
        if data is None:
            # A client without FstqMod sent its model in plain arrays: accept it if it fits.
            _matching_tensors(record, received, "the reply", unreadable="unreadable arrays")
            return content
        try:
            update = fstqcodec.decode(data, limits=self.limits)
        except fstqcodec.DecodeError as err:
            raise _Rejected(f"undecodable update ({type(err).__name__}: {err})") from None
        _require_same_tensors(update, received, "the decoded update")
        model = {}
        for name, reference in received.items():
            rebuilt = np.add(reference, update[name], dtype=_update_dtype(reference.dtype))
            model[name] = rebuilt.astype(reference.dtype, copy=False)
        restored = RecordDict()
        for record_key, value in content.items():
            restored[record_key] = _numpy_record(model) if record_key == key else value
        return restored

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate with the wrapped strategy and add the evaluate downlink bytes."""
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        traffic = self.traffic.get(server_round)
        if metrics is not None and traffic is not None:
            metrics["fstq.downlink-bytes"] = traffic.evaluate_downlink_bytes
        return metrics


def _is_global_model(record: object, arrays: ArrayRecord) -> bool:
    """Whether a record in a strategy's message is the global model it was given."""
    if record is arrays:
        return True
    # A strategy may copy the record; same names and the very same Array objects is the same model.
    return (
        isinstance(record, ArrayRecord)
        and list(record.keys()) == list(arrays.keys())
        and all(record[name] is arrays[name] for name in arrays.keys())
    )
