"""The `default/kubernetes` Service, kept the way kube-apiserver keeps it.

When the server has an advertise address, it maintains, at start and then every
`ServerConfig.kubernetes_service_interval` seconds:

- Service `default/kubernetes`: no selector, ClusterIP the first address of the service CIDR (the
  one the allocator keeps for it), port 443 named `https` (TCP) -> targetPort the advertised port,
  labels `component: apiserver`, `provider: kubernetes`;
- Endpoints `default/kubernetes` and EndpointSlice `default/kubernetes` (label
  `kubernetes.io/service-name: kubernetes`, addressType IPv4, one ready endpoint: the advertised
  address, port `https`).

Only what differs is written: a restart with a state file that already holds them writes nothing. A
Service that was deleted, or changed by hand, is put back. Its ClusterIP cannot be changed: an
existing Service keeps its own and the repair says so; when the address is held by another Service,
the repair logs that and retries on its next round.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
from typing import TYPE_CHECKING, Any

from .errors import APIError

if TYPE_CHECKING:
    from .rest import API

log = logging.getLogger("pycilium.lab.apiserver")

Obj = dict[str, Any]

NAMESPACE = "default"
NAME = "kubernetes"
PORT_NAME = "https"
SERVICE_PORT = 443
SERVICE_LABELS = {"component": "apiserver", "provider": "kubernetes"}
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def first_service_ip(service_cidr: str) -> str:
    """The first host address of the service CIDR (10.96.0.1 for 10.96.0.0/12)."""
    net = ipaddress.ip_network(service_cidr, strict=False)
    return str(net.network_address + 1)


def desired_service(service_cidr: str, port: int) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": dict(SERVICE_LABELS)},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": first_service_ip(service_cidr),
            "ports": [{"name": PORT_NAME, "port": SERVICE_PORT, "protocol": "TCP", "targetPort": port}],
            "sessionAffinity": "None",
        },
    }


def desired_endpoints(address: str, port: int) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {
            "name": NAME,
            "namespace": NAMESPACE,
            "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"},
        },
        "subsets": [
            {"addresses": [{"ip": address}], "ports": [{"name": PORT_NAME, "port": port, "protocol": "TCP"}]}
        ],
    }


def desired_slice(address: str, port: int) -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": {SERVICE_NAME_LABEL: NAME}},
        "addressType": "IPv6" if ":" in address else "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
        "ports": [{"name": PORT_NAME, "port": port, "protocol": "TCP"}],
    }


def _service_differs(cur: Obj, want: Obj) -> bool:
    cspec, wspec = cur.get("spec") or {}, want["spec"]
    labels = (cur.get("metadata") or {}).get("labels") or {}
    ports = [
        {k: p.get(k) for k in ("name", "port", "protocol", "targetPort")} for p in cspec.get("ports") or []
    ]
    return (
        any(labels.get(k) != v for k, v in SERVICE_LABELS.items())
        or cspec.get("type") != "ClusterIP"
        or bool(cspec.get("selector"))
        or ports != wspec["ports"]
        or cspec.get("sessionAffinity") != "None"
    )


def _fields_differ(cur: Obj, want: Obj, fields: tuple[str, ...]) -> bool:
    if ((cur.get("metadata") or {}).get("labels") or {}) != want["metadata"]["labels"]:
        return True
    return any(cur.get(f) != want[f] for f in fields)


def reconcile(api: API, service_cidr: str, address: str, port: int) -> list[str]:
    """Create or repair the Service, Endpoints and EndpointSlice; what was written, e.g.
    ["created service", "updated endpointslice"]. Errors are logged, not raised."""
    done: list[str] = []
    api.ensure_namespace(NAMESPACE)
    rt_svc = api.registry.get("", "v1", "services")
    rt_ep = api.registry.get("", "v1", "endpoints")
    rt_slice = api.registry.get("discovery.k8s.io", "v1", "endpointslices")
    assert rt_svc is not None and rt_ep is not None and rt_slice is not None
    svc = desired_service(service_cidr, port)
    try:
        cur = api.store.get(rt_svc.key, NAMESPACE, NAME)
        if cur is None:
            api.create(rt_svc, NAMESPACE, svc)
            done.append("created service")
        else:
            if cur["spec"].get("clusterIP") != svc["spec"]["clusterIP"]:
                log.warning(
                    "service %s/%s has clusterIP %s, not %s (a ClusterIP cannot change; delete it to fix)",
                    NAMESPACE,
                    NAME,
                    cur["spec"].get("clusterIP"),
                    svc["spec"]["clusterIP"],
                )
            if _service_differs(cur, svc):
                new = copy.deepcopy(cur)
                new["metadata"]["labels"] = {**(new["metadata"].get("labels") or {}), **SERVICE_LABELS}
                spec = new["spec"]
                spec.pop("selector", None)
                spec["type"], spec["ports"] = "ClusterIP", svc["spec"]["ports"]
                spec["sessionAffinity"] = "None"
                spec.pop("sessionAffinityConfig", None)
                api.update(rt_svc, NAMESPACE, NAME, new)
                done.append("updated service")
    except APIError as e:
        log.error("service %s/%s: %s", NAMESPACE, NAME, e)
    for rt, want, fields in (
        (rt_ep, desired_endpoints(address, port), ("subsets",)),
        (rt_slice, desired_slice(address, port), ("addressType", "endpoints", "ports")),
    ):
        what = rt.kind.lower()
        try:
            cur = api.store.get(rt.key, NAMESPACE, NAME)
            if cur is None:
                api.create(rt, NAMESPACE, want)
                done.append(f"created {what}")
            elif _fields_differ(cur, want, fields):
                api.update(rt, NAMESPACE, NAME, want)
                done.append(f"updated {what}")
        except APIError as e:
            log.error("%s %s/%s: %s", what, NAMESPACE, NAME, e)
    if done:
        log.info("%s/%s (%s:%d): %s", NAMESPACE, NAME, address, port, ", ".join(done))
    return done
