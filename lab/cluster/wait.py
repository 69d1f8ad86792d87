"""`apply --wait`: until the applied pods run with an IP and every agent has programmed them.

"Programmed" is read from the pinned maps of each node (what the datapath actually uses):
- a pod: its node's `endpoints` map has its IP, and every node's `ipcache` knows its IP with an
  identity (a hostNetwork pod only has to run: its IP is its node's);
- a Service: on every node, the `lb4_services` frontend of each ClusterIP port has as many active
  backends as the Service's EndpointSlices have ready endpoints for that port;
- a NetworkPolicy: every running pod it selects enforces policy in the policy's directions
  (EP_F_POLICY_INGRESS / EP_F_POLICY_EGRESS in its node's `endpoints` map). This shows the policy
  reached the datapath; it cannot tell a later change of rules of an already enforced pod.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pycilium.lab.cluster.kube import DEPLOYMENT, ENDPOINTSLICE, NETWORKPOLICY, POD, SERVICE, Kube, Obj
from pycilium.lab.manifests import match_label_selector, pod_ready, short_hash

PROTO = {"TCP": 6, "UDP": 17, "SCTP": 132}


@dataclass
class Targets:
    pods: list[tuple[str, str]] = field(default_factory=list)
    deployments: list[tuple[str, str]] = field(default_factory=list)
    services: list[tuple[str, str]] = field(default_factory=list)
    policies: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def of(cls, objs: list[Obj]) -> Targets:
        t = cls()
        for o in objs:
            meta = o.get("metadata") or {}
            key = (str(meta.get("namespace") or "default"), str(meta.get("name")))
            kind = o.get("kind")
            if kind == "Pod":
                t.pods.append(key)
            elif kind == "Deployment":
                t.deployments.append(key)
            elif kind == "Service":
                t.services.append(key)
            elif kind == "NetworkPolicy":
                t.policies.append(key)
        return t


def _meta(o: Obj) -> Obj:
    return o.get("metadata") or {}


def deployment_pods(kube: Kube, ns: str, name: str) -> tuple[list[Obj], str]:
    """The Deployment's live pods once it has converged, else a reason to keep waiting."""
    dep = kube.get(DEPLOYMENT, name, ns)
    if dep is None:
        return [], f"deployment {ns}/{name} not found"
    spec = dep.get("spec") or {}
    want = int(spec.get("replicas", 1))
    thash = short_hash(spec.get("template") or {}, 10)
    pods = [
        p
        for p in kube.list(POD, ns)
        if any(
            r.get("kind") == "Deployment" and r.get("uid") == _meta(dep).get("uid")
            for r in _meta(p).get("ownerReferences") or []
        )
    ]
    live = [p for p in pods if not _meta(p).get("deletionTimestamp")]
    current = [p for p in live if (_meta(p).get("labels") or {}).get("pod-template-hash") == thash]
    if len(pods) != want or len(current) != want:
        return (
            [],
            f"deployment {ns}/{name}: {len(current)}/{want} pods of the current template ({len(pods)} in all)",
        )
    return current, ""


def pod_waiting(pod: Obj | None, key: tuple[str, str]) -> str:
    if pod is None:
        return f"pod {key[0]}/{key[1]} not found"
    st = pod.get("status") or {}
    if not (pod.get("spec") or {}).get("nodeName"):
        return f"pod {key[0]}/{key[1]} not scheduled"
    if st.get("phase") != "Running" or not st.get("podIP") or not pod_ready(pod):
        why = next((c.get("message") for c in st.get("conditions") or [] if c.get("message")), "")
        return f"pod {key[0]}/{key[1]} {st.get('phase', 'Pending')}{': ' + why if why else ''}"
    return ""


class MapReader:
    """Reads the pinned maps of the lab's nodes."""

    def __init__(self, roots: dict[str, str]) -> None:
        self.roots = roots  # node name -> bpf root

    def _lookup(self, root: str, name: str, key: Any) -> Any:
        from pycilium.bpf.maps import BY_NAME, MapNotPinnedError, PinnedMap

        try:
            with PinnedMap(BY_NAME[name], root) as m:
                return m.lookup(key)
        except (MapNotPinnedError, OSError):
            return None

    def has_endpoint(self, node: str, ip: str) -> bool:
        from pycilium.bpf.maps.endpointmap import EndpointKey
        from pycilium.bpf.maps.util import ip_to_be32

        return self._lookup(self.roots[node], "endpoints", EndpointKey(ip_to_be32(ip))) is not None

    def endpoint_flags(self, node: str, ip: str) -> int | None:
        from pycilium.bpf.maps.endpointmap import EndpointKey
        from pycilium.bpf.maps.util import ip_to_be32

        v = self._lookup(self.roots[node], "endpoints", EndpointKey(ip_to_be32(ip)))
        return None if v is None else int(v.flags)

    def ipcache_identity(self, node: str, ip: str) -> int | None:
        from pycilium.bpf.maps.ipcache import IpcacheKey
        from pycilium.bpf.maps.util import ip_to_be32

        v = self._lookup(self.roots[node], "ipcache", IpcacheKey(32, ip_to_be32(ip)))
        return None if v is None else int(v.sec_identity)

    def service_count(self, node: str, vip: str, port: int, proto: int) -> int | None:
        from pycilium.bpf.maps.lbmap import Lb4Key
        from pycilium.bpf.maps.util import ip_to_be32, port_to_be16

        v = self._lookup(
            self.roots[node], "lb4_services", Lb4Key(ip_to_be32(vip), port_to_be16(port), 0, proto)
        )
        return None if v is None else int(v.count)


def programmed_pod(maps: MapReader, pod: Obj) -> str:
    if (pod.get("spec") or {}).get("hostNetwork"):
        return ""  # the node's own address: no endpoint, and no identity of its own
    ns, name = _meta(pod).get("namespace", "default"), _meta(pod).get("name")
    ip = str((pod.get("status") or {}).get("podIP") or "")
    node = str((pod.get("spec") or {}).get("nodeName") or "")
    if node in maps.roots and not maps.has_endpoint(node, ip):
        return f"pod {ns}/{name}: no endpoint for {ip} in {node}'s datapath yet"
    for n in maps.roots:
        if not maps.ipcache_identity(n, ip):
            return f"pod {ns}/{name}: {n} has no identity for {ip} yet"
    return ""


def ready_endpoints(slices: list[Obj], port_name: str, proto: str) -> int:
    n = 0
    for s in slices:
        if not any(
            (p.get("name") or "") == port_name and (p.get("protocol") or "TCP") == proto
            for p in s.get("ports") or []
        ):
            continue
        n += sum(1 for e in s.get("endpoints") or [] if (e.get("conditions") or {}).get("ready") is not False)
    return n


def programmed_service(kube: Kube, maps: MapReader, ns: str, name: str) -> str:
    svc = kube.get(SERVICE, name, ns)
    if svc is None:
        return f"service {ns}/{name} not found"
    spec = svc.get("spec") or {}
    vip = spec.get("clusterIP")
    if not vip or vip == "None" or spec.get("type") == "ExternalName":
        return ""
    slices = kube.list(ENDPOINTSLICE, ns, label_selector=f"kubernetes.io/service-name={name}")
    if spec.get("selector") and not slices:
        return f"service {ns}/{name}: no EndpointSlice yet"
    for p in spec.get("ports") or []:
        proto = str(p.get("protocol") or "TCP")
        want = ready_endpoints(slices, str(p.get("name") or ""), proto)
        for node in maps.roots:
            have = maps.service_count(node, vip, int(p["port"]), PROTO.get(proto, 0))
            if want and have != want:
                return (
                    f"service {ns}/{name} {vip}:{p['port']}/{proto}: {node} has {have or 0}/{want} backends"
                )
    return ""


EP_F_POLICY_INGRESS, EP_F_POLICY_EGRESS = 0x2, 0x4  # bpf/lib/map_layouts.h


def policy_types(spec: Obj) -> list[str]:
    """spec.policyTypes, or its default: Ingress, plus Egress when there are egress rules."""
    if spec.get("policyTypes"):
        return list(spec["policyTypes"])
    return ["Ingress", *(["Egress"] if spec.get("egress") else [])]


def programmed_policy(kube: Kube, maps: MapReader, ns: str, name: str) -> str:
    pol = kube.get(NETWORKPOLICY, name, ns)
    if pol is None:
        return f"networkpolicy {ns}/{name} not found"
    spec = pol.get("spec") or {}
    want = 0
    for t in policy_types(spec):
        want |= EP_F_POLICY_INGRESS if t == "Ingress" else EP_F_POLICY_EGRESS if t == "Egress" else 0
    for pod in kube.list(POD, ns):
        st, pspec = pod.get("status") or {}, pod.get("spec") or {}
        node, ip = str(pspec.get("nodeName") or ""), str(st.get("podIP") or "")
        if not ip or node not in maps.roots or st.get("phase") != "Running":
            continue
        if not match_label_selector(spec.get("podSelector"), _meta(pod).get("labels")):
            continue
        flags = maps.endpoint_flags(node, ip)
        if flags is None or flags & want != want:
            return f"networkpolicy {ns}/{name}: pod {_meta(pod).get('name')} not enforcing it yet on {node}"
    return ""


def wait(
    kube: Kube, targets: Targets, node_roots: dict[str, str], timeout: float, say: Callable[[str], None]
) -> bool:
    """Poll until everything is running and programmed; False on timeout (the reason is said)."""
    maps = MapReader(node_roots)
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        reason = _pending(kube, targets, maps)
        if not reason:
            return True
        if reason != last:
            say(f"waiting: {reason}")
            last = reason
        if time.monotonic() > deadline:
            say(f"timed out after {timeout:.0f}s: {reason}")
            return False
        time.sleep(0.2)


def _pending(kube: Kube, targets: Targets, maps: MapReader) -> str:
    pods: list[Obj] = []
    for key in targets.pods:
        pod = kube.get(POD, key[1], key[0])
        why = pod_waiting(pod, key)
        if why:
            return why
        assert pod is not None
        pods.append(pod)
    for ns, name in targets.deployments:
        dpods, why = deployment_pods(kube, ns, name)
        if why:
            return why
        for p in dpods:
            why = pod_waiting(p, (ns, _meta(p).get("name", "")))
            if why:
                return why
        pods.extend(dpods)
    for pod in pods:
        why = programmed_pod(maps, pod)
        if why:
            return why
    for ns, name in targets.services:
        why = programmed_service(kube, maps, ns, name)
        if why:
            return why
    for ns, name in targets.policies:
        why = programmed_policy(kube, maps, ns, name)
        if why:
            return why
    return ""
