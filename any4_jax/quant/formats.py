"""Number formats: the fixed 4-bit tables and the names users pass.

Every format but LO-BCQ ends up in the same storage form (a per-row 16-entry table,
per-group scale and zero, see `QuantizedWeight`); this module only knows which table and which
scaling rule a format uses. "bcq" (shared codebooks chosen per block) has its own storage,
`bcq.BCQWeight`. The tables are the bit patterns of docs/design.md section 4.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

# NormalFloat4 (QLoRA); identical to bitsandbytes' `get_4bit_type("nf4")`.
NF4_TABLE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)

# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2), listed in code
# order, normalised by its largest magnitude (12) in float32 exactly as bitsandbytes does.
# Its magnitudes are {0, 0.03125, 1, 1.5, 2, 3, 4, 6} / 6; +0 and -0 make 15 distinct values.
_FP4_BNB_RAW = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0,
                -2.0, -3.0]
FP4_TABLE = np.array(_FP4_BNB_RAW, dtype=np.float32) / np.float32(12.0)

# OCP MX FP4 (E2M1): magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}, sign in bit 3, normalised to 1.
_E2M1_MAG = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
FP4_E2M1_TABLE = np.array(_E2M1_MAG + [-m for m in _E2M1_MAG], dtype=np.float32) / np.float32(6.0)

FIXED_TABLES: dict[str, np.ndarray] = {
    "nf4": NF4_TABLE,
    "fp4": FP4_TABLE,
    "fp4_e2m1": FP4_E2M1_TABLE,
}

# Grid formats take a bit width: "int4", "any3", ...
_GRID_RE = re.compile(r"^(int|any)([0-9]+)$")
MIN_BITS, MAX_BITS = 2, 4

FORMAT_NAMES = ("int4", "int3", "int2", "any4", "any3", "any2", "nf4", "fp4", "fp4_e2m1", "bcq")
# LO-BCQ (block-clustered codebooks): its own storage form, `bcq.BCQWeight`
BCQ = "bcq"


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """What a format name means: its family, bit width and scaling rule."""

    name: str  # canonical name, e.g. "any4"
    family: str  # "int" | "any" | "table" | "bcq"
    n_bit: int

    @property
    def n_levels(self) -> int:
        return 2**self.n_bit

    @property
    def fixed_table(self) -> np.ndarray | None:
        return FIXED_TABLES.get(self.name)


def parse_format(name: str) -> FormatSpec:
    """Maps a user-facing format name to its spec, with an error that lists what exists."""
    if not isinstance(name, str):
        raise TypeError(f"format must be a string such as 'any4', got {name!r}")
    key = name.strip().lower()
    if key == BCQ:
        return FormatSpec(name=BCQ, family="bcq", n_bit=4)
    if key in FIXED_TABLES:
        return FormatSpec(name=key, family="table", n_bit=4)
    m = _GRID_RE.match(key)
    if m is not None:
        family, n_bit = m.group(1), int(m.group(2))
        if not MIN_BITS <= n_bit <= MAX_BITS:
            raise ValueError(
                f"format {name!r}: n_bit={n_bit} is out of range; codes are stored in 4 bits, "
                f"so use {family}{MIN_BITS} to {family}{MAX_BITS}"
            )
        return FormatSpec(name=f"{family}{n_bit}", family=family, n_bit=n_bit)
    raise ValueError(
        f"unknown format {name!r}; choose one of {', '.join(FORMAT_NAMES)}"
    )


def int_grid_table(n_bit: int) -> np.ndarray:
    """The integer grid as a 16-entry table: entry q is q - 2^(n-1); unused entries are 0."""
    table = np.zeros(16, dtype=np.float32)
    levels = 2**n_bit
    table[:levels] = np.arange(levels, dtype=np.float32) - 2 ** (n_bit - 1)
    return table
