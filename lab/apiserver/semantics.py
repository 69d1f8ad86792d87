"""Per-resource admission: defaults, validation and side effects kube-apiserver applies on writes.

- Service: ClusterIP/ClusterIPs allocated from the service CIDR (unless "None" = headless, or given),
  NodePorts allocated for NodePort/LoadBalancer ports without one, both kept across updates that
  leave them empty, released on delete or when the type no longer needs them; taken values -> 422.
- Pod: status.phase Pending when absent; container ports default to protocol TCP.
- Secret: type Opaque by default; stringData folded into data (base64).
- Namespace: the `kubernetes.io/metadata.name` label; status.phase Active.
- CustomResourceDefinition: validated; status conditions Established/NamesAccepted set; serving of
  its resource starts when it is stored and stops (its objects deleted) when it is deleted.

Allocations are made while admitting and recorded in a `Txn`: they are undone if the write does not
happen (a later error or dryRun), and releases of old values run only once the write is stored.
"""

from __future__ import annotations

import base64
import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .allocators import AllocationError
from .errors import invalid
from .resources import CRD_KEY, ResourceType

if TYPE_CHECKING:
    from .rest import API

Obj = dict[str, Any]

SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")


@dataclass
class Txn:
    undo: list[Callable[[], None]] = field(default_factory=list)
    commit: list[Callable[[], None]] = field(default_factory=list)

    def rollback(self) -> None:
        for fn in reversed(self.undo):
            fn()
        self.undo.clear()

    def done(self) -> None:
        for fn in self.commit:
            fn()
        self.commit.clear()
        self.undo.clear()


def admit(api: API, rt: ResourceType, old: Obj | None, new: Obj, txn: Txn) -> None:
    """Default and validate `new` (replacing `old`, or a create) in place; may allocate into `txn`."""
    if rt.key == "/services":
        _admit_service(api, old, new, txn)
    elif rt.key == "/pods" and old is None:
        new.setdefault("status", {}).setdefault("phase", "Pending")
        for c in (new.get("spec") or {}).get("containers") or []:
            for p in c.get("ports") or []:
                p.setdefault("protocol", "TCP")
    elif rt.key == "/namespaces":
        new["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = new["metadata"]["name"]
        new.setdefault("status", {}).setdefault("phase", "Active")
    elif rt.key == CRD_KEY:
        _admit_crd(new)
    elif rt.key == "/secrets":
        new["type"] = new.get("type") or "Opaque"
        for k, v in (new.pop("stringData", None) or {}).items():
            new.setdefault("data", {})[k] = base64.b64encode(str(v).encode()).decode()


def after_write(api: API, rt: ResourceType, obj: Obj) -> None:
    if rt.key == CRD_KEY:
        api.registry.register_crd(obj)


def after_delete(api: API, rt: ResourceType, obj: Obj) -> None:
    if rt.key == "/services":
        spec = obj.get("spec") or {}
        if spec.get("type") != "ExternalName":
            api.cluster_ips.release(spec.get("clusterIP"))
        for p in spec.get("ports") or []:
            api.node_ports.release(p.get("nodePort"))
    elif rt.key == CRD_KEY:
        types = api.registry.unregister_crd(obj["metadata"]["name"])
        for key in {t.key for t in types}:
            api.store.drop_resource(key)
    elif rt.key == "/namespaces":
        api.purge_namespace(obj["metadata"]["name"])


def rebuild_allocations(api: API) -> None:
    """Re-mark the ClusterIPs and NodePorts of stored Services as used (after loading state)."""
    for svc in api.store.list_objects("/services"):
        spec = svc.get("spec") or {}
        if spec.get("type") != "ExternalName" and spec.get("clusterIP") not in (None, "", "None"):
            try:
                api.cluster_ips.allocate(spec["clusterIP"])
            except AllocationError:
                pass
        for p in spec.get("ports") or []:
            if p.get("nodePort"):
                try:
                    api.node_ports.allocate(int(p["nodePort"]))
                except AllocationError:
                    pass


# --- Service ----------------------------------------------------------------------------------


def _admit_service(api: API, old: Obj | None, new: Obj, txn: Txn) -> None:
    name = new["metadata"]["name"]

    def bad(path: str, value: Any, detail: str) -> Exception:
        return invalid("Service", "", name, path, value, detail)

    spec = new.setdefault("spec", {})
    svc_type = spec.setdefault("type", "ClusterIP")
    if svc_type not in SERVICE_TYPES:
        raise bad("spec.type", svc_type, f"Unsupported value: supported values: {', '.join(SERVICE_TYPES)}")
    spec.setdefault("sessionAffinity", "None")
    ports = spec.get("ports") or []
    seen: set[tuple[Any, Any]] = set()
    for i, p in enumerate(ports):
        p.setdefault("protocol", "TCP")
        port = p.get("port")
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise bad(f"spec.ports[{i}].port", port, "must be between 1 and 65535, inclusive")
        p.setdefault("targetPort", port)
        if (port, p["protocol"]) in seen:
            raise bad(f"spec.ports[{i}]", None, f"Duplicate value: {port}/{p['protocol']}")
        seen.add((port, p["protocol"]))
        if len(ports) > 1 and not p.get("name"):
            raise bad(f"spec.ports[{i}].name", None, "Required value")
    old_spec = (old or {}).get("spec") or {}
    old_type = old_spec.get("type", "ClusterIP") if old else None

    # ClusterIP
    old_ip = old_spec.get("clusterIP") if old and old_type != "ExternalName" else None
    if svc_type == "ExternalName":
        if not spec.get("externalName"):
            raise bad("spec.externalName", None, "Required value")
        spec.pop("clusterIP", None)
        spec.pop("clusterIPs", None)
        if old_ip and old_ip != "None":
            txn.commit.append(lambda: api.cluster_ips.release(old_ip))
    else:
        want = spec.get("clusterIP") or (spec.get("clusterIPs") or [None])[0]
        if old_ip:
            want = want or old_ip
            if want != old_ip:
                raise bad("spec.clusterIPs[0]", want, "may not change once set")
        elif want == "None":
            pass
        else:
            try:
                want = api.cluster_ips.allocate(want or None)
            except AllocationError as e:
                raise bad("spec.clusterIPs", [want], str(e)) from None
            ip = want
            txn.undo.append(lambda: api.cluster_ips.release(ip))
        if want != "None" and not ports:
            raise bad("spec.ports", None, "Required value")
        spec["clusterIP"] = want
        spec["clusterIPs"] = [want]
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")

    # NodePorts
    old_by_port = {
        (p.get("port"), p.get("protocol", "TCP")): p["nodePort"]
        for p in old_spec.get("ports") or []
        if p.get("nodePort")
    }
    old_nps = set(old_by_port.values())
    kept: set[int] = set()
    if svc_type in ("NodePort", "LoadBalancer"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
        for i, p in enumerate(ports):
            np = p.get("nodePort") or old_by_port.get((p["port"], p["protocol"]))
            if np and np in old_nps:
                kept.add(np)
            elif np and np in kept | {q.get("nodePort") for q in ports[:i]}:
                pass  # the same node port for two protocols of one service
            else:
                try:
                    np = api.node_ports.allocate(np or None)
                except AllocationError as e:
                    raise bad(f"spec.ports[{i}].nodePort", p.get("nodePort"), str(e)) from None
                txn.undo.append(functools.partial(api.node_ports.release, np))
            p["nodePort"] = np
    else:
        for p in ports:
            p.pop("nodePort", None)
        spec.pop("externalTrafficPolicy", None)
    for np in old_nps - kept:
        txn.commit.append(functools.partial(api.node_ports.release, np))
    new.setdefault("status", {}).setdefault("loadBalancer", {})


# --- CustomResourceDefinition -----------------------------------------------------------------


def _admit_crd(new: Obj) -> None:
    name = new["metadata"]["name"]

    def bad(path: str, value: Any, detail: str) -> Exception:
        return invalid("CustomResourceDefinition", "apiextensions.k8s.io", name, path, value, detail)

    spec = new.get("spec") or {}
    group = spec.get("group") or ""
    names = spec.get("names") or {}
    if "." not in group:
        raise bad("spec.group", group, "should be a domain with at least one dot")
    for f in ("plural", "kind"):
        if not names.get(f):
            raise bad(f"spec.names.{f}", None, "Required value")
    if name != f"{names['plural']}.{group}":
        raise bad("metadata.name", name, 'must be spec.names.plural+"."+spec.group')
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        raise bad(
            "spec.scope", spec.get("scope"), 'Unsupported value: supported values: "Cluster", "Namespaced"'
        )
    versions = spec.get("versions") or []
    if not versions:
        raise bad("spec.versions", None, "Required value")
    storage = [v.get("name") for v in versions if v.get("storage")]
    if len(storage) != 1:
        raise bad("spec.versions", None, "must have exactly one version marked as storage version")
    status = new.setdefault("status", {})
    status["acceptedNames"] = copy.deepcopy(names)
    status["acceptedNames"].setdefault("singular", names["kind"].lower())
    status["acceptedNames"].setdefault("listKind", f"{names['kind']}List")
    status["storedVersions"] = sorted(set(status.get("storedVersions") or []) | set(storage))
    have = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    status["conditions"] = [
        have.get(t) or {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": now()}
        for t, r, m in (
            ("NamesAccepted", "NoConflicts", "no conflicts found"),
            ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        )
    ]


def now() -> str:
    """An RFC 3339 timestamp, second precision, UTC (metadata.creationTimestamp format)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
