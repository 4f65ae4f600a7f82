"""PyTorch adapter: encode and decode torch tensors, and collect Fisher importance during training.

Importing this module imports torch; ``import fstqcodec`` never does.

- :func:`encode` / :func:`decode`: float32, float16 and bfloat16 tensors (CPU or CUDA) in, tensors of
  the original dtypes out, on the device asked for.
- :class:`FisherAccumulator`: the diagonal Fisher proxy of a module's trainable parameters (running
  mean of squared gradients), gathered by gradient hooks from the backward passes training already
  runs, at no extra forward or backward.
- :class:`TokenFisherRecorder` and :func:`token_fisher`: the per-token Fisher proxy, the squared norm
  of the loss gradient with respect to each input token's embedding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

import fstqcodec
from fstqcodec.config import resolve_config

__all__ = [
    "encode",
    "decode",
    "to_numpy",
    "FisherAccumulator",
    "TokenFisherRecorder",
    "token_fisher",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_BY_NAME = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy of a floating tensor; bfloat16 becomes float32 (exactly: bf16 embeds in f32).

    Raises
    ------
    TypeError
        If ``tensor`` is not a torch tensor of a supported floating dtype.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"unsupported tensor dtype {tensor.dtype}; supported: float32, float16, bfloat16, float64"
        )
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.cpu().contiguous().numpy()


def _importance_to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().contiguous().numpy()
    return value


def encode(tensors: Mapping[str, torch.Tensor], *, fisher: Mapping[str, Any] | None = None,
           config: fstqcodec.EncodeConfig | None = None, meta: dict | None = None,
           schema: fstqcodec.Schema | None = None, **options: Any) -> bytes:
    """Encode a name -> tensor mapping with :func:`fstqcodec.encode`.

    Parameters
    ----------
    tensors : Mapping[str, torch.Tensor]
        Floating tensors (float32, float16, bfloat16, float64) on any device. bfloat16 tensors are
        declared as bfloat16 in the message so :func:`decode` gives bfloat16 back.
    fisher : Mapping[str, torch.Tensor or numpy.ndarray or float], optional
        Non-negative importance per element (same shapes) or per tensor (scalars).
    config : fstqcodec.EncodeConfig, optional
        The encoder's options in one object. ``fisher_power`` defaults to 1, as in
        :func:`fstqcodec.encode`; for federated updates use
        ``fisher_power=fstqcodec.FEDERATED_FISHER_POWER`` (README, "How it works").
    meta : dict, optional
        Small scalar metadata carried in the header.
    schema : fstqcodec.Schema, optional
        As for :func:`fstqcodec.encode`.
    **options
        The keyword options of :func:`fstqcodec.encode` (``budget``, ``block_size``, ``seed``...),
        instead of ``config``.

    Returns
    -------
    bytes
        The message.

    Raises
    ------
    TypeError
        If ``tensors`` is not a mapping of torch tensors of a supported dtype, or both ``config``
        and keyword options are given.
    fstqcodec.EncodeError
        If the codec refuses the input (non-finite values, a budget too small, ...).
    """
    config = resolve_config(config, options)
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of name -> torch.Tensor, got {type(tensors).__name__}")
    arrays: dict[str, Any] = {}
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.bfloat16:
            # numpy has no bfloat16: the core takes the CPU tensor and declares it bfloat16 on the wire.
            arrays[name] = tensor.detach().cpu()
        else:
            arrays[name] = to_numpy(tensor)
    if fisher is not None:
        fisher = {name: _importance_to_numpy(value) for name, value in fisher.items()}
    return fstqcodec.encode(arrays, fisher=fisher, config=config, meta=meta, schema=schema)


def decode(data: bytes, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
           limits: Any = None, schemas: Any = None) -> dict[str, torch.Tensor]:
    """Decode a message into torch tensors of the dtypes it declares (bfloat16 included).

    The message is parsed once (:func:`fstqcodec.open`).

    Parameters
    ----------
    data : bytes
        The message (untrusted input is fine: it is validated like :func:`fstqcodec.decode`).
    device : str or torch.device
        Where the tensors go.
    dtype : torch.dtype, optional
        Cast every tensor to this dtype; by default each keeps the dtype declared in the message.
    limits : fstqcodec.Limits, optional
        Decoder limits.
    schemas : fstqcodec.Schema or iterable of them, optional
        Resolve messages encoded with ``schema=``.

    Returns
    -------
    dict[str, torch.Tensor]

    Raises
    ------
    fstqcodec.DecodeError
        If the message is malformed or exceeds the limits.
    """
    message = fstqcodec.open(data, limits=limits, schemas=schemas)
    out: dict[str, torch.Tensor] = {}
    for name, array in message.items():
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        out[name] = tensor.to(device=device, dtype=dtype or _DTYPE_BY_NAME[message.dtypes[name]])
    return out


class FisherAccumulator:
    """Running diagonal Fisher proxy of a module's trainable parameters.

    For each parameter with ``requires_grad``, keeps the mean over observed backward passes of the
    squared gradient, ``F = mean_t g_t**2`` (the empirical Fisher diagonal that Fed-FSTQ uses). The
    gradients come from tensor hooks, so the backward pass that training already runs feeds it: no
    extra forward or backward. Each backward contributes its own gradient (before it is summed into
    ``.grad``), so gradient accumulation over micro-batches is handled correctly.

    Parameters
    ----------
    module : torch.nn.Module
        The model. Parameters frozen at construction time are ignored.
    decay : float, optional
        ``None`` (default) for the arithmetic mean over all observations since the last
        :meth:`reset`; a value in ``[0, 1)`` for an exponential moving average.
    scale : float
        Gradients are divided by this before squaring (e.g. a mixed-precision loss scale).

    Examples
    --------
    >>> acc = FisherAccumulator(model)
    >>> loss.backward(); optimizer.step()        # the usual step; the hooks record g**2
    >>> importance = acc.fisher()                # name -> tensor, same shapes as the parameters

    Notes
    -----
    Call :meth:`remove` (or use the accumulator as a context manager) to detach the hooks.
    Backward passes run while :meth:`paused` is active are not recorded.
    """

    def __init__(self, module: torch.nn.Module, *, decay: float | None = None, scale: float = 1.0):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be None or in [0, 1), got {decay}")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.decay = decay
        self.scale = float(scale)
        self.parameters: dict[str, torch.nn.Parameter] = {
            name: p for name, p in module.named_parameters() if p.requires_grad
        }
        if not self.parameters:
            raise ValueError("the module has no trainable parameters")
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._enabled = True
        self._handles = [p.register_hook(self._make_hook(name)) for name, p in self.parameters.items()]

    def _make_hook(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            if self._enabled:
                self._observe(name, grad)
            return None  # leave the gradient unchanged

        return hook

    @torch.no_grad()
    def _observe(self, name: str, grad: torch.Tensor) -> None:
        squared = grad.detach().float()
        if self.scale != 1.0:
            squared = squared / self.scale
        squared = squared * squared
        previous = self._sums.get(name)
        if previous is None:
            self._sums[name] = squared.clone()
        elif self.decay is None:
            previous.add_(squared)
        else:
            previous.mul_(self.decay).add_(squared, alpha=1.0 - self.decay)
        self._counts[name] = self._counts.get(name, 0) + 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Context in which backward passes are not recorded (e.g. a validation gradient)."""
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    @property
    def steps(self) -> int:
        """Most backward passes observed for any parameter since the last reset."""
        return max(self._counts.values(), default=0)

    def fisher(self, *, names: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
        """The current estimate, parameter name -> tensor of the parameter's shape (float32).

        Parameters
        ----------
        names : Mapping[str, str], optional
            Renames parameters (module name -> output name); parameters not in it are left out.
            Used to key the Fisher like a PEFT state dict.

        Raises
        ------
        RuntimeError
            If no backward pass has been observed since the last reset.
        """
        if not self._counts:
            raise RuntimeError("no gradients observed yet: run a backward pass first")
        out: dict[str, torch.Tensor] = {}
        for name, param in self.parameters.items():
            if names is not None and name not in names:
                continue
            total = self._sums.get(name)
            if total is None:  # parameter unused in every observed backward: zero sensitivity
                value = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            elif self.decay is None:
                value = total / self._counts[name]
            else:
                value = total.clone()
            out[names[name] if names is not None else name] = value
        return out

    def reset(self) -> None:
        """Forget all observations (e.g. at the start of a round)."""
        self._sums.clear()
        self._counts.clear()

    def remove(self) -> None:
        """Detach the gradient hooks; the current estimate stays readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "FisherAccumulator":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


class TokenFisherRecorder:
    """Records the per-token Fisher proxy from the backward passes training already runs.

    Hooks the input-embedding module: its output is made to require a gradient, and the gradient
    that flows back into it is reduced to ``||d loss / d e_t||**2`` per token. With a frozen
    embedding table (LoRA) this extends the backward by the part below the first trainable layer,
    but needs no extra forward or backward pass.

    Parameters
    ----------
    embedding : torch.nn.Module
        The token-embedding module, e.g. ``model.get_input_embeddings()``.

    Attributes
    ----------
    last : torch.Tensor or None
        ``(batch, sequence)`` float32 scores from the most recent backward.
    """

    def __init__(self, embedding: torch.nn.Module):
        if not isinstance(embedding, torch.nn.Module):
            raise TypeError(f"embedding must be a torch.nn.Module, got {type(embedding).__name__}")
        self.last: torch.Tensor | None = None
        self._handle = embedding.register_forward_hook(self._forward_hook)

    def _forward_hook(self, module, inputs, output):
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return None
        if not output.requires_grad:
            output = output.detach().requires_grad_(True)
        output.register_hook(self._record)
        return output

    def _record(self, grad: torch.Tensor) -> None:
        self.last = grad.detach().float().pow(2).sum(dim=-1)

    def remove(self) -> None:
        """Detach the hook."""
        self._handle.remove()

    def __enter__(self) -> "TokenFisherRecorder":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def token_fisher(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-token Fisher proxy of one batch: squared norm of d loss / d input-token embedding.

    Runs one forward and one backward, differentiating only with respect to the embedding output
    (parameter ``.grad`` fields are not touched). For use outside training, e.g. to rank tokens
    for pruning at inference; during training use :class:`TokenFisherRecorder` instead.

    Parameters
    ----------
    model : torch.nn.Module
        A Hugging Face model (anything with ``get_input_embeddings()`` whose output has ``.loss``
        when called with ``labels``).
    batch : Mapping[str, torch.Tensor]
        Model inputs including ``labels``.

    Returns
    -------
    torch.Tensor
        ``(batch, sequence)`` float32 scores; padding positions are zeroed when the batch has an
        ``attention_mask``.

    Raises
    ------
    ValueError
        If the model returns no loss (``labels`` missing).
    """
    captured: list[torch.Tensor] = []

    def capture(module, inputs, output):
        output = output.detach().requires_grad_(True)
        captured.append(output)
        return output

    handle = model.get_input_embeddings().register_forward_hook(capture)
    try:
        with torch.enable_grad():
            outputs = model(**batch)
            loss = getattr(outputs, "loss", None)
            if loss is None:
                raise ValueError("the model returned no loss: pass `labels` in the batch")
            (grad,) = torch.autograd.grad(loss, captured[-1])
    finally:
        handle.remove()
    scores = grad.float().pow(2).sum(dim=-1)
    mask = batch.get("attention_mask")
    if mask is not None:
        scores = scores * mask.to(scores.dtype)
    return scores.detach()
