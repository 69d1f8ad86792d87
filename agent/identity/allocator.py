"""Numeric security identities: one per distinct security-relevant label set, agreed cluster-wide.

Global identities (256..65535) are PyCiliumIdentity objects in the API server. To allocate a label
set the allocator first looks in its cache (fed by list/watch of the objects); on a miss it walks a
probe sequence that every agent computes the same way (a hash of the sorted labels, then forward)
and, for each candidate number, tries to create the object. Creation succeeding means the number is
ours; 409 AlreadyExists means someone holds it: if the holder has our labels (another agent won the
race for the same pods) we use it, else we try the next number. Every agent therefore ends up with
the same number for the same labels.

Node-local identities (``1<<24 | n``) are handed out for ipBlock CIDRs; reserved identities
(host, world, ...) are fixed.

Garbage collection (any agent may run it): an identity that no pod in the cluster has used for
longer than the grace period is deleted with uid + resourceVersion preconditions. If an identity
still referenced on this node is deleted anyway (a race with a collector on another node) the
allocator re-creates it under the same number, or, if that number was taken meanwhile, allocates a
new one and tells its listeners (``identity_reassigned``).

Thread safety: every public method takes ``lock`` (pass one shared RLock to every control-plane
component so their callbacks nest without lock-order problems). Backend calls happen under it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from pycilium.agent.identity.backend import (
    SECURITY_LABELS,
    AlreadyExistsError,
    BackendError,
    IdentityBackend,
)
from pycilium.agent.identity.labels import (
    ID_WORLD,
    LOCAL_ID_FLAG,
    MAX_GLOBAL_ID,
    MAX_LOCAL_ID,
    MIN_GLOBAL_ID,
    RESERVED_LABELS,
    Labels,
    cidr_labels,
    is_global_id,
    is_local_id,
    labels_from_map,
    labels_key,
    labels_to_map,
)

log = logging.getLogger("pycilium.agent.identity")

Obj = dict[str, Any]


class IdentityAllocationError(RuntimeError):
    """No identity could be allocated (API server unreachable, or the identity space is full)."""


class IdentityListener(Protocol):
    """Told about every identity that appears or disappears (reserved, global and local)."""

    def identity_added(self, identity: int, labels: Labels) -> None: ...

    def identity_removed(self, identity: int, labels: Labels) -> None: ...


@dataclass(frozen=True)
class Identity:
    id: int
    labels: Labels
    uid: str = ""
    resource_version: str = ""

    @property
    def scope(self) -> str:
        if is_global_id(self.id):
            return "global"
        if is_local_id(self.id):
            return "local"
        return "reserved"


def _probe_start(key: str) -> int:
    span = MAX_GLOBAL_ID - MIN_GLOBAL_ID + 1
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return MIN_GLOBAL_ID + h % span


def probe_sequence(labels: Iterable[str], limit: int | None = None) -> Iterable[int]:
    """The candidate numbers for a label set, in the order every agent tries them."""
    span = MAX_GLOBAL_ID - MIN_GLOBAL_ID + 1
    start = _probe_start(labels_key(labels))
    for i in range(span if limit is None else min(limit, span)):
        yield MIN_GLOBAL_ID + (start - MIN_GLOBAL_ID + i) % span


class IdentityAllocator:
    """Allocation, cache and garbage collection of security identities."""

    def __init__(
        self,
        backend: IdentityBackend | None,
        *,
        lock: threading.RLock | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_probes: int = MAX_GLOBAL_ID - MIN_GLOBAL_ID + 1,
    ) -> None:
        self.backend = backend
        self.lock = lock or threading.RLock()
        self.clock = clock
        self.max_probes = max_probes
        self._by_id: dict[int, Identity] = {i: Identity(i, ls) for i, ls in RESERVED_LABELS.items()}
        self._global_by_key: dict[str, set[int]] = {}
        self._refs: dict[str, int] = {}  # label key -> local references
        self._ref_ids: dict[str, int] = {}  # label key -> the number this node uses for it
        self._cidr: dict[str, tuple[int, int]] = {}  # prefix -> (identity, references)
        self._cidr_restored: set[str] = set()  # restored at start, not yet referenced again
        self._next_local = 1
        self._unused_since: dict[int, float] = {}
        self._listeners: list[IdentityListener] = []
        self._reassign_listeners: list[Callable[[Labels, int, int], None]] = []
        self.synced = False

    # ---- listeners -----------------------------------------------------------------------------
    def subscribe(self, listener: IdentityListener, replay: bool = True) -> None:
        """Register a listener; with `replay` it is first told about every known identity."""
        with self.lock:
            self._listeners.append(listener)
            if replay:
                for ident in list(self._by_id.values()):
                    listener.identity_added(ident.id, ident.labels)

    def on_reassigned(self, callback: Callable[[Labels, int, int], None]) -> None:
        """callback(labels, old_id, new_id): a label set used here had to move to a new number."""
        with self.lock:
            self._reassign_listeners.append(callback)

    def _added(self, ident: Identity) -> None:
        for listener in list(self._listeners):
            listener.identity_added(ident.id, ident.labels)

    def _removed(self, ident: Identity) -> None:
        for listener in list(self._listeners):
            listener.identity_removed(ident.id, ident.labels)

    # ---- cache ---------------------------------------------------------------------------------
    def _parse(self, obj: Obj) -> Identity | None:
        meta = obj.get("metadata") or {}
        try:
            num = int(str(meta.get("name", "")))
        except ValueError:
            log.warning("ignoring identity object with a non-numeric name %r", meta.get("name"))
            return None
        if not is_global_id(num):
            log.warning("ignoring identity object %d outside %d..%d", num, MIN_GLOBAL_ID, MAX_GLOBAL_ID)
            return None
        raw = obj.get(SECURITY_LABELS)
        if not isinstance(raw, dict) or not raw:
            log.warning("ignoring identity object %d without %s", num, SECURITY_LABELS)
            return None
        return Identity(num, labels_from_map(raw), meta.get("uid", ""), str(meta.get("resourceVersion", "")))

    def _store(self, ident: Identity) -> None:
        old = self._by_id.get(ident.id)
        if old is not None and old.labels == ident.labels:
            self._by_id[ident.id] = ident  # newer resourceVersion
            return
        if old is not None:
            self._forget(old)
        self._by_id[ident.id] = ident
        self._global_by_key.setdefault(labels_key(ident.labels), set()).add(ident.id)
        self._added(ident)

    def _forget(self, ident: Identity) -> None:
        self._by_id.pop(ident.id, None)
        self._unused_since.pop(ident.id, None)
        key = labels_key(ident.labels)
        ids = self._global_by_key.get(key)
        if ids is not None:
            ids.discard(ident.id)
            if not ids:
                del self._global_by_key[key]
        self._removed(ident)

    def upsert_identity(self, obj: Obj) -> None:
        """A PyCiliumIdentity was listed, added or modified (wire to its reflector)."""
        ident = self._parse(obj)
        if ident is None:
            return
        with self.lock:
            self._store(ident)

    def delete_identity(self, obj: Obj) -> None:
        """A PyCiliumIdentity was deleted (wire to its reflector)."""
        ident = self._parse(obj)
        if ident is None:
            return
        with self.lock:
            known = self._by_id.get(ident.id)
            if known is None or known.labels != ident.labels:
                return
            key = labels_key(known.labels)
            in_use = self._ref_ids.get(key) == known.id
            self._forget(known)
            if in_use:
                self._restore_in_use(known)

    def _restore_in_use(self, ident: Identity) -> None:
        """An identity this node still uses was deleted: re-create it, or move to a new number."""
        key = labels_key(ident.labels)
        if self.backend is not None:
            try:
                obj = self.backend.create(ident.id, labels_to_map(ident.labels))
                parsed = self._parse(obj)
                self._store(parsed or ident)
                log.info("re-created identity %d still used on this node", ident.id)
                return
            except AlreadyExistsError:
                obj2 = self.backend.get(ident.id)
                parsed = self._parse(obj2) if obj2 else None
                if parsed is not None:
                    self._store(parsed)
                    if parsed.labels == ident.labels:
                        return
            except BackendError as e:
                log.warning("cannot re-create identity %d: %s; keeping it locally", ident.id, e)
                self._store(ident)
                return
        try:
            new = self._allocate_global(ident.labels)
        except IdentityAllocationError as e:
            log.error("identity %d of %s was deleted and cannot be replaced: %s", ident.id, key, e)
            self._store(ident)
            return
        self._ref_ids[key] = new.id
        log.warning(
            "identity %d was deleted and taken by other labels; %s now uses %d", ident.id, key, new.id
        )
        for cb in list(self._reassign_listeners):
            cb(ident.labels, ident.id, new.id)

    def resync(self) -> None:
        """List every identity object and make the cache match (used at start without a reflector)."""
        if self.backend is None:
            self.synced = True
            return
        objs = self.backend.list()
        with self.lock:
            seen: set[int] = set()
            for obj in objs:
                ident = self._parse(obj)
                if ident is not None:
                    seen.add(ident.id)
                    self._store(ident)
            for ident in [i for i in self._by_id.values() if is_global_id(i.id) and i.id not in seen]:
                self.delete_identity(self._as_obj(ident))
            self.synced = True

    def mark_synced(self) -> None:
        """The identity reflector has delivered its initial list."""
        with self.lock:
            self.synced = True

    @staticmethod
    def _as_obj(ident: Identity) -> Obj:
        return {
            "metadata": {"name": str(ident.id), "uid": ident.uid, "resourceVersion": ident.resource_version},
            SECURITY_LABELS: labels_to_map(ident.labels),
        }

    # ---- queries -------------------------------------------------------------------------------
    def lookup(self, identity: int) -> Labels | None:
        with self.lock:
            ident = self._by_id.get(identity)
            return ident.labels if ident else None

    def lookup_labels(self, labels: Iterable[str]) -> int | None:
        """The number in use for a label set (this node's choice first), or None."""
        key = labels_key(labels)
        with self.lock:
            if key in self._ref_ids:
                return self._ref_ids[key]
            ids = self._global_by_key.get(key)
            return min(ids) if ids else None

    def get(self, identity: int) -> Identity | None:
        with self.lock:
            return self._by_id.get(identity)

    def all(self) -> dict[int, Labels]:
        """Every known identity: reserved, cluster-wide and node-local."""
        with self.lock:
            return {i: ident.labels for i, ident in sorted(self._by_id.items())}

    def references(self) -> dict[int, int]:
        """Identity -> local reference count (for `identity list` / status)."""
        with self.lock:
            out = {self._ref_ids[k]: n for k, n in self._refs.items() if k in self._ref_ids}
            for ident, n in self._cidr.values():
                out[ident] = n
            return out

    # ---- global allocation ---------------------------------------------------------------------
    def allocate(self, labels: Iterable[str]) -> int:
        """The cluster-wide identity of a label set, created if needed; takes a local reference."""
        ls: Labels = frozenset(labels)
        if not ls:
            raise ValueError("cannot allocate an identity for an empty label set")
        for i, reserved in RESERVED_LABELS.items():
            if reserved == ls:
                return i
        key = labels_key(ls)
        with self.lock:
            if key in self._ref_ids:
                self._refs[key] += 1
                return self._ref_ids[key]
            num = self.lookup_labels(ls)
            if num is None and not self.synced and self.backend is not None:
                try:
                    self.resync()
                except BackendError as e:
                    raise IdentityAllocationError(str(e)) from None
                num = self.lookup_labels(ls)
            if num is None:
                num = self._allocate_global(ls).id
            self._refs[key] = 1
            self._ref_ids[key] = num
            self._unused_since.pop(num, None)
            return num

    def _allocate_global(self, labels: Labels) -> Identity:
        if self.backend is None:
            raise IdentityAllocationError("no identity backend configured")
        want = labels_to_map(labels)
        try:
            for cand in probe_sequence(labels, self.max_probes):
                known = self._by_id.get(cand)
                if known is not None:
                    if known.labels == labels:
                        return known
                    continue
                for _ in range(3):  # the holder may be deleted between our create and get
                    try:
                        obj = self.backend.create(cand, want)
                        ident = self._parse(obj) or Identity(cand, labels)
                        self._store(ident)
                        log.info("allocated identity %d for %s", cand, labels_key(labels))
                        return ident
                    except AlreadyExistsError:
                        holder = self.backend.get(cand)
                        if holder is None:
                            continue
                        ident2 = self._parse(holder)
                        if ident2 is None:
                            break  # unusable object holds the number: skip it
                        self._store(ident2)
                        if ident2.labels == labels:
                            return ident2
                        break
        except BackendError as e:
            raise IdentityAllocationError(f"allocating an identity for {labels_key(labels)}: {e}") from None
        raise IdentityAllocationError(f"no free identity for {labels_key(labels)} (identity space exhausted)")

    def release(self, labels_or_id: Iterable[str] | int) -> None:
        """Drop one local reference (taken by allocate). The object stays until GC removes it."""
        with self.lock:
            if isinstance(labels_or_id, int):
                keys = [k for k, v in self._ref_ids.items() if v == labels_or_id]
                if not keys:
                    return
                key = keys[0]
            else:
                key = labels_key(labels_or_id)
            n = self._refs.get(key, 0)
            if n <= 1:
                self._refs.pop(key, None)
                self._ref_ids.pop(key, None)
            else:
                self._refs[key] = n - 1

    # ---- node-local CIDR identities ------------------------------------------------------------
    def allocate_cidr(self, prefix: str | ipaddress.IPv4Network) -> int:
        """A node-local identity for an ipBlock prefix (0.0.0.0/0 is reserved:world); takes a reference."""
        net = ipaddress.IPv4Network(prefix, strict=False)
        if net.prefixlen == 0:
            return ID_WORLD
        p = str(net)
        with self.lock:
            if p in self._cidr:
                num, n = self._cidr[p]
                self._cidr[p] = (num, n + 1)
                self._cidr_restored.discard(p)
                return num
            num = self._next_free_local()
            ident = Identity(num, cidr_labels(net))
            self._cidr[p] = (num, 1)
            self._by_id[num] = ident
            self._added(ident)
            return num

    def _next_free_local(self) -> int:
        for _ in range(MAX_LOCAL_ID):
            n = self._next_local
            self._next_local = n + 1 if n < MAX_LOCAL_ID else 1
            if (LOCAL_ID_FLAG | n) not in self._by_id:
                return LOCAL_ID_FLAG | n
        raise IdentityAllocationError("node-local identity space exhausted")

    def release_cidr(self, prefix: str | ipaddress.IPv4Network) -> None:
        net = ipaddress.IPv4Network(prefix, strict=False)
        p = str(net)
        with self.lock:
            if p not in self._cidr:
                return
            num, n = self._cidr[p]
            if n > 1:
                self._cidr[p] = (num, n - 1)
                return
            del self._cidr[p]
            ident = self._by_id.pop(num, None)
            if ident is not None:
                self._removed(ident)

    def cidr_identity(self, prefix: str | ipaddress.IPv4Network) -> int | None:
        net = ipaddress.IPv4Network(prefix, strict=False)
        if net.prefixlen == 0:
            return ID_WORLD
        with self.lock:
            got = self._cidr.get(str(net))
            return got[0] if got else None

    def restore_cidr(self, prefix: str | ipaddress.IPv4Network, identity: int) -> bool:
        """Keep the number a CIDR had before a restart (read back from the ipcache), so that the
        policy and ipcache maps stay consistent while the agent catches up. Unreferenced restored
        identities are dropped by `drop_unused_restored`."""
        net = ipaddress.IPv4Network(prefix, strict=False)
        p = str(net)
        with self.lock:
            if not is_local_id(identity) or p in self._cidr or identity in self._by_id:
                return False
            ident = Identity(identity, cidr_labels(net))
            self._cidr[p] = (identity, 0)
            self._cidr_restored.add(p)
            self._by_id[identity] = ident
            self._next_local = max(self._next_local, (identity & MAX_LOCAL_ID) + 1)
            if self._next_local > MAX_LOCAL_ID:
                self._next_local = 1
            self._added(ident)
            return True

    def drop_unused_restored(self) -> list[str]:
        with self.lock:
            dropped = []
            for p in sorted(self._cidr_restored):
                num, n = self._cidr[p]
                if n == 0:
                    self._cidr[p] = (num, 1)
                    self.release_cidr(p)
                    dropped.append(p)
            self._cidr_restored.clear()
            return dropped

    # ---- garbage collection --------------------------------------------------------------------
    def gc(self, in_use: set[str], grace: float, now: float | None = None) -> list[int]:
        """Delete cluster-wide identities whose label set (key in `in_use`) no pod in the cluster has
        had for at least `grace` seconds. Returns the numbers deleted."""
        if self.backend is None:
            return []
        t = self.clock() if now is None else now
        deleted: list[int] = []
        with self.lock:
            victims: list[Identity] = []
            for ident in list(self._by_id.values()):
                if not is_global_id(ident.id):
                    continue
                key = labels_key(ident.labels)
                if key in in_use or key in self._refs:
                    self._unused_since.pop(ident.id, None)
                    continue
                since = self._unused_since.setdefault(ident.id, t)
                if t - since >= grace:
                    victims.append(ident)
            for ident in victims:
                try:
                    ok = self.backend.delete(ident.id, ident.uid, ident.resource_version)
                except BackendError as e:
                    log.warning("identity GC: deleting %d failed: %s", ident.id, e)
                    continue
                if ok:
                    log.info(
                        "identity GC: deleted unused identity %d (%s)", ident.id, labels_key(ident.labels)
                    )
                    deleted.append(ident.id)
                    if self._by_id.get(ident.id) == ident:
                        self._forget(ident)
                else:
                    # changed or re-created meanwhile: look again next round
                    self._unused_since.pop(ident.id, None)
        return deleted
