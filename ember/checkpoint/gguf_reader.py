"""A GGUF file's metadata, tensor table and raw tensor bytes, read without copying the file.

gguf's own `GGUFReader` builds a numpy view per vocabulary entry, which takes seconds on a 49k-token
vocabulary; this reader walks the header once with `struct` over an mmap (tens of milliseconds) and
leaves tensor data untouched until a tensor is asked for.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# metadata value types with a fixed width: type id -> struct format
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"
}
_NUMPY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in the file and how it is stored."""

    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # torch order (slowest dimension first), i.e. GGUF's dims reversed
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    num_bytes: int


@dataclass
class GGUFFile:
    """A parsed GGUF header plus a read-only memory map of the whole file."""

    path: Path
    metadata: dict  # key -> int | float | bool | str | list
    tensors: dict[str, GGUFTensorInfo]  # in file order
    _blob: np.ndarray  # the file as uint8, memory-mapped

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view: [rows..., bytes_per_row]."""
        block_size, type_size = GGML_QUANT_SIZES[info.ggml_type]
        row_bytes = info.shape[-1] // block_size * type_size
        data = self._blob[info.offset : info.offset + info.num_bytes]
        return data.reshape(*info.shape[:-1], row_bytes)


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF v2/v3 file's metadata and tensor table; tensor data stays on disk (mmap)."""
    path = Path(path)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if buf[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes).")
    version, num_tensors, num_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"{path} is GGUF version {version}; only versions 2 and 3 are supported.")
    pos = 24
    metadata = {}
    for _ in range(num_kv):
        key, pos = _read_string(buf, pos)
        (value_type,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = _read_value(buf, pos + 4, value_type)
    if "general.architecture" not in metadata:
        raise ValueError(f"{path} has no general.architecture in its GGUF metadata.")

    entries = []
    for _ in range(num_tensors):
        name, pos = _read_string(buf, pos)
        (num_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{num_dims}Q", buf, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * num_dims)
        pos += 4 + 8 * num_dims + 12
        entries.append((name, tuple(reversed(dims)), ggml_type, offset))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = (pos + alignment - 1) // alignment * alignment

    tensors = {}
    for name, shape, ggml_type, offset in entries:
        try:
            qtype = GGMLQuantizationType(ggml_type)
            block_size, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ValueError(f"{path}: tensor {name} has unknown ggml type {ggml_type}.") from None
        num_bytes = prod(shape) // block_size * type_size
        tensors[name] = GGUFTensorInfo(name, shape, qtype, data_start + offset, num_bytes)
    blob = np.frombuffer(buf, dtype=np.uint8)
    return GGUFFile(path, metadata, tensors, blob)


def _read_string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    pos += 8
    return buf[pos : pos + length].decode("utf-8", errors="replace"), pos + length


def _read_value(buf: mmap.mmap, pos: int, value_type: int):
    """One metadata value and the position just past it."""
    if value_type in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[value_type]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if value_type == _STRING:
        return _read_string(buf, pos)
    if value_type == _ARRAY:
        item_type, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item_type in _NUMPY_DTYPES:  # numbers: one bulk read
            dtype = np.dtype(_NUMPY_DTYPES[item_type])
            values = np.frombuffer(buf, dtype=dtype, count=count, offset=pos).tolist()
            return values, pos + count * dtype.itemsize
        values = []
        for _ in range(count):  # strings (vocabulary, merges) or nested arrays
            value, pos = _read_value(buf, pos, item_type)
            values.append(value)
        return values, pos
    raise ValueError(f"unknown GGUF metadata value type {value_type} at byte {pos}.")
