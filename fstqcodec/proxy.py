"""Downlink model proxies (FedQSN, arXiv 2508.18911), made real in the fstq format.

The server never sends its whole model. A **server mask**, fixed for the run, hides a share of
every tensor from every client; a **client mask**, drawn anew for each client and round, hides
more; the rest is quantized at a byte budget. Masks travel as seeds in the message's header
(format 1.1, ``spec/FORMAT.md`` 5.9): hidden entries cost no bytes, and the message holds no
value of a server-masked entry. The server then averages each client's update only where that
client could see (:class:`MaskedAverage`: per-entry weight sums).

Only numpy is needed::

    server = ProxyServer(shapes, server_keep=0.7, client_keep=0.9, seed=0)
    message = server.downlink(global_params, client=3, round_number=1)
    proxy, visible = decode_proxy(message, previous=my_last_proxy, fill="received")
    my_last_proxy = proxy  # each entry as last sent to this client (the initial model's where never)
    ... train, then send  (local - proxy) * visible  uplink ...
    average.add(update, server.visible(client=3, round_number=1), weight=n_examples)
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Mapping

import numpy as np

from . import decoder
from .codec import encode
from .policy.budget import Budget
from .wire.masks import GRANULARITIES, Mask, visibility

__all__ = ["ProxyServer", "MaskedAverage", "decode_proxy", "read_proxy", "fill_hidden", "FILLS", "cosine_similarity",
           "exempt_patterns"]

#: What a client puts in the entries its proxy hides: zeros; its own previous values (the model it
#: last trained); or the last values it received (the model it decoded from its last proxy: each entry
#: as the server last sent it, the initial value where never sent).
FILLS = ("zero", "previous", "received")


def exempt_patterns(patterns) -> tuple[str, ...]:
    """``patterns`` (a sequence of glob patterns of tensor names) as a tuple.

    Raises
    ------
    TypeError
        If ``patterns`` is a bare string (a sequence of one-letter patterns) or holds a non-string.
    """
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"server_exempt must be a sequence of glob patterns (str), got {patterns!r}")
    return tuple(patterns)


def _derive_seed(*parts: int) -> int:
    """A 64-bit mask seed from integers (SHA-256 of their decimal forms), stable everywhere."""
    text = ",".join(str(int(p)) for p in parts).encode("ascii")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


class ProxyServer:
    """Builds each client's downlink proxy of the global model.

    Parameters
    ----------
    shapes : Mapping[str, tuple]
        The model's tensors (names in order, shapes).
    server_keep : float
        Share of every tensor the server ever sends, in (0, 1] (1 - the server mask rate).
    client_keep : float
        Share of the server-visible entries each client gets in a round, in (0, 1].
    granularity : {"element", "row", "column"}
        Mask unit (rows and columns only for 2-D tensors; 1-D tensors fall back to elements).
    server_exempt : sequence of str
        Glob patterns (``fnmatch``, case-sensitive) of tensor names the server mask does not cover:
        the client masks still hide part of them each round. For parts of the model that are not
        the server's to protect and that every entry of must train, such as a classification head
        initialised for the federation (a server-masked entry never trains: no client sees it).
    seed : int
        Run seed: the server masks derive from it, the client masks from it, the round and the client.
    budget : Budget or int or None
        Downlink size: a :class:`Budget` (``bits_per_param`` counts the entries sent), a byte count,
        or None for exact (lossless) values.
    block_size : int
        Encoder block size.

    Raises
    ------
    ValueError
        If a keep share or the granularity is out of range, or a ``server_exempt`` pattern
        matches no tensor (a misspelt pattern would silently exempt nothing).
    TypeError
        If ``server_exempt`` is not a sequence of strings.
    """

    def __init__(self, shapes: Mapping, *, server_keep: float = 0.7, client_keep: float = 0.9, granularity: str = "element",
                 seed: int = 0, budget=Budget(bits_per_param=4), block_size: int = 64, server_exempt=()):
        for what, keep in (("server_keep", server_keep), ("client_keep", client_keep)):
            if not 0.0 < float(keep) <= 1.0:
                raise ValueError(f"{what} must be in (0, 1], got {keep!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        self.server_keep, self.client_keep = float(server_keep), float(client_keep)
        self.granularity, self.seed, self.budget, self.block_size = granularity, int(seed), budget, block_size
        self.server_exempt = exempt_patterns(server_exempt)
        unmatched = [p for p in self.server_exempt if not any(fnmatch.fnmatchcase(n, p) for n in self.shapes)]
        if unmatched:
            raise ValueError(f"server_exempt pattern(s) {unmatched} match no tensor name (names: {list(self.shapes)[:4]}...)")
        self._server_visible = {name: visibility(shape, self._server_masks(name)) for name, shape in self.shapes.items()}

    def _unit(self, shape: tuple) -> str:
        return self.granularity if len(shape) == 2 else "element"

    def exempt(self, name: str) -> bool:
        """Whether the server mask leaves tensor ``name`` out (it matches a ``server_exempt`` pattern)."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.server_exempt)

    def _server_masks(self, name: str) -> list:
        if self.server_keep == 1.0 or self.exempt(name):
            return []
        index = list(self.shapes).index(name)
        return [Mask(_derive_seed(self.seed, 1, index), self.server_keep, self._unit(self.shapes[name]))]

    def masks(self, client: int, round_number: int) -> dict:
        """Tensor name -> the masks of ``client``'s proxy in ``round_number`` (server's, then client's)."""
        masks = {}
        for index, (name, shape) in enumerate(self.shapes.items()):
            listed = self._server_masks(name)
            if self.client_keep < 1.0:
                listed.append(Mask(_derive_seed(self.seed, 2, round_number, client, index), self.client_keep, self._unit(shape)))
            if listed:
                masks[name] = listed
        return masks

    def server_visible(self) -> dict:
        """Tensor name -> boolean array: the entries the server ever sends (to anyone)."""
        return {name: visible.copy() for name, visible in self._server_visible.items()}

    def visible(self, client: int, round_number: int) -> dict:
        """Tensor name -> boolean array: the entries ``client``'s proxy carries in ``round_number``."""
        masks = self.masks(client, round_number)
        return {name: visibility(shape, masks.get(name, [])) for name, shape in self.shapes.items()}

    def downlink(self, params: Mapping, client: int, round_number: int, *, schema=None) -> bytes:
        """The proxy message of ``params`` for ``client`` in ``round_number``.

        Raises
        ------
        EncodeError
            If ``params`` do not match the shapes, or the budget is below the smallest message.
        """
        arrays = {}
        for name, shape in self.shapes.items():
            array = np.asarray(params[name])
            if tuple(array.shape) != shape:
                raise ValueError(f"params[{name!r}] has shape {array.shape}, the proxy server was built for {shape}")
            arrays[name] = array
        return encode(arrays, budget=self.budget, block_size=self.block_size, masks=self.masks(client, round_number),
                      schema=schema, seed=_derive_seed(self.seed, 3, round_number, client) % (1 << 63))


def decode_proxy(message, *, previous: Mapping | None = None, fill: str = "zero", schemas=None, limits=None) -> tuple[dict, dict]:
    """A client's model from its proxy message, and which entries the message carried.

    Parameters
    ----------
    message : bytes-like
        A proxy message (possibly hostile: the decoder checks everything).
    previous : Mapping[str, array], optional
        The values hidden entries take with ``fill="previous"`` or ``fill="received"``: the model
        the client last trained ("previous"), or the model it decoded from its last proxy
        ("received"; the initial model before its first). With "received", the returned model is
        what to pass next time, so each entry keeps the last value the server sent this client:
        its best estimate of the global model, free of its own local (non-IID) training.
    fill : {"zero", "previous", "received"}
        What hidden entries hold: zero, or the values of ``previous``.

    Returns
    -------
    (dict, dict)
        Name -> float array (the model), and name -> boolean array (True where the proxy carried
        the entry).

    Raises
    ------
    DecodeError
        If the message is invalid.
    ValueError
        If ``fill`` is unknown, or ``fill`` is "previous" or "received" without ``previous`` for every tensor.
    """
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    arrays, visible, _ = read_proxy(message, schemas=schemas, limits=limits)
    if fill != "zero":
        arrays = fill_hidden(arrays, visible, previous)
    return arrays, visible


def read_proxy(message, *, schemas=None, limits=None) -> tuple[dict, dict, dict]:
    """Decode a proxy message once: its arrays (hidden entries 0), what it carried, and its masks.

    Returns
    -------
    (dict, dict, dict)
        Name -> float array, name -> boolean array (True where the message carried the entry),
        and name -> list of :class:`Mask` for the tensors that carry masks. A receiver that
        encodes its reply with these masks sends exactly the entries it was sent.

    Raises
    ------
    DecodeError
        If the message is invalid.
    """
    _, layout, arrays = decoder.read_message(message, decoder.resolve_limits(limits), schemas)
    masked = decoder.visible_elements(layout)
    visible = {name: masked.get(name, np.ones(array.shape, dtype=bool)) for name, array in arrays.items()}
    masks = {layout.tensors[index].name: list(listed) for index, listed in layout.masks.items()}
    return arrays, visible, masks


def fill_hidden(arrays: Mapping, visible: Mapping, previous: Mapping | None) -> dict:
    """``arrays`` with every hidden entry (``visible`` False) taken from ``previous``.

    Raises
    ------
    ValueError
        If ``previous`` lacks a tensor of ``arrays`` or holds one of another shape.
    """
    if previous is None or any(name not in previous for name in arrays):
        raise ValueError("filling hidden entries needs the client's previous values of every tensor")
    filled = {}
    for name, array in arrays.items():
        kept = np.asarray(previous[name])
        if kept.shape != array.shape:
            raise ValueError(f"the previous values of {name!r} have shape {kept.shape}, the proxy {array.shape}")
        filled[name] = np.where(visible[name], array, kept.astype(array.dtype, copy=False))
    return filled


class MaskedAverage:
    """FedAvg where each client counts only on the entries it could see.

    Each entry of the result is ``sum_c w_c v_c x_c / sum_c w_c v_c`` (``v_c`` the client's
    visibility); an entry no client saw gets 0.
    """

    def __init__(self, shapes: Mapping):
        self.sums = {name: np.zeros(shape, dtype=np.float64) for name, shape in shapes.items()}
        self.weights = {name: np.zeros(shape, dtype=np.float64) for name, shape in shapes.items()}

    def add(self, update: Mapping, visible: Mapping, weight: float) -> None:
        """Count ``update`` with ``weight`` where ``visible`` is True (elsewhere it is ignored)."""
        for name in self.sums:
            seen = np.asarray(visible[name], dtype=bool)
            self.sums[name] += np.where(seen, weight * np.asarray(update[name], dtype=np.float64), 0.0)
            self.weights[name] += weight * seen

    def result(self) -> dict:
        """Name -> float32 weighted mean per entry (0 where the weights sum to 0)."""
        return {
            name: np.where(self.weights[name] > 0, total / np.maximum(self.weights[name], 1e-300), 0.0).astype(np.float32)
            for name, total in self.sums.items()
        }


def cosine_similarity(a: Mapping, b: Mapping) -> float:
    """Cosine similarity of two models taken as one flat vector each (0 if either is all zero)."""
    dot = sum(float(np.dot(np.ravel(a[n]).astype(np.float64), np.ravel(b[n]).astype(np.float64))) for n in a)
    norm_a = np.sqrt(sum(float(np.sum(np.square(a[n], dtype=np.float64))) for n in a))
    norm_b = np.sqrt(sum(float(np.sum(np.square(b[n], dtype=np.float64))) for n in b))
    return dot / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else 0.0
