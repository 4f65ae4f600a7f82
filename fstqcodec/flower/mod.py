"""Client side of the fstq Flower protocol: :class:`FstqMod` (``spec/FLOWER.md``).

Imports nothing from ``flwr.serverapp`` nor from :mod:`fstqcodec.flower.strategy`, so a client
process loads no server code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict

import fstqcodec

from .protocol import (
    CONFIG_RECORD,
    FISHER_RECORD,
    MOD_FAILED_PRECONDITION,
    PROTOCOL_VERSION,
    RESIDUAL_STATE,
    STYPE_MODEL,
    STYPE_UPDATE,
    Rejected,
    budget_from_config,
    check_same_tensors,
    matching_tensors,
    message_bytes,
    message_record,
    numpy_record,
    plain_tensors,
    update_dtype,
)

__all__ = ["FstqMod"]

logger = logging.getLogger("flwr").getChild("fstqcodec")

#: What a client mod calls next: the next mod, or the app (Flower's ``ClientAppCallable``, restated
#: here because its module is not part of Flower's stable ``flwr.app`` surface).
ClientAppCallable = Callable[[Message, Context], Message]


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
        except (fstqcodec.DecodeError, Rejected, ValueError) as err:
            return _error_reply(msg, f"FstqMod could not read the server's message: {err}")

        if request is None or not _is_train(msg):
            return _call_with_content(call_next, msg, ctxt, content)

        try:
            budget = budget_from_config(request)
            _, received = _the_model(content, "the train message")
        except (ValueError, Rejected) as err:
            return _error_reply(msg, f"FstqMod: {err}")

        reply = _call_with_content(call_next, msg, ctxt, content)
        if reply.has_error():
            return reply

        try:
            return self._compress_reply(reply, ctxt, received, budget, request)
        except (Rejected, fstqcodec.EncodeError, fstqcodec.DecodeError) as err:
            # DecodeError here would mean the encoder wrote a message it cannot read back (a
            # core bug); report it to the server instead of crashing the node.
            return _error_reply(msg, f"FstqMod could not compress the update: {err}")

    def _unpack_incoming(self, content: RecordDict) -> tuple[RecordDict, ConfigRecord | None]:
        """Decode compressed models and take out the "fstq" ConfigRecord."""
        request = content.config_records.get(CONFIG_RECORD)
        if request is not None:
            version = request.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise Rejected(f"the {CONFIG_RECORD!r} ConfigRecord has no valid 'version'")
            if version > PROTOCOL_VERSION:
                raise Rejected(
                    f"the server speaks fstq adapter protocol {version}, this client only "
                    f"{PROTOCOL_VERSION}; upgrade fstqcodec on the client"
                )
        unpacked = RecordDict()
        for key, record in content.items():
            if key == CONFIG_RECORD and request is not None:
                continue  # consumed here: the app sees the message it would have seen
            if isinstance(record, ArrayRecord):
                data = message_bytes(record, STYPE_MODEL)
                if data is not None:
                    record = numpy_record(fstqcodec.decode(data, limits=self.limits))
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
            raise Rejected(
                "the app's reply must hold exactly one model ArrayRecord (besides "
                f"{self.fisher_record!r}), found {sorted(model_records)}"
            )
        (model_key, model_record), = model_records.items()
        trained = matching_tensors(
            model_record, received, "the app's reply", unreadable="the app's reply does not hold NumPy arrays"
        )

        update = {
            name: np.subtract(trained[name], reference, dtype=update_dtype(reference.dtype))
            for name, reference in received.items()
        }
        fisher = None
        if fisher_record is not None:
            what = f"the {self.fisher_record!r} record"
            fisher = matching_tensors(fisher_record, received, what, unreadable=f"{what} is not NumPy")
            if any(np.any(values < 0) for values in fisher.values()):
                raise Rejected(f"the {self.fisher_record!r} record has negative values")

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
            ctxt.state[self.state_key] = numpy_record(dict(feedback.residual))
            if "round" in request:
                # What this message carries in full (update + residual), in case it never arrives.
                ctxt.state[self._sent_key] = numpy_record(dict(feedback.last_update))
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
            compressed[key] = message_record(data, STYPE_UPDATE) if key == model_key else record
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
        residual = plain_tensors(stored)
        if check_same_tensors(residual, update, "the stored residual") is not None:
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
        raise Rejected(f"{what} must hold exactly one ArrayRecord, found {sorted(records)}")
    (key, record), = records.items()
    try:
        return key, plain_tensors(record)
    except TypeError as err:
        raise Rejected(f"{what} does not hold NumPy arrays: {err}") from None


def _error_reply(msg: Message, reason: str) -> Message:
    logger.error(reason)
    return Message(Error(code=MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)

