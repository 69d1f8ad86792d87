"""Maglev consistent hashing tables (Eisenbud et al., NSDI 2016) for north-south frontends.

Every node builds the same table from the same backends: positions depend only on the backends'
addresses (`ip:port/proto`, hashed with a fixed seed) and the table size, never on node-local ids.
A flow hash indexes the table in the datapath (bpf/lib/lb.h), so a connection reaching any node
goes to the same backend, and removing one backend moves only the flows that were on it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache

SEED = b"pycilium-maglev-v1"
SMALL_PRIMES_LIMIT = 1 << 20


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


def _offset_skip(name: str, m: int) -> tuple[int, int]:
    h = hashlib.blake2b(name.encode(), digest_size=16, key=SEED).digest()
    return int.from_bytes(h[:8], "little") % m, int.from_bytes(h[8:], "little") % (m - 1) + 1


@lru_cache(maxsize=4096)
def table(names: tuple[str, ...], m: int) -> tuple[int, ...]:
    """Index into `names` for each of the `m` slots (m prime, > len(names)); () without names."""
    if not names:
        return ()
    if not is_prime(m):
        raise ValueError(f"Maglev table size must be prime, got {m}")
    n = len(names)
    perms = [_offset_skip(nm, m) for nm in names]
    nxt = [0] * n
    out = [-1] * m
    filled = 0
    while True:
        for i in range(n):
            off, skip = perms[i]
            c = (off + nxt[i] * skip) % m
            while out[c] >= 0:
                nxt[i] += 1
                c = (off + nxt[i] * skip) % m
            out[c] = i
            nxt[i] += 1
            filled += 1
            if filled == m:
                return tuple(out)


def flow_hash(saddr_be32: int, daddr_be32: int, sport_be16: int, dport_be16: int, proto: int) -> int:
    """Python mirror of lb4_flow_hash() in bpf/lib/lb.h (addresses/ports as the datapath holds them:
    network-order bytes read as little-endian integers); for tests and `pycilium` diagnostics."""
    m32 = 0xFFFFFFFF
    h = (saddr_be32 * 0x9E3779B1) & m32
    h ^= (daddr_be32 * 0x85EBCA6B) & m32
    h ^= ((((sport_be16 << 16) | dport_be16) & m32) * 0xC2B2AE35) & m32
    h ^= proto
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m32
    h ^= h >> 16
    return h


def backend_table(backends: Sequence[tuple[str, int, int]], ids: Sequence[int], m: int) -> list[int]:
    """The table as backend ids: `backends` are (ip, port, proto) in any order, `ids` their ids."""
    order = sorted(range(len(backends)), key=lambda i: backends[i])
    names = tuple(f"{backends[i][0]}:{backends[i][1]}/{backends[i][2]}" for i in order)
    return [ids[order[j]] for j in table(names, m)]
