"""Streaming safetensors reader and writer on NumPy, with bfloat16 through ml_dtypes.

File layout (the safetensors format): an unsigned little-endian 64-bit header length N, then N
bytes of JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the end of the header) plus an optional ``"__metadata__"`` string map,
then the raw little-endian tensor bytes.

The reader memory-maps the file and hands out zero-copy views, so a caller can copy one tensor
at a time into its destination without a second full copy of the checkpoint in host memory.
The writer streams tensors one by one to disk for the same reason.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Callable, Iterable, Iterator, Mapping

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
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
# The dtypes a converted or exported checkpoint may be stored in, by their transformers names.
STORAGE_DTYPES = {"float32": _DTYPES["F32"], "bfloat16": _DTYPES["BF16"], "float16": _DTYPES["F16"]}


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read as the format defines it."""


class SafetensorsFile:
    """A memory-mapped safetensors file: ``keys()``, ``shape(name)``, ``dtype(name)``, ``[name]``.

    ``file[name]`` is a read-only NumPy view into the mapping; copy it (``np.asarray(x, dtype)``)
    before the file is closed.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._file = open(self.path, "rb")
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size < 8:
                raise SafetensorsError(f"{self.path}: too short to be a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", self._file.read(8))
            if header_len > size - 8:
                raise SafetensorsError(f"{self.path}: header length {header_len} exceeds the file size {size}")
            try:
                header = json.loads(self._file.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise SafetensorsError(f"{self.path}: header is not valid JSON ({err})") from None
            self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
            self._entries = header
            self._data_start = 8 + header_len
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            for name, entry in header.items():
                begin, end = entry["data_offsets"]
                dtype = self._dtype_of(name, entry)
                expected = int(np.prod(entry["shape"], dtype=np.int64)) * dtype.itemsize
                if end - begin != expected or self._data_start + end > size:
                    raise SafetensorsError(
                        f"{self.path}: tensor {name!r} has offsets {begin}..{end}, which do not fit "
                        f"shape {entry['shape']} of {entry['dtype']} in a file of {size} bytes"
                    )
        except Exception:
            self._file.close()
            raise

    def _dtype_of(self, name: str, entry: Mapping) -> np.dtype:
        try:
            return _DTYPES[entry["dtype"]]
        except KeyError:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']!r}; "
                f"supported: {', '.join(_DTYPES)}"
            ) from None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return self._dtype_of(name, self._entries[name])

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        dtype = self._dtype_of(name, entry)
        count = (end - begin) // dtype.itemsize
        flat = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._data_start + begin)
        return flat.reshape(entry["shape"])

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, copied array) for every tensor in one file."""
    with SafetensorsFile(path) as file:
        for name in file.keys():
            yield name, np.array(file[name])
