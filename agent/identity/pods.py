"""Every pod in the cluster with its security identity (the agent watches all pods and namespaces).

The tracker turns raw Pod / Namespace dicts into `PodInfo` records, allocates each pod's identity
(one allocator reference per pod) and tells its listeners (ipcache, policy) about every change.
Pods on the host network, and pods that finished (Succeeded / Failed), have no identity.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from pycilium.agent.identity.allocator import IdentityAllocationError, IdentityAllocator
from pycilium.agent.identity.labels import Labels, labels_key, pod_identity_labels

log = logging.getLogger("pycilium.agent.identity")

Obj = dict[str, Any]


@dataclass(frozen=True)
class ContainerPort:
    name: str
    port: int
    protocol: str  # TCP / UDP / SCTP


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    uid: str = ""
    node_name: str = ""
    ip: str | None = None
    host_ip: str | None = None
    host_network: bool = False
    phase: str = "Pending"
    terminating: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[ContainerPort, ...] = ()
    identity_labels: Labels | None = None
    identity: int | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def active(self) -> bool:
        """Has (or should have) an identity: not host-network and not finished."""
        return not self.host_network and self.phase not in ("Succeeded", "Failed")

    def named_ports(self, name: str, protocol: str) -> set[int]:
        return {p.port for p in self.ports if p.name == name and p.protocol == protocol}


def pod_from_object(obj: Obj) -> PodInfo:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    ip = status.get("podIP") or None
    if not ip:
        for entry in status.get("podIPs") or []:
            cand = (entry or {}).get("ip")
            if cand and ":" not in cand:
                ip = cand
                break
    if ip and ":" in ip:  # IPv6 only: not handled by the v4 datapath
        ip = None
    ports: list[ContainerPort] = []
    for c in list(spec.get("containers") or []) + list(spec.get("initContainers") or []):
        for p in (c or {}).get("ports") or []:
            try:
                num = int(p.get("containerPort"))
            except (TypeError, ValueError):
                continue
            ports.append(ContainerPort(str(p.get("name") or ""), num, str(p.get("protocol") or "TCP")))
    return PodInfo(
        namespace=str(meta.get("namespace") or "default"),
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        node_name=str(spec.get("nodeName") or ""),
        ip=ip,
        host_ip=status.get("hostIP") or None,
        host_network=bool(spec.get("hostNetwork")),
        phase=str(status.get("phase") or "Pending"),
        terminating=bool(meta.get("deletionTimestamp")),
        labels=dict(meta.get("labels") or {}),
        ports=tuple(ports),
    )


class PodListener(Protocol):
    def pod_changed(self, old: PodInfo | None, new: PodInfo | None) -> None: ...


class PodTracker:
    """All pods and namespaces of the cluster; each active pod holds a reference on its identity."""

    def __init__(
        self, allocator: IdentityAllocator, node_name: str, *, lock: threading.RLock | None = None
    ) -> None:
        self.allocator = allocator
        self.node_name = node_name
        self.lock = lock or allocator.lock
        self._pods: dict[str, PodInfo] = {}
        self._ns_labels: dict[str, dict[str, str]] = {}
        self._by_identity: dict[int, set[str]] = {}
        self._pending: set[str] = set()  # pods whose identity allocation failed
        self._listeners: list[PodListener] = []
        allocator.on_reassigned(self._reassigned)

    def subscribe(self, listener: PodListener) -> None:
        with self.lock:
            self._listeners.append(listener)

    def _notify(self, old: PodInfo | None, new: PodInfo | None) -> None:
        for listener in list(self._listeners):
            listener.pod_changed(old, new)

    # ---- namespaces ----------------------------------------------------------------------------
    def upsert_namespace(self, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name") or "")
        labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
        with self.lock:
            if self._ns_labels.get(name) == labels:
                return
            self._ns_labels[name] = labels
            self._refresh_namespace(name)

    def delete_namespace(self, obj: Obj) -> None:
        name = str((obj.get("metadata") or {}).get("name") or "")
        with self.lock:
            if self._ns_labels.pop(name, None) is not None:
                self._refresh_namespace(name)

    def namespace_labels(self, name: str) -> dict[str, str] | None:
        with self.lock:
            got = self._ns_labels.get(name)
            return dict(got) if got is not None else None

    def _refresh_namespace(self, ns: str) -> None:
        for key in [k for k, p in self._pods.items() if p.namespace == ns]:
            old = self._pods[key]
            self._set(old, replace(old, identity_labels=None, identity=None))

    # ---- pods ----------------------------------------------------------------------------------
    def upsert_pod(self, obj: Obj) -> None:
        info = pod_from_object(obj)
        with self.lock:
            old = self._pods.get(info.key)
            if old is not None and old.uid and info.uid and old.uid != info.uid:
                self._drop(old)  # re-created under the same name
                old = None
            if old is not None:
                info = replace(info, identity_labels=old.identity_labels, identity=old.identity)
            self._set(old, info)

    def delete_pod(self, obj: Obj) -> None:
        info = pod_from_object(obj)
        with self.lock:
            old = self._pods.get(info.key)
            if old is None or (old.uid and info.uid and old.uid != info.uid):
                return
            self._drop(old)

    def _drop(self, old: PodInfo) -> None:
        self._pods.pop(old.key, None)
        self._pending.discard(old.key)
        self._unindex(old)
        if old.identity is not None and old.identity_labels is not None:
            self.allocator.release(old.identity_labels)
        self._notify(old, None)

    def _unindex(self, p: PodInfo) -> None:
        if p.identity is not None:
            s = self._by_identity.get(p.identity)
            if s is not None:
                s.discard(p.key)
                if not s:
                    del self._by_identity[p.identity]

    def _set(self, old: PodInfo | None, new: PodInfo) -> None:
        """Store `new` (identity fields carried from `old`), re-resolving the identity if needed."""
        want: Labels | None = None
        if new.active:
            want = pod_identity_labels(new.labels, new.namespace, self._ns_labels.get(new.namespace))
        have = old.identity_labels if old is not None and old.identity is not None else None
        ident = old.identity if old is not None and have == want else None
        if want is not None and ident is None:
            try:
                ident = self.allocator.allocate(want)
                self._pending.discard(new.key)
            except IdentityAllocationError as e:
                log.warning("pod %s: no identity yet (%s); retrying later", new.key, e)
                self._pending.add(new.key)
        elif want is None:
            self._pending.discard(new.key)
        new = replace(new, identity_labels=want if ident is not None else None, identity=ident)
        if old is not None:
            self._unindex(old)
        if have is not None and (ident is None or have != want):
            self.allocator.release(have)
        self._pods[new.key] = new
        if new.identity is not None:
            self._by_identity.setdefault(new.identity, set()).add(new.key)
        if old != new:
            self._notify(old, new)

    def retry_pending(self) -> int:
        """Try again to allocate identities that failed (API server away); returns how many remain."""
        with self.lock:
            for key in sorted(self._pending):
                p = self._pods.get(key)
                if p is None:
                    self._pending.discard(key)
                    continue
                self._set(p, replace(p, identity_labels=None, identity=None))
            return len(self._pending)

    def _reassigned(self, labels: Labels, old_id: int, new_id: int) -> None:
        for key in sorted(self._by_identity.get(old_id, set())):
            p = self._pods[key]
            if p.identity_labels != labels:
                continue
            new = replace(p, identity=new_id)
            self._unindex(p)
            self._pods[key] = new
            self._by_identity.setdefault(new_id, set()).add(key)
            self._notify(p, new)

    # ---- queries -------------------------------------------------------------------------------
    def get(self, namespace: str, name: str) -> PodInfo | None:
        with self.lock:
            return self._pods.get(f"{namespace}/{name}")

    def peek(self, namespace: str, name: str) -> PodInfo | None:
        """`get` without the lock (a single dict read): for callers that must not take it."""
        return self._pods.get(f"{namespace}/{name}")

    def pods(self) -> list[PodInfo]:
        with self.lock:
            return list(self._pods.values())

    def by_identity(self, identity: int) -> list[PodInfo]:
        with self.lock:
            return [self._pods[k] for k in sorted(self._by_identity.get(identity, ()))]

    def identities(self) -> set[int]:
        with self.lock:
            return set(self._by_identity)

    def in_use_label_keys(self) -> set[str]:
        """Label keys of every active pod (identified or not): what identity GC must keep."""
        with self.lock:
            out: set[str] = set()
            for p in self._pods.values():
                if p.identity_labels is not None:
                    out.add(labels_key(p.identity_labels))
                elif p.active:
                    ns = self._ns_labels.get(p.namespace)
                    out.add(labels_key(pod_identity_labels(p.labels, p.namespace, ns)))
            return out

    def pending(self) -> set[str]:
        with self.lock:
            return set(self._pending)
