"""Read the character vectors of an R lazy-load database (`Rdata.rdx` + `Rdata.rdb`).

How R stores a package's data sets: `Rdata.rdx` is a gzip-compressed R serialisation of an
index, a list whose `variables` entry maps each name to (offset, length) in `Rdata.rdb`; each
such block of the .rdb is a 4-byte big-endian uncompressed length followed by a zlib stream of
one R serialisation. Parsing R's serialisation itself is left to the `rdata` package; only this
container logic is ours.
"""

from __future__ import annotations

import gzip
import struct
import warnings
import zlib


def _unserialize(data: bytes):
    # the rdata package pulls in xarray and pandas: imported only when texts are decoded
    import rdata

    with warnings.catch_warnings():
        # rdata warns "Unknown file type: assumed RDS" for bare serialisations: that is what
        # these blocks are.
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(data))


def read_index(rdx: bytes) -> dict[str, tuple[int, int]]:
    """{variable name: (offset, length)} from the bytes of an .rdx file."""
    try:
        raw = gzip.decompress(rdx)
    except OSError:
        raw = zlib.decompress(rdx[4:])  # some R versions store the index like a .rdb block
    index = _unserialize(raw)
    try:
        variables = index["variables"]
    except (KeyError, TypeError):
        raise ValueError("not an R lazy-load index: no 'variables' entry") from None
    return {str(k): (int(v[0]), int(v[1])) for k, v in variables.items()}


def read_block(rdb: bytes, offset: int, length: int):
    """One object of an .rdb file, converted to Python by `rdata`."""
    block = rdb[offset:offset + length]
    if len(block) != length or length < 4:
        raise ValueError(f"block at {offset} (+{length}) lies outside the .rdb file "
                         f"({len(rdb)} bytes): the file is truncated")
    (n,) = struct.unpack(">I", block[:4])
    raw = zlib.decompress(block[4:])
    if len(raw) != n:
        raise ValueError(f"block at {offset}: {len(raw)} bytes after zlib, header says {n}")
    return _unserialize(raw)


def read_character_vectors(rdx: bytes, rdb: bytes) -> dict[str, list[str]]:
    """Every variable of the database that is a character vector, as a list of str."""
    out = {}
    for name, (off, ln) in read_index(rdx).items():
        obj = read_block(rdb, off, ln)
        try:
            out[name] = [str(s) if s is not None else "" for s in obj]
        except TypeError:
            continue
    return out
