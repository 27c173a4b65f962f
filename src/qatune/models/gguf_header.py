"""`check_gguf_header(path)`: every count and size a GGUF header declares, checked against the file's size
before the `gguf` package reads it.

`gguf.GGUFReader` trusts the header: an array declared with 2^40 elements in a 150-byte file makes it loop 2^40
times, appending a (zero-length) numpy view per element, until memory runs out. This walk reads the same
layout (GGUF v2/v3: magic, version, tensor count, KV count, the KVs, the tensor infos) with `struct` from a
memory map, allocates nothing per element, and refuses the first count or size that the rest of the file cannot
hold. It also caps the total number of metadata array elements: the reader keeps one numpy view per element
(about 100 bytes each), and the largest real tokenizers hold about a million.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUFValueType

from qatune.errors import ModelError

MAX_ARRAY_ELEMENTS = 1 << 22  # metadata array elements in all
MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALARS = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
            GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
            GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}
_MIN_KV, _MIN_TENSOR_INFO = 8 + 4 + 1, 8 + 4 + 4 + 8  # key length + type + 1-byte value; name length + ... + offset


class _Walk:
    """A cursor over the header; each read checks that the bytes are there, each count that the rest can
    hold it."""

    def __init__(self, data: mmap.mmap | bytes, path: Path):
        self.data, self.path, self.at, self.elements = data, path, 0, 0
        self.order = "<"

    def fail(self, what: str) -> ModelError:
        return ModelError(f"GGUF file {self.path} is truncated or corrupt: {what} (the file has "
                          f"{len(self.data)} bytes)")

    def read(self, fmt: str, what: str):
        size = struct.calcsize(self.order + fmt)
        if self.at + size > len(self.data):
            raise self.fail(f"{what} at byte {self.at} runs past the end")
        value = struct.unpack_from(self.order + fmt, self.data, self.at)[0]
        self.at += size
        return value

    def count(self, what: str, item_size: int) -> int:
        n = self.read("Q", what)
        if n * item_size > len(self.data) - self.at:
            raise self.fail(f"{what} is {n} at byte {self.at - 8}, more than the rest of the file can hold")
        return n

    def string(self, what: str, keep: bool = True) -> str | None:
        """A string (names and keys, decoded) or, with `keep=False`, only its length checked and skipped."""
        n = self.count(f"the length of {what}", 1)
        self.at += n
        return bytes(self.data[self.at - n:self.at]).decode("utf-8", errors="replace") if keep else None

    def value(self, kind: int, key: str, depth: int = 0):
        """Skip one value of type `kind` (returning a scalar's value, for general.alignment)."""
        if kind in _SCALARS:
            return self.read(_SCALARS[kind], f"the value of {key}")
        if kind == GGUFValueType.STRING:
            return self.string(f"the value of {key}", keep=False)
        if kind != GGUFValueType.ARRAY or depth > 0:  # GGUF has no nested arrays in practice; the reader flattens
            raise self.fail(f"key {key} has value type {kind}, which qatune does not read")
        item = self.read("I", f"the item type of {key}")
        item_size = struct.calcsize(_SCALARS[item]) if item in _SCALARS else 8  # a string: at least its length
        n = self.count(f"the element count of {key}", item_size)
        self.elements += n
        if self.elements > MAX_ARRAY_ELEMENTS:
            raise self.fail(f"metadata arrays hold more than {MAX_ARRAY_ELEMENTS} elements (at {key})")
        if item in _SCALARS:
            self.at += n * item_size
        else:
            for _ in range(n):
                self.value(item, key, depth + 1)
        return None

    def tensor_info(self) -> tuple[str, int, int]:
        """A tensor's name, data offset (from the data start) and size in bytes."""
        name = self.string("a tensor name")
        n_dims = self.read("I", f"the dimension count of tensor {name}")
        if n_dims > MAX_DIMS:
            raise self.fail(f"tensor {name} declares {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [self.read("Q", f"a dimension of tensor {name}") for _ in range(n_dims)]
        kind = self.read("I", f"the type of tensor {name}")
        if kind not in GGML_QUANT_SIZES:
            raise self.fail(f"tensor {name} has unknown type {kind}")
        block, type_size = GGML_QUANT_SIZES[kind]
        offset = self.read("Q", f"the data offset of tensor {name}")
        return name, offset, math.prod(dims) * type_size // block


def check_gguf_header(path: Path) -> None:
    """Raise a `ModelError` naming `path` if its header declares more than the file holds."""
    with open(path, "rb") as f:
        if Path(path).stat().st_size == 0:
            raise ModelError(f"GGUF file {path} is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _check(_Walk(data, Path(path)))


def _check(walk: _Walk) -> None:
    if walk.read("4s", "the magic number") != b"GGUF":
        raise walk.fail("it does not start with GGUF")
    version = walk.read("I", "the version")
    if version & 0xFFFF == 0:  # written on a big-endian machine
        walk.order = ">"
        version = struct.unpack("<I", struct.pack(">I", version))[0]
    if version not in (2, 3):  # version 1 counted in 32 bits: another layout
        raise ModelError(f"GGUF file {walk.path} has version {version}; qatune reads versions 2 and 3")
    n_tensors = walk.count("the tensor count", _MIN_TENSOR_INFO)
    n_kv = walk.count("the key-value count", _MIN_KV)
    alignment = GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = walk.string("a metadata key")
        value = walk.value(walk.read("I", f"the type of {key}"), key)
        if key == "general.alignment" and isinstance(value, int) and value > 0:
            alignment = value
    infos = [walk.tensor_info() for _ in range(n_tensors)]
    start = -(-walk.at // alignment) * alignment
    for name, offset, n_bytes in infos:
        if start + offset + n_bytes > len(walk.data):
            raise walk.fail(f"tensor {name} ends at byte {start + offset + n_bytes}")
