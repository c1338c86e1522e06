"""A GGUF file's tensor index and scalar metadata, read without parsing its arrays' elements.

gguf's GGUFReader builds a numpy view for every element of every metadata array: the default
model's 49152-token vocabulary and its merges cost 3-5 s of CPU per parse, on every int4 load
and every quantization="auto" decision. A load needs only the tensor infos (name, shape, type,
bytes) and general.architecture, so this walks the header itself (the format: gguf's
GGUF.md) and steps over arrays: strings by their lengths, fixed-size elements in one jump.
The type tables (value sizes, block sizes) come from the gguf package.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF's order: shape[0] is the row width (columns)
    tensor_type: object  # gguf.GGMLQuantizationType; .name is "Q4_1", "F32", ...
    data: np.ndarray  # the raw bytes, uint8 [rows, bytes per row], mapped read-only from the file


class GGUFIndex:
    """fields: the scalar and string metadata (arrays are skipped); tensors: GGUFTensor, in file order."""

    def __init__(self, path: str):
        import gguf

        self.path = path
        self._mapped = np.memmap(path, dtype=np.uint8, mode="r")
        self._buf = memoryview(self._mapped)
        self._pos = 0
        if bytes(self._buf[:4]) != _MAGIC:
            raise ValueError(f"{path}: not a GGUF file (magic {bytes(self._buf[:4])!r})")
        version, n_tensors, n_fields = self._unpack("<IQQ", 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} (big-endian or too old) is not read; versions 2 and 3 are")
        self._sizes = {t: struct.calcsize(c) for t, c in _SCALAR_FORMATS.items()}
        self.fields: dict[str, object] = {}
        for _ in range(n_fields):
            key = self._string()
            value_type = self._unpack("<I")[0]
            value = self._value(value_type)
            if value is not _SKIPPED:
                self.fields[key] = value
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I")[0]
            shape = self._unpack(f"<{n_dims}Q")
            type_id, offset = self._unpack("<IQ")
            infos.append((name, shape, gguf.GGMLQuantizationType(type_id), offset))
        alignment = int(self.fields.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = []
        for name, shape, tensor_type, offset in infos:
            block, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
            row_bytes = shape[0] // block * block_bytes
            rows = math.prod(shape[1:])
            start = data_start + offset
            data = self._mapped[start : start + rows * row_bytes].reshape(rows, row_bytes)
            self.tensors.append(GGUFTensor(name, tuple(shape), tensor_type, data))

    def _unpack(self, fmt: str, at: int | None = None) -> tuple:
        if at is not None:
            self._pos = at
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        text = bytes(self._buf[self._pos : self._pos + length]).decode("utf-8", errors="replace")
        self._pos += length
        return text

    def _value(self, value_type: int):
        if value_type == _STRING:
            return self._string()
        if value_type in _SCALAR_FORMATS:
            return self._unpack(_SCALAR_FORMATS[value_type])[0]
        if value_type != _ARRAY:
            raise ValueError(f"{self.path}: unknown GGUF value type {value_type} at byte {self._pos}")
        element_type, count = self._unpack("<IQ")
        if element_type in _SCALAR_FORMATS:
            self._pos += count * self._sizes[element_type]
        elif element_type == _STRING:
            for _ in range(count):
                self._pos += 8 + struct.unpack_from("<Q", self._buf, self._pos)[0]
        else:  # arrays of arrays: each element walked
            for _ in range(count):
                self._value(element_type)
        return _SKIPPED


_SKIPPED = object()
_STRING, _ARRAY = 8, 9
# GGUF value type -> struct format (gguf.GGUFValueType's numbering; GGUF.md)
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
