"""A small, strict safetensors reader (memory-mapped, bf16 via ml_dtypes).

Written here rather than using `safetensors.numpy` so that a truncated or corrupt file is
reported with the file and tensor name (numpy cannot hold bf16 either). Format: 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then data.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or does not fit the model."""


def indexed_shards(directory: str, index: str, kind: str) -> list[str]:
    """Paths of the shards an index file (`{"weight_map": {tensor: file}}`) lists, sorted,
    each checked to exist: a missing shard is named."""
    try:
        with open(index) as fh:
            wmap = json.load(fh)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: not a valid {kind} index ({e!r})") from None
    shards = sorted(set(wmap.values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
    if missing:
        raise CheckpointError(f"{directory}: the index lists shards that are not there: "
                              f"{missing}; download them or remove the incomplete directory")
    return [os.path.join(directory, s) for s in shards]


class SafetensorsFile:
    """`f = SafetensorsFile(path)`; `f.keys()`, `f.shape(name)`, `f.get(name) -> np.ndarray`.

    Arrays are read-only views of a memory map: nothing is read until used.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: only {size} bytes, not a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(
                    f"{self.path}: header length {n} exceeds the file size {size}; the file is "
                    "truncated or not safetensors (re-download it)")
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self._base = 8 + n
        self._size = size
        self._header = header
        for name, info in header.items():
            try:
                dt = _DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                b, e = (int(o) for o in info["data_offsets"])
            except KeyError as err:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has an unsupported or missing entry "
                    f"({err}); supported dtypes: {sorted(_DTYPES)}") from None
            if e - b != math.prod(shape) * np.dtype(dt).itemsize or b < 0:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} of shape {shape} {info['dtype']} has "
                    f"{e - b} bytes of data; the header is corrupt")
            if self._base + e > size:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} ends at byte {self._base + e} but the file "
                    f"has {size}; the file is truncated (re-download it)")
        self._mm = None

    def keys(self) -> list[str]:
        return list(self._header)

    def __iter__(self):
        return iter(self._header)

    def __contains__(self, name: str) -> bool:
        return name in self._header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self._header[name]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        b, e = info["data_offsets"]
        raw = self._mm[self._base + b:self._base + e]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])

    def close(self):
        self._mm = None


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
    """Write numpy arrays (incl. ml_dtypes bf16) as safetensors (used by tests and tools)."""
    inv = {np.dtype(v): k for k, v in _DTYPES.items()}
    header, off = {}, 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        header[name] = {"dtype": inv[a.dtype], "shape": list(a.shape),
                        "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)) + hb)
        for a in tensors.values():
            fh.write(np.ascontiguousarray(a).tobytes())
