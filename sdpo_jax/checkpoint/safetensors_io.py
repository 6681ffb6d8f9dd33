"""Streaming safetensors writer on NumPy, with bfloat16 through ml_dtypes.

File layout (the safetensors format): an unsigned little-endian 64-bit header length N, then N
bytes of JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the end of the header) plus an optional ``"__metadata__"`` string map,
then the raw little-endian tensor bytes.

The writer streams tensors one by one to disk, materialising each (possibly lazy) tensor only
while it is written, so a multi-GB shard never sits whole in host memory; the ``safetensors``
library's writers take every tensor in memory at once. Files are read with the library itself
(``safe_open``; see `sdpo_jax.checkpoint.hf_import`).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}  # numpy dtype -> the format's dtype code
# The dtypes a converted or exported checkpoint may be stored in, by their transformers names.
STORAGE_DTYPES = {"float32": _DTYPES["F32"], "bfloat16": _DTYPES["BF16"], "float16": _DTYPES["F16"]}


class SafetensorsError(ValueError):
    """Tensors that cannot be written as a safetensors file (a dtype it has no code for, a repeated name)."""


class LazyTensor:
    """A tensor known by shape and dtype, computed only when ``np.asarray`` asks for it."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, compute: Callable[[], np.ndarray]):
        self.shape, self.dtype, self._compute = tuple(shape), np.dtype(dtype), compute

    def __array__(self, dtype=None, copy=None):
        array = np.asarray(self._compute(), dtype=self.dtype)
        return array if dtype is None else array.astype(dtype)


def tensor_nbytes(array) -> int:
    """Bytes of an array, or of any object with ``shape`` and ``dtype`` (e.g. a lazy tensor)."""
    return int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize


def write_safetensors(
    path: str | os.PathLike,
    tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``(name, array)`` pairs to ``path``; arrays are written one at a time.

    An "array" may be anything with ``shape`` and ``dtype`` that ``np.asarray`` materialises: the
    header is built from shapes alone and each tensor is materialised only while it is written,
    so lazy tensors keep host memory at one tensor.
    """
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, array in items:
        dtype = np.dtype(array.dtype)
        if dtype not in _NAMES:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        if name in header:
            raise SafetensorsError(f"{path}: tensor name {name!r} appears twice")
        nbytes = tensor_nbytes(array)
        header[name] = {"dtype": _NAMES[dtype], "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    tmp_path = os.fspath(path) + ".tmp"
    with open(tmp_path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for _, array in items:
            # Native byte order is little-endian on every platform JAX supports, as the format wants.
            out.write(np.ascontiguousarray(np.asarray(array)).reshape(-1).view(np.uint8).data)
    os.replace(tmp_path, path)
