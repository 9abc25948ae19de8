"""Universal LO-BCQ codebooks as a small versioned file (`any4 bcq-calibrate` writes it).

An `.npz` with `weights` [Nc, 16] int8 (and `activations` [Nc, 16] int8 when learned for
W4A4) plus `__meta__`, a JSON string: {"kind": "any4-bcq-codebooks", "version": 1,
"block_len", "array_len", "n_codebooks", "codebook_bits", ...how they were learned}.
Written atomically; read back with every field checked.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np

from any4_jax import outputs
from any4_jax.quant.bcq import qmax_of

KIND = "any4-bcq-codebooks"
VERSION = 1


@dataclasses.dataclass(frozen=True, eq=False)
class BCQCodebooks:
    """Codebooks shared by every layer ("universal"), for weights and optionally activations.

    weights, activations: [Nc, 16] float32 integer-valued arrays with sorted rows (activation
    codebooks hold -qmax and qmax). info: how they were learned (model, blocks, MSE, seconds).
    """

    weights: np.ndarray
    block_len: int
    array_len: int
    codebook_bits: int
    activations: np.ndarray | None = None
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def n_codebooks(self) -> int:
        return int(self.weights.shape[0])

    def check(self, *, name: str = "codebooks") -> BCQCodebooks:
        qmax = qmax_of(self.codebook_bits)
        for what, c in (("weights", self.weights), ("activations", self.activations)):
            if c is None:
                continue
            if c.ndim != 2 or c.shape[1] != 16 or not 1 <= c.shape[0] <= 16:
                raise ValueError(f"{name}: {what} codebooks have shape {c.shape}, expected "
                                 "[n_codebooks <= 16, 16]")
            if np.any(c != np.round(c)) or np.abs(c).max() > qmax:
                raise ValueError(f"{name}: {what} entries must be integers in [-{qmax}, {qmax}]")
        return self

    def matches(self, config) -> list[str]:
        """How a QuantConfig of format "bcq" differs from what these were learned for."""
        out = []
        for f in ("block_len", "array_len", "codebook_bits", "n_codebooks"):
            if getattr(config, f) != getattr(self, f):
                out.append(f"{f}: codebooks {getattr(self, f)}, config {getattr(config, f)}")
        return out

    def save(self, path) -> None:
        """Writes the .npz atomically (a failed write leaves no partial file)."""
        self.check(name=str(path))
        meta = {"kind": KIND, "version": VERSION, "block_len": self.block_len,
                "array_len": self.array_len, "n_codebooks": self.n_codebooks,
                "codebook_bits": self.codebook_bits, "info": self.info}
        arrays = {"weights": self.weights.astype(np.int8),
                  "__meta__": np.asarray(json.dumps(meta))}
        if self.activations is not None:
            arrays["activations"] = self.activations.astype(np.int8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        outputs.atomic_write(path, buf.getvalue())

    @classmethod
    def load(cls, path) -> BCQCodebooks:
        """Reads a file `save` wrote; a ValueError naming the problem otherwise."""
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such codebooks file; write one with "
                             "`any4 bcq-calibrate MODEL --out FILE`")
        try:
            z = np.load(path, allow_pickle=False)
            meta = json.loads(str(z["__meta__"]))
            weights = z["weights"].astype(np.float32)
            acts = z["activations"].astype(np.float32) if "activations" in z.files else None
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a codebooks file written by `any4 bcq-calibrate` "
                             f"({type(e).__name__}: {e})") from None
        if meta.get("kind") != KIND:
            raise ValueError(f"{path}: not a codebooks file (kind {meta.get('kind')!r})")
        if meta.get("version") != VERSION:
            raise ValueError(f"{path}: codebooks file version {meta.get('version')}, this "
                             f"any4-jax reads version {VERSION}; re-run `any4 bcq-calibrate`")
        out = cls(weights=np.sort(weights, -1), block_len=int(meta["block_len"]),
                  array_len=int(meta["array_len"]), codebook_bits=int(meta["codebook_bits"]),
                  activations=None if acts is None else np.sort(acts, -1),
                  info=meta.get("info", {}))
        if out.n_codebooks != meta["n_codebooks"]:
            raise ValueError(f"{path}: {out.n_codebooks} codebooks stored, the header says "
                             f"{meta['n_codebooks']}")
        return out.check(name=str(path))
