"""Uplink encodings compared by the reference loop; each produces the real bytes a system would send.

Every method turns a client's update (name -> float32 array) into ``bytes`` and back; the loop counts
``len(bytes)``. The baselines use a minimal container: an 8-byte header (magic ``b"SB"``, method id,
format version, little-endian ``uint32`` tensor count) followed by the payload of each tensor in the
order of a schema both ends agree on once (the model's trainable parameters, as Flower and FLARE fix
it by the model definition). Tensor names and shapes are therefore not sent by the baselines, which
favours them against fstqcodec, whose messages are self-describing: the comparison is conservative.

Methods
-------
fp32, fp16
    Raw little-endian floats (Fed-LoRA, the Fed-FSTQ paper's baseline, and half precision).
nf4
    NVIDIA FLARE's 4-bit filter: per tensor, 64-element blocks, a float32 absmax per block, 4-bit
    NormalFloat codes packed two per byte (low nibble first).
qsgd8, qsgd4
    QSGD-style stochastic uniform quantisation: a float32 per-tensor norm, then ``s = 2**(b-1) - 1``
    levels per sign, rounded stochastically so the estimate is unbiased. The max-norm variant is used
    (the L2-norm variant at 4 bits rounds nearly every element of a 6k-element tensor to zero).
topk
    Global top-k by magnitude with error feedback: ``uint32`` count, ``uint32`` indices into the
    concatenated update, ``float32`` values. ``k`` is set from the same bits-per-parameter as fstq,
    so the two send about the same bytes.
eden, signsgd-ef
    DRIVE/EDEN (unbiased, sub-bit by shared-random subsampling) and scaled sign with error
    feedback, the distributed-mean-estimation peers (:mod:`fstqcodec.sim.peer_methods`).
fstq, fstq-nofisher
    :func:`fstqcodec.encode` under ``Budget(bits_per_param=...)`` with :class:`fstqcodec.ErrorFeedback`,
    with the diagonal Fisher from the client's accumulator, or with uniform importance (ablation).
fstq-unbiased
    fstq's unbiased mode (``EncodeConfig(unbiased=True)``: blocks sent with Fisher-chosen
    probabilities, scaled by their inverse, stochastic rounding) without error feedback: the
    server's average is unbiased, as EDEN's is.
fstq-ef21
    fstq with predictive coding across rounds instead of error feedback: each message encodes the
    client's update minus a reference both ends hold (:mod:`fstqcodec.sim.predictive`; measured as
    an ablation under label skew, where it did worse than error feedback).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import fstqcodec
from fstqcodec.config import EncodeConfig
from fstqcodec.stages.codebooks import NF4

__all__ = [
    "METHOD_NAMES",
    "DEFAULT_METHODS",
    "UpdateLayout",
    "Method",
    "make_method",
    "parse_methods",
    "NF4_LEVELS",
]

#: Every method ``fstq simulate`` knows, in the order results are reported.
METHOD_NAMES = ("fp32", "fp16", "nf4", "qsgd8", "qsgd4", "topk", "eden", "signsgd-ef", "fstq-nofisher", "fstq",
                "fstq-unbiased", "fstq-ef21")
#: Methods that read none of the encoder settings (:data:`ENCODER_SETTINGS`): fixed-rate codes.
FIXED_RATE_METHODS = frozenset({"fp32", "fp16", "nf4", "qsgd8", "qsgd4", "signsgd-ef"})
#: The loop's settings that only the other methods read (fstq's encoder options, topk's and eden's rate).
ENCODER_SETTINGS = ("budget_bpp", "deadline_s", "min_budget_bytes", "block_size", "fisher_power")
#: Methods run by ``fstq simulate`` with no ``--methods``.
DEFAULT_METHODS = ("fp32", "nf4", "fstq")

#: The 16 NormalFloat-4 levels (QLoRA; bitsandbytes' and FLARE's table), shared with the codec.
NF4_LEVELS = NF4
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2

_MAGIC = b"SB"
_VERSION = 1
_HEADER = struct.Struct("<2sBBI")
_METHOD_IDS = {"fp32": 1, "fp16": 2, "nf4": 3, "qsgd8": 4, "qsgd4": 5, "topk": 6}


class UpdateLayout:
    """Ordered tensor names and shapes, agreed once by client and server (the model definition).

    Not the wire format's :class:`fstqcodec.Schema`: this is the sim's view of an update, which the
    baselines' minimal container relies on.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]]):
        self.names = list(shapes)
        self.shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        self.sizes = {name: math.prod(shape) for name, shape in self.shapes.items()}
        self.total = sum(self.sizes.values())

    def check(self, update: Mapping[str, np.ndarray]) -> None:
        """Raise ``ValueError`` unless ``update`` has exactly the schema's names and shapes."""
        if list(update) != self.names and set(update) != set(self.names):
            missing = sorted(set(self.names) - set(update))
            extra = sorted(set(update) - set(self.names))
            raise ValueError(f"update does not match the schema: missing {missing[:3]}, extra {extra[:3]}")
        for name in self.names:
            if tuple(np.shape(update[name])) != self.shapes[name]:
                raise ValueError(
                    f"tensor {name!r} has shape {np.shape(update[name])}, schema says {self.shapes[name]}"
                )

    def flatten(self, update: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([np.asarray(update[n], dtype=np.float32).ravel() for n in self.names])

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        out, offset = {}, 0
        for name in self.names:
            size = self.sizes[name]
            out[name] = flat[offset:offset + size].reshape(self.shapes[name]).astype(np.float32)
            offset += size
        return out


class Method:
    """One uplink encoding. Subclasses implement :meth:`encode` and :meth:`decode`.

    Client state (error-feedback memory) lives in the object returned by :meth:`new_client_state`,
    one per client, so a method object is shared by all clients of a run.
    """

    name = ""
    #: Whether the method uses the client's Fisher estimate (the loop collects it only if needed).
    uses_fisher = False
    #: Whether the server keeps a reference per client and averages those instead of the messages
    #: (predictive coding, :mod:`fstqcodec.sim.predictive`).
    keeps_server_references = False

    def __init__(self, layout: UpdateLayout):
        self.layout = layout

    def new_client_state(self) -> Any:
        return None

    def encode(self, update: Mapping[str, np.ndarray], *, fisher: Mapping[str, np.ndarray] | None,
               state: Any, seed: int, budget_bytes: int | None = None) -> bytes:
        """Encode one client's update. ``budget_bytes`` (per-client link budget) is honoured only
        by methods with a byte budget (fstq); fixed-rate baselines ignore it."""
        raise NotImplementedError

    def decode(self, data: bytes) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def config(self) -> dict:
        return {"name": self.name}

    def anatomy(self, data: bytes) -> dict[str, int]:
        """Where a message's bytes go: part name -> bytes, summing to ``len(data)``."""
        return {"header": _HEADER.size, "payload": len(data) - _HEADER.size}

    # -- the minimal container shared by the baselines --
    def _header(self) -> bytes:
        return _HEADER.pack(_MAGIC, _METHOD_IDS[self.name], _VERSION, len(self.layout.names))

    def _read_header(self, data: bytes) -> memoryview:
        if len(data) < _HEADER.size:
            raise ValueError(f"{self.name} message truncated: {len(data)} bytes")
        magic, method_id, version, count = _HEADER.unpack_from(data)
        if magic != _MAGIC or method_id != _METHOD_IDS[self.name] or version != _VERSION:
            raise ValueError(f"not a {self.name} message (magic {magic!r}, id {method_id}, version {version})")
        if count != len(self.layout.names):
            raise ValueError(f"{self.name} message has {count} tensors, schema has {len(self.layout.names)}")
        return memoryview(data)[_HEADER.size:]


class _Reader:
    """Sequential reader over a payload that refuses to read past its end."""

    def __init__(self, payload: memoryview, what: str):
        self.payload, self.offset, self.what = payload, 0, what

    def take(self, dtype: str, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        if self.offset + size > len(self.payload):
            raise ValueError(f"{self.what} message truncated")
        out = np.frombuffer(self.payload, dtype=dtype, count=count, offset=self.offset)
        self.offset += size
        return out

    def finish(self) -> None:
        if self.offset != len(self.payload):
            raise ValueError(f"{self.what} message has {len(self.payload) - self.offset} trailing bytes")


class RawFloat(Method):
    """fp32 / fp16: raw little-endian values."""

    def __init__(self, layout: UpdateLayout, dtype: str):
        super().__init__(layout)
        self.name = {"<f4": "fp32", "<f2": "fp16"}[dtype]
        self.dtype = dtype

    def encode(self, update, *, fisher, state, seed, budget_bytes=None):
        self.layout.check(update)
        return self._header() + self.layout.flatten(update).astype(self.dtype).tobytes()

    def decode(self, data):
        reader = _Reader(self._read_header(data), self.name)
        flat = reader.take(self.dtype, self.layout.total).astype(np.float32)
        reader.finish()
        return self.layout.unflatten(flat)


def _pack_nibbles(codes: np.ndarray) -> bytes:
    codes = codes.astype(np.uint8)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    return (codes[0::2] | (codes[1::2] << 4)).tobytes()


def _unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    out = np.empty(packed.size * 2, dtype=np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:count]


class NF4(Method):
    """Blockwise NormalFloat-4, as NVIDIA FLARE's 4-bit quantisation filter sends it."""

    name = "nf4"
    block_size = 64

    def encode(self, update, *, fisher, state, seed, budget_bytes=None):
        self.layout.check(update)
        parts = [self._header()]
        for name in self.layout.names:
            values = np.asarray(update[name], dtype=np.float32).ravel()
            n_blocks = -(-values.size // self.block_size)
            padded = np.zeros(n_blocks * self.block_size, dtype=np.float32)
            padded[: values.size] = values
            blocks = padded.reshape(n_blocks, self.block_size)
            absmax = np.abs(blocks).max(axis=1).astype(np.float32)
            safe = np.where(absmax > 0, absmax, 1.0)[:, None]
            codes = np.searchsorted(_NF4_MIDPOINTS, blocks / safe).ravel()[: values.size]
            parts.append(absmax.astype("<f4").tobytes())
            parts.append(_pack_nibbles(codes))
        return b"".join(parts)

    def decode(self, data):
        reader = _Reader(self._read_header(data), self.name)
        out = {}
        for name in self.layout.names:
            size = self.layout.sizes[name]
            n_blocks = -(-size // self.block_size)
            absmax = reader.take("<f4", n_blocks).astype(np.float32)
            codes = _unpack_nibbles(reader.take("u1", (size + 1) // 2), size)
            scales = np.repeat(absmax, self.block_size)[:size]
            out[name] = (NF4_LEVELS[codes] * scales).reshape(self.layout.shapes[name])
        reader.finish()
        return out


class QSGD(Method):
    """Stochastic uniform quantisation with a per-tensor (max) norm, 8 or 4 bits per element."""

    def __init__(self, layout: UpdateLayout, bits: int):
        super().__init__(layout)
        if bits not in (4, 8):
            raise ValueError("qsgd supports 4 or 8 bits")
        self.bits = bits
        self.name = f"qsgd{bits}"
        self.levels = (1 << (bits - 1)) - 1  # per sign: 7 or 127

    def config(self):
        return {"name": self.name, "bits": self.bits, "levels_per_sign": self.levels, "norm": "max"}

    def encode(self, update, *, fisher, state, seed, budget_bytes=None):
        self.layout.check(update)
        rng = np.random.default_rng(seed)
        parts = [self._header()]
        for name in self.layout.names:
            values = np.asarray(update[name], dtype=np.float32).ravel()
            norm = np.float32(np.abs(values).max()) if values.size else np.float32(0)
            scaled = np.abs(values) / norm * self.levels if norm > 0 else np.zeros_like(values)
            lower = np.floor(scaled)
            level = lower + (rng.random(values.size) < (scaled - lower))
            signed = (np.sign(values) * level).astype(np.int16)
            parts.append(np.array([norm], dtype="<f4").tobytes())
            if self.bits == 8:
                parts.append(signed.astype(np.int8).tobytes())
            else:
                parts.append(_pack_nibbles(signed + self.levels))
        return b"".join(parts)

    def decode(self, data):
        reader = _Reader(self._read_header(data), self.name)
        out = {}
        for name in self.layout.names:
            size = self.layout.sizes[name]
            norm = float(reader.take("<f4", 1)[0])
            if self.bits == 8:
                signed = reader.take("i1", size).astype(np.float32)
            else:
                signed = _unpack_nibbles(reader.take("u1", (size + 1) // 2), size).astype(np.float32)
                signed -= self.levels
            out[name] = (signed * (norm / self.levels)).astype(np.float32).reshape(self.layout.shapes[name])
        reader.finish()
        return out


class TopK(Method):
    """Global top-k sparsification with error feedback; ``k`` from a bits-per-parameter budget."""

    name = "topk"
    bits_per_entry = 64  # uint32 index + float32 value

    def __init__(self, layout: UpdateLayout, bits_per_param: float):
        super().__init__(layout)
        budget_bits = bits_per_param * layout.total - 8 * (_HEADER.size + 4)
        self.k = max(1, min(layout.total, int(budget_bits // self.bits_per_entry)))

    def config(self):
        return {"name": self.name, "k": self.k, "fraction": self.k / self.layout.total,
                "error_feedback": True}

    def new_client_state(self):
        return {"residual": np.zeros(self.layout.total, dtype=np.float32)}

    def encode(self, update, *, fisher, state, seed, budget_bytes=None):
        self.layout.check(update)
        corrected = self.layout.flatten(update) + state["residual"]
        # argpartition then sort: the indices go out ascending, which a receiver can check cheaply.
        indices = np.sort(np.argpartition(np.abs(corrected), -self.k)[-self.k:]).astype(np.uint32)
        values = corrected[indices].astype(np.float32)
        state["residual"] = corrected
        state["residual"][indices] = 0.0
        return (self._header() + struct.pack("<I", self.k)
                + indices.astype("<u4").tobytes() + values.astype("<f4").tobytes())

    def decode(self, data):
        reader = _Reader(self._read_header(data), self.name)
        (k,) = reader.take("<u4", 1)
        if k > self.layout.total:
            raise ValueError(f"topk message declares k={k} > {self.layout.total} parameters")
        indices = reader.take("<u4", int(k))
        values = reader.take("<f4", int(k))
        reader.finish()
        if k and (indices.max() >= self.layout.total or np.any(np.diff(indices.astype(np.int64)) <= 0)):
            raise ValueError("topk indices out of range or not strictly increasing")
        flat = np.zeros(self.layout.total, dtype=np.float32)
        flat[indices] = values
        return self.layout.unflatten(flat)


class Fstq(Method):
    """fstqcodec under a byte budget, with error feedback; Fisher-weighted or not.

    Both ends know the model, as the baselines assume: tensors are named by the layout's
    :class:`fstqcodec.Schema` digest instead of being listed, which frees a few hundred header bytes
    for codes in a ~4 kB message.
    """

    def __init__(self, layout: UpdateLayout, config: EncodeConfig, *, use_fisher: bool, unbiased: bool = False):
        super().__init__(layout)
        self.name = "fstq-unbiased" if unbiased else "fstq" if use_fisher else "fstq-nofisher"
        self.uses_fisher = use_fisher
        # The unbiased mode needs no error feedback: nothing is held back on average.
        self.error_feedback = not unbiased
        self.encode_config = config.replace(unbiased=True) if unbiased else config
        self.wire_schema = fstqcodec.Schema(
            [(name, "float32", layout.shapes[name], config.block_size) for name in layout.names]
        )

    def config(self):
        return {"name": self.name, "fisher": self.uses_fisher, "error_feedback": self.error_feedback,
                "header": "tensors named by schema digest (both ends know the model)",
                "encode_config": self.encode_config.get_config()}

    def new_client_state(self):
        return fstqcodec.ErrorFeedback(self.encode_config) if self.error_feedback else None

    def encode(self, update, *, fisher, state, seed, budget_bytes=None):
        self.layout.check(update)
        config = self.encode_config.replace(seed=seed)
        if budget_bytes is not None:
            config = config.replace(budget=fstqcodec.Budget(max_bytes=int(budget_bytes)))
        return (state.encode if self.error_feedback else fstqcodec.encode)(
            {name: np.asarray(update[name], dtype=np.float32) for name in self.layout.names},
            fisher=fisher if self.uses_fisher else None,
            schema=self.wire_schema,
            config=config,
        )

    def decode(self, data):
        return fstqcodec.decode(data, schemas=self.wire_schema)

    def anatomy(self, data):
        """Preamble and checksum, the msgpack header (as stored), and each kind of section."""
        report = fstqcodec.inspect(data, schemas=self.wire_schema)
        parts = {"framing": report["framing_size"], "header": report["header_size"]}
        for section in report["sections"]:
            parts[section["kind"]] = parts.get(section["kind"], 0) + section["stored"]
        return parts


def make_method(name: str, layout: UpdateLayout, config: EncodeConfig) -> Method:
    """Build a method by name.

    Parameters
    ----------
    name : str
        One of :data:`METHOD_NAMES`.
    layout : UpdateLayout
        The update's tensor names and shapes.
    config : fstqcodec.EncodeConfig
        The fstq methods' encoder options. Its budget, in bits per parameter, also sets ``topk``'s
        ``k``; the fixed-rate baselines ignore it.

    Raises
    ------
    ValueError
        If the name is unknown, or ``topk`` or ``eden`` is asked for without a bits-per-parameter
        budget.
    """
    if name == "fp32":
        return RawFloat(layout, "<f4")
    if name == "fp16":
        return RawFloat(layout, "<f2")
    if name == "nf4":
        return NF4(layout)
    if name in ("qsgd8", "qsgd4"):
        return QSGD(layout, int(name[4:]))
    if name == "topk":
        if config.budget is None or config.budget.bits_per_param is None:
            raise ValueError("topk needs a bits-per-parameter budget to choose k")
        return TopK(layout, config.budget.bits_per_param)
    if name in ("fstq", "fstq-nofisher", "fstq-unbiased"):
        return Fstq(layout, config, use_fisher=name != "fstq-nofisher", unbiased=name == "fstq-unbiased")
    if name in ("eden", "signsgd-ef"):
        from fstqcodec.sim.peer_methods import Eden, SignSGDEF  # imports this module

        return Eden(layout, config) if name == "eden" else SignSGDEF(layout)
    if name == "fstq-ef21":
        from fstqcodec.sim.predictive import FstqEF21  # imports this module

        return FstqEF21(layout, config)
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)}")


def parse_methods(text: str) -> list[str]:
    """Parse ``--methods``: a comma-separated list, or ``all``; ``qsgd`` means both qsgd8 and qsgd4.

    Raises
    ------
    ValueError
        On an unknown or repeated name, or an empty list.
    """
    text = text.strip()
    if text == "all":
        return list(METHOD_NAMES)
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            continue
        expanded = ["qsgd8", "qsgd4"] if name == "qsgd" else [name]
        for item in expanded:
            if item not in METHOD_NAMES:
                raise ValueError(f"unknown method {item!r}; known: {', '.join(METHOD_NAMES)}, all")
            if item in names:
                raise ValueError(f"method {item!r} given twice")
            names.append(item)
    if not names:
        raise ValueError("no methods given")
    return names
