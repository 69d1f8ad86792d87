"""Server-side printing (`meta.k8s.io/v1` Table), what `kubectl get` asks for to show its columns.

Columns for the kinds the lab shows most (Pods, Services, Nodes, Namespaces, EndpointSlices,
Deployments, NetworkPolicies, CRDs), a CRD's additionalPrinterColumns (simple `.a.b` paths) for
custom resources, NAME/AGE for the rest. Priority-1 columns appear with `-o wide`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .resources import ResourceType
from .selectors import field_value

Obj = dict[str, Any]
Column = tuple[str, int, Callable[[Obj], Any]]  # (name, priority, cell)


def age(obj: Obj) -> str:
    ts = obj["metadata"].get("creationTimestamp")
    if not ts:
        return "<unknown>"
    try:
        secs = int(
            (
                datetime.now(UTC) - datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            ).total_seconds()
        )
    except ValueError:
        return "<invalid>"
    secs = max(0, secs)
    mins, hours, days = secs // 60, secs // 3600, secs // 86400
    if secs < 120:
        return f"{secs}s"
    if mins < 10:
        return f"{mins}m{secs % 60}s" if secs % 60 else f"{mins}m"
    if hours < 3:
        return f"{mins}m"
    if hours < 8:
        return f"{hours}h{mins % 60}m" if mins % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    return f"{days}d"


def _get(obj: Obj, path: str, default: Any = "<none>") -> Any:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def _pod_status(p: Obj) -> str:
    if p["metadata"].get("deletionTimestamp"):
        return "Terminating"
    return str(_get(p, "status.phase", "Unknown"))


def _pod_ready(p: Obj) -> str:
    total = len(_get(p, "spec.containers", []) or [])
    ready = sum(1 for c in _get(p, "status.containerStatuses", []) or [] if c.get("ready"))
    return f"{ready}/{total}"


def _svc_external(s: Obj) -> str:
    ips = [i.get("ip") or i.get("hostname") for i in _get(s, "status.loadBalancer.ingress", []) or []]
    ips += _get(s, "spec.externalIPs", []) or []
    if ips:
        return ",".join(str(i) for i in ips)
    return "<pending>" if _get(s, "spec.type") == "LoadBalancer" else "<none>"


def _svc_ports(s: Obj) -> str:
    out = []
    for p in _get(s, "spec.ports", []) or []:
        np = f":{p['nodePort']}" if p.get("nodePort") else ""
        out.append(f"{p.get('port')}{np}/{p.get('protocol', 'TCP')}")
    return ",".join(out) or "<none>"


def _node_status(n: Obj) -> str:
    for c in _get(n, "status.conditions", []) or []:
        if c.get("type") == "Ready":
            return "Ready" if c.get("status") == "True" else "NotReady"
    return "Unknown"


def _node_ip(n: Obj) -> str:
    for a in _get(n, "status.addresses", []) or []:
        if a.get("type") == "InternalIP":
            return str(a.get("address"))
    return "<none>"


def _selector(m: Any) -> str:
    if not isinstance(m, dict) or not m:
        return "<none>"
    return ",".join(f"{k}={v}" for k, v in sorted(m.items()))


def _slice_endpoints(s: Obj) -> str:
    addrs = [a for e in s.get("endpoints") or [] for a in e.get("addresses") or []]
    shown = ",".join(addrs[:3])
    return shown + (f" + {len(addrs) - 3} more..." if len(addrs) > 3 else "") if addrs else "<unset>"


NAME: Column = ("Name", 0, lambda o: o["metadata"]["name"])
AGE: Column = ("Age", 0, age)

COLUMNS: dict[str, list[Column]] = {
    "/pods": [
        NAME,
        ("Ready", 0, _pod_ready),
        ("Status", 0, _pod_status),
        (
            "Restarts",
            0,
            lambda p: sum(c.get("restartCount", 0) for c in _get(p, "status.containerStatuses", []) or []),
        ),
        AGE,
        ("IP", 1, lambda p: _get(p, "status.podIP")),
        ("Node", 1, lambda p: _get(p, "spec.nodeName")),
    ],
    "/services": [
        NAME,
        ("Type", 0, lambda s: _get(s, "spec.type")),
        ("Cluster-IP", 0, lambda s: _get(s, "spec.clusterIP")),
        ("External-IP", 0, _svc_external),
        ("Port(s)", 0, _svc_ports),
        AGE,
        ("Selector", 1, lambda s: _selector(_get(s, "spec.selector", None))),
    ],
    "/nodes": [
        NAME,
        ("Status", 0, _node_status),
        ("Roles", 0, lambda n: "<none>"),
        AGE,
        ("Version", 0, lambda n: _get(n, "status.nodeInfo.kubeletVersion", "")),
        ("Internal-IP", 1, _node_ip),
        ("Pod-CIDR", 1, lambda n: _get(n, "spec.podCIDR")),
    ],
    "/namespaces": [NAME, ("Status", 0, lambda n: _get(n, "status.phase", "Active")), AGE],
    "discovery.k8s.io/endpointslices": [
        NAME,
        ("AddressType", 0, lambda s: s.get("addressType", "")),
        ("Ports", 0, lambda s: ",".join(str(p.get("port", "")) for p in s.get("ports") or []) or "<unset>"),
        ("Endpoints", 0, _slice_endpoints),
        AGE,
    ],
    "apps/deployments": [
        NAME,
        ("Ready", 0, lambda d: f"{_get(d, 'status.readyReplicas', 0)}/{_get(d, 'spec.replicas', 1)}"),
        ("Up-to-date", 0, lambda d: _get(d, "status.updatedReplicas", 0)),
        ("Available", 0, lambda d: _get(d, "status.availableReplicas", 0)),
        AGE,
    ],
    "networking.k8s.io/networkpolicies": [
        NAME,
        ("Pod-Selector", 0, lambda n: _selector(_get(n, "spec.podSelector.matchLabels", None))),
        AGE,
    ],
    "apiextensions.k8s.io/customresourcedefinitions": [
        NAME,
        ("Created At", 0, lambda c: c["metadata"].get("creationTimestamp", "")),
    ],
}


def _path_cell(path: str, obj: Obj) -> str:
    return field_value(obj, path) or "<none>"


def _columns(rt: ResourceType) -> list[Column]:
    if rt.key in COLUMNS:
        return COLUMNS[rt.key]
    if rt.printer_columns:
        extra: list[Column] = [
            (name, prio, functools.partial(_path_cell, path.lstrip(".")))
            for name, path, prio in rt.printer_columns
        ]
        return [NAME, *extra, AGE]
    return [NAME, AGE]


def _definitions(cols: list[Column]) -> list[Obj]:
    return [
        {
            "name": name,
            "type": "string",
            "format": "name" if i == 0 else "",
            "description": "",
            "priority": prio,
        }
        for i, (name, prio, _) in enumerate(cols)
    ]


def table(rt: ResourceType, objs: list[Obj], meta: Obj | None = None) -> Obj:
    cols = _columns(rt)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta or {},
        "columnDefinitions": _definitions(cols),
        "rows": [{"cells": [cell(o) for _, _, cell in cols], "object": o} for o in objs],
    }


def wants_table(accept: str) -> bool:
    return "as=Table" in accept
