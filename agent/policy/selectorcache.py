"""SelectorCache: every selector used by a policy, resolved to the set of identities it selects.

Selections are computed once when a selector is first used and then kept up to date one identity
at a time: the cache listens to the identity allocator (identity_added / identity_removed) and
reports which selectors changed, so the policy engine regenerates only the endpoints that depend
on them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet

from pycilium.agent.identity.labels import IdentityView, Labels, view
from pycilium.agent.policy.selectors import Selector

ChangeCallback = Callable[[set[Selector]], None]


class SelectorCache:
    def __init__(self) -> None:
        self._identities: dict[int, IdentityView] = {}
        self._selections: dict[Selector, set[int]] = {}
        self._users: dict[Selector, int] = {}
        self._callbacks: list[ChangeCallback] = []

    def on_change(self, callback: ChangeCallback) -> None:
        self._callbacks.append(callback)

    # ---- selectors -----------------------------------------------------------------------------
    def add_selector(self, sel: Selector) -> frozenset[int]:
        """Take a reference on a selector; returns its current selection."""
        n = self._users.get(sel, 0)
        self._users[sel] = n + 1
        if n == 0:
            self._selections[sel] = {i for i, v in self._identities.items() if sel.matches(v)}
        return frozenset(self._selections[sel])

    def add_selectors(self, sels: Iterable[Selector]) -> None:
        for s in sels:
            self.add_selector(s)

    def remove_selector(self, sel: Selector) -> None:
        n = self._users.get(sel, 0)
        if n <= 1:
            self._users.pop(sel, None)
            self._selections.pop(sel, None)
        else:
            self._users[sel] = n - 1

    def remove_selectors(self, sels: Iterable[Selector]) -> None:
        for s in sels:
            self.remove_selector(s)

    def selection(self, sel: Selector) -> AbstractSet[int]:
        """The identities `sel` selects; the cache's own set for registered selectors (read only)."""
        got = self._selections.get(sel)
        if got is None:  # not registered: compute without caching
            return frozenset(i for i, v in self._identities.items() if sel.matches(v))
        return got

    def selectors(self) -> list[Selector]:
        return list(self._selections)

    # ---- identities (IdentityListener) ---------------------------------------------------------
    def identity_added(self, identity: int, labels: Labels) -> None:
        v = view(labels)
        self._identities[identity] = v
        changed: set[Selector] = set()
        for sel, ids in self._selections.items():
            hit = sel.matches(v)
            if hit and identity not in ids:
                ids.add(identity)
                changed.add(sel)
            elif not hit and identity in ids:
                ids.discard(identity)
                changed.add(sel)
        self._fire(changed)

    def identity_removed(self, identity: int, labels: Labels) -> None:
        if self._identities.pop(identity, None) is None:
            return
        changed: set[Selector] = set()
        for sel, ids in self._selections.items():
            if identity in ids:
                ids.discard(identity)
                changed.add(sel)
        self._fire(changed)

    def _fire(self, changed: set[Selector]) -> None:
        if not changed:
            return
        for cb in list(self._callbacks):
            cb(changed)

    def identity_view(self, identity: int) -> IdentityView | None:
        return self._identities.get(identity)
