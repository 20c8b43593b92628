"""The header of a GGUF file: its metadata and tensor table, with each tensor's data as a
read-only view of one memory map.

Written from the GGUF format's specification rather than through ``gguf.GGUFReader``:
that reader slices its memory map once per metadata value (about 250k slices for a 49k-token
vocabulary), about 1 s of CPU in every process that loads the default model. Here a
vocabulary's arrays are walked by offset, and arrays of numbers are read in one call.
Quantization facts (block sizes, type ids) come from the ``gguf`` package.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# value type ids of the GGUF metadata (the spec's gguf_metadata_value_type)
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_SCALARS = {
    _UINT8: "<B", _INT8: "<b", _UINT16: "<H", _INT16: "<h", _UINT32: "<I", _INT32: "<i",
    _FLOAT32: "<f", _BOOL: "<?", _UINT64: "<Q", _INT64: "<q", _FLOAT64: "<d",
}
_NUMPY = {
    _UINT8: np.uint8, _INT8: np.int8, _UINT16: np.uint16, _INT16: np.int16, _UINT32: np.uint32,
    _INT32: np.int32, _FLOAT32: np.float32, _BOOL: np.bool_, _UINT64: np.uint64, _INT64: np.int64,
    _FLOAT64: np.float64,
}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray  # GGUF's dims, innermost first
    data: np.ndarray  # numpy order: plain types as their dtype, quantized ones as uint8 rows of blocks


class GGUFFile:
    """One parsed GGUF file. ``metadata`` maps each key to a Python value (arrays of strings
    as lists, other arrays as numpy arrays); ``tensors`` keeps the file's order."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._buffer = memoryview(self._map)
        self._path = path
        if bytes(self._buffer[:4]) != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
        version, = struct.unpack_from("<I", self._buffer, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or later)")
        tensor_count, kv_count = struct.unpack_from("<QQ", self._buffer, 8)
        self._offset = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string()
            value_type = self._scalar("<I")
            self.metadata[key] = self._value(value_type)
        table = [self._tensor_info() for _ in range(tensor_count)]
        alignment = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-self._offset // alignment) * alignment
        array = np.frombuffer(self._map, dtype=np.uint8)
        self.tensors = [self._tensor(array, data_start, *info) for info in table]

    def _scalar(self, fmt: str):
        value, = struct.unpack_from(fmt, self._buffer, self._offset)
        self._offset += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._scalar("<Q")
        start = self._offset
        self._offset += length
        return bytes(self._buffer[start:self._offset]).decode("utf-8", errors="replace")

    def _value(self, value_type: int):
        if value_type in _SCALARS:
            return self._scalar(_SCALARS[value_type])
        if value_type == _STRING:
            return self._string()
        if value_type != _ARRAY:
            raise ValueError(f"{self._path}: unknown GGUF metadata type {value_type} at byte {self._offset}")
        item_type = self._scalar("<I")
        count = self._scalar("<Q")
        if item_type in _NUMPY:
            dtype = np.dtype(_NUMPY[item_type]).newbyteorder("<")
            start = self._offset
            self._offset += count * dtype.itemsize
            return np.frombuffer(self._map, dtype=dtype, count=count, offset=start)
        return [self._value(item_type) for _ in range(count)]

    def _tensor_info(self) -> tuple[str, np.ndarray, int, int]:
        name = self._string()
        n_dims = self._scalar("<I")
        dims = np.frombuffer(self._map, dtype="<u8", count=n_dims, offset=self._offset).copy()
        self._offset += 8 * n_dims
        ggml_type = self._scalar("<I")
        offset = self._scalar("<Q")
        return name, dims, ggml_type, offset

    def _tensor(self, array: np.ndarray, data_start: int, name: str, dims: np.ndarray, ggml_type: int,
                offset: int) -> GGUFTensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        kind = GGMLQuantizationType(ggml_type)
        numpy_dims = tuple(int(d) for d in reversed(dims.tolist()))
        plain = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
                 GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                 GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                 GGMLQuantizationType.I64: np.int64}
        start = data_start + offset
        if kind in plain:
            dtype = np.dtype(plain[kind])
            shape, nbytes = numpy_dims, int(np.prod(numpy_dims)) * dtype.itemsize
        else:
            block_size, type_size = GGML_QUANT_SIZES[kind]
            if numpy_dims[-1] % block_size:
                raise ValueError(f"{self._path}: tensor {name!r} rows of {numpy_dims[-1]} are not whole "
                                 f"{kind.name} blocks of {block_size}")
            dtype = np.dtype(np.uint8)
            shape = (*numpy_dims[:-1], numpy_dims[-1] // block_size * type_size)
            nbytes = int(np.prod(shape))
        if start + nbytes > len(array):
            raise ValueError(f"{self._path}: tensor {name!r} runs past the end of the file")
        data = array[start:start + nbytes].view(dtype).reshape(shape)
        return GGUFTensor(name, kind, dims, data)
