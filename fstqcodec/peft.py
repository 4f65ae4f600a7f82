"""PEFT adapter: LoRA updates of a ``peft.PeftModel`` as fstqcodec messages.

Importing this module imports torch, transformers and peft; ``import fstqcodec`` never does.

The adapter's tensors are named as peft's own ``get_peft_model_state_dict`` names them (adapter name
removed, ``modules_to_save`` heads under their base name), so a message decodes straight into
``set_peft_model_state_dict`` on the other side.

- :func:`adapter_state`, :func:`load_adapter_state`: read / write the trainable adapter.
- :func:`adapter_update`, :func:`apply_update`: deltas between adapters, and applying a decoded one.
- :func:`state_names`, :func:`adapter_fisher`: the Fisher of :class:`fstqcodec.torch.FisherAccumulator`
  keyed like the adapter's state dict.
- :class:`FisherCallback`: a ``transformers.TrainerCallback`` accumulating the Fisher during training.
- :func:`client_message`: (global adapter, local adapter, Fisher, config, error feedback) -> bytes;
  its ``fisher_power`` defaults to :data:`fstqcodec.FEDERATED_FISHER_POWER`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import TrainerCallback

import fstqcodec
from fstqcodec.config import resolve_config
from fstqcodec.torch import FisherAccumulator, to_numpy

__all__ = [
    "adapter_state",
    "load_adapter_state",
    "adapter_update",
    "apply_update",
    "state_names",
    "adapter_fisher",
    "FisherCallback",
    "client_message",
]


def _check_peft(model: Any) -> None:
    if not isinstance(model, PeftModel):
        raise TypeError(f"expected a peft.PeftModel, got {type(model).__name__}")


def adapter_state(model: PeftModel, *, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """A detached copy of the adapter's state dict (LoRA matrices and ``modules_to_save`` heads).

    Parameters
    ----------
    model : peft.PeftModel
    adapter_name : str
        Which adapter.

    Returns
    -------
    dict[str, torch.Tensor]
        Keyed as ``peft.get_peft_model_state_dict`` keys them; tensors are clones, so later training
        does not change them.

    Raises
    ------
    TypeError
        If ``model`` is not a PeftModel.
    """
    _check_peft(model)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def load_adapter_state(model: PeftModel, state: Mapping[str, torch.Tensor], *,
                       adapter_name: str = "default") -> None:
    """Load a full adapter state (e.g. a new global adapter) into ``model`` in place.

    Tensors are cast to each parameter's dtype and device by peft/torch.

    Raises
    ------
    TypeError
        If ``model`` is not a PeftModel.
    ValueError
        If ``state`` has names the adapter does not have, or lacks some it has (a partial or
        mismatched update would otherwise be ignored silently).
    """
    _check_peft(model)
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    given = set(state)
    if given != expected:
        missing, extra = sorted(expected - given), sorted(given - expected)
        raise ValueError(f"adapter state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    tensors = {name: torch.as_tensor(value) for name, value in state.items()}
    result = set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"peft did not place these tensors: {list(unexpected)[:3]}")


def adapter_update(global_state: Mapping[str, torch.Tensor],
                   local_state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The update a client sends: ``local - global`` per tensor, as float32 numpy arrays.

    Raises
    ------
    ValueError
        If the two states do not have the same names and shapes.
    """
    if set(global_state) != set(local_state):
        raise ValueError("global and local adapter states have different tensor names")
    update = {}
    for name, local in local_state.items():
        reference = global_state[name]
        if tuple(local.shape) != tuple(reference.shape):
            raise ValueError(f"tensor {name!r}: local shape {tuple(local.shape)} != global {tuple(reference.shape)}")
        update[name] = to_numpy(local.detach().float().cpu() - reference.detach().float().cpu()).astype(np.float32)
    return update


def apply_update(model: PeftModel, update: Mapping[str, Any], *, scale: float = 1.0,
                 adapter_name: str = "default") -> None:
    """Add a (decoded) update to the model's adapter in place: ``adapter += scale * update``.

    Parameters
    ----------
    model : peft.PeftModel
    update : Mapping[str, numpy.ndarray or torch.Tensor]
        Keyed like :func:`adapter_state`; names it lacks are left unchanged.
    scale : float
        Multiplier (e.g. a server learning rate).

    Raises
    ------
    ValueError
        If the update names a tensor the adapter does not have, or has a wrong shape.
    """
    state = adapter_state(model, adapter_name=adapter_name)
    for name, delta in update.items():
        if name not in state:
            raise ValueError(f"update names {name!r}, which the adapter does not have")
        delta = torch.as_tensor(np.asarray(delta) if not isinstance(delta, torch.Tensor) else delta)
        if tuple(delta.shape) != tuple(state[name].shape):
            raise ValueError(f"update {name!r} has shape {tuple(delta.shape)}, adapter has {tuple(state[name].shape)}")
        state[name] = state[name] + scale * delta.to(device=state[name].device, dtype=state[name].dtype)
    load_adapter_state(model, state, adapter_name=adapter_name)


def state_names(model: PeftModel, *, adapter_name: str = "default") -> dict[str, str]:
    """Map trainable parameter names (``model.named_parameters()``) to adapter state-dict names.

    Matched by storage (peft's state dict holds views of the parameters), which follows whatever
    renaming peft applies; parameters that are trainable but not part of the adapter state are absent.
    """
    _check_peft(model)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    by_storage = {(t.data_ptr(), tuple(t.shape)): name for name, t in state.items()}
    mapping = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = by_storage.get((param.data_ptr(), tuple(param.shape)))
            if key is not None:
                mapping[name] = key
    if len(set(mapping.values())) != len(state):
        # peft returned copies, not views: fall back to peft's naming rules.
        mapping = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            key = name.replace(f"modules_to_save.{adapter_name}.", "").replace(f".{adapter_name}.", ".")
            if key in state:
                mapping[name] = key
    return mapping


def adapter_fisher(accumulator: FisherAccumulator, model: PeftModel, *,
                   adapter_name: str = "default") -> dict[str, np.ndarray]:
    """The accumulator's Fisher keyed like the adapter's state dict, as float32 numpy arrays."""
    names = state_names(model, adapter_name=adapter_name)
    return {name: to_numpy(value) for name, value in accumulator.fisher(names=names).items()}


class FisherCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that accumulates the diagonal Fisher during training.

    The gradient hooks are attached at ``on_train_begin`` and record every backward pass the
    Trainer runs (no extra compute). After training, :meth:`fisher` gives the Fisher keyed like the
    adapter's state dict, ready for :func:`client_message`.

    Parameters
    ----------
    adapter_name : str
        The PEFT adapter whose parameters are tracked.
    decay : float, optional
        See :class:`fstqcodec.torch.FisherAccumulator`.

    Notes
    -----
    Under fp16 mixed precision with a loss scaler, the recorded squared gradients are scaled by the
    square of the loss scale; only their relative sizes matter for bit allocation, so this is harmless
    as long as the scale is constant within a round.
    """

    def __init__(self, *, adapter_name: str = "default", decay: float | None = None):
        self.adapter_name = adapter_name
        self.decay = decay
        self.accumulator: FisherAccumulator | None = None
        self._model: PeftModel | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("FisherCallback needs the Trainer to pass the model")
        _check_peft(model)
        if self.accumulator is not None:
            self.accumulator.remove()
        self._model = model
        self.accumulator = FisherAccumulator(model, decay=self.decay)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.accumulator is not None:
            self.accumulator.remove()  # keep the estimate, stop recording
        return control

    def fisher(self) -> dict[str, np.ndarray]:
        """The Fisher of the last training run, keyed like the adapter state dict.

        Raises
        ------
        RuntimeError
            If training has not run (no gradients observed).
        """
        if self.accumulator is None or self._model is None:
            raise RuntimeError("FisherCallback has not seen a training run")
        return adapter_fisher(self.accumulator, self._model, adapter_name=self.adapter_name)


def client_message(global_state: Mapping[str, torch.Tensor], local_state: Mapping[str, torch.Tensor], *,
                   fisher: Mapping[str, Any] | None = None, error_feedback: fstqcodec.ErrorFeedback | None = None,
                   config: fstqcodec.EncodeConfig | None = None, meta: dict | None = None,
                   schema: fstqcodec.Schema | None = None, **options: Any) -> bytes:
    """The uplink message of a client: its adapter's change since the global adapter, encoded.

    The encoder's options come from one :class:`fstqcodec.EncodeConfig`: ``config``, else the
    keyword ``options``, else the ``error_feedback``'s own config. Built from keyword options,
    ``fisher_power`` defaults to :data:`fstqcodec.FEDERATED_FISHER_POWER` (0.5), the weighting the
    reference loop measured best for federated updates, not to :func:`fstqcodec.encode`'s 1
    (README, "How it works"); a ``config`` is used as it is.

    Parameters
    ----------
    global_state : Mapping[str, torch.Tensor]
        The adapter the client received (its :func:`adapter_state` before training).
    local_state : Mapping[str, torch.Tensor]
        The adapter after local training.
    fisher : Mapping[str, numpy.ndarray], optional
        Importance keyed like the states (:meth:`FisherCallback.fisher` or :func:`adapter_fisher`).
    error_feedback : fstqcodec.ErrorFeedback, optional
        The client's error-feedback memory; when given, what this message loses is carried into
        the next one.
    config : fstqcodec.EncodeConfig, optional
        The encoder's options (``budget`` None encodes losslessly).
    meta : dict, optional
        Small scalar metadata carried in the header.
    schema : fstqcodec.Schema, optional
        As for :func:`fstqcodec.encode`.
    **options
        The keyword options of :func:`fstqcodec.encode` (``budget``, ``block_size``,
        ``fisher_power``...), instead of ``config``.

    Returns
    -------
    bytes

    Raises
    ------
    ValueError
        If the states do not match, or an option is invalid.
    TypeError
        If both ``config`` and keyword options are given.
    fstqcodec.EncodeError
        If the codec refuses the update.
    """
    if config is None and not options and error_feedback is not None and error_feedback.config is not None:
        config = error_feedback.config
    config = resolve_config(config, options, defaults={"fisher_power": fstqcodec.FEDERATED_FISHER_POWER})
    update = adapter_update(global_state, local_state)
    if fisher is not None:
        fisher = {name: (to_numpy(v) if isinstance(v, torch.Tensor) else v) for name, v in fisher.items()}
    if error_feedback is not None:
        return error_feedback.encode(update, fisher=fisher, config=config, meta=meta, schema=schema)
    return fstqcodec.encode(update, fisher=fisher, config=config, meta=meta, schema=schema)
