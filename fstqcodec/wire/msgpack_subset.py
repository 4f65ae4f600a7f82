"""The header's msgpack subset, checked byte by byte in the order FORMAT.md section 5.1 fixes.

:func:`scan` is the exact reading of section 5.1: it walks the header bytes once, item by item,
without building objects, and raises the error of the first check that fails. The container
module parses valid headers with msgpack-python (C speed) and calls :func:`scan` only when that
parse fails or the object is too deep, so that the error class never depends on the order in
which msgpack-python happens to notice the problems (it counts containers when they end, and
bounds declared lengths by the whole header rather than by the bytes left).
"""

from __future__ import annotations

import re

from ..errors import BadFormatError, LimitExceededError, TrailingDataError
from ..stages import rans as _rans  # holds the optional C accelerator (None when not built or disabled)

__all__ = ["MAX_DEPTH", "container_budget", "scan", "too_deep"]

#: Deepest container a header may hold (the header map is at depth 1). FORMAT.md 5.1 rule 6.
MAX_DEPTH = 16

# Items that are a single byte: positive and negative fixint, nil, false, true.
_ONE_BYTE_RUN = re.compile(rb"[\x00-\x7f\xc0\xc2\xc3\xe0-\xff]*")
# Scalars with a fixed number of bytes after the type byte: floats and integers.
_FIXED = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
# str and bin types with the size of their length field (fixstr: 0, the length is in the type byte).
_STR_LENGTH_FIELD = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_BIN_LENGTH_FIELD = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_ARRAY_LENGTH_FIELD = {0xDC: 2, 0xDD: 4}
_MAP_LENGTH_FIELD = {0xDE: 2, 0xDF: 4}
_EXT = frozenset({0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})


def container_budget(limits) -> int:
    """Most arrays and maps a header may hold (FORMAT.md 5.1 rule 8)."""
    return 2 * limits.max_tensors + 3 * limits.max_contexts + 4096


def _is_str_type(byte: int) -> bool:
    return 0xA0 <= byte <= 0xBF or byte in _STR_LENGTH_FIELD


def _fail(message: str, offset: int):
    raise BadFormatError(f"header is not valid msgpack under FORMAT.md 5.1: {message} (header byte {offset})")


def _read_length(data: bytes, pos: int, size: int, what: str) -> int:
    if pos + size > len(data):
        _fail(f"{what} length field ends past the last byte", pos)
    return int.from_bytes(data[pos : pos + size], "big")


def scan(data: bytes, limits) -> None:
    """Check ``data`` against FORMAT.md 5.1 rules 1-8, in byte order (step 8).

    Uses the C accelerator when it is built: a zstd-encoded header of a few hundred bytes can hold
    millions of items, which this walk visits one by one.

    Raises
    ------
    BadFormatError, LimitExceededError, TrailingDataError
        The error of the first check that fails, in the order the bytes are read.
    """
    native = getattr(_rans._speedups, "msgpack_scan", None)
    if native is None:
        return scan_python(data, limits)
    budget = container_budget(limits)
    try:
        native(data, budget)
    except ValueError as exc:
        code, message, extra = exc.args
        if code == "limit":
            raise _too_many_containers(budget, limits, extra) from None
        if code == "trailing":
            raise TrailingDataError(f"header holds {extra} bytes after its msgpack map", extra=extra, offset=len(data) - extra) from None
        _fail(message, extra)


def _too_many_containers(budget: int, limits, count: int) -> LimitExceededError:
    return LimitExceededError(
        f"header holds more than {budget} arrays and maps, more than max_tensors={limits.max_tensors} "
        "and max_contexts allow",
        limit_name="max_tensors",
        limit=limits.max_tensors,
        actual=count,
    )


def scan_python(data: bytes, limits) -> None:
    """The Python implementation of :func:`scan` (the reference)."""
    size = len(data)
    if size == 0 or not (0x80 <= data[0] <= 0x8F or data[0] in _MAP_LENGTH_FIELD):
        _fail("the header is not a map", 0)
    budget = container_budget(limits)
    containers = 0
    # One frame per open container: [items still to read, the keys seen (a set) for maps].
    stack: list = []
    pos = 0
    while True:
        top = stack[-1] if stack else None
        if top is not None and top[1] is None and pos < size:
            # A run of one-byte scalars in an array is checked in one step (nil bombs).
            run = min(_ONE_BYTE_RUN.match(data, pos).end() - pos, top[0])
            if run:
                pos += run
                top[0] -= run
                if _close_finished(stack):
                    break
                continue
        if pos >= size:
            _fail("an object ends past the last byte", pos)
        start, byte = pos, data[pos]
        pos += 1
        is_key = top is not None and top[1] is not None and top[0] % 2 == 0
        if is_key and not _is_str_type(byte):
            _fail(f"map key of type byte {byte:#04x} is not a str", start)
        if byte == 0xC1 or byte in _EXT:
            _fail(f"type byte {byte:#04x} is an extension type or never used", start)
        if byte <= 0x7F or byte >= 0xE0 or byte in (0xC0, 0xC2, 0xC3):
            pass
        elif byte in _FIXED:
            if pos + _FIXED[byte] > size:
                _fail("a number ends past the last byte", start)
            pos += _FIXED[byte]
        elif _is_str_type(byte) or byte in _BIN_LENGTH_FIELD:
            field = _STR_LENGTH_FIELD.get(byte, _BIN_LENGTH_FIELD.get(byte, 0))
            length = byte & 0x1F if field == 0 else _read_length(data, pos, field, "str/bin")
            pos += field
            if length > size - pos:
                _fail(f"a str or bin declares {length} bytes, {size - pos} are left", start)
            payload = data[pos : pos + length]
            pos += length
            if _is_str_type(byte):
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    _fail("a str is not valid UTF-8", start)
                if is_key:
                    if payload in top[1]:
                        _fail(f"a map holds the key {payload.decode()!r} twice", start)
                    top[1].add(payload)
        else:
            is_map = 0x80 <= byte <= 0x8F or byte in _MAP_LENGTH_FIELD
            field = _MAP_LENGTH_FIELD.get(byte, _ARRAY_LENGTH_FIELD.get(byte, 0))
            count = byte & 0x0F if field == 0 else _read_length(data, pos, field, "array/map")
            pos += field
            if len(stack) + 1 > MAX_DEPTH:
                _fail(f"a container at depth {len(stack) + 1}, deeper than {MAX_DEPTH}", start)
            items = 2 * count if is_map else count
            if items > size - pos:
                _fail(f"a container declares {items} objects, {size - pos} bytes are left", start)
            containers += 1
            if containers > budget:
                raise _too_many_containers(budget, limits, containers)
            stack.append([items, set() if is_map else None])
            if items == 0 and _close_finished(stack):
                break
            continue
        top[0] -= 1
        if _close_finished(stack):
            break
    if pos != size:
        raise TrailingDataError(f"header holds {size - pos} bytes after its msgpack map", extra=size - pos, offset=pos)


def _close_finished(stack: list) -> bool:
    """Pop the containers whose items are all read; True once the header map itself is complete."""
    while stack and stack[-1][0] == 0:
        stack.pop()
        if not stack:
            return True
        stack[-1][0] -= 1
    return False


def too_deep(header) -> bool:
    """Whether a parsed header holds a container deeper than :data:`MAX_DEPTH` (maps, lists)."""
    level, depth = [header], 1
    while level:
        children = []
        for container in level:
            values = container.values() if isinstance(container, dict) else container
            children.extend(v for v in values if isinstance(v, (list, dict)))
        if children and depth == MAX_DEPTH:
            return True
        level, depth = children, depth + 1
    return False
