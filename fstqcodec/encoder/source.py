"""Input checks: the tensors to encode as one padded (blocks x block_size) float32 matrix."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import EncodeError
from ..limits import DEFAULT_LIMITS
from ..stages import rans as _rans
from ..stages.scales import round_bf16
from ..wire.header import DTYPES, TensorSpec

__all__ = ["Input"]

_NUMPY_DTYPES = {np.dtype("float32"): "float32", np.dtype("float16"): "float16", np.dtype("float64"): "float64"}
_RAW_NUMPY = {"f16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "f32": np.dtype("<f4"), "f64": np.dtype("<f8")}

def _check_name(name) -> None:
    """Names a default decoder accepts: non-empty str, valid UTF-8, at most max_name_length bytes."""
    if not isinstance(name, str) or not name:
        raise EncodeError(f"tensor names must be non-empty strings, got {name!r}")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise EncodeError(f"tensor name {name!r} is not valid UTF-8 (it holds a surrogate)", tensor=name) from None
    if len(encoded) > DEFAULT_LIMITS.max_name_length:
        raise EncodeError(
            f"tensor name of {len(encoded)} UTF-8 bytes; decoders refuse more than {DEFAULT_LIMITS.max_name_length} by default",
            tensor=name,
        )


def _as_array(name: str, value):
    """(dtype name, numpy array) for one input tensor."""
    if hasattr(value, "detach") and hasattr(value, "dtype"):
        # A torch tensor: convert without importing torch (the adapter module does the rest).
        tensor = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            return "bfloat16", tensor.float().numpy()
        value = tensor.numpy()
    array = np.asarray(value)
    if array.dtype.kind == "f" and not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    dtype_name = _NUMPY_DTYPES.get(array.dtype)
    if dtype_name is None:
        raise EncodeError(
            f"tensor {name!r} has dtype {array.dtype}; supported: float16, float32, float64 (and torch bfloat16)",
            tensor=name,
        )
    return dtype_name, array


def _flat_tensor(name, value, nonfinite: str) -> tuple[str, tuple, np.ndarray]:
    """(dtype name, shape, flat array) of one input tensor, its name and values checked."""
    _check_name(name)
    dtype_name, array = _as_array(name, value)
    if array.ndim > DEFAULT_LIMITS.max_ndim:
        raise EncodeError(
            f"tensor {name!r} has {array.ndim} dimensions; decoders refuse more than {DEFAULT_LIMITS.max_ndim} by default",
            tensor=name,
        )
    shape = tuple(int(d) for d in array.shape)
    array = np.ascontiguousarray(array).reshape(-1)
    if _all_finite(array):
        return dtype_name, shape, array
    finite = np.isfinite(array)
    if not finite.all():
        if nonfinite == "error":
            bad = int(array.size - np.count_nonzero(finite))
            raise EncodeError(
                f"tensor {name!r} holds {bad} non-finite values (NaN or inf); "
                "pass nonfinite='zero' to replace them with zeros",
                tensor=name,
            )
        array = np.where(finite, array, 0).astype(array.dtype)
    return dtype_name, shape, array


def _all_finite(array: np.ndarray) -> bool:
    native = getattr(_rans._speedups, "all_finite", None)
    if native is not None and array.dtype.itemsize in (4, 8):
        return native(array, array.itemsize)
    return bool(np.isfinite(array).all())


class Input:
    """The tensors to encode, flattened into one padded (blocks x block_size) float32 matrix
    (built when first read, or by the encoder's block-sum pass as it reads the tensors).

    ``block_size`` and ``nonfinite`` come validated from an :class:`fstqcodec.EncodeConfig`.

    Raises
    ------
    EncodeError
        Bad names, unsupported dtypes, non-finite values (unless ``nonfinite="zero"``).
    TypeError
        If ``tensors`` is not a mapping.
    """

    def __init__(self, tensors, block_size: int, nonfinite: str):
        if not isinstance(tensors, Mapping):
            raise TypeError(f"tensors must be a mapping of names to arrays, got {type(tensors).__name__}")
        self.block_size = block_size
        self.specs: list[TensorSpec] = []
        self.arrays: list[np.ndarray] = []  # flat, at their own dtype (bfloat16 as float32 values)
        for name, value in tensors.items():
            dtype_name, shape, array = _flat_tensor(name, value, nonfinite)
            self.specs.append(TensorSpec(name, dtype_name, shape, block_size))
            self.arrays.append(array)
        if len(self.specs) > DEFAULT_LIMITS.max_tensors:
            raise EncodeError(f"{len(self.specs)} tensors; decoders refuse more than {DEFAULT_LIMITS.max_tensors} by default")
        self.names = [s.name for s in self.specs]
        self.elements = sum(s.size for s in self.specs)
        self.raw_bytes = sum(s.size * (2 if s.dtype == "bfloat16" else DTYPES[s.dtype].itemsize) for s in self.specs)
        self._index_blocks()
        flats = [a.astype(np.float32, copy=False) for a in self.arrays]
        if not self.aligned:
            flats = [np.pad(f, (0, (-len(f)) % block_size)) for f in flats]
        self._matrix = None
        if not flats:
            self._matrix = np.zeros((0, block_size), np.float32)
        elif len(flats) == 1:
            self._matrix = flats[0].reshape(-1, block_size)
        else:
            # Copied into one matrix when first needed: the budgeted path's block-sum pass copies
            # the tensors as it reads them (:meth:`matrix_rows_to_fill`), instead of a pass of
            # its own before it.
            self._flats = flats

    @property
    def matrix(self) -> np.ndarray:
        """The tensors as one (blocks x block_size) float32 matrix, padding zero."""
        if self._matrix is None:
            self._matrix = np.concatenate(self._flats).reshape(-1, self.block_size)
            del self._flats
        return self._matrix

    def matrix_rows_to_fill(self):
        """Where the matrix is not built yet: ``(tensor rows, matrix)``, a function giving the
        rows ``lo:hi`` (blocks of tensor ``t``) of tensor ``t`` read in place, and the empty
        matrix to copy them into. Whoever takes this must fill every row, then call
        :meth:`matrix_filled`. None where the matrix exists (or is a view of one tensor)."""
        if self._matrix is not None:
            return None
        flats, size = self._flats, self.block_size

        def rows_of(t: int, lo: int, hi: int) -> np.ndarray:
            first = (lo - int(self.first_block[t])) * size
            return flats[t][first : first + (hi - lo) * size].reshape(-1, size)

        return rows_of, np.empty((len(self.counts), size), np.float32)

    def matrix_filled(self, matrix: np.ndarray) -> None:
        """The matrix that :meth:`matrix_rows_to_fill`'s taker has filled."""
        self._matrix = matrix
        del self._flats

    def _index_blocks(self) -> None:
        """Per block its element count and tensor; per tensor its first block."""
        counts = []
        for spec in self.specs:
            full, tail = divmod(spec.size, self.block_size)
            counts.append(np.full(full, self.block_size, dtype=np.int64))
            if tail:
                counts.append(np.array([tail], dtype=np.int64))
        self.counts = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        self.block_tensor = np.repeat(np.arange(len(self.specs)), [s.num_blocks for s in self.specs])
        self.first_block = np.concatenate([[0], np.cumsum([s.num_blocks for s in self.specs])]).astype(np.int64)
        self.aligned = all(s.size % self.block_size == 0 for s in self.specs)

    def check_quantizable(self) -> None:
        """Lossy coding works in float32: refuse float64 values beyond its range.

        Raises
        ------
        EncodeError
            Naming the first tensor with such values.
        """
        for spec, array in zip(self.specs, self.arrays):
            if spec.dtype == "float64" and array.size and float(np.max(np.abs(array))) > float(np.finfo(np.float32).max):
                raise EncodeError(
                    f"tensor {spec.name!r} holds values beyond the float32 range, which lossy coding cannot "
                    "represent; encode it losslessly (budget=None)",
                    tensor=spec.name,
                )

    def flatten_rows(self, matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Row-wise ``matrix`` (one row per block in ``rows``) as a flat array, padding removed."""
        if self.aligned:
            return matrix.reshape(-1)
        counts = self.counts[rows]
        if np.all(counts == self.block_size):
            return matrix.reshape(-1)
        mask = np.arange(self.block_size)[None, :] < counts[:, None]
        return matrix[mask]

    def raw_values(self, rows: np.ndarray, fmt: str) -> np.ndarray:
        """Elements of blocks ``rows`` (ascending) in raw format ``fmt``, exactly where the format
        can hold them."""
        if fmt != "f64":
            # float32, float16 and bfloat16 values sit exactly in the float32 matrix.
            every_row = len(rows) == len(self.matrix) and (not len(rows) or int(rows[-1]) == len(rows) - 1)
            values = self.flatten_rows(self.matrix if every_row else self.matrix[rows], rows)
            if fmt == "bf16":
                return (round_bf16(values).view(np.uint32) >> np.uint32(16)).astype("<u2")
            return values.astype(_RAW_NUMPY[fmt], copy=False)
        # float64: from the original arrays, one contiguous run of blocks per tensor.
        pieces = []
        tensor_of_row = self.block_tensor[rows]
        for t in np.unique(tensor_of_row):
            mine = rows[tensor_of_row == t] - self.first_block[t]
            flat = self.arrays[t]
            if len(mine) == int(self.first_block[t + 1] - self.first_block[t]):
                pieces.append(flat)
                continue
            starts = mine * self.block_size
            lengths = np.minimum(self.block_size, len(flat) - starts)
            offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
            pieces.append(flat[offsets + np.arange(int(lengths.sum()))])
        return np.concatenate(pieces).astype("<f8") if pieces else np.zeros(0, "<f8")

