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
REDOWNLOAD = "the file is truncated or corrupt (re-download it)"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or does not fit the model."""


def read_weight_map(index: str, kind: str) -> dict[str, str]:
    """The `{"weight_map": {tensor: shard file}}` of an index file, checked: a damaged index,
    or one that points outside its directory, is named."""
    try:
        with open(index, encoding="utf-8") as fh:
            wmap = json.load(fh)["weight_map"]
    except OSError as e:
        raise CheckpointError(f"{index}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid {kind} index ({type(e).__name__}: {e}); "
                              f"{REDOWNLOAD}") from None
    if not isinstance(wmap, dict) or not all(
            isinstance(f, str) and f and os.path.basename(f) == f for f in wmap.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names "
                              f"in the same directory; {REDOWNLOAD}")
    return wmap


def indexed_shards(directory: str, index: str, kind: str) -> list[str]:
    """Paths of the shards an index file (`{"weight_map": {tensor: file}}`) lists, sorted,
    each checked to exist: a missing shard is named."""
    shards = sorted(set(read_weight_map(index, kind).values()))
    if not shards:
        raise CheckpointError(f"{index}: the index lists no shards; {REDOWNLOAD}")
    missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
    if missing:
        raise CheckpointError(f"{directory}: the index lists shards that are not there: "
                              f"{missing}; download them or remove the incomplete directory")
    return [os.path.join(directory, s) for s in shards]


def _read_header(path: str) -> tuple[dict, int, int]:
    """(header without __metadata__, offset of the data, file size); a damaged file is
    named."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: only {size} bytes, not a safetensors file; "
                                      f"{REDOWNLOAD}")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(
                    f"{path}: header length {n} exceeds the file size {size}; the file is "
                    "truncated or not safetensors (re-download it)")
            raw = fh.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e}); {REDOWNLOAD}"
                              ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON "
                              f"{type(header).__name__}, not an object); {REDOWNLOAD}")
    header.pop("__metadata__", None)
    return header, 8 + n, size


def _entry(path: str, name: str, info) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, or a CheckpointError naming it."""
    try:
        dt = np.dtype(_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        b, e = info["data_offsets"]
        ok = all(type(v) is int and v >= 0 for v in (*shape, b, e)) and b <= e
    except KeyError as err:
        raise CheckpointError(
            f"{path}: tensor {name!r} has an unsupported or missing entry ({err}); supported "
            f"dtypes: {sorted(_DTYPES)}") from None
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry "
                              f"{str(info)[:200]}; {REDOWNLOAD}")
    return dt, shape, b, e


class SafetensorsFile:
    """`f = SafetensorsFile(path)`; `f.keys()`, `f.shape(name)`, `f.dtype(name)`,
    `f.get(name) -> np.ndarray`.

    The whole header is checked on opening (each entry's dtype, shape and byte range), so a
    damaged file fails before any tensor is read. Arrays are read-only views of a memory map:
    nothing is read until used.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        header, self._base, size = _read_header(self.path)
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            dt, shape, b, e = _entry(self.path, name, info)
            if e - b != math.prod(shape) * dt.itemsize:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} of shape {shape} {info['dtype']} has "
                    f"{e - b} bytes of data; the header is corrupt (re-download the file)")
            if self._base + e > size:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} ends at byte {self._base + e} but the file "
                    f"has {size}; the file is truncated (re-download it)")
            self._entries[name] = (dt, shape, b, e)
        self._mm = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        dt, shape, b, e = self._entries[name]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm[self._base + b:self._base + e].view(dt).reshape(shape)

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
