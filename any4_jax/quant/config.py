"""Configuration of a quantization run: frozen, keyword-only, validated on construction."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from any4_jax.quant.bcq_fit import BCQFitConfig
from any4_jax.quant.formats import FormatSpec, parse_format
from any4_jax.quant.qweight import check_group_size

KMEANS_INITS = ("kmeans++", "random", "int", "nf4")
KMEANS_METHODS = ("lloyd", "optimal")


def _is_int(v) -> bool:
    """An integer that is not a bool (True would silently mean 1)."""
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def _is_real(v) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(
        v, bool | np.bool_)
SAMPLE_WEIGHTINGS = ("none", "activations", "activations_x_scales")
DEFAULT_GROUP_SIZE = 128  # the paper's and the reference release's
_BCQ_FIELDS = ("block_len", "array_len", "n_codebooks", "codebook_bits", "bcq_fit")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KMeansConfig:
    """Weighted k-means over the group-scaled values of each row (docs/design.md s.4).

    method: "optimal" (the global minimum of the weighted SSE, by dynamic programming over
      the sorted row: exact and deterministic) or "lloyd" (k-means++ seeding and Lloyd
      iterations: a local optimum). Default: "optimal", unless one of Lloyd's own settings
      (init, max_iter, tol, seed) is given another value than its default, which asks for
      Lloyd; method="optimal" with one of them is an error (they would be ignored).
    init: "kmeans++" (weighted, greedy, 2 + floor(ln k) local trials), "random" (k weighted
      samples without replacement), "int" (uniform grid over the row's range) or "nf4" (the
      nf4 table mapped onto the row's range).
    max_iter: Lloyd iterations at most per row (0 keeps the initial table).
    tol: a row stops once its largest squared centroid shift is below tol * variance(row).
    seed: every row draws from fold_in(PRNGKey(seed), global row index), so a row's result
      does not depend on the rows it is batched or sharded with.
    """

    method: str | None = None
    init: str = "kmeans++"
    max_iter: int = 300
    tol: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        lloyd_only = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                      if f.name != "method" and getattr(self, f.name) != f.default}
        if self.method is None:
            object.__setattr__(self, "method", "lloyd" if lloyd_only else "optimal")
        elif self.method == "optimal" and lloyd_only:
            given = ", ".join(f"{k}={v!r}" for k, v in lloyd_only.items())
            raise ValueError(f"KMeansConfig: {given} apply to method='lloyd' only (the optimal "
                             "solver has no initialisation, iterations or randomness); pass "
                             "method='lloyd' with them, or drop them")
        if self.method not in KMEANS_METHODS:
            raise ValueError(f"KMeansConfig: unknown method={self.method!r}; choose one of "
                             f"{KMEANS_METHODS}")
        if self.init not in KMEANS_INITS:
            raise ValueError(f"KMeansConfig: unknown init={self.init!r}; choose one of "
                             f"{KMEANS_INITS}")
        if not _is_int(self.max_iter) or self.max_iter < 0:
            raise ValueError(f"KMeansConfig: max_iter={self.max_iter!r} must be an integer >= 0")
        if not _is_real(self.tol) or not self.tol >= 0:
            raise ValueError(f"KMeansConfig: tol={self.tol!r} must be a number >= 0 (e.g. 1e-4)")
        if not _is_int(self.seed):
            raise ValueError(f"KMeansConfig: seed={self.seed!r} must be an integer")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How to quantize one weight matrix `[N, K]` (out_features x in_features).

    format: "int4" (default grid; also "int3", "int2"), "any4" / "any3" / "any2" (learned
      per-row tables), "nf4", "fp4" (bitsandbytes' table), "fp4_e2m1" (OCP).
    group_size: groups of this many consecutive elements along K share a scale and a zero;
      None means one group per whole row.
    symmetric: int-n / any-n only; zero = 0 and the scale comes from max|w|. nf4 and fp4 are
      always absmax-scaled.
    dtype: storage dtype of the table, scales and zeros (None: the weight's dtype).
    sample_weighting: any-n only; the weight of element (i, j) in k-means: "none" (1),
      "activations" (xbar_j), "activations_x_scales" (xbar_j * alpha_ij, the paper's default).
      Without a `sample_weight` argument, xbar is taken as all ones.
    kmeans: the k-means settings (any-n only).
    block_len, array_len, n_codebooks, codebook_bits, bcq_fit: "bcq" only (LO-BCQ, docs/bcq.md):
      blocks of block_len scalars each pick one of n_codebooks shared codebooks of 16
      codebook_bits-bit integers; arrays of array_len scalars share an 8-bit scale (group_size
      and dtype do not apply); bcq_fit: how codebooks are learned where none are given.
    """

    format: str = "any4"
    group_size: int | None = DEFAULT_GROUP_SIZE
    symmetric: bool = False
    dtype: str | None = None
    sample_weighting: str = "activations_x_scales"
    kmeans: KMeansConfig = dataclasses.field(default_factory=KMeansConfig)
    block_len: int = 8
    array_len: int = 64
    n_codebooks: int = 16
    codebook_bits: int = 6
    bcq_fit: BCQFitConfig = dataclasses.field(default_factory=BCQFitConfig)

    def __post_init__(self):
        spec = parse_format(self.format)  # raises on unknown names / bad n_bit
        object.__setattr__(self, "format", spec.name)
        self._check_bcq(spec)
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size < 1):
            raise ValueError(
                f"QuantConfig: group_size={self.group_size!r} must be a positive integer "
                "(or None for one group per row)"
            )
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"QuantConfig: symmetric={self.symmetric!r} must be True or False")
        if self.symmetric and spec.family == "table":
            raise ValueError(
                f"QuantConfig: symmetric=True does not apply to {spec.name!r}, which is always "
                "absmax-scaled; drop symmetric"
            )
        if self.sample_weighting not in SAMPLE_WEIGHTINGS:
            raise ValueError(
                f"QuantConfig: unknown sample_weighting={self.sample_weighting!r}; choose one of "
                f"{SAMPLE_WEIGHTINGS}"
            )
        if self.dtype is not None:
            try:
                dt = jnp.dtype(self.dtype)
            except TypeError as e:
                raise ValueError(f"QuantConfig: dtype={self.dtype!r} is not a dtype name") from e
            # an integer table would truncate every entry, scale and zero (to 0 for most)
            if not jnp.issubdtype(dt, jnp.floating):
                raise ValueError(f"QuantConfig: dtype={dt.name!r} is not a floating dtype; the "
                                 "table, scales and zeros need one (bfloat16, float16 or "
                                 "float32), or None for the weight's own")
            object.__setattr__(self, "dtype", dt.name)
        if not isinstance(self.kmeans, KMeansConfig):
            raise TypeError(f"QuantConfig: kmeans must be a KMeansConfig, got {self.kmeans!r}")

    def _check_bcq(self, spec: FormatSpec) -> None:
        names = _BCQ_FIELDS
        if spec.family != "bcq":
            given = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                     if f.name in names and getattr(self, f.name) != (
                         f.default if f.default is not dataclasses.MISSING
                         else f.default_factory())]
            if given:
                raise ValueError(f"QuantConfig: {', '.join(given)} apply to format='bcq' only; "
                                 f"drop them for {spec.name!r}")
            return
        for name, low, high in (("block_len", 1, 64), ("array_len", 2, 4096),
                                ("n_codebooks", 1, 16), ("codebook_bits", 5, 8)):
            v = getattr(self, name)
            if not _is_int(v) or not low <= v <= high:
                raise ValueError(f"QuantConfig: {name}={v!r} must be an integer in [{low}, "
                                 f"{high}]" + (" (selectors are 4-bit)" if name == "n_codebooks"
                                               else ""))
        if self.array_len % (2 * self.block_len):
            raise ValueError(f"QuantConfig: array_len={self.array_len} must be a multiple of "
                             f"2 * block_len = {2 * self.block_len} (whole blocks per array, "
                             "two selectors per byte), e.g. array_len=64 with block_len=8")
        if self.symmetric:
            raise ValueError("QuantConfig: symmetric=True does not apply to 'bcq' (its "
                             "codebooks are signed and absmax-scaled); drop symmetric")
        if not isinstance(self.bcq_fit, BCQFitConfig):
            raise TypeError(f"QuantConfig: bcq_fit must be a BCQFitConfig, got {self.bcq_fit!r}")

    @property
    def uses_activation_stats(self) -> bool:
        """Whether quantizing with this config reads per-input-channel activation statistics
        (any-n and bcq sample weights)."""
        return self.spec.family in ("any", "bcq") and self.sample_weighting != "none"

    @property
    def spec(self) -> FormatSpec:
        return parse_format(self.format)

    def resolve_group_size(self, k: int, *, name: str = "weight") -> int:
        """The group size for a row of length k, with an error that names the fix."""
        g = k if self.group_size is None else self.group_size
        check_group_size(k, g, name=name)
        return g

    def replace(self, **changes) -> QuantConfig:
        """A copy with `changes`; a change of format away from "bcq" drops the bcq settings
        (an override `down_proj: format=int4` on a bcq config means int4 there)."""
        if "format" in changes and parse_format(changes["format"]).family != "bcq":
            for f in dataclasses.fields(self):
                if f.name in _BCQ_FIELDS and f.name not in changes:
                    changes[f.name] = (f.default if f.default is not dataclasses.MISSING
                                       else f.default_factory())
        return dataclasses.replace(self, **changes)
