"""Service + EndpointSlices -> the load balancer's desired frontends and backends (pure functions).

One frontend per (address, port, protocol):
- ClusterIP: every IPv4 cluster IP, flags CLUSTERIP (+ INT_LOCAL_SCOPE in flags2 for
  internalTrafficPolicy=Local);
- NodePort (type NodePort or LoadBalancer with a nodePort): address 0 = any node address, flags
  NODEPORT|ROUTABLE;
- LoadBalancer: every status.loadBalancer.ingress IP, flags LOADBALANCER|ROUTABLE;
- externalIPs: flags EXTERNAL_IP|ROUTABLE;
externalTrafficPolicy=Local adds EXT_LOCAL_SCOPE to the routable (north-south) frontends;
sessionAffinity=ClientIP adds AFFINITY to all, with the timeout in slot 0's backend_id.

Backends of a service port come from the EndpointSlice ports with the same name and protocol (the
EndpointSlice controller has already resolved a named targetPort into a number per slice). Endpoint
conditions:
- ready (and not terminating): active, in the slots;
- serving and terminating: in the slots only when no endpoint of the port is ready;
- terminating (serving or not): kept in the backends map as TERMINATING so pinned flows drain;
- neither ready nor terminating (starting, failing probes): not a backend.
Slots list node-local backends first (local = the endpoint's nodeName is this node), each group in
address order, and local_count says how many there are.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pycilium.bpf.maps.defines import d

from .model import TYPE_LOAD_BALANCER, TYPE_NODE_PORT, ServiceInfo, ServicePort, SliceEndpoint, SliceInfo

SVC_FLAG_EXTERNAL_IP = d("SVC_FLAG_EXTERNAL_IP")
SVC_FLAG_NODEPORT = d("SVC_FLAG_NODEPORT")
SVC_FLAG_EXT_LOCAL_SCOPE = d("SVC_FLAG_EXT_LOCAL_SCOPE")
SVC_FLAG_AFFINITY = d("SVC_FLAG_AFFINITY")
SVC_FLAG_LOADBALANCER = d("SVC_FLAG_LOADBALANCER")
SVC_FLAG_ROUTABLE = d("SVC_FLAG_ROUTABLE")
SVC_FLAG_CLUSTERIP = d("SVC_FLAG_CLUSTERIP")
SVC_FLAG2_INT_LOCAL_SCOPE = d("SVC_FLAG2_INT_LOCAL_SCOPE")
SVC_FLAG2_MAGLEV = d("SVC_FLAG2_MAGLEV")

KIND_CLUSTER_IP = "ClusterIP"
KIND_NODE_PORT = "NodePort"
KIND_LOAD_BALANCER = "LoadBalancer"
KIND_EXTERNAL_IP = "ExternalIPs"

ANY_ADDRESS = "0.0.0.0"

FeKey = tuple[str, int, int]  # (address, port, protocol)
BKey = tuple[str, int, int]  # (backend address, port, protocol)


@dataclass(frozen=True, slots=True)
class Frontend:
    """One frontend (VIP:port/proto) of a service, with everything slot 0 carries but the counts."""

    address: str
    port: int
    proto: int
    kind: str
    flags: int
    flags2: int
    affinity_timeout: int
    port_name: str

    @property
    def key(self) -> FeKey:
        return (self.address, self.port, self.proto)


@dataclass(frozen=True, slots=True)
class FrontendPlan:
    frontend: Frontend
    slots: tuple[BKey, ...]  # backends in slot order (1..count)
    local_count: int
    terminating: tuple[BKey, ...] = ()  # kept for draining, not in the slots


@dataclass(frozen=True, slots=True)
class ServicePlan:
    frontends: tuple[FrontendPlan, ...]
    backends: dict[BKey, tuple[bool, str]]  # backend -> (active, node name)


EMPTY_PLAN = ServicePlan((), {})


def _frontends(svc: ServiceInfo, sp: ServicePort) -> list[Frontend]:
    aff = SVC_FLAG_AFFINITY if svc.affinity_timeout else 0
    ext = SVC_FLAG_EXT_LOCAL_SCOPE if svc.ext_local else 0
    int2 = SVC_FLAG2_INT_LOCAL_SCOPE if svc.int_local else 0
    t = svc.affinity_timeout
    out = [Frontend(ip, sp.port, sp.proto, KIND_CLUSTER_IP, SVC_FLAG_CLUSTERIP | aff, int2, t, sp.name)
           for ip in svc.cluster_ips]  # fmt: skip
    routable = SVC_FLAG_ROUTABLE | aff | ext
    if sp.node_port and svc.type in (TYPE_NODE_PORT, TYPE_LOAD_BALANCER):
        out.append(Frontend(ANY_ADDRESS, sp.node_port, sp.proto, KIND_NODE_PORT, SVC_FLAG_NODEPORT | routable,
                            0, t, sp.name))  # fmt: skip
    for ip in svc.lb_ips:
        out.append(Frontend(ip, sp.port, sp.proto, KIND_LOAD_BALANCER, SVC_FLAG_LOADBALANCER | routable, 0, t,
                            sp.name))  # fmt: skip
    for ip in svc.external_ips:
        out.append(Frontend(ip, sp.port, sp.proto, KIND_EXTERNAL_IP, SVC_FLAG_EXTERNAL_IP | routable, 0, t,
                            sp.name))  # fmt: skip
    return out


def _endpoints_for_port(sp: ServicePort, slices: Iterable[SliceInfo]) -> dict[tuple[str, int], SliceEndpoint]:
    """(ip, port) -> endpoint, merged over slices (an endpoint may briefly appear in two)."""
    found: dict[tuple[str, int], SliceEndpoint] = {}
    for sl in slices:
        port = 0
        for p in sl.ports:
            if p.name == sp.name and p.proto == sp.proto:
                port = p.port
                break
        if not port:
            if sl.ports or not sp.target_port:
                continue
            port = sp.target_port  # a slice without ports: the Service's numeric targetPort
        for ep in sl.endpoints:
            k = (ep.ip, port)
            cur = found.get(k)
            if cur is None or _rank(ep) > _rank(cur):
                found[k] = ep
    return found


def _rank(ep: SliceEndpoint) -> int:
    return 3 if ep.ready else 2 if ep.serving and ep.terminating else 1 if ep.terminating else 0


def plan_service(svc: ServiceInfo, slices: Iterable[SliceInfo], node_name: str) -> ServicePlan:
    """The frontends and backends one Service should have in the datapath."""
    slices = list(slices)
    plans: list[FrontendPlan] = []
    backends: dict[BKey, tuple[bool, str]] = {}
    seen_fe: set[FeKey] = set()
    for sp in svc.ports:
        eps = _endpoints_for_port(sp, slices)
        active = [(k, ep) for k, ep in eps.items() if ep.ready]
        in_slots = active or [(k, ep) for k, ep in eps.items() if ep.serving and ep.terminating]
        for (ip, port), ep in eps.items():
            if ep.ready:
                backends[(ip, port, sp.proto)] = (True, ep.node)
            elif ep.terminating:
                bk = (ip, port, sp.proto)
                if bk not in backends:
                    backends[bk] = (False, ep.node)
        local = sorted(
            (ip, port, sp.proto) for (ip, port), ep in in_slots if node_name and ep.node == node_name
        )
        remote = sorted(
            (ip, port, sp.proto) for (ip, port), ep in in_slots if not (node_name and ep.node == node_name)
        )
        slots = (*local, *remote)
        in_slot = set(slots)
        draining = tuple(sorted((ip, port, sp.proto) for (ip, port), ep in eps.items()
                                if ep.terminating and (ip, port, sp.proto) not in in_slot))  # fmt: skip
        for fe in _frontends(svc, sp):
            if fe.key in seen_fe:
                continue  # two ports of one service on the same frontend: the first wins
            seen_fe.add(fe.key)
            plans.append(FrontendPlan(fe, slots, len(local), draining))
    return ServicePlan(tuple(plans), backends)
