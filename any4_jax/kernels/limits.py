"""The shape limits a kernel states in its `can_use`, worded the same way for every kernel.

Only a backend's own limits: that the group size divides K is the weight's invariant
(`QuantizedWeight.check`), checked once where the weight is made.
"""

from __future__ import annotations


def multiple_reasons(*, n: int | None = None, k: int | None = None, g: int | None = None,
                     n_multiple: int = 1, k_multiple: int = 1, g_multiple: int = 1,
                     why: str = "") -> list[str]:
    """A reason for each of N, K and the group size that is not a multiple of what the
    kernel tiles by (`why` says why, e.g. "the kernel's smallest K block")."""
    tail = f" ({why})" if why else ""
    out = []
    for name, value, mult in (("N", n, n_multiple), ("K", k, k_multiple),
                              ("group_size", g, g_multiple)):
        if value is not None and value % mult:
            out.append(f"{name}={value} is not a multiple of {mult}{tail}")
    return out
