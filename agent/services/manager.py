"""The service manager: Kubernetes Services + EndpointSlices -> the pinned load-balancer maps.

Flow. Reflector threads call the handlers, which parse the object into a small record, store it and
mark its Service dirty (nothing else: handlers never touch the maps). One sync thread takes all dirty
Services, plans them (translate.py) and writes the difference against what it has written before,
batched and in the order the datapath needs (bpf/lib/map_layouts.h, "How the agent writes a
service"):

  1. backends            lb4_backends[id]                  (new ids, state changes)
  2. slots               lb4_services[vip,port,1..n]       (only slots whose backend changed)
  3. reverse NAT, affinity match
  4. frontends           lb4_services[vip,port,0]          (count, local_count, flags, timeout)
  5. removals, in reverse: removed frontends' slot 0, then slots beyond the new counts, reverse NAT
     and affinity match of removed frontends, then backends nothing refers to any more;
  6. conntrack/NAT/affinity purge for the backends that went away: handed to a purge thread right
     after the writes (a scan of a large conntrack table must not delay the next service update),
     batched when several removals are pending.

So a lookup in the datapath sees either the old or the new service, never a slot that points to a
backend not yet written or already deleted.

Restart. At start() the maps are read back: backend ids, each frontend's rev_nat_index and slots.
Nothing is written until every source (the Service and EndpointSlice reflectors) has completed its
first full list; then one full sync writes the desired state and only then deletes what is stale.
Datapath state therefore survives an agent restart untouched for every Service that still exists.

Drift. audit() (every `audit_interval` seconds) reads the maps (services, backends, reverse NAT,
affinity match, Maglev tables) and repairs every entry that differs from the desired state, counting
repairs in pycilium_datapath_drift_repairs_total{map}.

Threads: handlers run on reflector threads and only take the short input lock; the sync thread owns
the written state under the state lock, which queries (list_services) take as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from pycilium.agent.k8s.reflector import Handlers, HasSynced

from . import maglev
from .ids import IdAllocator
from .lbmaps import (
    AFFINITY_MATCH,
    AFFINITY_MATCH_VALUE,
    BACKENDS,
    BE_STATE_ACTIVE,
    BE_STATE_TERMINATING,
    MAGLEV,
    REVERSE_NAT,
    SERVICES,
    LBMaps,
    PurgeRequest,
    affinity_match_key,
    backend_key,
    backend_value,
    decode_affinity_match_key,
    decode_backend,
    decode_backend_key,
    decode_revnat_key,
    decode_svc_key,
    decode_svc_value,
    maglev_entries,
    maglev_key_rev_nat,
    maglev_keys,
    revnat_key,
    revnat_value,
    svc_key,
    svc_value,
)
from .metrics import service_metrics
from .model import (
    PROTO_NAMES,
    ServiceInfo,
    SliceInfo,
    SvcKey,
    parse_endpoint_slice,
    parse_service,
)
from .translate import (
    EMPTY_PLAN,
    SVC_FLAG2_MAGLEV,
    SVC_FLAG_AFFINITY,
    SVC_FLAG_EXT_LOCAL_SCOPE,
    SVC_FLAG_EXTERNAL_IP,
    SVC_FLAG_LOADBALANCER,
    SVC_FLAG_NODEPORT,
    BKey,
    FeKey,
    Frontend,
    FrontendPlan,
    ServicePlan,
    plan_service,
)

log = logging.getLogger("pycilium.services")

Obj = dict[str, Any]
SliceKey = tuple[str, str]

REVNAT_STATE_FILE = "lb-revnat.json"


# --- query API (pycilium service list) -------------------------------------------------------------


@dataclass(frozen=True)
class BackendView:
    id: int
    address: str
    port: int
    protocol: str
    state: str  # "active" | "terminating"
    in_slots: bool  # selected for new connections (else only draining)
    local: bool  # first local_count slots

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}/{self.protocol}"


@dataclass(frozen=True)
class ServiceView:
    id: int  # rev_nat_index of the frontend
    frontend: str  # "10.96.0.10:53/UDP"
    address: str
    port: int
    protocol: str
    type: str  # ClusterIP | NodePort | LoadBalancer | ExternalIPs
    namespace: str
    name: str
    flags: int
    flags2: int
    affinity_timeout: int
    count: int
    local_count: int
    backends: tuple[BackendView, ...]


# --- written state -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Fe:
    frontend: Frontend | None  # None: restored from the maps, owner not known yet
    svc: SvcKey | None
    rev_nat: int
    slots: tuple[int, ...]  # backend ids of slots 1..n
    local_count: int
    val0: bytes
    terminating: tuple[BKey, ...] = ()

    @property
    def affinity(self) -> bool:
        return bool(self.val0) and bool(decode_svc_value(self.val0)[3] & SVC_FLAG_AFFINITY)


class ServiceManager:
    """Keeps the load-balancer maps equal to the Services and EndpointSlices of the cluster."""

    def __init__(
        self,
        *,
        node_name: str,
        bpf_root: str,
        state_dir: str | None = None,
        node_ip_of: Callable[[str], str | None] | None = None,
        audit_interval: float = 60.0,
        registry: CollectorRegistry | None = None,
        maps: LBMaps | None = None,
        lb_algorithm: str = "random",
        maglev_table_size: int = 16381,
    ) -> None:
        self.node_name = node_name
        # Maglev: north-south frontends get a consistent-hashing table (agent/services/maglev.py)
        self.lb_algorithm = lb_algorithm
        self.maglev_table_size = maglev_table_size
        self._maglev_written: dict[FeKey, tuple[int, tuple[int, ...]]] = {}  # frontend -> (rev_nat, table)
        self.bpf_root = bpf_root
        self.state_dir = state_dir
        self.node_ip_of = node_ip_of
        self.audit_interval = audit_interval
        self.metrics = service_metrics(registry)
        self.maps = maps
        self._own_maps = maps is None
        # sync/readiness
        self.synced = threading.Event()  # the first full sync has been written
        self.on_applied: list[Callable[[set[SvcKey]], None]] = []
        # input side (handlers)
        self._in_lock = threading.Lock()
        self._services: dict[SvcKey, ServiceInfo] = {}
        self._slices: dict[SliceKey, SliceInfo] = {}
        self._svc_slices: dict[SvcKey, set[SliceKey]] = {}
        self._dirty: set[SvcKey] = set()
        self._nodes_dirty: set[str] | None = set()  # nodes whose IP changed (None: all)
        self._gen_in = 0
        # written state (sync thread)
        self._state_lock = threading.RLock()
        self._fe: dict[FeKey, _Fe] = {}
        self._be: dict[int, bytes] = {}  # backend id -> lb4_backends value as written
        self._revnat_written: dict[int, bytes] = {}
        self._stale_aff: set[tuple[int, int]] = set()
        self._orphans: dict[
            int, BKey
        ] = {}  # restored backend ids whose backend has another id  # restored affinity-match pairs, until the full sync
        self._fe_owner: dict[FeKey, SvcKey] = {}
        self._fe_waiters: dict[FeKey, set[SvcKey]] = {}
        self._svc_fes: dict[SvcKey, tuple[FeKey, ...]] = {}
        self._svc_bes: dict[SvcKey, dict[BKey, bool]] = {}  # backend -> active
        self._be_refs: dict[BKey, list[int]] = {}  # [services with it active, services with it terminating]
        self._be_node: dict[BKey, str] = {}
        self._backend_ids: IdAllocator[BKey] = IdAllocator(1, 0xFFFFFFFE, "backend")
        self._revnat_ids: IdAllocator[FeKey] = IdAllocator(1, 0xFFFF, "rev_nat_index")
        self._revnat_dirty = False
        self._revnat_saved_at = 0.0
        # thread
        self._cond = threading.Condition()
        self._gen_done = -1
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sources: list[HasSynced] = []
        self._next_audit = 0.0
        self._gauges_at = 0.0
        self._gauges_dirty = False
        self._purge_q: list[PurgeRequest] = []
        self._purging = False
        self._purge_thread: threading.Thread | None = None
        self.cycles = 0
        self.last_error = ""

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, sources: Iterable[HasSynced] = ()) -> None:
        """Read the maps back and start the sync thread, which waits for every source to be synced."""
        if self._thread is not None:
            return
        if self.maps is None:
            self.maps = LBMaps(self.bpf_root)
        self._sources = list(sources)
        self.restore()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="service-sync", daemon=True)
        self._thread.start()
        self._purge_thread = threading.Thread(target=self._purge_loop, name="service-ct-purge", daemon=True)
        self._purge_thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop syncing. The maps stay as they are: the datapath keeps forwarding."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            self._cond.notify_all()
        if self._purge_thread is not None:
            self._purge_thread.join(timeout)
            self._purge_thread = None
        self._run_purges()  # whatever is still queued
        with self._state_lock:
            if self._revnat_dirty:
                self._save_revnat(force=True)
        if self._own_maps and self.maps is not None:
            self.maps.close()
            self.maps = None

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event handled so far is in the maps (and the first full sync is done)."""
        with self._in_lock:
            target = self._gen_in
        with self._cond:
            return self._cond.wait_for(
                lambda: (
                    self.synced.is_set()
                    and self._gen_done >= target
                    and not self._purge_q
                    and not self._purging
                ),
                timeout,
            )

    def nodes_changed(self, nodes: Iterable[str] | None = None) -> None:
        """Node addresses changed (backends carry their node's IP): recompute the services with
        endpoints on those nodes (every service when `nodes` is None)."""
        with self._in_lock:
            if nodes is None:
                self._dirty.update(self._services)
                self._dirty.update(self._svc_fes)
                self._nodes_dirty = None
            else:
                names = set(nodes)
                if self._nodes_dirty is not None:
                    self._nodes_dirty |= names
                for sl in self._slices.values():
                    if any(ep.node in names for ep in sl.endpoints):
                        self._dirty.add(sl.service_key)
            self._gen_in += 1
        self._wake.set()

    # --- handlers -----------------------------------------------------------------------------

    def service_handlers(self) -> Handlers:
        return Handlers(on_add=self.on_service, on_update=lambda _old, new: self.on_service(new),
                        on_delete=self.on_service_deleted)  # fmt: skip

    def endpointslice_handlers(self) -> Handlers:
        return Handlers(on_add=self.on_endpoint_slice, on_update=lambda _old, new: self.on_endpoint_slice(new),
                        on_delete=self.on_endpoint_slice_deleted)  # fmt: skip

    def _warner(self, kind: str, obj: Obj) -> Callable[[str], None]:
        meta = obj.get("metadata") or {}
        where = f"{kind} {meta.get('namespace') or ''}/{meta.get('name') or ''}"

        def warn(msg: str) -> None:
            self.metrics.rejected.labels(kind=kind).inc()
            log.warning("%s: %s", where, msg)

        return warn

    @staticmethod
    def _key(obj: Obj) -> SvcKey:
        meta = obj.get("metadata") or {}
        return (meta.get("namespace") or "", meta.get("name") or "")

    def on_service(self, obj: Obj) -> None:
        key = self._key(obj)
        info = parse_service(obj, self._warner("Service", obj))
        with self._in_lock:
            old = self._services.get(key)
            if info is None:
                if old is None:
                    return
                del self._services[key]
            else:
                if old == info:
                    return
                self._services[key] = info
            self._mark(key)
        self._wake.set()

    def on_service_deleted(self, obj: Obj) -> None:
        key = self._key(obj)
        with self._in_lock:
            if self._services.pop(key, None) is None and key not in self._svc_fes:
                return
            self._mark(key)
        self._wake.set()

    def on_endpoint_slice(self, obj: Obj) -> None:
        key = self._key(obj)
        sl = parse_endpoint_slice(obj, self._warner("EndpointSlice", obj))
        with self._in_lock:
            old = self._slices.get(key)
            if old == sl:
                return
            if old is not None:
                self._unlink_slice(key, old)
            if sl is not None:
                self._slices[key] = sl
                self._svc_slices.setdefault(sl.service_key, set()).add(key)
                self._mark(sl.service_key)
        self._wake.set()

    def on_endpoint_slice_deleted(self, obj: Obj) -> None:
        key = self._key(obj)
        with self._in_lock:
            old = self._slices.get(key)
            if old is None:
                return
            self._unlink_slice(key, old)
        self._wake.set()

    def _unlink_slice(self, key: SliceKey, old: SliceInfo) -> None:
        del self._slices[key]
        sk = old.service_key
        keys = self._svc_slices.get(sk)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._svc_slices[sk]
        self._mark(sk)

    def _mark(self, key: SvcKey) -> None:
        self._dirty.add(key)
        self._gen_in += 1

    # --- sync thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set() and not all(s.synced.is_set() for s in self._sources):
            self._stop.wait(0.05)
        backoff = 0.1
        failed = False
        while not self._stop.is_set() and not self.synced.is_set():
            try:
                self._cycle(full=True)
                self.synced.set()
                with self._cond:
                    self._cond.notify_all()
                log.info(
                    "services: initial sync written (%d frontends, %d backends)", len(self._fe), len(self._be)
                )
            except Exception as e:
                failed = True
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("services: initial sync failed; retrying in %.1fs", backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        # The desired state is recorded before it is written: after a failed write only the audit,
        # which compares with the maps themselves, finds what is missing. Run it at once then.
        self._next_audit = time.monotonic() + (0.0 if failed else self.audit_interval)
        backoff = 0.1
        while not self._stop.is_set():
            deadline = self._next_audit
            if self._gauges_dirty:
                deadline = min(deadline, self._gauges_at + 1.0)
            self._wake.wait(max(0.0, deadline - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                if self._gauges_dirty and time.monotonic() >= self._gauges_at + 1.0:
                    with self._state_lock:
                        self._update_gauges()
                if self._dirty:
                    self._cycle(full=False)
                if time.monotonic() >= self._next_audit:
                    self.audit()
                    self._next_audit = time.monotonic() + self.audit_interval
                backoff = 0.1
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("services: sync failed; auditing in %.1fs", backoff)
                self._next_audit = time.monotonic() + backoff
                backoff = min(backoff * 2, 30.0)

    def sync_once(self, full: bool = False) -> None:
        """Run one sync cycle on the calling thread (tests and benchmarks without the thread)."""
        self._cycle(full=full)
        if full:
            self.synced.set()

    def _cycle(self, full: bool) -> None:
        t0 = time.perf_counter()
        with self._in_lock:
            if full:
                keys = set(self._services) | set(self._svc_fes) | set(self._svc_bes) | self._dirty
                self._dirty = set()
            else:
                keys, self._dirty = self._dirty, set()
            gen = self._gen_in
            nodes_dirty, self._nodes_dirty = self._nodes_dirty, set()
            snapshot = {
                k: (self._services.get(k), [self._slices[s] for s in self._svc_slices.get(k, ())])
                for k in keys
            }
        with self._state_lock:
            self._apply(snapshot, full, nodes_dirty)
            self._update_gauges(force=full)
            if self._revnat_dirty:
                self._save_revnat(force=full)
        self.cycles += 1
        self.metrics.sync_duration.labels(mode="full" if full else "incremental").observe(
            time.perf_counter() - t0
        )
        with self._cond:
            self._gen_done = max(self._gen_done, gen)
            self._cond.notify_all()
        for cb in self.on_applied:
            try:
                cb(set(keys))
            except Exception:
                log.exception("services: on_applied callback failed")

    # --- planning + writing -------------------------------------------------------------------

    def _node_ip(self, node: str) -> str | None:
        if not node or self.node_ip_of is None:
            return None
        try:
            return self.node_ip_of(node)
        except Exception:
            return None

    def _apply(
        self,
        snapshot: dict[SvcKey, tuple[ServiceInfo | None, list[SliceInfo]]],
        full: bool,
        nodes_dirty: set[str] | None = None,
    ) -> None:
        """Plan the services in `snapshot` and write the difference. `full`: the snapshot holds every
        service, so whatever it does not produce is stale. `nodes_dirty`: backends on these nodes are
        rewritten (their node IP changed); None: on every node."""
        every_node = nodes_dirty is None
        nodes_dirty = nodes_dirty or set()
        assert self.maps is not None
        touched_be: dict[BKey, None] = {}  # insertion-ordered: ids follow the plan order
        fe_want: dict[FeKey, tuple[SvcKey, FrontendPlan] | None] = {}
        released: list[FeKey] = []
        plans: dict[SvcKey, ServicePlan] = {}
        for key, (info, slices) in snapshot.items():
            if info is None:
                plans[key] = EMPTY_PLAN
                continue
            try:
                plans[key] = plan_service(info, slices, self.node_name)
            except Exception:
                log.exception("services: cannot translate Service %s/%s; keeping its current state", *key)
        # Releases first, so a frontend moving between two services in one batch is not a conflict.
        for key, plan in plans.items():
            new_keys = {fp.frontend.key for fp in plan.frontends}
            for old_fk in self._svc_fes.get(key, ()):
                if old_fk not in new_keys and self._fe_owner.get(old_fk) == key:
                    del self._fe_owner[old_fk]
                    fe_want.setdefault(old_fk, None)
                    released.append(old_fk)
        for key, plan in plans.items():
            # backend references
            old_b = self._svc_bes.get(key, {})
            new_b = {bk: act for bk, (act, _n) in plan.backends.items()}
            for bk, act in old_b.items():
                nb = new_b.get(bk)
                if nb is None or nb != act:
                    self._be_refs[bk][0 if act else 1] -= 1
                    touched_be[bk] = None
            for bk, (act, node) in plan.backends.items():
                ob = old_b.get(bk)
                if ob is None or ob != act:
                    self._be_refs.setdefault(bk, [0, 0])[0 if act else 1] += 1
                    touched_be[bk] = None
                if self._be_node.get(bk) != node:
                    self._be_node[bk] = node
                    touched_be[bk] = None
                elif full or every_node or node in nodes_dirty:
                    touched_be[bk] = None
            if new_b:
                self._svc_bes[key] = new_b
            else:
                self._svc_bes.pop(key, None)
            # frontends
            owned: list[FeKey] = []
            for fp in plan.frontends:
                fk = fp.frontend.key
                owner = self._fe_owner.get(fk)
                if owner is not None and owner != key:
                    if key not in self._fe_waiters.get(fk, ()):
                        log.warning("services: %s/%s frontend %s:%d/%s is already used by %s/%s; skipped",
                                    key[0], key[1], fk[0], fk[1], PROTO_NAMES.get(fk[2], fk[2]), *owner)  # fmt: skip
                    self._fe_waiters.setdefault(fk, set()).add(key)
                    continue
                self._fe_owner[fk] = key
                fe_want[fk] = (key, fp)
                owned.append(fk)
            if owned:
                self._svc_fes[key] = tuple(owned)
            else:
                self._svc_fes.pop(key, None)
        if full:
            for fk in self._fe:
                fe_want.setdefault(fk, None)
            for bid, v in self._be.items():
                touched_be[self._backend_ids.owner(bid) or decode_backend(v)[0]] = None

        # 1. backends: ids and values
        be_k: list[bytes] = []
        be_v: list[bytes] = []
        dead: dict[int, BKey] = {}
        for bk in touched_be:
            refs = self._be_refs.get(bk)
            if refs is not None and (refs[0] > 0 or refs[1] > 0):
                state = BE_STATE_ACTIVE if refs[0] > 0 else BE_STATE_TERMINATING
                bid = self._backend_ids.acquire(bk)
                val = backend_value(bk, state, self._node_ip(self._be_node.get(bk, "")))
                if self._be.get(bid) != val:
                    be_k.append(backend_key(bid))
                    be_v.append(val)
                    self._be[bid] = val
            else:
                self._be_refs.pop(bk, None)
                self._be_node.pop(bk, None)
                bid_ = self._backend_ids.release(bk)
                if bid_ is not None and bid_ in self._be:
                    dead[bid_] = bk
                    del self._be[bid_]
        if full:  # ids found in the map that no allocation owns (duplicates of one backend)
            for bid, bk in self._orphans.items():
                if bid in self._be and self._backend_ids.get(bk) != bid:
                    dead[bid] = bk
                    del self._be[bid]
            self._orphans = {}

        # 2-4. frontends
        slot_k: list[bytes] = []
        slot_v: list[bytes] = []
        rn_k: list[bytes] = []
        rn_v: list[bytes] = []
        am_add: list[bytes] = []
        s0_k: list[bytes] = []
        s0_v: list[bytes] = []
        del_s0: list[bytes] = []
        del_slots: list[bytes] = []
        del_rn: list[bytes] = []
        am_del: list[bytes] = []
        mg_k: list[bytes] = []
        mg_v: list[bytes] = []
        mg_del: list[bytes] = []
        dead_pairs: set[tuple[int, int, int]] = set()
        ids = self._backend_ids
        for fk, want in fe_want.items():
            old = self._fe.get(fk)
            if want is None:
                if old is None:
                    continue
                del_s0.append(svc_key(fk, 0))
                del_slots.extend(svc_key(fk, i) for i in range(1, len(old.slots) + 1))
                mw = self._maglev_written.pop(fk, None)
                if mw is not None:
                    mg_del.extend(maglev_keys(mw[0], len(mw[1])))
                if self._revnat_written.pop(old.rev_nat, None) is not None:
                    del_rn.append(revnat_key(old.rev_nat))
                if old.affinity:
                    am_del.extend(affinity_match_key(b, old.rev_nat) for b in old.slots)
                for b in old.slots:
                    if b not in dead:
                        dead_pairs.add((b, old.rev_nat, fk[2]))
                if self._revnat_ids.get(fk) == old.rev_nat:
                    self._revnat_ids.release(fk)
                    self._revnat_dirty = True
                del self._fe[fk]
                continue
            svc, fp = want
            fe = fp.frontend
            rn = self._revnat_ids.get(fk)
            if rn is None:
                rn = self._revnat_ids.acquire(fk)
                self._revnat_dirty = True
            new_slots = tuple(ids.acquire(bk) for bk in fp.slots)
            aff = bool(fe.flags & SVC_FLAG_AFFINITY)
            flags2 = fe.flags2
            mag = self._maglev_table(fe.flags, fp, new_slots)
            old_mag = self._maglev_written.get(fk)
            if mag is not None:
                flags2 |= SVC_FLAG2_MAGLEV
                if old_mag != (rn, mag):
                    k_, v_ = maglev_entries(rn, mag)
                    mg_k.extend(k_)
                    mg_v.extend(v_)
                    self._maglev_written[fk] = (rn, mag)
            if old_mag is not None and (mag is None or old_mag[0] != rn):
                mg_del.extend(maglev_keys(old_mag[0], len(old_mag[1])))
                if mag is None:
                    del self._maglev_written[fk]
            val0 = svc_value(fe.affinity_timeout if aff else 0, len(new_slots), rn, fe.flags, flags2,
                             fp.local_count)  # fmt: skip
            old_slots = old.slots if old is not None else ()
            same_rn = old is not None and old.rev_nat == rn
            for i, bid in enumerate(new_slots):
                if not same_rn or i >= len(old_slots) or old_slots[i] != bid:
                    slot_k.append(svc_key(fk, i + 1))
                    slot_v.append(svc_value(bid, 0, rn, 0, 0, 0))
            rv = revnat_value(fk)
            if self._revnat_written.get(rn) != rv:
                rn_k.append(revnat_key(rn))
                rn_v.append(rv)
                self._revnat_written[rn] = rv
            new_pairs = {(b, rn) for b in new_slots} if aff else set()
            old_pairs = {(b, old.rev_nat) for b in old_slots} if old is not None and old.affinity else set()
            am_add.extend(affinity_match_key(*p) for p in new_pairs - old_pairs)
            am_del.extend(affinity_match_key(*p) for p in old_pairs - new_pairs)
            if old is None or old.val0 != val0:
                s0_k.append(svc_key(fk, 0))
                s0_v.append(val0)
            del_slots.extend(svc_key(fk, i) for i in range(len(new_slots) + 1, len(old_slots) + 1))
            if old is not None and old_slots:
                kept = self._svc_bes.get(svc, {})
                for b in set(old_slots).difference(new_slots):
                    gone = self._be.get(b)
                    if b not in dead and (gone is None or decode_backend(gone)[0] not in kept):
                        dead_pairs.add((b, old.rev_nat, fk[2]))
            self._fe[fk] = _Fe(fe, svc, rn, new_slots, fp.local_count, val0, fp.terminating)
        if full:
            live_rn = {fe.rev_nat for fe in self._fe.values()}
            for rn in [r for r in self._revnat_written if r not in live_rn]:
                del self._revnat_written[rn]
                del_rn.append(revnat_key(rn))
            wanted_pairs = self._wanted_pairs()
            am_del.extend(affinity_match_key(*p) for p in self._stale_aff - wanted_pairs)
            self._stale_aff = set()

        # write, in order
        m = self.maps
        m.update(BACKENDS, be_k, be_v)
        m.update(SERVICES, slot_k, slot_v)
        m.update(REVERSE_NAT, rn_k, rn_v)
        m.update(AFFINITY_MATCH, am_add, [AFFINITY_MATCH_VALUE] * len(am_add))
        m.update(MAGLEV, mg_k, mg_v)
        m.update(SERVICES, s0_k, s0_v)
        m.delete(SERVICES, del_s0)
        m.delete(MAGLEV, mg_del)
        if full:  # tables of frontends that no longer exist (e.g. deleted while the agent was down)
            live = {rn for rn, _ in self._maglev_written.values()}
            m.delete(MAGLEV, [k for k, _ in m.items(MAGLEV) if maglev_key_rev_nat(k) not in live])
        m.delete(SERVICES, del_slots)
        m.delete(REVERSE_NAT, del_rn)
        m.delete(AFFINITY_MATCH, am_del)
        m.delete(BACKENDS, [backend_key(b) for b in dead])
        dead_pairs = {p for p in dead_pairs if p[0] not in dead}
        if dead or dead_pairs:
            self._queue_purge(PurgeRequest(dict(dead), dead_pairs))

        # frontends freed by this batch that other services were waiting for
        waiting: set[SvcKey] = set()
        for fk in released:
            if fk not in self._fe_owner:
                waiting |= self._fe_waiters.pop(fk, set())
        for key in plans:
            for fk, ws in list(self._fe_waiters.items()):
                if key in ws and self._fe_owner.get(fk) == key:
                    ws.discard(key)
                    if not ws:
                        del self._fe_waiters[fk]
        if waiting:
            with self._in_lock:
                for k in waiting:
                    self._mark(k)
            self._wake.set()

    def _maglev_table(
        self, flags: int, fp: FrontendPlan, slot_ids: tuple[int, ...]
    ) -> tuple[int, ...] | None:
        """The Maglev table of a north-south frontend (None: random selection)."""
        if self.lb_algorithm != "maglev" or not flags & (
            SVC_FLAG_NODEPORT | SVC_FLAG_LOADBALANCER | SVC_FLAG_EXTERNAL_IP
        ):
            return None
        n = fp.local_count if flags & SVC_FLAG_EXT_LOCAL_SCOPE else len(slot_ids)
        if n == 0:
            return None
        return tuple(maglev.backend_table(list(fp.slots[:n]), slot_ids[:n], self.maglev_table_size))

    def _wanted_pairs(self) -> set[tuple[int, int]]:
        out: set[tuple[int, int]] = set()
        for fe in self._fe.values():
            if fe.affinity:
                out.update((b, fe.rev_nat) for b in fe.slots)
        return out

    # --- conntrack purge ----------------------------------------------------------------------

    def _queue_purge(self, req: PurgeRequest) -> None:
        if not req:
            return
        with self._cond:
            self._purge_q.append(req)
            self._cond.notify_all()
        if self._purge_thread is None:  # no threads (sync_once): purge inline
            self._run_purges()

    def _purge_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._purge_q) or self._stop.is_set())
                if not self._purge_q and self._stop.is_set():
                    return
            self._run_purges()

    def _run_purges(self) -> None:
        with self._cond:
            if not self._purge_q or self._purging:
                return
            reqs, self._purge_q = self._purge_q, []
            self._purging = True
        try:
            dead: dict[int, BKey] = {}
            pairs: set[tuple[int, int, int]] = set()
            for r in reqs:
                dead.update(r.dead)
                pairs |= r.dead_pairs
            with self._state_lock:
                # a backend that came back (same address, new id) keeps its new flows' OUT/IN entries
                live = {bk for bk in dead.values() if bk in self._backend_ids}
                maps = self.maps
            if maps is None:
                return
            purged = maps.purge(PurgeRequest(dead, pairs), keep_tuples=live)
            for name, n in purged.items():
                if n:
                    self.metrics.purged.labels(map=name).inc(n)
            if any(purged.values()):
                log.info("services: purged state of %d removed backends: %s", len(dead), purged)
        except Exception:
            log.exception("services: conntrack purge failed")
        finally:
            with self._cond:
                self._purging = False
                self._cond.notify_all()

    # --- restore ------------------------------------------------------------------------------

    def restore(self) -> None:
        """Read the maps back: backend ids, frontends with their rev_nat_index and slots."""
        assert self.maps is not None
        with self._state_lock:
            m = self.maps
            slot0: dict[FeKey, bytes] = {}
            slots: dict[FeKey, dict[int, int]] = {}
            for k, v in m.items(SERVICES):
                fk, slot, _scope = decode_svc_key(k)
                if slot == 0:
                    slot0[fk] = bytes(v)
                else:
                    slots.setdefault(fk, {})[slot] = decode_svc_value(v)[0]
            in_slots = {b for ss in slots.values() for b in ss.values()}
            found = [(decode_backend_key(k), bytes(v)) for k, v in m.items(BACKENDS)]
            # One backend under two ids (an interrupted write): keep the id the slots use, else the lowest.
            found.sort(key=lambda e: (e[0] not in in_slots, e[0]))
            for bid, v in found:
                bk = decode_backend(v)[0]
                if not self._backend_ids.restore(bk, bid):
                    self._orphans[bid] = bk
                self._be[bid] = v
            for fk in set(slot0) | set(slots):
                v0 = slot0.get(fk)
                ss = slots.get(fk, {})
                n = max(ss) if ss else 0
                # slots without a frontend (an interrupted write or delete) have no index of their own
                rn = decode_svc_value(v0)[2] if v0 is not None else 0
                v0 = v0 or b""
                if rn and not self._revnat_ids.restore(fk, rn):
                    rn = 0  # a duplicate: the full sync gives the frontend a fresh index
                self._fe[fk] = _Fe(None, None, rn, tuple(ss.get(i, 0) for i in range(1, n + 1)), 0, v0)
            for k, v in m.items(REVERSE_NAT):
                self._revnat_written[decode_revnat_key(k)] = bytes(v)
            for k, _v in m.items(AFFINITY_MATCH):
                self._stale_aff.add(decode_affinity_match_key(k))
            self._load_revnat()
            if self._fe or self._be:
                log.info("services: restored %d frontends and %d backends from the maps; stale entries are "
                         "removed after the first full sync", len(self._fe), len(self._be))  # fmt: skip

    def _revnat_path(self) -> Path | None:
        return Path(self.state_dir) / REVNAT_STATE_FILE if self.state_dir else None

    def _load_revnat(self) -> None:
        p = self._revnat_path()
        if p is None or not p.exists():
            return
        try:
            data = json.loads(p.read_text())
            for addr, port, proto, idx in data.get("revnat", []):
                self._revnat_ids.restore((str(addr), int(port), int(proto)), int(idx))
        except (OSError, ValueError, TypeError) as e:
            log.warning("services: ignoring unreadable %s: %s", p, e)

    def _save_revnat(self, force: bool = False) -> None:
        p = self._revnat_path()
        if p is None:
            self._revnat_dirty = False
            return
        now = time.monotonic()
        if not force and now - self._revnat_saved_at < 2.0:
            return
        data = {"revnat": [[a, po, pr, i] for (a, po, pr), i in self._revnat_ids.items()]}
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".lb-revnat.")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, separators=(",", ":"))
            os.replace(tmp, p)
            self._revnat_dirty = False
            self._revnat_saved_at = now
        except OSError as e:
            log.warning("services: cannot save %s: %s", p, e)
            with contextlib.suppress(Exception):
                os.unlink(tmp)

    # --- audit --------------------------------------------------------------------------------

    def expected_entries(self) -> dict[str, dict[bytes, bytes]]:
        """What the load-balancer maps must contain, byte for byte (lb4_maglev: the chunks of the
        tables written for Maglev frontends, and nothing else)."""
        with self._state_lock:
            svcs: dict[bytes, bytes] = {}
            pairs: dict[bytes, bytes] = {}
            for fk, fe in self._fe.items():
                if fe.frontend is None:
                    continue
                svcs[svc_key(fk, 0)] = fe.val0
                for i, b in enumerate(fe.slots, 1):
                    svcs[svc_key(fk, i)] = svc_value(b, 0, fe.rev_nat, 0, 0, 0)
                if fe.affinity:
                    for b in fe.slots:
                        pairs[affinity_match_key(b, fe.rev_nat)] = AFFINITY_MATCH_VALUE
            chunks: dict[bytes, bytes] = {}
            for rn, tbl in self._maglev_written.values():
                keys, values = maglev_entries(rn, tbl)
                chunks.update(zip(keys, values, strict=True))
            return {
                SERVICES: svcs,
                BACKENDS: {backend_key(b): v for b, v in self._be.items()},
                REVERSE_NAT: {revnat_key(rn): v for rn, v in self._revnat_written.items()},
                AFFINITY_MATCH: pairs,
                MAGLEV: chunks,
            }

    def audit(self) -> int:
        """Compare the maps with the desired state and repair every difference; returns repairs."""
        if not self.synced.is_set() or self.maps is None:
            return 0
        with self._state_lock:
            m = self.maps
            expected = self.expected_entries()
            fixes: dict[str, tuple[list[bytes], list[bytes]]] = {}
            extra: dict[str, list[bytes]] = {}
            for name, want in expected.items():
                have = dict(m.items(name))
                fk_: list[bytes] = []
                fv_: list[bytes] = []
                for k, v in want.items():
                    if have.get(k) != v:
                        fk_.append(k)
                        fv_.append(v)
                fixes[name] = (fk_, fv_)
                extra[name] = [k for k in have if k not in want]
            # same order as a sync: backends, slots, reverse NAT/affinity, Maglev tables, frontends;
            # then removals
            sk, sv = fixes[SERVICES]
            slot_fix = [(k, v) for k, v in zip(sk, sv, strict=True) if decode_svc_key(k)[1] != 0]
            s0_fix = [(k, v) for k, v in zip(sk, sv, strict=True) if decode_svc_key(k)[1] == 0]
            m.update(BACKENDS, *fixes[BACKENDS])
            m.update(SERVICES, [k for k, _ in slot_fix], [v for _, v in slot_fix])
            m.update(REVERSE_NAT, *fixes[REVERSE_NAT])
            m.update(AFFINITY_MATCH, *fixes[AFFINITY_MATCH])
            m.update(MAGLEV, *fixes[MAGLEV])
            m.update(SERVICES, [k for k, _ in s0_fix], [v for _, v in s0_fix])
            extra_svc = sorted(extra[SERVICES], key=lambda k: decode_svc_key(k)[1] != 0)
            m.delete(SERVICES, extra_svc)
            m.delete(MAGLEV, extra[MAGLEV])
            m.delete(REVERSE_NAT, extra[REVERSE_NAT])
            m.delete(AFFINITY_MATCH, extra[AFFINITY_MATCH])
            dead: dict[int, BKey] = {}
            if extra[BACKENDS]:
                have_be = dict(m.items(BACKENDS))
                for k in extra[BACKENDS]:
                    if k in have_be:
                        dead[decode_backend_key(k)] = decode_backend(have_be[k])[0]
                m.delete(BACKENDS, extra[BACKENDS])
            if dead:
                self._queue_purge(PurgeRequest(dead, set()))
            total = 0
            for name in expected:
                n = len(fixes[name][0]) + len(extra[name])
                if n:
                    self.metrics.drift_repairs.labels(map=name).inc(n)
                    total += n
            if total:
                log.warning("services: audit repaired %d map entries (%s)", total,
                            {n: len(fixes[n][0]) + len(extra[n]) for n in expected})  # fmt: skip
            return total

    # --- queries ------------------------------------------------------------------------------

    def _update_gauges(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._gauges_at < 1.0:
            self._gauges_dirty = True  # O(services): at most once a second, not on every cycle
            return
        self._gauges_at = now
        self._gauges_dirty = False
        with self._in_lock:
            by_type: dict[str, int] = {}
            for info in self._services.values():
                by_type[info.type] = by_type.get(info.type, 0) + 1
        for t in ("ClusterIP", "NodePort", "LoadBalancer"):
            self.metrics.services.labels(type=t).set(by_type.get(t, 0))
        self.metrics.frontends.set(len(self._fe))
        active = sum(1 for refs in self._be_refs.values() if refs[0] > 0)
        self.metrics.backends.labels(state="active").set(active)
        self.metrics.backends.labels(state="terminating").set(len(self._be) - active)

    def list_services(self) -> list[ServiceView]:
        """Every frontend in the datapath with its backends (for `pycilium service list`)."""
        out: list[ServiceView] = []
        with self._state_lock:
            for fk, fe in self._fe.items():
                f = fe.frontend
                if f is None:
                    continue
                _b, count, rn, flags, flags2, local_count = decode_svc_value(fe.val0)
                backends: list[BackendView] = []
                for i, bid in enumerate(fe.slots):
                    raw = self._be.get(bid)
                    if raw is None:
                        continue
                    bk, state, _node = decode_backend(raw)
                    backends.append(BackendView(bid, bk[0], bk[1], PROTO_NAMES.get(bk[2], str(bk[2])),
                                                _state_name(state), True, i < local_count))  # fmt: skip
                for bk in fe.terminating:
                    bid_ = self._backend_ids.get(bk)
                    if bid_ is None:
                        continue
                    backends.append(BackendView(bid_, bk[0], bk[1], PROTO_NAMES.get(bk[2], str(bk[2])),
                                                "terminating", False, False))  # fmt: skip
                ns, name = fe.svc or ("", "")
                proto = PROTO_NAMES.get(fk[2], str(fk[2]))
                out.append(ServiceView(rn, f"{fk[0]}:{fk[1]}/{proto}", fk[0], fk[1], proto, f.kind, ns, name,
                                       flags, flags2, f.affinity_timeout, count, local_count, tuple(backends)))  # fmt: skip
        out.sort(key=lambda s: s.id)
        return out

    def get_service(self, namespace: str, name: str) -> list[ServiceView]:
        return [s for s in self.list_services() if s.namespace == namespace and s.name == name]

    def status(self) -> dict[str, Any]:
        with self._in_lock:
            n_svc, n_sl, dirty = len(self._services), len(self._slices), len(self._dirty)
        with self._state_lock:
            return {
                "synced": self.synced.is_set(),
                "services": n_svc,
                "endpointslices": n_sl,
                "frontends": len(self._fe),
                "backends": len(self._be),
                "pending": dirty,
                "cycles": self.cycles,
                "last_error": self.last_error,
            }


def _state_name(state: int) -> str:
    return {BE_STATE_ACTIVE: "active", BE_STATE_TERMINATING: "terminating"}.get(state, f"state-{state}")
