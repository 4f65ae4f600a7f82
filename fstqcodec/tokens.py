"""Token reduction for ``transformers`` encoder classifiers, guided by a token-importance prior.

Importing this module imports torch; ``import fstqcodec`` never does.

The prior is learnt from the token Fisher (:func:`fstqcodec.torch.token_fisher`, or
:class:`fstqcodec.torch.TokenFisherRecorder` during training): for every vocabulary id and every
position, the log of the mean *relative* Fisher of the tokens seen there (each sequence's scores
divided by their mean over its real tokens, so every sequence counts alike whatever its loss).
It is a plain ``dict`` of numpy arrays, so it is encoded by :func:`fstqcodec.encode` like any update
and a server can average it element-wise (a geometric mean of the clients' relative importances).

At inference, :class:`PrunedClassifier` looks each token up in the prior (no labels, no backward:
one gather per request), keeps the highest-scoring tokens at a keep ratio (always the special tokens
such as [CLS] and [SEP], in their original order and with their original position ids) and runs the
unchanged model on the shorter sequences.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch

__all__ = [
    "VOCAB_KEY",
    "POSITION_KEY",
    "TokenPriorAccumulator",
    "TokenPriorRecorder",
    "check_prior",
    "average_priors",
    "prior_scores",
    "random_scores",
    "first_layer_attention_scores",
    "select_tokens",
    "reduce_batch",
    "keep_ratio_for_speedup",
    "encoder_flops",
    "PrunedClassifier",
]

VOCAB_KEY = "token_prior.vocab"
POSITION_KEY = "token_prior.position"
_USES = ("vocab", "position", "both")


class TokenPriorAccumulator:
    """Accumulates the token Fisher of training batches into a per-vocabulary-id and per-position prior.

    Parameters
    ----------
    vocab_size : int
        Size of the model's vocabulary (``model.config.vocab_size``).
    max_positions : int
        Number of position embeddings (``model.config.max_position_embeddings``).
    smoothing : float
        Pseudo-count of a neutral observation added to every id and position, so that an id seen
        once does not get an extreme prior (ids never seen get exactly the neutral value 0).

    Raises
    ------
    ValueError
        If a size is not a positive integer or ``smoothing`` is negative.
    """

    def __init__(self, vocab_size: int, max_positions: int, *, smoothing: float = 1.0):
        for name, value in (("vocab_size", vocab_size), ("max_positions", max_positions)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not smoothing >= 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing}")
        self.smoothing = float(smoothing)
        self.vocab_sums = torch.zeros(vocab_size, dtype=torch.float64)
        self.vocab_counts = torch.zeros(vocab_size, dtype=torch.float64)
        self.position_sums = torch.zeros(max_positions, dtype=torch.float64)
        self.position_counts = torch.zeros(max_positions, dtype=torch.float64)
        self.sequences = 0

    @torch.no_grad()
    def observe(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                scores: torch.Tensor, *, position_ids: torch.Tensor | None = None) -> None:
        """Add one batch: its token ids, mask and ``(batch, sequence)`` token-Fisher scores.

        ``position_ids`` gives each token's position when the batch was already reduced (default:
        ``0 .. sequence - 1``).

        Raises
        ------
        ValueError
            If the shapes disagree, an id is outside the vocabulary, the sequence is longer than
            ``max_positions``, or a score is negative or not finite.
        """
        if input_ids.shape != scores.shape or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and scores {tuple(scores.shape)} must be the same (batch, sequence) shape"
            )
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
        scores = scores.detach().double().cpu()
        if not torch.isfinite(scores).all() or (scores < 0).any():
            raise ValueError("token-Fisher scores must be finite and non-negative")
        ids, real = input_ids.cpu().long(), mask.cpu().bool()
        if ids.shape[1] > self.position_sums.numel():
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_positions {self.position_sums.numel()}")
        if ((ids < 0) | (ids >= self.vocab_sums.numel()))[real].any():
            raise ValueError(f"a token id is outside the vocabulary of {self.vocab_sums.numel()}")
        # Relative Fisher: each sequence's scores over their mean, so a badly classified example
        # (large loss, large gradients everywhere) does not outweigh the others.
        mean = (scores * real).sum(dim=1, keepdim=True) / real.sum(dim=1, keepdim=True).clamp(min=1)
        relative = torch.where(real, scores / mean.clamp(min=1e-30), torch.zeros_like(scores))
        self.vocab_sums.index_add_(0, ids[real], relative[real])
        self.vocab_counts.index_add_(0, ids[real], torch.ones_like(relative[real]))
        positions = torch.arange(ids.shape[1]).expand_as(ids) if position_ids is None else position_ids.cpu().long()
        if positions.shape != ids.shape or ((positions < 0) | (positions >= self.position_sums.numel()))[real].any():
            raise ValueError(f"position_ids must be {tuple(ids.shape)} and below {self.position_sums.numel()}")
        self.position_sums.index_add_(0, positions[real], relative[real])
        self.position_counts.index_add_(0, positions[real], torch.ones_like(relative[real]))
        self.sequences += int(real.any(dim=1).sum())

    def prior(self) -> dict[str, np.ndarray]:
        """The prior as ``{VOCAB_KEY: (vocab_size,), POSITION_KEY: (max_positions,)}`` float32 arrays.

        Each value is ``log((sum + smoothing) / (count + smoothing))`` of the relative Fisher, so 0 is
        an average token, positive more informative, negative less.

        Raises
        ------
        RuntimeError
            If nothing has been observed.
        """
        if self.sequences == 0:
            raise RuntimeError("no token Fisher observed yet: call observe() first")

        def shrunk_log(sums: torch.Tensor, counts: torch.Tensor) -> np.ndarray:
            value = (sums + self.smoothing) / (counts + self.smoothing).clamp(min=1e-30)
            value = torch.where(counts > 0, value, torch.ones_like(value))
            return value.clamp(min=1e-12).log().float().numpy()

        return {
            VOCAB_KEY: shrunk_log(self.vocab_sums, self.vocab_counts),
            POSITION_KEY: shrunk_log(self.position_sums, self.position_counts),
        }


class TokenPriorRecorder:
    """Accumulates the prior during training, from the backward passes training runs anyway.

    Hooks the model's forward (to see each batch's ``input_ids``, ``attention_mask`` and
    ``position_ids``, passed as keyword arguments as ``transformers`` and ``peft`` models take them)
    and its input-embedding output (whose gradient gives the token Fisher, as
    :class:`fstqcodec.torch.TokenFisherRecorder` does). Forward passes without gradients
    (evaluation) are not recorded.

    Parameters
    ----------
    model : torch.nn.Module
        A ``transformers`` model or ``peft.PeftModel`` (``config`` and ``get_input_embeddings()``).
    smoothing : float
        As :class:`TokenPriorAccumulator`.

    Raises
    ------
    TypeError
        If the model has no ``config`` or input embeddings.
    """

    def __init__(self, model: torch.nn.Module, *, smoothing: float = 1.0):
        config = getattr(model, "config", None)
        if config is None or not hasattr(model, "get_input_embeddings"):
            raise TypeError(f"{type(model).__name__} has no config or get_input_embeddings()")
        self.accumulator = TokenPriorAccumulator(config.vocab_size, config.max_position_embeddings,
                                                 smoothing=smoothing)
        self._batch: dict[str, torch.Tensor | None] | None = None
        self._handles = [
            model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True),
            model.get_input_embeddings().register_forward_hook(self._watch_embeddings),
        ]

    def _capture_inputs(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._batch = None if ids is None or not torch.is_grad_enabled() else {
            "input_ids": ids, "attention_mask": kwargs.get("attention_mask"),
            "position_ids": kwargs.get("position_ids")}
        return None

    def _watch_embeddings(self, module, inputs, output):
        if self._batch is None or not isinstance(output, torch.Tensor):
            return None
        batch, self._batch = self._batch, None
        if not output.requires_grad:
            output = output.detach().requires_grad_(True)

        def record(grad: torch.Tensor) -> None:
            self.accumulator.observe(batch["input_ids"], batch["attention_mask"],
                                     grad.detach().float().pow(2).sum(dim=-1), position_ids=batch["position_ids"])

        output.register_hook(record)
        return output

    def prior(self) -> dict[str, np.ndarray]:
        """The prior from every recorded backward (see :meth:`TokenPriorAccumulator.prior`)."""
        return self.accumulator.prior()

    def remove(self) -> None:
        """Detach the hooks; the prior stays readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "TokenPriorRecorder":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def check_prior(prior: Mapping[str, object], *, vocab_size: int, max_positions: int | None = None,
                use: str = "vocab") -> None:
    """Check that a prior fits a model: the keys ``use`` needs, 1-D, the model's sizes, finite.

    Raises
    ------
    TypeError
        If ``prior`` is not a mapping of arrays.
    ValueError
        If ``use`` is unknown, a key is missing, a shape does not match the model's vocabulary or
        positions, or a value is NaN or infinite (the message names the key and what is wrong).
    """
    if use not in _USES:
        raise ValueError(f"use must be one of {', '.join(_USES)}, got {use!r}")
    if not isinstance(prior, Mapping):
        raise TypeError(f"the prior must be a mapping of name -> array, got {type(prior).__name__}")
    needed = {"vocab": [VOCAB_KEY], "position": [POSITION_KEY], "both": [VOCAB_KEY, POSITION_KEY]}[use]
    expected = {VOCAB_KEY: ("vocabulary", vocab_size), POSITION_KEY: ("position embeddings", max_positions)}
    for key in needed:
        if key not in prior:
            raise ValueError(f"the prior has no {key!r} (needed for use={use!r}); it has {sorted(prior)}")
        value = np.asarray(_to_numpy(prior[key]))
        what, size = expected[key]
        if value.ndim != 1 or (size is not None and value.shape[0] != size):
            raise ValueError(
                f"prior {key!r} has shape {value.shape}, but the model's {what} has {size} entries"
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"prior {key!r} must be floating point, got dtype {value.dtype}")
        bad = int(np.count_nonzero(~np.isfinite(value)))
        if bad:
            raise ValueError(f"prior {key!r} has {bad} non-finite value(s) (NaN or infinity)")


def average_priors(priors: Iterable[Mapping[str, object]], weights: Iterable[float] | None = None) -> dict[str, np.ndarray]:
    """The server's side: a weighted element-wise mean of clients' priors (decoded messages).

    The log-priors average to a geometric mean of the clients' relative importances; an id a client
    never saw counts as neutral (0) in its prior.

    Raises
    ------
    ValueError
        If there are no priors, the weights do not match them or are not positive, or the priors
        differ in keys or shapes or hold non-finite values.
    """
    priors = [dict(prior) for prior in priors]
    if not priors:
        raise ValueError("no priors to average")
    weights = np.ones(len(priors)) if weights is None else np.asarray(list(weights), dtype=np.float64)
    if weights.shape != (len(priors),) or not (weights > 0).all() or not np.isfinite(weights).all():
        raise ValueError(f"need one positive finite weight per prior ({len(priors)}), got {weights.tolist()}")
    keys = sorted(priors[0])
    out = {}
    for key in keys:
        arrays = []
        for number, prior in enumerate(priors):
            if sorted(prior) != keys:
                raise ValueError(f"prior {number} has keys {sorted(prior)}, prior 0 has {keys}")
            array = np.asarray(_to_numpy(prior[key]), dtype=np.float64)
            if array.shape != np.shape(priors[0][key]):
                raise ValueError(f"prior {number}: {key!r} has shape {array.shape}, prior 0 {np.shape(priors[0][key])}")
            if not np.isfinite(array).all():
                raise ValueError(f"prior {number}: {key!r} has non-finite values")
            arrays.append(array)
        out[key] = (np.tensordot(weights, np.stack(arrays), axes=1) / weights.sum()).astype(np.float32)
    return out


def _to_numpy(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value


def prior_scores(prior: Mapping[str, object], input_ids: torch.Tensor, *, use: str = "vocab") -> torch.Tensor:
    """Per-token scores ``(batch, sequence)`` from the prior: a lookup, no model call.

    Raises
    ------
    ValueError
        If ``use`` is unknown or the prior lacks what it needs.
    """
    if use not in _USES:
        raise ValueError(f"use must be one of {', '.join(_USES)}, got {use!r}")
    scores = torch.zeros(input_ids.shape, dtype=torch.float32)
    if use in ("vocab", "both"):
        vocab = torch.as_tensor(np.asarray(_to_numpy(prior[VOCAB_KEY]), dtype=np.float32))
        scores = scores + vocab[input_ids.cpu().long()]
    if use in ("position", "both"):
        position = torch.as_tensor(np.asarray(_to_numpy(prior[POSITION_KEY]), dtype=np.float32))
        scores = scores + position[: input_ids.shape[1]].unsqueeze(0)
    return scores


def random_scores(input_ids: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random scores, for the random-selection ablation."""
    return torch.rand(input_ids.shape, generator=generator)


@torch.no_grad()
def first_layer_attention_scores(model: torch.nn.Module, input_ids: torch.Tensor,
                                 attention_mask: torch.Tensor) -> torch.Tensor:
    """Attention that the first token ([CLS]) pays to each token in the first layer, heads averaged.

    A partial forward (embeddings, then the first layer's query and key projections) of a BERT-like
    model, for the attention-score ablation; its cost is part of that method's measured time.

    Raises
    ------
    TypeError
        If the model does not have a BERT-like ``embeddings`` and ``encoder.layer[0].attention.self``.
    """
    base = getattr(model, "base_model", model)
    try:
        attention = base.encoder.layer[0].attention.self
        embeddings = base.embeddings
    except AttributeError:
        raise TypeError(f"{type(model).__name__} is not a BERT-like encoder (no encoder.layer[0].attention.self)") from None
    hidden = embeddings(input_ids=input_ids)
    heads, size = attention.num_attention_heads, attention.attention_head_size
    query = attention.query(hidden[:, :1]).view(hidden.shape[0], 1, heads, size).transpose(1, 2)
    key = attention.key(hidden).view(hidden.shape[0], -1, heads, size).transpose(1, 2)
    logits = (query @ key.transpose(-1, -2)).squeeze(2) / math.sqrt(size)  # (batch, heads, sequence)
    logits = logits.masked_fill(~attention_mask.bool().unsqueeze(1), float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


def select_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, scores: torch.Tensor,
                  keep_ratio: float, *, special_ids: Iterable[int] = (), pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Keep the highest-scoring tokens of each sequence, the special tokens always, in order.

    Each sequence keeps ``ceil(keep_ratio * length)`` of its real tokens (at least its special
    tokens). The result is padded to the longest kept sequence and carries the original
    ``position_ids``, so the model sees each kept token where it was.

    Returns
    -------
    dict
        ``input_ids``, ``attention_mask`` and ``position_ids``, each ``(batch, kept)``.

    Raises
    ------
    ValueError
        If ``keep_ratio`` is not in (0, 1] or the shapes disagree.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if not input_ids.shape == attention_mask.shape == scores.shape:
        raise ValueError("input_ids, attention_mask and scores must have the same (batch, sequence) shape")
    real = attention_mask.bool()
    special = torch.zeros_like(real)
    for token_id in set(special_ids):
        special |= input_ids == token_id
    special &= real
    lengths = real.sum(dim=1)
    keep = torch.maximum(torch.ceil(lengths * keep_ratio).long(), special.sum(dim=1))
    # Rank: special tokens first, then by score; padding last.
    rank_key = scores.float().masked_fill(special, float("inf")).masked_fill(~real, float("-inf"))
    order = rank_key.argsort(dim=1, descending=True, stable=True)
    width = int(keep.max()) if keep.numel() else 0
    chosen = order[:, :width]
    chosen_valid = torch.arange(width).unsqueeze(0) < keep.unsqueeze(1)
    # Restore the original order; padding slots sort after every real position.
    sort_key = chosen.masked_fill(~chosen_valid, input_ids.shape[1])
    positions, _ = sort_key.sort(dim=1)
    valid = positions < input_ids.shape[1]
    positions = positions.clamp(max=input_ids.shape[1] - 1)
    return {
        "input_ids": input_ids.gather(1, positions).masked_fill(~valid, pad_id),
        "attention_mask": valid.to(attention_mask.dtype),
        "position_ids": positions.masked_fill(~valid, 0),
    }


def reduce_batch(batch: Mapping[str, torch.Tensor], scores: torch.Tensor, keep_ratio: float, *,
                 special_ids: Iterable[int] = (), pad_id: int = 0) -> dict[str, torch.Tensor]:
    """A training batch cut to the highest-scoring tokens of each sequence (training-side selection).

    ``input_ids`` and ``attention_mask`` are replaced by the kept tokens (with ``position_ids``);
    other per-token entries (``token_type_ids``) follow the selection; per-example entries such as
    ``labels`` pass through. With ``scores`` from :func:`prior_scores` the selection costs a lookup;
    with :func:`random_scores` it is the random ablation.

    Raises
    ------
    ValueError
        As :func:`select_tokens`.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    kept = select_tokens(ids, mask, scores, keep_ratio, special_ids=special_ids, pad_id=pad_id)
    out = {}
    for key, value in batch.items():
        if key in ("input_ids", "attention_mask", "position_ids"):
            continue
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == ids.shape:
            value = value.gather(1, kept["position_ids"]).masked_fill(kept["attention_mask"] == 0, 0)
        out[key] = value
    out.update(kept)
    return out


def _encoder_flops(length: float, hidden: int, intermediate: int, layers: int) -> float:
    """Multiply-adds of a BERT-like encoder on one sequence: projections, feed-forward, attention."""
    linear = length * (4 * hidden * hidden + 2 * hidden * intermediate)
    attention = 2 * length * length * hidden
    return layers * (linear + attention)


def encoder_flops(config, length: float) -> float:
    """Counted multiply-adds of one forward pass of a BERT-like encoder over one sequence of ``length`` tokens.

    Projections, feed-forward and attention scores of every layer (``config.hidden_size``,
    ``intermediate_size``, ``num_hidden_layers``); embeddings and the head are not counted. Padding
    counts: the model computes on it.
    """
    return _encoder_flops(length, config.hidden_size, config.intermediate_size, config.num_hidden_layers)


def keep_ratio_for_speedup(config, speedup: float, *, length: int) -> float:
    """The keep ratio that cuts the encoder's arithmetic by ``speedup`` for sequences of ``length`` tokens.

    A counted-FLOPs model (projections, feed-forward and attention scores of every layer), solved by
    bisection. Measured end-to-end speedups come out somewhat lower: tokenisation, the embedding
    lookup and the head are not reduced.

    Raises
    ------
    ValueError
        If ``speedup`` is below 1 or ``length`` is not positive.
    """
    if not speedup >= 1.0:
        raise ValueError(f"speedup must be >= 1, got {speedup}")
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    sizes = (config.hidden_size, config.intermediate_size, config.num_hidden_layers)
    target = _encoder_flops(length, *sizes) / speedup
    low, high = 0.0, 1.0
    for _ in range(50):
        middle = (low + high) / 2
        if _encoder_flops(middle * length, *sizes) < target:
            low = middle
        else:
            high = middle
    return max(high, 1.0 / length)


class PrunedClassifier:
    """A ``transformers`` sequence classifier that drops its lowest-prior input tokens first.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        An encoder classifier that accepts ``position_ids`` (BERT, RoBERTa, MiniLM, ...).
    prior : Mapping[str, numpy.ndarray]
        From :meth:`TokenPriorAccumulator.prior` (or decoded from an fstq message, or averaged).
    keep_ratio : float, optional
        Share of each sequence's tokens to keep, in (0, 1].
    speedup : float, optional
        Instead of ``keep_ratio``: the encoder-FLOPs reduction wanted (see
        :func:`keep_ratio_for_speedup`), resolved per batch from its length.
    special_ids : Iterable[int]
        Token ids always kept (e.g. ``tokenizer.all_special_ids``: [CLS], [SEP]).
    use : {"vocab", "position", "both"}
        Which part of the prior ranks tokens: ``"both"`` (the default) adds the vocabulary-id and
        position log-priors, which ranked best on BBC training articles (benchmarks/token_pruning.py).

    Raises
    ------
    ValueError
        If the prior does not fit the model (shape, missing key, non-finite values), or not exactly
        one of ``keep_ratio`` and ``speedup`` is given, or either is out of range.
    """

    def __init__(self, model, prior: Mapping[str, object], *, keep_ratio: float | None = None,
                 speedup: float | None = None, special_ids: Iterable[int] = (), use: str = "both"):
        config = model.config
        check_prior(prior, vocab_size=config.vocab_size,
                    max_positions=getattr(config, "max_position_embeddings", None), use=use)
        if (keep_ratio is None) == (speedup is None):
            raise ValueError("give exactly one of keep_ratio and speedup")
        if keep_ratio is not None and not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if speedup is not None and not speedup >= 1.0:
            raise ValueError(f"speedup must be >= 1, got {speedup}")
        self.model, self.use = model, use
        self.keep_ratio, self.speedup = keep_ratio, speedup
        self.special_ids = tuple(int(i) for i in special_ids)
        self.pad_id = int(getattr(config, "pad_token_id", None) or 0)
        self.prior = {key: np.asarray(_to_numpy(value), dtype=np.float32) for key, value in prior.items()
                      if key in (VOCAB_KEY, POSITION_KEY)}

    def ratio_for(self, length: int) -> float:
        """The keep ratio used for a batch whose longest sequence has ``length`` tokens."""
        if self.keep_ratio is not None:
            return self.keep_ratio
        return keep_ratio_for_speedup(self.model.config, self.speedup, length=length)

    def prune(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pruned model inputs (``input_ids``, ``attention_mask``, ``position_ids``)."""
        scores = prior_scores(self.prior, input_ids, use=self.use)
        ratio = self.ratio_for(int(attention_mask.sum(dim=1).max()))
        return select_tokens(input_ids, attention_mask, scores, ratio,
                             special_ids=self.special_ids, pad_id=self.pad_id)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, labels)`` of the model on the pruned inputs."""
        return self.model(**self.prune(input_ids, attention_mask)).logits
