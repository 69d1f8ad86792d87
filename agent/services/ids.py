"""Node-local id allocators: backend ids (u32) and reverse-NAT indices (u16, one per frontend).

Ids are handed out from a moving cursor, so a released id is reused as late as possible: state that
still names an old id (a conntrack entry that escaped the purge, an affinity entry) is unlikely to
meet a new owner. Both are restored from the pinned maps at start, so they survive agent restarts.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class IdSpaceExhausted(RuntimeError):
    pass


class IdAllocator(Generic[K]):
    def __init__(self, lo: int, hi: int, what: str) -> None:
        self.lo, self.hi, self.what = lo, hi, what
        self._ids: dict[K, int] = {}
        self._owner: dict[int, K] = {}
        self._next = lo

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    def items(self) -> Iterator[tuple[K, int]]:
        return iter(list(self._ids.items()))

    def get(self, key: K) -> int | None:
        return self._ids.get(key)

    def owner(self, ident: int) -> K | None:
        return self._owner.get(ident)

    def acquire(self, key: K) -> int:
        """The key's id, allocating the next free one if it has none."""
        ident = self._ids.get(key)
        if ident is not None:
            return ident
        span = self.hi - self.lo + 1
        if len(self._owner) >= span:
            raise IdSpaceExhausted(f"no free {self.what} id ({span} in use)")
        ident = self._next
        while ident in self._owner:
            ident = ident + 1 if ident < self.hi else self.lo
        self._ids[key] = ident
        self._owner[ident] = key
        self._next = ident + 1 if ident < self.hi else self.lo
        return ident

    def restore(self, key: K, ident: int) -> bool:
        """Adopt an id found in a map; False if the id or the key is already taken (a duplicate)."""
        if not self.lo <= ident <= self.hi or ident in self._owner or key in self._ids:
            return False
        self._ids[key] = ident
        self._owner[ident] = key
        if ident >= self._next or self._next == self.lo:
            self._next = ident + 1 if ident < self.hi else self.lo
        return True

    def release(self, key: K) -> int | None:
        ident = self._ids.pop(key, None)
        if ident is not None:
            self._owner.pop(ident, None)
        return ident
