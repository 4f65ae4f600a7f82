"""The public one-shot API: ``encode``, ``decode``, ``open``, ``inspect`` (bytes in, bytes out)."""

from __future__ import annotations

import numpy as np

from . import _threads, decoder, encoder
from .config import DEFAULT_BLOCK_SIZE, EncodeConfig
from .limits import Limits
from .message import Message
from .encoder.masking import apply_masks
from .errors import EncodeError
from .policy.fisher import normalize_fisher
from .wire.header import Schema

__all__ = ["encode", "decode", "open", "inspect"]

_DEFAULT_CONFIG = EncodeConfig()


def encode(
    tensors,
    *,
    fisher=None,
    fisher_power: float = 1.0,
    budget=None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    bits: int | None = None,
    codebook=None,
    rounding: str = "nearest",
    seed: int = 0,
    unbiased: bool = False,
    nonfinite: str = "error",
    meta: dict | None = None,
    compress_header: bool = True,
    schema: Schema | None = None,
    config: EncodeConfig | None = None,
    masks=None,
    threads: int | None = None,
) -> bytes:
    """Encode named tensors into one fstq message.

    Parameters
    ----------
    tensors : Mapping[str, array-like]
        Names to float16, float32 or float64 arrays (torch tensors too, including bfloat16).
    fisher : Mapping[str, array-like or float], optional
        Non-negative importance per element (same shapes) or per tensor (scalars). The encoder
        minimises ``sum_i F_i (x_i - xhat_i)**2``. None means uniform importance (plain MSE).
    fisher_power : float
        Weigh the error by ``F_i ** fisher_power`` instead. 1 (the default) minimises the
        Fisher-weighted error, the second-order loss increase. 0.5 weighs by the gradient's
        magnitude: for updates from an Adam-like optimizer, whose steps have about the same size
        in every coordinate, a coordinate's first-order gain is proportional to ``|g_i|``, and
        0.5 spreads the bits over more of them (it reached the target with 20% less uplink in the
        reference loop; README, "Reference loop"). 0 is uniform importance. The federated
        entry points (``fstqcodec.peft.client_message``, ``fstq simulate``) default to
        :data:`fstqcodec.FEDERATED_FISHER_POWER` (0.5) instead.
    budget : Budget or int, optional
        Size limit of the whole message, every byte counted (an int is a number of bytes).
        None means lossless.
    block_size : int
        Elements per block (1..65536); each block gets its own bit-width and scale.
    bits : int, optional
        Fixed-rate mode: every block on the uniform grid of this width (2..8) with an absmax
        scale and packed codes. Excludes ``budget`` and ``codebook``.
    codebook : str or array-like, optional
        Fixed-rate mode with explicit levels (``"nf4"``, or 2**k increasing values) and an
        absmax scale. Excludes ``budget`` and ``bits``.
    rounding : {"nearest", "stochastic"}
        Stochastic rounding is unbiased and draws from ``seed``.
    seed : int
        Seed of the random generator (stochastic rounding, the unbiased mode's draws). The same
        input, options and seed give the same bytes.
    unbiased : bool
        Budget mode only: make the decoded update an unbiased estimate of the input (its
        expectation over ``seed`` is the input), for servers that average many clients'
        messages without error feedback. Each block is sent with a probability chosen by its
        Fisher-weighted energy, scaled by the inverse, and rounded stochastically (``rounding``
        is then ignored). Its error is larger than the default's, which shrinks toward zero
        instead (README, "On real updates"). The wire format is the same.
    nonfinite : {"error", "zero"}
        What to do with NaN and inf: refuse (default) or replace them with 0.
    meta : dict, optional
        Small scalar metadata carried in the header (``str`` keys).
    compress_header : bool
        zstd-compress the header when that makes it smaller.
    schema : Schema, optional
        Name the tensors by this schema's digest instead of listing them: the header shrinks to
        a few dozen bytes, and the decoder must be given the same schema. The tensors must
        match it exactly (names, order, dtypes, shapes, block size).
    config : EncodeConfig, optional
        All the options above but ``fisher``, ``meta`` and ``schema`` in one object; the same
        config gives the same bytes as the same keyword options. Give either ``config`` or
        those keyword options, not both.
    masks : Mapping[str, Mask or list of Mask], optional
        Seeded masks per tensor (format 1.1, spec section 5.9): only the elements every mask of a
        tensor keeps are coded (the budget is spent on them alone); the decoder regenerates the
        masks from the header and returns hidden elements as 0. The message carries no index
        bytes. Used by :mod:`fstqcodec.proxy` for downlink model proxies.
    threads : int, optional
        Worker threads for the passes that run in the C accelerator without the GIL (block
        statistics, the allocation's evaluations, quantization, the code streams). The bytes
        are the same for any number; None or 1 runs everything on the calling thread.

    Returns
    -------
    bytes

    Raises
    ------
    EncodeError
        Non-finite values, unsupported dtypes, Fisher weights that do not match the tensors.
    BudgetError
        The budget is below the smallest message for these tensors.
    TypeError, ValueError
        Misuse of the arguments (``threads`` not None or an int >= 1 included).

    Examples
    --------
    >>> import numpy as np, fstqcodec
    >>> update = {"w": np.linspace(-1, 1, 4096, dtype=np.float32)}
    >>> message = fstqcodec.encode(update, budget=fstqcodec.Budget(bits_per_param=2))
    >>> len(message) <= 4096 * 2 // 8
    True
    """
    options = EncodeConfig(
        budget=budget, block_size=block_size, bits=bits, codebook=codebook, rounding=rounding,
        seed=seed, unbiased=unbiased, fisher_power=fisher_power, nonfinite=nonfinite,
        compress_header=compress_header,
    )
    if config is not None:
        if not isinstance(config, EncodeConfig):
            raise TypeError(f"config must be a fstqcodec.EncodeConfig, got {type(config).__name__}")
        if options != _DEFAULT_CONFIG:
            raise TypeError("give the encoder options either in config or as keyword arguments, not both")
        options = config
    if meta is not None:
        _check_meta(meta)
    threads = _threads.check_threads(threads)
    # Non-finite intermediate values are handled explicitly; a caller's np.seterr must not turn
    # them into FloatingPointError.
    with np.errstate(all="ignore"), _threads.using(threads):
        return _encode(tensors, fisher, options, meta, schema, masks)


def _encode(tensors, fisher, config: EncodeConfig, meta, schema, masks=None) -> bytes:
    masked = None
    if masks:
        tensors, fisher, masked = apply_masks(tensors, fisher, masks, config.block_size)
    source = encoder.Input(tensors, config.block_size, config.nonfinite)
    # A budgeted encode checks float32 Fisher arrays in its block-sum pass, which reads them anyway.
    weights = normalize_fisher(fisher, source.names, {s.name: s.shape for s in source.specs}, config.fisher_power,
                               defer=config.mode == "budget")
    declared = masked[0] if masked else source.specs
    if schema is not None:
        if not isinstance(schema, Schema):
            raise TypeError(f"schema must be a fstqcodec.Schema, got {type(schema).__name__}")
        if Schema([(t.name, t.dtype, t.shape, t.block_size) for t in declared]) != schema:
            raise EncodeError(_schema_difference(declared, schema.tensors))
    options = {"meta": meta, "compress_header": config.compress_header, "schema": schema, "masked": masked}
    if config.mode in ("bits", "codebook"):
        source.check_quantizable()
        rng = np.random.default_rng(config.seed)
        plan = encoder.fixed_plan(source, bits=config.bits, codebook=config.codebook, rounding=config.rounding, rng=rng)
        return encoder.assemble(source, plan, **options)
    if config.mode == "lossless":
        return encoder.assemble(source, encoder.lossless_plan(source), **options)
    limit = config.budget.resolve(elements=source.elements, raw_bytes=source.raw_bytes)
    return encoder.encode_to_budget(source, weights, limit, rounding=config.rounding, seed=config.seed,
                                    unbiased=config.unbiased, **options)


def _check_meta(meta) -> None:
    """Refuse at encode time what the decoder refuses (FORMAT.md 5.2: str keys, scalar values)."""
    if not isinstance(meta, dict):
        raise TypeError("meta must be a dict")
    for key, value in meta.items():
        if not isinstance(key, str):
            raise TypeError(f"meta keys must be strings, got {key!r}")
        if value is not None and not isinstance(value, (str, int, float, bool, bytes)):
            raise TypeError(f"meta value for {key!r} must be a str, int, float, bool, bytes or None, got {type(value).__name__}")


def _schema_difference(specs, expected) -> str:
    for index, (have, want) in enumerate(zip(specs, expected)):
        if have != want:
            return f"tensor #{index} is {have}, the schema says {want}"
    return f"{len(specs)} tensors, the schema has {len(expected)}"


def decode(data, *, limits: Limits | None = None, schemas=None, threads: int | None = None) -> dict:
    """Decode a message into ``name -> numpy array`` with the original names, shapes and dtypes.

    bfloat16 tensors come back as float32 arrays holding bfloat16 values (numpy has no bfloat16);
    :func:`open` also returns each tensor's declared dtype and the message's ``meta``.

    Parameters
    ----------
    data : bytes-like
        A message, possibly hostile.
    limits : Limits, optional
        Bounds on what the message may declare; None means :data:`fstqcodec.DEFAULT_LIMITS`.
    schemas : Schema or iterable of Schema, optional
        Resolve messages encoded with ``schema=`` (they carry a digest, not the tensor list).
    threads : int, optional
        Worker threads decoding the message's contexts (code streams) side by side; the result
        is the same for any number. None or 1 decodes on the calling thread. Several contexts'
        symbols are then held at once (each within the limits).

    Returns
    -------
    dict[str, numpy.ndarray]

    Raises
    ------
    DecodeError
        A subclass naming what is wrong: TruncatedError, BadFormatError, UnsupportedVersionError,
        UnsupportedFeatureError, ChecksumError, TrailingDataError, LimitExceededError,
        UnknownSchemaError. Nothing else, for any input bytes.
    TypeError
        If ``data`` is not bytes-like or ``limits`` is not a Limits.
    ValueError
        If ``threads`` is not None or an int >= 1.
    """
    threads = _threads.check_threads(threads)
    with _threads.using(threads):
        return decoder.decode_message(data, limits, schemas)


def open(data, *, limits: Limits | None = None, schemas=None) -> Message:  # noqa: A001 (like safetensors' safe_open)
    """Decode a message into its tensors together with what it declares about them.

    Parses the message once. Unlike :func:`decode`, the result keeps each tensor's declared dtype
    (``"bfloat16"`` included, although numpy holds bfloat16 values in float32 arrays) and the
    message's ``meta``.

    Parameters
    ----------
    data : bytes-like
        A message, possibly hostile.
    limits : Limits, optional
        As for :func:`decode`.
    schemas : Schema or iterable of Schema, optional
        As for :func:`decode`.

    Returns
    -------
    Message
        A mapping of names to arrays with ``dtypes``, ``shapes``, ``meta``, ``version`` and ``size``.

    Raises
    ------
    DecodeError
        As :func:`decode`: a subclass naming what is wrong, for any input bytes.
    TypeError
        If ``data`` is not bytes-like, ``limits`` is not a Limits or ``schemas`` not Schemas.

    Examples
    --------
    >>> import numpy as np, fstqcodec
    >>> message = fstqcodec.encode({"w": np.ones((2, 3), np.float16)}, meta={"round": 7})
    >>> opened = fstqcodec.open(message)
    >>> opened.dtypes, opened.shapes, opened.meta
    ({'w': 'float16'}, {'w': (2, 3)}, {'round': 7})
    """
    container, layout, arrays = decoder.read_message(data, limits, schemas)
    dtypes = {spec.name: spec.dtype for spec in layout.tensors}
    return Message(arrays, dtypes, dict(layout.meta), (container.major, container.minor), len(container.data))


def inspect(data, *, limits: Limits | None = None, schemas=None) -> dict:
    """Describe a message without decoding its codes.

    Returns
    -------
    dict
        ``version``, ``size``, ``header_size`` (stored), ``header_encoding``, ``framing_size``,
        ``sections`` (kind, stored and decoded sizes, encoding), ``tensors`` (name, dtype, shape,
        block size, blocks), ``contexts`` (as in the header), ``width_histogram`` (blocks per
        bit-width: 0 dropped, 1-8 quantized, 16/32/64 raw), ``elements``, ``bits_per_element``
        and ``meta``.

    Raises
    ------
    DecodeError
        As :func:`decode` does for the parts it reads (framing, checksum, header, block table).
    """
    return decoder.inspect_message(data, limits, schemas)
