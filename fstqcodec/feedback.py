"""Error feedback: what a message lost is added to the next update, so biased compression converges."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .codec import decode, encode
from .config import EncodeConfig

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Client-side memory of the compression error (error feedback, as in EF-SGD).

    Each call to :meth:`encode` compresses ``update + residual`` and keeps the new residual,
    ``(update + residual) - decode(message)``: what the receiver did not get. Over rounds nothing
    is lost, only delayed, which is what makes aggressive, biased compression converge.

    If a message never reached the receiver, call :meth:`message_lost`: the whole corrected update
    goes back into the residual instead of being thrown away.

    Attributes
    ----------
    residual : dict[str, numpy.ndarray]
        The error carried to the next update (float32 arrays, or float64 for float64 input).

    Examples
    --------
    >>> import numpy as np, fstqcodec
    >>> ef = fstqcodec.ErrorFeedback()
    >>> message = ef.encode({"w": np.ones(1000, np.float32)}, budget=fstqcodec.Budget(bits_per_param=1))
    >>> sorted(ef.residual)
    ['w']
    """

    def __init__(self, config: EncodeConfig | None = None):
        if config is not None and not isinstance(config, EncodeConfig):
            raise TypeError(f"config must be a fstqcodec.EncodeConfig, got {type(config).__name__}")
        self.config = config
        self.residual: dict = {}
        self._last_corrected: tuple[dict, dict] | None = None

    def encode(self, update: Mapping, *, fisher=None, meta=None, schema=None, **options) -> bytes:
        """Encode ``update`` plus the carried residual; remember what the message lost.

        Takes the keyword arguments of :func:`fstqcodec.encode`. Without encoder options or
        ``config=``, the config given to the constructor applies.

        Raises
        ------
        EncodeError
            As :func:`fstqcodec.encode`; the residual is left unchanged.
        """
        if self.config is not None and not options:
            options = {"config": self.config}
        config = options.get("config") or EncodeConfig(**{k: v for k, v in options.items() if k != "config"})
        corrected = {}
        for name, value in update.items():
            if hasattr(value, "detach"):  # torch tensor
                value = value.detach().float().cpu().numpy()
            array = np.asarray(value)
            work_dtype = np.float64 if array.dtype == np.float64 else np.float32
            array = array.astype(work_dtype, copy=True)
            previous = self.residual.get(name)
            if previous is not None:
                if previous.shape != array.shape:
                    raise ValueError(
                        f"tensor {name!r} has shape {array.shape}, its residual {previous.shape}; call reset() after a model change"
                    )
                array += previous
            if config.nonfinite == "zero":
                # The encoder replaces NaN/inf with 0; so does the memory, or they would come
                # back in every later round.
                array[~np.isfinite(array)] = 0
            corrected[name] = array
        message = encode(corrected, fisher=fisher, meta=meta, schema=schema, **options)
        decoded = decode(message, schemas=schema)
        # Tensors absent from this update keep their residual for a later one.
        residual = dict(self.residual)
        residual.update({name: corrected[name] - decoded[name].astype(corrected[name].dtype) for name in corrected})
        self._last_corrected = (corrected, dict(self.residual))
        self.residual = residual
        return message

    @property
    def last_update(self) -> dict | None:
        """What the last message encoded in full (the update plus the residual it carried), until
        :meth:`message_lost` or :meth:`reset`; ``None`` before the first message.

        A client that learns of a loss only later, in another process, keeps this beside the
        residual and makes it the residual then (as :mod:`fstqcodec.flower` does).
        """
        return None if self._last_corrected is None else self._last_corrected[0]

    def message_lost(self) -> None:
        """The last message was not delivered: keep all of it in the residual for the next round."""
        if self._last_corrected is not None:
            corrected, previous = self._last_corrected
            previous.update(corrected)
            self.residual = previous
            self._last_corrected = None

    def state(self) -> dict:
        """Everything this memory holds, as plain data: ``{"residual": {name: array},
        "last_update": {name: array} or None, "residual_before": {name: array} or None}``.

        :meth:`from_state` rebuilds an equal memory; a client that lives across processes (a
        Flower ClientApp, an NVFLARE executor) keeps this between rounds instead of the object.
        """
        last, before = self._last_corrected if self._last_corrected is not None else (None, None)
        return {"residual": dict(self.residual), "last_update": last, "residual_before": before}

    @classmethod
    def from_state(cls, state: Mapping, config: EncodeConfig | None = None) -> "ErrorFeedback":
        """The memory that :meth:`state` described (arrays are copied).

        Raises
        ------
        ValueError
            If ``state`` lacks ``residual`` or holds ``last_update`` without ``residual_before``.
        """
        if "residual" not in state:
            raise ValueError("an ErrorFeedback state needs a 'residual' entry")
        feedback = cls(config)
        feedback.residual = _copy(state["residual"])
        last, before = state.get("last_update"), state.get("residual_before")
        if (last is None) != (before is None):
            raise ValueError("an ErrorFeedback state holds both 'last_update' and 'residual_before', or neither")
        if last is not None:
            feedback._last_corrected = (_copy(last), _copy(before))
        return feedback

    def reset(self) -> None:
        """Forget the residual (after a model change, or to start over)."""
        self.residual = {}
        self._last_corrected = None

    def __repr__(self) -> str:
        return f"ErrorFeedback(config={self.config!r}, tensors={len(self.residual)})"


def _copy(arrays: Mapping) -> dict:
    return {name: np.array(value, copy=True) for name, value in arrays.items()}
