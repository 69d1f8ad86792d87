"""Port ranges as LPM prefixes over the 16-bit destination port.

The policy map matches the port by longest prefix (after the protocol), so a range
[first, last] (NetworkPolicy ``port`` .. ``endPort``) is written as the minimal set of aligned
blocks ``(port, prefix_len)``, each covering ``2**(16 - prefix_len)`` ports starting at ``port``.
"""

from __future__ import annotations

PORT_BITS = 16
MAX_PORT = (1 << PORT_BITS) - 1


def range_to_prefixes(first: int, last: int) -> list[tuple[int, int]]:
    """Minimal list of (port, prefix_len) blocks covering exactly first..last (inclusive)."""
    if not 0 <= first <= last <= MAX_PORT:
        raise ValueError(f"invalid port range {first}-{last}")
    out: list[tuple[int, int]] = []
    lo = first
    while lo <= last:
        # largest aligned block starting at lo that does not pass `last`
        size = lo & -lo if lo else 1 << PORT_BITS
        while lo + size - 1 > last:
            size >>= 1
        out.append((lo, PORT_BITS - (size.bit_length() - 1)))
        lo += size
    return out


def prefix_range(port: int, prefix_len: int) -> tuple[int, int]:
    """The (first, last) ports a (port, prefix_len) block covers."""
    size = 1 << (PORT_BITS - prefix_len)
    first = port & ~(size - 1) & MAX_PORT
    return first, first + size - 1
