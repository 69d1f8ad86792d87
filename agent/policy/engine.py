"""The policy engine: NetworkPolicies + identities + local endpoints -> the datapath, incrementally.

Inputs (plain methods, raw Kubernetes dicts): `upsert_policy` / `delete_policy` (NetworkPolicy),
`endpoint_added` / `endpoint_removed` (the endpoint manager), pod and identity changes (through
`PodTracker` and `IdentityAllocator` subscriptions), `mark_synced` once every watch has delivered
its initial state.

What changes is tracked so that only affected endpoints are recomputed: a policy change touches
the endpoints it selects (before and after); an identity change touches the policies whose
selectors' selections changed (SelectorCache); a pod change touches its own endpoint, and the
endpoints with egress named-port rules.

Writes per endpoint are ordered so the datapath never enforces a direction without its entries:
1. directions that stop being enforced: flag off first;
2. new entries written;
3. enforcement flags (and the endpoint's identity) set;
4. stale entries deleted.

Before `mark_synced` nothing is written for endpoints that existed before a restart (the datapath
keeps enforcing what it had); entries of endpoints that did not come back are deleted at sync.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Protocol

from pycilium.agent.identity.allocator import IdentityAllocator
from pycilium.agent.identity.labels import EXCLUDED_POD_LABEL_KEYS, format_labels
from pycilium.agent.identity.pods import PodInfo, PodTracker
from pycilium.agent.policy.compiler import (
    EndpointPolicy,
    EnforcementMode,
    PolicyMapKey,
    Subject,
    compile_endpoint,
)
from pycilium.agent.policy.datapath import (
    POLICY_FLAGS_MASK,
    EndpointWriter,
    PolicyDatapath,
    enforcement_flags,
)
from pycilium.agent.policy.k8s import ParsedPolicy, parse_network_policy, policy_key
from pycilium.agent.policy.pycilium_crd import KIND as KIND_PCNP
from pycilium.agent.policy.pycilium_crd import parse_pycilium_network_policy
from pycilium.agent.policy.selectorcache import SelectorCache
from pycilium.agent.policy.selectors import EndpointSelector, Selector

log = logging.getLogger("pycilium.agent.policy")

Obj = dict[str, Any]


class CIDRSink(Protocol):
    """Where CIDR identities go (the ipcache manager)."""

    def upsert_cidr(self, prefix: str | ipaddress.IPv4Network, identity: int) -> None: ...

    def delete_cidr(self, prefix: str | ipaddress.IPv4Network) -> None: ...


@dataclass(frozen=True)
class LocalEndpoint:
    ep_id: int
    ip: str
    namespace: str
    name: str

    @property
    def pod_key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class EndpointStatus:
    """What `pycilium endpoint list` shows about policy."""

    ep_id: int
    ip: str
    namespace: str
    name: str
    identity: int | None
    ingress_enforced: bool
    egress_enforced: bool
    policies: tuple[str, ...]
    entries: int
    datapath_synced: bool  # flags and identity are in the endpoints map


@dataclass(frozen=True)
class PolicyEntryView:
    """One allow entry with the remote identity's labels (`pycilium bpf policy get`)."""

    direction: str
    identity: int
    labels: tuple[str, ...]
    port: str  # ANY, ANY/TCP, 80/TCP, 8000-8063/TCP
    prefixlen: int


class PolicyEngine:
    def __init__(
        self,
        allocator: IdentityAllocator,
        pods: PodTracker,
        datapath: PolicyDatapath,
        *,
        endpoints: EndpointWriter | None = None,
        ipcache: CIDRSink | None = None,
        mode: EnforcementMode = "default",
        lock: threading.RLock | None = None,
    ) -> None:
        self.allocator = allocator
        self.pods = pods
        self.datapath = datapath
        if endpoints is None:
            if not isinstance(datapath, EndpointWriter):
                raise TypeError("PolicyEngine needs an EndpointWriter (endpoints=...)")
            endpoints = datapath
        self.endpoint_writer: EndpointWriter = endpoints
        self.ipcache = ipcache
        self.mode: EnforcementMode = mode
        self.lock = lock or allocator.lock
        self.cache = SelectorCache()
        self._policies: dict[str, ParsedPolicy] = {}
        self._by_ns: dict[str, set[str]] = {}
        self._by_selector: dict[Selector, set[str]] = {}
        self._named_egress: set[str] = set()
        self._errors: dict[str, list[str]] = {}
        self._endpoints: dict[int, LocalEndpoint] = {}
        self._ep_by_pod: dict[str, int] = {}
        self._applied: dict[int, EndpointPolicy] = {}
        self._flags: dict[int, int] = {}  # policy flag bits last written
        self._flags_ok: set[int] = set()
        self._maybe: dict[int, set[PolicyMapKey]] = {}  # possibly present after a failed write
        self._dirty: set[int] = set()
        self._dirty_retry: set[int] = set()
        self._dirty_policies: set[str] = set()  # selections changed: their endpoints need regenerating
        self._named_ids: set[int] = set()  # pods of these identities changed named ports
        self._named_names: set[str] = set()
        self._depth = 0
        self.synced = False
        with self.lock:
            self._leftover: dict[int, set[PolicyMapKey]] = datapath.dump()
            self.cache.on_change(self._selectors_changed)
            allocator.subscribe(self.cache)
            pods.subscribe(self)

    # ---- batching ------------------------------------------------------------------------------
    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Hold back regeneration until the outermost batch ends (wrap every input event)."""
        return self._batch()

    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        with self.lock:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._flush()

    def _flush(self) -> None:
        if not self.synced:
            return
        if self._named_ids:
            ids, names = self._named_ids, self._named_names
            self._named_ids, self._named_names = set(), set()
            for k in self._named_egress:
                if self._named_egress_affected(self._policies[k], ids, names):
                    self._dirty_policies.add(k)
        if self._dirty_policies:
            keys, self._dirty_policies = self._dirty_policies, set()
            for k in sorted(keys):
                p = self._policies.get(k)
                if p is not None:
                    self._mark_selected(p)
        while self._dirty:
            ep_id = min(self._dirty)
            self._dirty.discard(ep_id)
            self._regenerate(ep_id)

    # ---- CompileContext ------------------------------------------------------------------------
    def selection(self, sel: Selector) -> AbstractSet[int]:
        return self.cache.selection(sel)

    def named_ports(self, identity: int, name: str, protocol: str) -> set[int]:
        out: set[int] = set()
        for p in self.pods.by_identity(identity):
            out |= p.named_ports(name, protocol)
        return out

    def pod_identities(self) -> Iterable[int]:
        return self.pods.identities()

    # ---- policies ------------------------------------------------------------------------------
    def upsert_policy(self, obj: Obj) -> None:
        """A NetworkPolicy was added or changed (wire to its reflector)."""
        self._upsert(obj, "NetworkPolicy", parse_network_policy)

    def delete_policy(self, obj: Obj) -> None:
        self._delete(obj, "NetworkPolicy")

    def upsert_pycilium_policy(self, obj: Obj) -> None:
        """A PyCiliumNetworkPolicy was added or changed."""
        self._upsert(obj, KIND_PCNP, parse_pycilium_network_policy)

    def delete_pycilium_policy(self, obj: Obj) -> None:
        self._delete(obj, KIND_PCNP)

    @staticmethod
    def _key(obj: Obj, kind: str) -> str:
        meta = obj.get("metadata") or {}
        return policy_key(kind, str(meta.get("namespace") or "default"), str(meta.get("name") or ""))

    def _upsert(
        self, obj: Obj, kind: str, parse: Callable[[Obj], tuple[ParsedPolicy | None, list[str]]]
    ) -> None:
        parsed, errors = parse(obj)
        key = self._key(obj, kind)
        for e in errors:
            log.error("%s %s: %s", kind, key, e)
        with self._batch():
            if errors:
                self._errors[key] = errors
            else:
                self._errors.pop(key, None)
            if parsed is None:
                if key in self._policies:
                    log.error("%s %s: invalid update ignored; keeping the previous version", kind, key)
                else:
                    log.error("%s %s: skipped", kind, key)
                return
            old = self._policies.get(key)
            if old == parsed:
                return
            self._warn_excluded(parsed)
            for prefix in sorted(parsed.cidr_prefixes()):
                ident = self.allocator.allocate_cidr(prefix)
                if self.ipcache is not None:
                    self.ipcache.upsert_cidr(prefix, ident)
            self.cache.add_selectors(parsed.selectors())
            if old is not None:
                self._unindex(old)
                self._mark_selected(old)
            self._index(parsed)
            self._mark_selected(parsed)
            self._flush()
            if old is not None:
                self._release(old)

    def _delete(self, obj: Obj, kind: str) -> None:
        key = self._key(obj, kind)
        with self._batch():
            self._errors.pop(key, None)
            old = self._policies.get(key)
            if old is None:
                return
            self._unindex(old)
            self._mark_selected(old)
            self._flush()
            self._release(old)

    def _warn_excluded(self, p: ParsedPolicy) -> None:
        for sel in p.selectors():
            if isinstance(sel, EndpointSelector):
                bad = sel.pods.keys() & EXCLUDED_POD_LABEL_KEYS
                if bad:
                    log.warning("%s %s: peer selector uses %s, which are not part of identities "
                                "and never match", p.kind, p.key, ", ".join(sorted(bad)))  # fmt: skip

    def _index(self, p: ParsedPolicy) -> None:
        self._policies[p.key] = p
        self._by_ns.setdefault(p.namespace, set()).add(p.key)
        for sel in p.selectors():
            self._by_selector.setdefault(sel, set()).add(p.key)
        if any(r.has_named_ports for r in p.egress or ()):
            self._named_egress.add(p.key)

    def _unindex(self, p: ParsedPolicy) -> None:
        self._policies.pop(p.key, None)
        s = self._by_ns.get(p.namespace)
        if s is not None:
            s.discard(p.key)
            if not s:
                del self._by_ns[p.namespace]
        for sel in p.selectors():
            users = self._by_selector.get(sel)
            if users is not None:
                users.discard(p.key)
                if not users:
                    del self._by_selector[sel]
        self._named_egress.discard(p.key)

    def _release(self, p: ParsedPolicy) -> None:
        """Give back what an old version of a policy held (after the datapath stopped using it)."""
        self.cache.remove_selectors(p.selectors())
        for prefix in sorted(p.cidr_prefixes()):
            self.allocator.release_cidr(prefix)
            if self.ipcache is not None and self.allocator.cidr_identity(prefix) is None:
                self.ipcache.delete_cidr(prefix)

    def _selected_endpoints(self, p: ParsedPolicy) -> set[int]:
        out: set[int] = set()
        for ep in self._endpoints.values():
            if ep.namespace == p.namespace and p.pod_selector.matches(self._subject(ep).labels):
                out.add(ep.ep_id)
        return out

    def _mark_selected(self, p: ParsedPolicy) -> None:
        if self.mode == "never":
            return
        self._dirty |= self._selected_endpoints(p)

    def _selectors_changed(self, sels: set[Selector]) -> None:
        for s in sels:
            self._dirty_policies |= self._by_selector.get(s, set())
        if self._depth == 0:
            self._flush()

    # ---- pods (PodListener) --------------------------------------------------------------------
    def pod_changed(self, old: PodInfo | None, new: PodInfo | None) -> None:
        with self._batch():
            ref = new or old
            assert ref is not None
            ep_id = self._ep_by_pod.get(ref.key)
            if ep_id is not None:
                self._dirty.add(ep_id)
            if self._named_egress:
                before = (old.identity, old.ports) if old else None
                after = (new.identity, new.ports) if new else None
                if before != after:
                    ids = {x.identity for x in (old, new) if x is not None and x.identity is not None}
                    names = {cp.name for x in (old, new) if x is not None for cp in x.ports if cp.name}
                    if ids and names:  # evaluated once per batch, in _flush
                        self._named_ids |= ids
                        self._named_names |= names

    def _named_egress_affected(self, p: ParsedPolicy, ids: set[int], names: set[str]) -> bool:
        """Whether egress named ports of `p` resolve differently when pods of `ids` with ports
        `names` change."""
        for r in p.egress or ():
            if not names.intersection(pr.name for pr in r.ports or () if pr.name):
                continue
            if r.peers is None:
                return True
            for sel in r.peers:
                if not ids.isdisjoint(self.cache.selection(sel)):
                    return True
        return False

    # ---- endpoints -----------------------------------------------------------------------------
    def endpoint_added(self, ep_id: int, ip: str, namespace: str, name: str) -> None:
        """A local endpoint exists (call after its endpoints-map entry is written): computes and
        writes its policy and identity synchronously when the engine is synced."""
        ipaddress.IPv4Address(ip)
        ep = LocalEndpoint(ep_id, ip, namespace, name)
        with self._batch():
            old = self._endpoints.get(ep_id)
            if old is not None and old != ep:
                self._ep_by_pod.pop(old.pod_key, None)
                if old.ip != ep.ip:
                    self._flags.pop(ep_id, None)
                    self._flags_ok.discard(ep_id)
            self._endpoints[ep_id] = ep
            self._ep_by_pod[ep.pod_key] = ep_id
            self._dirty.add(ep_id)

    def endpoint_removed(self, ep_id: int) -> None:
        """The endpoint is gone: its policy entries are deleted."""
        with self._batch():
            ep = self._endpoints.pop(ep_id, None)
            if ep is not None:
                self._ep_by_pod.pop(ep.pod_key, None)
            self._dirty.discard(ep_id)
            stale = set(self._leftover.pop(ep_id, set())) | self._maybe.pop(ep_id, set())
            applied = self._applied.pop(ep_id, None)
            if applied is not None:
                stale |= applied.keys
            self._flags.pop(ep_id, None)
            self._flags_ok.discard(ep_id)
            if stale:
                self.datapath.remove(ep_id, sorted(stale))

    def endpoint_datapath_state(self, ep_id: int) -> tuple[int | None, int]:
        """(identity, EP_F_POLICY_* bits) the endpoints-map entry of this endpoint should carry; for
        the endpoint manager when it (re)writes the entry."""
        with self.lock:
            ep = self._endpoints.get(ep_id)
            pod = self.pods.get(ep.namespace, ep.name) if ep else None
            return (pod.identity if pod else None, self._flags.get(ep_id, 0))

    def _subject(self, ep: LocalEndpoint) -> Subject:
        pod = self.pods.get(ep.namespace, ep.name)
        if pod is None:
            return Subject(ep.namespace, {}, ())
        return Subject(ep.namespace, pod.labels, pod.ports)

    def compute(self, ep_id: int) -> EndpointPolicy | None:
        """The policy an endpoint should have now (not necessarily written yet)."""
        with self.lock:
            ep = self._endpoints.get(ep_id)
            if ep is None:
                return None
            policies = [self._policies[k] for k in self._by_ns.get(ep.namespace, ())]
            return compile_endpoint(self._subject(ep), policies, self, self.mode)

    def _regenerate(self, ep_id: int) -> None:
        ep = self._endpoints.get(ep_id)
        desired = self.compute(ep_id)
        if ep is None or desired is None:
            return
        pod = self.pods.get(ep.namespace, ep.name)
        try:
            self._apply(ep, desired, pod.identity if pod else None)
        except Exception:
            log.exception("endpoint %d (%s): writing policy failed; will retry", ep_id, ep.pod_key)
            self._dirty_retry.add(ep_id)

    def _apply(self, ep: LocalEndpoint, desired: EndpointPolicy, identity: int | None) -> None:
        ep_id = ep.ep_id
        cur = self._applied.get(ep_id)
        if cur is None:
            cur_keys = self._leftover.pop(ep_id, set())
            st = self.endpoint_writer.read_endpoint(ep_id, ep.ip)
            cur_flags = st[1] & POLICY_FLAGS_MASK if st is not None else 0
            self._applied[ep_id] = EndpointPolicy(
                bool(cur_flags & enforcement_flags(True, False)),
                bool(cur_flags & enforcement_flags(False, True)),
                frozenset(cur_keys),
            )
            self._flags[ep_id] = cur_flags
        else:
            cur_keys = set(cur.keys)
            cur_flags = self._flags.get(ep_id, 0)
        maybe = self._maybe.pop(ep_id, set())
        want_flags = enforcement_flags(desired.ingress_enforced, desired.egress_enforced)
        add = set(desired.keys) - cur_keys
        remove = (cur_keys | maybe) - set(desired.keys)
        # 1. directions no longer enforced: flag off before their entries go
        keep = cur_flags & want_flags
        if keep != cur_flags and self.endpoint_writer.write_endpoint(
            ep_id, ep.ip, None, keep, POLICY_FLAGS_MASK
        ):
            self._flags[ep_id] = keep
        # 2. new entries
        if add:
            try:
                self.datapath.write(ep_id, sorted(add))
            except Exception:
                self._maybe[ep_id] = maybe | add
                raise
        self._applied[ep_id] = EndpointPolicy(
            bool(cur_flags & enforcement_flags(True, False)),
            bool(cur_flags & enforcement_flags(False, True)),
            frozenset(cur_keys | add),
            desired.policies,
        )
        # 3. enforcement on (only now that the entries are there) and the endpoint's identity
        if self.endpoint_writer.write_endpoint(ep_id, ep.ip, identity, want_flags, POLICY_FLAGS_MASK):
            self._flags[ep_id] = want_flags
            self._flags_ok.add(ep_id)
        else:
            self._flags_ok.discard(ep_id)
            log.debug("endpoint %d (%s): no endpoints-map entry yet", ep_id, ep.pod_key)
        # 4. stale entries
        if remove:
            self.datapath.remove(ep_id, sorted(remove))
        self._applied[ep_id] = desired

    def retry(self) -> int:
        """Re-apply endpoints whose last write failed or whose endpoints-map entry was missing."""
        with self._batch():
            todo = set(self._dirty_retry) | {e for e in self._endpoints if e not in self._flags_ok}
            self._dirty_retry.clear()
            self._dirty |= todo
            return len(todo)

    def regenerate_all(self) -> None:
        with self._batch():
            self._dirty |= set(self._endpoints)

    def mark_synced(self) -> None:
        """Every watch delivered its initial state: compute all endpoints, drop stale entries."""
        with self._batch():
            self.synced = True
            self._dirty |= set(self._endpoints)
            self._dirty_policies.clear()
            self._named_ids.clear()
            self._named_names.clear()
            self._flush()
            for ep_id in sorted(set(self._leftover) - set(self._endpoints)):
                keys = self._leftover.pop(ep_id)
                log.info("removing %d policy entries of vanished endpoint %d", len(keys), ep_id)
                self.datapath.remove(ep_id, sorted(keys))

    # ---- queries -------------------------------------------------------------------------------
    def endpoint_policy(self, ep_id: int) -> EndpointPolicy | None:
        """What is written for the endpoint."""
        with self.lock:
            return self._applied.get(ep_id)

    def endpoint_status(self, ep_id: int) -> EndpointStatus | None:
        with self.lock:
            ep = self._endpoints.get(ep_id)
            if ep is None:
                return None
            applied = self._applied.get(ep_id) or EndpointPolicy()
            pod = self.pods.get(ep.namespace, ep.name)
            return EndpointStatus(
                ep_id=ep_id,
                ip=ep.ip,
                namespace=ep.namespace,
                name=ep.name,
                identity=pod.identity if pod else None,
                ingress_enforced=applied.ingress_enforced,
                egress_enforced=applied.egress_enforced,
                policies=applied.policies,
                entries=len(applied.keys),
                datapath_synced=ep_id in self._flags_ok,
            )

    def endpoints(self) -> list[EndpointStatus]:
        with self.lock:
            out = [self.endpoint_status(e) for e in sorted(self._endpoints)]
            return [s for s in out if s is not None]

    def policy_entries(self, ep_id: int) -> list[PolicyEntryView]:
        with self.lock:
            applied = self._applied.get(ep_id)
            if applied is None:
                return []
            rows = []
            for k in sorted(
                applied.keys, key=lambda k: (k.egress, k.identity, k.protocol, k.port, k.port_prefix)
            ):
                labels = ("reserved:unknown",) if k.identity == 0 else tuple(self.identity_labels(k.identity))
                rows.append(PolicyEntryView(k.direction, k.identity, labels, k.describe_port(), k.prefixlen))
            return rows

    def identity_labels(self, identity: int) -> list[str]:
        labels = self.allocator.lookup(identity)
        return format_labels(labels) if labels else []

    def policy_errors(self) -> dict[str, list[str]]:
        with self.lock:
            return {k: list(v) for k, v in self._errors.items()}

    def policies(self) -> list[str]:
        with self.lock:
            return sorted(self._policies)

    def policy(self, namespace: str, name: str) -> ParsedPolicy | None:
        with self.lock:
            return self._policies.get(f"{namespace}/{name}")
