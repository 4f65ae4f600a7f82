"""Client side of the fstq Flower protocol: :class:`FstqMod` (``spec/FLOWER.md``).

Imports nothing from ``flwr.serverapp`` nor from :mod:`fstqcodec.flower.strategy`, so a client
process loads no server code.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict

import fstqcodec
from fstqcodec.proxy import fill_hidden, read_proxy

from .protocol import (
    CONFIG_RECORD,
    FISHER_RECORD,
    MOD_FAILED_PRECONDITION,
    RESIDUAL_STATE,
    STYPE_MODEL,
    STYPE_PROXY,
    STYPE_UPDATE,
    ProtocolError,
    TrainRequest,
    check_same_tensors,
    check_version,
    matching_tensors,
    message_bytes,
    message_record,
    numpy_record,
    plain_tensors,
    read_proxy_fill,
    update_dtype,
)

__all__ = ["FstqMod", "PROXY_PREVIOUS_STATE", "PROXY_RECEIVED_STATE"]

#: Key under which the mod keeps, in ``Context.state``, the model the app last trained from a
#: proxy (the "previous values" a ``proxy-fill = "previous"`` proxy's hidden entries take).
PROXY_PREVIOUS_STATE = "fstq.proxy-previous"
#: Key under which the mod keeps the model it last decoded from a proxy, hidden entries filled
#: (what a ``proxy-fill = "received"`` proxy's hidden entries take: each entry as last sent).
PROXY_RECEIVED_STATE = "fstq.proxy-received"
#: Where each filling proxy-fill keeps the values its hidden entries take.
_FILL_STATE = {"previous": PROXY_PREVIOUS_STATE, "received": PROXY_RECEIVED_STATE}

logger = logging.getLogger("flwr").getChild("fstqcodec")

#: What a client mod calls next: the next mod, or the app (Flower's ``ClientAppCallable``, restated
#: here because its module is not part of Flower's stable ``flwr.app`` surface).
ClientAppCallable = Callable[[Message, Context], Message]


@dataclasses.dataclass(frozen=True)
class _ReceivedProxy:
    """What a proxy of the global model carried: per tensor, the visible entries and the masks;
    with ``proxy-fill = "received"``, the model it decoded to (kept as the client's last received)."""

    visible: dict
    masks: dict
    received: dict | None = None


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
    names or shapes change. The mod keeps the whole of :meth:`fstqcodec.ErrorFeedback.state`
    (the last message's update under ``state_key + ".sent"``, the residual before it under
    ``state_key + ".before"``, its round under ``state_key + ".sent-round"``): if the server's
    next request says that round's reply was never accepted (lost, late, or dropped as broken),
    that update goes back into the residual instead of being lost.

    The encoder's options (budget, block size, seed, Fisher power, ...) come from the server's
    request; a request that leaves ``fisher_power`` out gets
    :data:`fstqcodec.FEDERATED_FISHER_POWER`.

    Place it first (outermost) in ``ClientApp(mods=[...])``, outside clipping or local-DP mods,
    so that those see plain arrays. It cannot be combined with secure aggregation (SecAgg+), which
    needs the plain arrays on the wire. Flower's ``message_size_mod`` placed before it logs the
    compressed sizes that travel; placed after it, the plain sizes the app handles.

    Only floating-point arrays can be sent this way (an integer buffer in the model makes the mod
    answer with an error reply naming it).

    Downlink proxies (``spec/FLOWER.md`` 5): a model ``ArrayRecord`` of ``stype``
    :data:`STYPE_PROXY` is an fstq message with seeded masks that carries only the entries this
    client may see this round. The app gets it as plain arrays whose hidden entries are zero or,
    with the server's ``proxy-fill = "previous"``, the model the app last trained (kept in
    ``context.state[PROXY_PREVIOUS_STATE]``), or with ``proxy-fill = "received"``, the model the
    mod last decoded from a proxy, so that each entry is as the server last sent it (kept in
    ``context.state[PROXY_RECEIVED_STATE]`` as soon as a proxy is read, in any message type);
    before the first, ``initial_model(context)``, or zeros without it. The update goes back zero
    where the proxy hid entries, encoded with the proxy's own masks, so the reply carries exactly
    the entries the client was sent; error feedback keeps what the hidden entries owe for a round
    where they are visible.

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
    initial_model : callable or None
        ``initial_model(context) -> {name: array}``: the client's model before it first trained,
        the previous values of a ``"previous"``- or ``"received"``-filled proxy in its first round (the app's own
        initialisation, shared by every client). ``None``: zeros then.

    Examples
    --------
    >>> from flwr.clientapp import ClientApp
    >>> app = ClientApp(mods=[FstqMod()])  # doctest: +SKIP

    An app with a PEFT model hands its Fisher to the mod (``integrations/flower-app`` does)::

        accumulator = fstqcodec.torch.FisherAccumulator(model)      # before local training
        fisher = fstqcodec.peft.adapter_fisher(accumulator, model)  # after it
        content["fisher"] = ArrayRecord({k: Array(v) for k, v in fisher.items()})
    """

    def __init__(
        self,
        *,
        limits: fstqcodec.Limits | None = None,
        fisher_record: str = FISHER_RECORD,
        state_key: str = RESIDUAL_STATE,
        initial_model: Callable[[Context], Mapping[str, np.ndarray]] | None = None,
    ) -> None:
        self.limits = limits
        self.fisher_record = fisher_record
        self.state_key = state_key
        self.initial_model = initial_model

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
            request, record = _read_request(msg)
            content, proxy = self._unpack_incoming(msg.content, ctxt, request, record)
        except (fstqcodec.DecodeError, ProtocolError) as err:
            return _error_reply(msg, f"FstqMod could not read the server's message: {err}")
        if proxy is not None and proxy.received is not None:  # the values were sent, whatever follows
            ctxt.state[PROXY_RECEIVED_STATE] = numpy_record(proxy.received)
        if request is None:
            return _call_with_content(call_next, msg, ctxt, content)
        try:
            _, received = _the_model(content, "the train message")
        except ProtocolError as err:
            return _error_reply(msg, f"FstqMod: {err}")

        reply = _call_with_content(call_next, msg, ctxt, content)
        if reply.has_error():
            return reply
        try:
            return self._compress_reply(reply, ctxt, received, request, proxy)
        except (ProtocolError, fstqcodec.EncodeError, fstqcodec.DecodeError) as err:
            # DecodeError here would mean the encoder wrote a message it cannot read back (a
            # core bug); report it to the server instead of crashing the node.
            return _error_reply(msg, f"FstqMod could not compress the update: {err}")

    def _unpack_incoming(
        self, content: RecordDict, ctxt: Context, request: TrainRequest | None, fstq_record: ConfigRecord | None
    ) -> tuple[RecordDict, _ReceivedProxy | None]:
        """The content with compressed models and proxies decoded and the request record taken
        out, and what the proxy (if any) carried."""
        unpacked = RecordDict()
        proxy = None
        for key, record in content.items():
            if key == CONFIG_RECORD and isinstance(record, ConfigRecord):
                continue  # consumed here: the app sees the message it would have seen
            if isinstance(record, ArrayRecord):
                data = message_bytes(record, STYPE_MODEL)
                if data is not None:
                    record = numpy_record(fstqcodec.decode(data, limits=self.limits))
                elif (data := message_bytes(record, STYPE_PROXY)) is not None:
                    if proxy is not None:
                        raise ProtocolError("a message may hold one proxy of the global model, found two")
                    fill = _proxy_fill(request, fstq_record)
                    tensors, proxy = self._open_proxy(data, ctxt, fill)
                    record = numpy_record(tensors)
            unpacked[key] = record
        return unpacked, proxy

    def _open_proxy(self, data: bytes, ctxt: Context, fill: str) -> tuple[dict, _ReceivedProxy]:
        """The model a proxy gives the app (hidden entries filled) and what the proxy carried."""
        tensors, visible, masks = read_proxy(data, limits=self.limits)
        if fill != "zero":
            previous = self._previous_values(ctxt, _FILL_STATE[fill])
            if previous is not None:
                reason = check_same_tensors(previous, tensors, "the client's previous values")
                if reason is not None:
                    raise ProtocolError(f"the proxy does not fit this client's model: {reason}")
                tensors = fill_hidden(tensors, visible, previous)
        return tensors, _ReceivedProxy(visible, masks, received=tensors if fill == "received" else None)

    def _previous_values(self, ctxt: Context, key: str) -> dict | None:
        """What the fill kept under ``key`` (the model the app last trained, or the client last
        received, from a proxy); before that, the initial model or None."""
        stored = ctxt.state.array_records.get(key)
        if stored is not None:
            return plain_tensors(stored)
        if self.initial_model is not None:
            return {name: np.asarray(value) for name, value in self.initial_model(ctxt).items()}
        return None

    def _compress_reply(
        self, reply: Message, ctxt: Context, received: dict[str, np.ndarray], request: TrainRequest,
        proxy: _ReceivedProxy | None,
    ) -> Message:
        """Replace the reply's model by one fstq message of ``trained - received`` (with a proxy:
        on the entries it carried, encoded with its masks)."""
        model_key, trained = self._trained_model(reply, received)
        update = {
            name: np.subtract(trained[name], reference, dtype=update_dtype(reference.dtype))
            for name, reference in received.items()
        }
        masks = None
        if proxy is not None:
            # The server can use no change of an entry it did not send, and must not learn one.
            update = {name: np.where(proxy.visible[name], value, value.dtype.type(0)) for name, value in update.items()}
            masks = proxy.masks
        fisher = self._app_fisher(reply, received)
        if request.error_feedback:
            feedback = self._load_feedback(ctxt, update, request)
            data = feedback.encode(update, fisher=fisher, config=request.encoder, masks=masks)
            self._save_feedback(ctxt, feedback, request.server_round)
        else:
            self._forget_feedback(ctxt)  # a stale residual must not leak into a later run
            data = fstqcodec.encode(update, fisher=fisher, config=request.encoder, masks=masks)
        if proxy is not None and request.proxy_fill == "previous":
            ctxt.state[PROXY_PREVIOUS_STATE] = numpy_record(trained)

        compressed = RecordDict()
        for key, record in reply.content.items():
            if key == self.fisher_record and isinstance(record, ArrayRecord):
                continue  # Fisher stays on the client
            compressed[key] = message_record(data, STYPE_UPDATE) if key == model_key else record
        reply.content = compressed
        return reply

    def _trained_model(
        self, reply: Message, received: dict[str, np.ndarray]
    ) -> tuple[str, dict[str, np.ndarray]]:
        """The key and tensors of the app's one model ArrayRecord (the Fisher record aside)."""
        model_records = {
            key: record
            for key, record in reply.content.array_records.items()
            if key != self.fisher_record
        }
        if len(model_records) != 1:
            raise ProtocolError(
                "the app's reply must hold exactly one model ArrayRecord (besides "
                f"{self.fisher_record!r}), found {sorted(model_records)}"
            )
        (model_key, model_record), = model_records.items()
        unreadable = "the app's reply does not hold NumPy arrays"
        return model_key, matching_tensors(model_record, received, "the app's reply", unreadable=unreadable)

    def _app_fisher(self, reply: Message, received: dict[str, np.ndarray]) -> dict | None:
        """The app's Fisher, shaped like the model and non-negative, or ``None``."""
        fisher_record = reply.content.array_records.get(self.fisher_record)
        if fisher_record is None:
            return None
        what = f"the {self.fisher_record!r} record"
        fisher = matching_tensors(fisher_record, received, what, unreadable=f"{what} is not NumPy")
        if any(np.any(values < 0) for values in fisher.values()):
            raise ProtocolError(f"the {self.fisher_record!r} record has negative values")
        return fisher

    # -- error feedback across rounds (Context.state) -------------------------------------------

    def _state_keys(self) -> dict[str, str]:
        """Context.state keys of the parts of :meth:`fstqcodec.ErrorFeedback.state`."""
        return {
            "residual": self.state_key,
            "last_update": self.state_key + ".sent",
            "residual_before": self.state_key + ".before",
        }

    @property
    def _sent_round_key(self) -> str:
        return self.state_key + ".sent-round"

    def _load_feedback(
        self, ctxt: Context, update: Mapping[str, np.ndarray], request: TrainRequest
    ) -> fstqcodec.ErrorFeedback:
        """The error-feedback memory kept in the context, if it still fits the model.

        If the server says the last message sent was never accepted, that message's whole
        update goes back into the residual (:meth:`fstqcodec.ErrorFeedback.message_lost`).
        """
        keys = self._state_keys()
        if keys["residual"] not in ctxt.state.array_records:
            return fstqcodec.ErrorFeedback(request.encoder)
        stored = ctxt.state.array_records
        state = {part: plain_tensors(stored[key]) if key in stored else None for part, key in keys.items()}
        if (state["last_update"] is None) != (state["residual_before"] is None):
            state["last_update"] = state["residual_before"] = None  # half a record: keep the residual
        feedback = fstqcodec.ErrorFeedback.from_state(state, request.encoder)
        sent_round = ctxt.state.config_records.get(self._sent_round_key, {}).get("round")
        if isinstance(sent_round, int) and request.last_accepted_round < sent_round:
            logger.info("FstqMod: the server never accepted the reply of round %s; keeping its update",
                        sent_round)
            feedback.message_lost()
        if check_same_tensors(feedback.residual, update, "the stored residual") is not None:
            logger.info("FstqMod: the model changed; discarding the error-feedback residual")
            feedback.reset()
        return feedback

    def _save_feedback(self, ctxt: Context, feedback: fstqcodec.ErrorFeedback, server_round: int) -> None:
        """Keep :meth:`fstqcodec.ErrorFeedback.state` and the round it was sent in."""
        self._forget_feedback(ctxt)
        state = feedback.state()
        for part, key in self._state_keys().items():
            tensors = state[part]
            if tensors is not None:
                ctxt.state[key] = numpy_record(tensors)
        ctxt.state[self._sent_round_key] = ConfigRecord({"round": int(server_round)})

    def _forget_feedback(self, ctxt: Context) -> None:
        for key in [*self._state_keys().values(), self._sent_round_key]:
            if key in ctxt.state:
                del ctxt.state[key]


def _read_request(msg: Message) -> tuple[TrainRequest | None, ConfigRecord | None]:
    """The server's request in a train message (``None`` if it asks for nothing), and the record.

    On other message types the record is not interpreted beyond its version, and its
    ``proxy-fill`` where the message holds a proxy (spec/FLOWER.md, 5).
    """
    record = msg.content.config_records.get(CONFIG_RECORD)
    if record is None:
        return None, None
    if not _is_train(msg):
        check_version(record)
        return None, record
    return TrainRequest.from_record(record), record


def _proxy_fill(request: TrainRequest | None, record: ConfigRecord | None) -> str:
    """What a proxy's hidden entries take, from the request or another message's record."""
    if request is not None:
        return request.proxy_fill
    if record is None:
        raise ProtocolError(
            f"a proxy of the global model ({STYPE_PROXY!r}) needs the {CONFIG_RECORD!r} record with 'proxy-fill'"
        )
    return read_proxy_fill(record)


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
        raise ProtocolError(f"{what} must hold exactly one ArrayRecord, found {sorted(records)}")
    (key, record), = records.items()
    try:
        return key, plain_tensors(record)
    except TypeError as err:
        raise ProtocolError(f"{what} does not hold NumPy arrays: {err}") from None


def _error_reply(msg: Message, reason: str) -> Message:
    logger.error(reason)
    return Message(Error(code=MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)

