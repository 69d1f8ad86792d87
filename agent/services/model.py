"""Services and EndpointSlices read into small immutable records.

The reflectors hand raw (compacted) dicts to the manager; everything the load balancer needs is
read here, once, into tuples and frozen dataclasses (a few hundred bytes per object instead of the
kilobytes a JSON dict takes). Anything malformed is reported through `warn` with the field that is
wrong and skipped; a Service is only rejected as a whole when nothing usable is left.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from pycilium.agent.k8s.resources import SERVICE_NAME_LABEL

Obj = dict[str, Any]
Warn = Callable[[str], None]
SvcKey = tuple[str, str]  # (namespace, name)

PROTO_TCP = 6
PROTO_UDP = 17
PROTOCOLS = {"TCP": PROTO_TCP, "UDP": PROTO_UDP}
PROTO_NAMES = {PROTO_TCP: "TCP", PROTO_UDP: "UDP"}

DEFAULT_AFFINITY_TIMEOUT = 10800
MAX_AFFINITY_TIMEOUT = 86400

TYPE_CLUSTER_IP = "ClusterIP"
TYPE_NODE_PORT = "NodePort"
TYPE_LOAD_BALANCER = "LoadBalancer"
TYPE_EXTERNAL_NAME = "ExternalName"
_TYPES = (TYPE_CLUSTER_IP, TYPE_NODE_PORT, TYPE_LOAD_BALANCER, TYPE_EXTERNAL_NAME)


class ServicePort(NamedTuple):
    name: str
    proto: int
    port: int
    node_port: int  # 0: none
    target_port: int  # numeric targetPort (0: named or absent); only used for slices without ports


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    namespace: str
    name: str
    type: str
    cluster_ips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    external_ips: tuple[str, ...] = ()
    lb_ips: tuple[str, ...] = ()
    affinity_timeout: int = 0  # 0: no session affinity
    ext_local: bool = False  # externalTrafficPolicy: Local
    int_local: bool = False  # internalTrafficPolicy: Local

    @property
    def key(self) -> SvcKey:
        return (self.namespace, self.name)


class SlicePort(NamedTuple):
    name: str
    proto: int
    port: int


class SliceEndpoint(NamedTuple):
    ip: str
    node: str
    ready: bool
    serving: bool
    terminating: bool


@dataclass(frozen=True, slots=True)
class SliceInfo:
    namespace: str
    name: str
    service: str
    ports: tuple[SlicePort, ...]
    endpoints: tuple[SliceEndpoint, ...]

    @property
    def service_key(self) -> SvcKey:
        return (self.namespace, self.service)


def _ipv4(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        return None


def _port(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        return None
    return value


def describe(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"


def parse_service(obj: Obj, warn: Warn) -> ServiceInfo | None:
    """The load-balancing view of a Service, or None when it is not load-balanced here.

    None for: headless (clusterIP None), ExternalName, no IPv4 cluster IP, no usable port. Bad
    fields are reported via `warn` naming the field and skipped.
    """
    meta = obj.get("metadata") or {}
    ns, name = meta.get("namespace") or "", meta.get("name") or ""
    if not name:
        warn("metadata.name: missing")
        return None
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        warn("spec: missing or not an object")
        return None
    stype = spec.get("type") or TYPE_CLUSTER_IP
    if stype not in _TYPES:
        warn(f"spec.type: unknown service type {stype!r}")
        return None
    if stype == TYPE_EXTERNAL_NAME:
        return None
    cip = spec.get("clusterIP")
    if cip == "None":
        return None  # headless: DNS only
    raw_ips = spec.get("clusterIPs") or ([cip] if cip else [])
    if not isinstance(raw_ips, list):
        warn("spec.clusterIPs: not a list")
        raw_ips = [cip] if cip else []
    cluster_ips: list[str] = []
    for i, v in enumerate(raw_ips):
        if v == "None":
            return None
        ip4 = _ipv4(v)
        if ip4 is not None:
            if ip4 not in cluster_ips:
                cluster_ips.append(ip4)
        elif not (isinstance(v, str) and ":" in v):  # IPv6 is not handled by this datapath
            warn(f"spec.clusterIPs[{i}]: not an IP address: {v!r}")
    ports: list[ServicePort] = []
    raw_ports = spec.get("ports") or []
    if not isinstance(raw_ports, list):
        warn("spec.ports: not a list")
        raw_ports = []
    for i, p in enumerate(raw_ports):
        if not isinstance(p, dict):
            warn(f"spec.ports[{i}]: not an object")
            continue
        proto_name = p.get("protocol") or "TCP"
        proto = PROTOCOLS.get(proto_name) if isinstance(proto_name, str) else None
        if proto is None:
            warn(
                f"spec.ports[{i}].protocol: {proto_name!r} is not supported (TCP and UDP only); port skipped"
            )
            continue
        port = _port(p.get("port"))
        if port is None:
            warn(f"spec.ports[{i}].port: invalid port {p.get('port')!r}; port skipped")
            continue
        np_raw = p.get("nodePort")
        node_port = 0
        if np_raw not in (None, 0):
            node_port = _port(np_raw) or 0
            if not node_port:
                warn(f"spec.ports[{i}].nodePort: invalid port {np_raw!r}; ignored")
        tp = p.get("targetPort")
        target = tp if isinstance(tp, int) and not isinstance(tp, bool) and 1 <= tp <= 65535 else 0
        pname = p.get("name") or ""
        if not isinstance(pname, str):
            warn(f"spec.ports[{i}].name: not a string")
            continue
        ports.append(ServicePort(pname, proto, port, node_port, target))
    if not ports:
        if raw_ports:
            warn("spec.ports: no usable port")
        return None
    external_ips: list[str] = []
    for i, v in enumerate(spec.get("externalIPs") or []):
        ip4 = _ipv4(v)
        if ip4 is None:
            if not (isinstance(v, str) and ":" in v):
                warn(f"spec.externalIPs[{i}]: not an IPv4 address: {v!r}")
            continue
        if ip4 not in external_ips:
            external_ips.append(ip4)
    lb_ips: list[str] = []
    if stype == TYPE_LOAD_BALANCER:
        ingress = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        for i, ing in enumerate(ingress if isinstance(ingress, list) else []):
            v = ing.get("ip") if isinstance(ing, dict) else None
            if v is None:
                continue  # hostname-only ingress: nothing to program
            ip4 = _ipv4(v)
            if ip4 is None:
                if not (isinstance(v, str) and ":" in v):
                    warn(f"status.loadBalancer.ingress[{i}].ip: not an IPv4 address: {v!r}")
                continue
            if ip4 not in lb_ips:
                lb_ips.append(ip4)
    timeout = 0
    if spec.get("sessionAffinity") == "ClientIP":
        cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get("timeoutSeconds")
        if cfg is None:
            timeout = DEFAULT_AFFINITY_TIMEOUT
        elif isinstance(cfg, int) and not isinstance(cfg, bool) and 1 <= cfg <= MAX_AFFINITY_TIMEOUT:
            timeout = cfg
        else:
            warn(f"spec.sessionAffinityConfig.clientIP.timeoutSeconds: invalid {cfg!r}; using default")
            timeout = DEFAULT_AFFINITY_TIMEOUT
    elif spec.get("sessionAffinity") not in (None, "None"):
        warn(f"spec.sessionAffinity: unknown value {spec.get('sessionAffinity')!r}; ignored")
    if not cluster_ips and not external_ips and not lb_ips and not any(p.node_port for p in ports):
        return None
    return ServiceInfo(
        namespace=ns,
        name=name,
        type=stype,
        cluster_ips=tuple(cluster_ips),
        ports=tuple(ports),
        external_ips=tuple(external_ips),
        lb_ips=tuple(lb_ips),
        affinity_timeout=timeout,
        ext_local=spec.get("externalTrafficPolicy") == "Local" and stype != TYPE_CLUSTER_IP,
        int_local=spec.get("internalTrafficPolicy") == "Local",
    )


def _cond(conds: Obj, name: str, default: bool) -> bool:
    v = conds.get(name)
    return default if v is None else bool(v)


def parse_endpoint_slice(obj: Obj, warn: Warn) -> SliceInfo | None:
    """The IPv4 endpoints of an EndpointSlice, or None when it has none for us."""
    meta = obj.get("metadata") or {}
    ns, name = meta.get("namespace") or "", meta.get("name") or ""
    svc = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not svc:
        return None  # not managed for a Service (custom slices without the label are not ours)
    if obj.get("addressType", "IPv4") != "IPv4":
        return None
    ports: list[SlicePort] = []
    raw_ports = obj.get("ports") or []
    for i, p in enumerate(raw_ports if isinstance(raw_ports, list) else []):
        if not isinstance(p, dict):
            warn(f"ports[{i}]: not an object")
            continue
        proto_name = p.get("protocol") or "TCP"
        proto = PROTOCOLS.get(proto_name) if isinstance(proto_name, str) else None
        if proto is None:
            warn(f"ports[{i}].protocol: {proto_name!r} is not supported (TCP and UDP only); port skipped")
            continue
        port = _port(p.get("port"))
        if port is None:
            if p.get("port") is not None:
                warn(f"ports[{i}].port: invalid port {p.get('port')!r}; port skipped")
            continue
        pname = p.get("name")
        ports.append(SlicePort(sys.intern(pname) if isinstance(pname, str) else "", proto, port))
    endpoints: list[SliceEndpoint] = []
    raw_eps = obj.get("endpoints") or []
    for i, ep in enumerate(raw_eps if isinstance(raw_eps, list) else []):
        if not isinstance(ep, dict):
            warn(f"endpoints[{i}]: not an object")
            continue
        conds = ep.get("conditions") or {}
        if not isinstance(conds, dict):
            conds = {}
        # API semantics: ready/serving unset mean unknown, to be read as true; terminating unset = false.
        ready = _cond(conds, "ready", True)
        serving = _cond(conds, "serving", ready)
        terminating = _cond(conds, "terminating", False)
        node = ep.get("nodeName")
        node = sys.intern(node) if isinstance(node, str) else ""  # few distinct names, many endpoints
        for j, a in enumerate(ep.get("addresses") or []):
            ip4 = _ipv4(a)
            if ip4 is None:
                warn(f"endpoints[{i}].addresses[{j}]: not an IPv4 address: {a!r}")
                continue
            endpoints.append(SliceEndpoint(ip4, node, ready and not terminating, serving, terminating))
            break  # the API allows one address per endpoint; consumers use the first
    return SliceInfo(sys.intern(ns), name, svc, tuple(ports), tuple(endpoints))


def compact_service(obj: Obj) -> Obj:
    """Reflector transform for Services: keep the fields parse_service reads."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    out_meta = {k: meta[k] for k in ("name", "namespace", "resourceVersion") if k in meta}
    out_spec = {
        k: spec[k]
        for k in (
            "type",
            "clusterIP",
            "clusterIPs",
            "ports",
            "externalIPs",
            "sessionAffinity",
            "sessionAffinityConfig",
            "externalTrafficPolicy",
            "internalTrafficPolicy",
        )
        if k in spec
    }
    out: Obj = {"metadata": out_meta, "spec": out_spec}
    ing = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress")
    if ing:
        out["status"] = {"loadBalancer": {"ingress": ing}}
    return out


def compact_endpoint_slice(obj: Obj) -> Obj:
    """Reflector transform for EndpointSlices: keep the fields parse_endpoint_slice reads."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    out_meta: Obj = {k: meta[k] for k in ("name", "namespace", "resourceVersion") if k in meta}
    if SERVICE_NAME_LABEL in labels:
        out_meta["labels"] = {SERVICE_NAME_LABEL: labels[SERVICE_NAME_LABEL]}
    eps = []
    for ep in obj.get("endpoints") or []:
        if isinstance(ep, dict):
            eps.append({k: ep[k] for k in ("addresses", "conditions", "nodeName") if k in ep})
        else:
            eps.append(ep)
    return {
        "metadata": out_meta,
        "addressType": obj.get("addressType", "IPv4"),
        "ports": obj.get("ports") or [],
        "endpoints": eps,
    }
