"""The tensor files ``fstq`` reads and writes: .npz and .safetensors, bfloat16 included, numpy only.

numpy has no bfloat16. In memory a bfloat16 tensor is a float32 array holding bfloat16 values (as
:func:`fstqcodec.decode` returns it) with ``"bfloat16"`` recorded in :attr:`TensorFile.dtypes`.
On disk it keeps its 16 bits:

- in .safetensors as ``BF16``, as torch writes it;
- in .npz as its raw bits in a ``uint16`` array of the structured dtype :data:`NPZ_BFLOAT16`
  (one field named ``bfloat16``), so that the file says what it holds and reads back as bfloat16.
  To get float32 values in numpy: ``(a["bfloat16"].astype("<u4") << 16).view("<f4")``.

The .safetensors reader follows the format's own checks (the header size capped, tensors tiling
the data exactly: no gaps, no overlaps, no trailing bytes) so that a truncated or damaged file is
refused by name instead of read short.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from ..files import write_atomic
from .errors import UsageError

__all__ = ["TensorFile", "NPZ_BFLOAT16", "read_tensors", "write_tensors", "write_output", "check_output_path", "check_suffix", "SUFFIXES"]

SUFFIXES = (".npz", ".safetensors")

#: How .npz files hold bfloat16 tensors: their raw bits under a field named after the dtype.
NPZ_BFLOAT16 = np.dtype([("bfloat16", "<u2")])

_FLOAT_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "float64": np.dtype("<f8")}
_SAFETENSORS_CODES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_SAFETENSORS_NAMES = {name: code for code, name in _SAFETENSORS_CODES.items()}
# The safetensors library refuses headers over 100 MB; a larger declared size is damage, not data.
_MAX_SAFETENSORS_HEADER = 100_000_000
_SUPPORTED = "fstq encodes float16, bfloat16, float32 and float64 tensors"


@dataclass
class TensorFile:
    """Named tensors and their dtypes (``"bfloat16"`` arrays hold float32 values)."""

    arrays: dict = field(default_factory=dict)
    dtypes: dict = field(default_factory=dict)

    @property
    def raw_bytes(self) -> int:
        """Bytes the tensors take at their own dtypes (2 per bfloat16 element)."""
        return sum(a.size * (2 if self.dtypes[n] == "bfloat16" else a.itemsize) for n, a in self.arrays.items())


def check_suffix(path: str, what: str) -> str:
    """The suffix of ``path``: ".npz" or ".safetensors".

    Raises
    ------
    UsageError
        Any other suffix; the message names ``what`` the path is ("input", "-o").
    """
    for suffix in SUFFIXES:
        if path.endswith(suffix):
            return suffix
    raise UsageError(f"{what} {path}: expected a .npz or .safetensors file")


def read_tensors(path: str) -> TensorFile:
    """Read a .npz or .safetensors file.

    Raises
    ------
    UsageError
        Not a readable .npz / .safetensors file, or a tensor of a dtype fstq does not encode.
    OSError
        The file cannot be opened.
    """
    if check_suffix(path, "input") == ".safetensors":
        with open(path, "rb") as stream:
            return _parse_safetensors(path, stream.read())
    return _read_npz(path)


def write_tensors(path: str, tensors: TensorFile) -> None:
    """Write ``tensors`` as .npz or .safetensors (chosen by the suffix), atomically (:func:`write_output`).

    Raises
    ------
    UsageError
        An unknown suffix, a name the format cannot hold, or a file that cannot be written.
    """
    if check_suffix(path, "-o") == ".safetensors":
        data = b"".join(_safetensors_chunks(path, tensors))
    else:
        stream = io.BytesIO()
        _write_npz(stream, tensors)
        data = stream.getvalue()
    write_output(path, data)


def write_output(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` with :func:`fstqcodec.files.write_atomic`.

    Nothing half-written is left under ``path``, and the file gets the mode the umask gives.

    Raises
    ------
    UsageError
        The file cannot be written, naming ``path`` (never the temporary file).
    """
    check_output_path(path)
    try:
        write_atomic(path, data)
    except OSError as error:  # a full disk, a read-only directory
        raise UsageError(f"-o {path}: cannot write ({error.strerror or error})") from None


def check_output_path(path: str) -> str:
    """The directory ``path`` goes in, or UsageError when it cannot be a new file there.

    Called before the work too, so that a mistyped ``-o`` fails at once, not after encoding.

    Raises
    ------
    UsageError
        ``path`` is a directory, or its directory does not exist.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"-o {path}: is a directory")
    if not os.path.isdir(directory):
        raise UsageError(f"-o {path}: directory {directory} does not exist")
    return directory


def _bfloat16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype("<u4") << 16).view("<f4")


def _bfloat16_bits(values: np.ndarray) -> np.ndarray:
    # The values hold bfloat16 numbers exactly (the decoder rounded them), so the low half is zero.
    return (np.ascontiguousarray(values, dtype="<f4").view("<u4") >> 16).astype("<u2")


def _read_npz(path: str) -> TensorFile:
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):  # a .npy file renamed
            raise UsageError(f"{path}: not a .npz archive")
        with archive:
            members = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, EOFError, zlib.error, ValueError) as error:
        raise UsageError(f"{path}: not a readable .npz file ({error})") from None
    tensors = TensorFile()
    for name, member in members.items():
        if member.dtype == NPZ_BFLOAT16:
            tensors.arrays[name], tensors.dtypes[name] = _bfloat16_values(member["bfloat16"]), "bfloat16"
        elif member.dtype.kind == "f" and member.dtype.itemsize in (2, 4, 8):
            tensors.arrays[name], tensors.dtypes[name] = member, f"float{8 * member.dtype.itemsize}"
        else:
            raise UsageError(f"{path}: tensor {name!r} is {member.dtype}; {_SUPPORTED} (bfloat16 as {NPZ_BFLOAT16.descr})")
    return tensors


def _write_npz(stream, tensors: TensorFile) -> None:
    # zipfile + write_array is what np.savez does, without savez's keyword arguments: a tensor
    # named "file" or "allow_pickle" would collide with them.
    with zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in tensors.arrays.items():
            if tensors.dtypes[name] == "bfloat16":
                array = _bfloat16_bits(array).view(NPZ_BFLOAT16)
            with archive.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def _parse_safetensors(path: str, data: bytes) -> TensorFile:
    """The tensors of a .safetensors file, checked as the safetensors library checks them."""
    if len(data) < 8:
        raise UsageError(f"{path}: truncated: {len(data)} bytes, shorter than the 8-byte header length")
    header_size = int.from_bytes(data[:8], "little")
    if header_size > _MAX_SAFETENSORS_HEADER:
        raise UsageError(f"{path}: not a .safetensors file: declares a header of {header_size} bytes")
    if 8 + header_size > len(data):
        raise UsageError(f"{path}: truncated: the header declares {header_size} bytes, {len(data) - 8} follow")
    header = _safetensors_header(path, data[8:8 + header_size])
    body = memoryview(data)[8 + header_size:]
    entries = sorted(header.items(), key=lambda item: item[1][2])
    tensors, expected_begin = TensorFile(), 0
    for name, (dtype_name, shape, (begin, end)) in entries:
        if begin != expected_begin:
            raise UsageError(f"{path}: tensor {name!r} starts at data byte {begin}, expected {expected_begin} (gap or overlap)")
        if end > len(body):
            raise UsageError(f"{path}: truncated: tensor {name!r} ends at data byte {end}, the file holds {len(body)}")
        expected_begin = end
        stored = np.dtype("<u2") if dtype_name == "bfloat16" else _FLOAT_DTYPES[dtype_name]
        count = math.prod(shape)
        if count * stored.itemsize != end - begin:
            raise UsageError(f"{path}: tensor {name!r} has shape {shape} but {end - begin} bytes of data")
        array = np.frombuffer(body, stored, count, begin).reshape(shape)
        tensors.arrays[name] = _bfloat16_values(array) if dtype_name == "bfloat16" else array
        tensors.dtypes[name] = dtype_name
    if expected_begin != len(body):
        raise UsageError(f"{path}: {len(body) - expected_begin} bytes after the last tensor's data")
    return tensors


def _safetensors_header(path: str, raw: bytes) -> dict:
    """``name -> (dtype name, shape, (begin, end))`` from the JSON header, each entry checked."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: JSON nested too deep
        raise UsageError(f"{path}: not a .safetensors file: the header is not JSON") from None
    if not isinstance(header, dict):
        raise UsageError(f"{path}: not a .safetensors file: the header is not a JSON object")
    header.pop("__metadata__", None)
    entries = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise UsageError(f"{path}: tensor {name!r}: the header entry needs dtype, shape and data_offsets")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(_is_size(d) for d in shape)):
            raise UsageError(f"{path}: tensor {name!r}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_size, offsets)) and offsets[0] <= offsets[1]):
            raise UsageError(f"{path}: tensor {name!r}: data_offsets {offsets!r} are not [begin, end]")
        if entry["dtype"] not in _SAFETENSORS_CODES:
            raise UsageError(f"{path}: tensor {name!r} is {entry['dtype']}; {_SUPPORTED} (F16, BF16, F32, F64)")
        entries[name] = (_SAFETENSORS_CODES[entry["dtype"]], tuple(shape), tuple(offsets))
    return entries


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _safetensors_chunks(path: str, tensors: TensorFile) -> list:
    """The bytes of a .safetensors file, header padded to 8 bytes as the library writes it."""
    header, chunks, offset = {}, [], 0
    for name, array in tensors.arrays.items():
        if name == "__metadata__":
            raise UsageError(f"-o {path}: a tensor named '__metadata__' cannot be stored in .safetensors")
        dtype_name = tensors.dtypes[name]
        if dtype_name == "bfloat16":
            raw = _bfloat16_bits(array)
        else:
            raw = np.ascontiguousarray(array, dtype=_FLOAT_DTYPES[dtype_name])
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype_name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + raw.nbytes]}
        chunks.append(raw.tobytes())
        offset += raw.nbytes
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return [len(encoded).to_bytes(8, "little"), encoded, *chunks]

