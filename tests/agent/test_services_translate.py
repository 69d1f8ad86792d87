"""Service + EndpointSlice translation into load-balancer plans: pure Python, no kernel."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
from pycilium.agent.services.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    ServiceInfo,
    SliceInfo,
    compact_endpoint_slice,
    compact_service,
    parse_endpoint_slice,
    parse_service,
)
from pycilium.agent.services.translate import (
    SVC_FLAG2_INT_LOCAL_SCOPE,
    SVC_FLAG_AFFINITY,
    SVC_FLAG_CLUSTERIP,
    SVC_FLAG_EXT_LOCAL_SCOPE,
    SVC_FLAG_EXTERNAL_IP,
    SVC_FLAG_LOADBALANCER,
    SVC_FLAG_NODEPORT,
    SVC_FLAG_ROUTABLE,
    FrontendPlan,
    ServicePlan,
    plan_service,
)
from pycilium.bpf.maps.defines import d

Obj = dict[str, Any]
TCP, UDP = 6, 17


def svc(name: str = "web", ns: str = "default", **spec: Any) -> Obj:
    spec.setdefault("clusterIP", "10.96.0.10")
    spec.setdefault("ports", [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}])
    status = spec.pop("status", None)
    obj: Obj = {
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "7"},
        "spec": spec,
    }
    if status is not None:
        obj["status"] = status
    return obj


def ep(ip: str, node: str = "n2", **conds: Any) -> Obj:
    out: Obj = {"addresses": [ip], "nodeName": node}
    if conds:
        out["conditions"] = conds
    return out


def eps(name: str = "web-1", service: str = "web", ports: list[Obj] | None = None, endpoints: list[Obj] | None = None,
        ns: str = "default", address_type: str = "IPv4") -> Obj:  # fmt: skip
    return {
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}] if ports is None else ports,
        "endpoints": endpoints or [],
    }


class Warnings(list[str]):
    def __call__(self, msg: str) -> None:
        self.append(msg)


def parse(obj: Obj) -> tuple[ServiceInfo | None, Warnings]:
    w = Warnings()
    return parse_service(obj, w), w


def slices(*objs: Obj) -> list[SliceInfo]:
    out = []
    for o in objs:
        s = parse_endpoint_slice(o, Warnings())
        assert s is not None
        out.append(s)
    return out


def plan(service: Obj, *slice_objs: Obj, node: str = "n1") -> ServicePlan:
    info, w = parse(service)
    assert info is not None, w
    return plan_service(info, slices(*slice_objs), node)


def by_frontend(p: ServicePlan) -> dict[tuple[str, int, int], FrontendPlan]:
    return {fp.frontend.key: fp for fp in p.frontends}


# --- Service shapes -------------------------------------------------------------------------------


def test_cluster_ip_multiple_ports_tcp_udp_with_named_target_ports_resolved_per_slice() -> None:
    s = svc(ports=[{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
                   {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": "dns-tcp"},
                   {"name": "metrics", "port": 9153, "targetPort": 9153}])  # fmt: skip
    # Two slices: the named port resolves to different numbers on different pods (rolling update).
    a = eps("web-a", ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}, {"name": "dns-tcp", "port": 5353,
            "protocol": "TCP"}, {"name": "metrics", "port": 9153, "protocol": "TCP"}],
            endpoints=[ep("10.0.1.1")])  # fmt: skip
    b = eps("web-b", ports=[{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53,
            "protocol": "TCP"}, {"name": "metrics", "port": 9153, "protocol": "TCP"}],
            endpoints=[ep("10.0.1.2")])  # fmt: skip
    p = by_frontend(plan(s, a, b))
    assert set(p) == {("10.96.0.10", 53, UDP), ("10.96.0.10", 53, TCP), ("10.96.0.10", 9153, TCP)}
    assert p[("10.96.0.10", 53, UDP)].slots == (("10.0.1.1", 5353, UDP), ("10.0.1.2", 53, UDP))
    assert p[("10.96.0.10", 53, TCP)].slots == (("10.0.1.1", 5353, TCP), ("10.0.1.2", 53, TCP))
    assert p[("10.96.0.10", 9153, TCP)].slots == (("10.0.1.1", 9153, TCP), ("10.0.1.2", 9153, TCP))
    for fp in p.values():
        assert fp.frontend.kind == "ClusterIP"
        assert fp.frontend.flags == SVC_FLAG_CLUSTERIP and fp.frontend.flags2 == 0
        assert fp.frontend.affinity_timeout == 0


def test_unnamed_single_port_matches_unnamed_slice_port() -> None:
    s = svc(ports=[{"port": 80, "targetPort": 8080}])
    p = plan(s, eps(ports=[{"port": 8080, "protocol": "TCP"}], endpoints=[ep("10.0.1.1")]))
    (fp,) = p.frontends
    assert fp.slots == (("10.0.1.1", 8080, TCP),)


def test_slice_without_ports_uses_numeric_target_port_only() -> None:
    numeric = svc(ports=[{"port": 80, "targetPort": 8080}])
    (fp,) = plan(numeric, eps(ports=[], endpoints=[ep("10.0.1.1")])).frontends
    assert fp.slots == (("10.0.1.1", 8080, TCP),)
    named = svc(ports=[{"port": 80, "targetPort": "http"}])
    (fp,) = plan(named, eps(ports=[], endpoints=[ep("10.0.1.1")])).frontends
    assert fp.slots == ()


def test_sctp_and_unknown_protocols_are_rejected_with_namespace_name_and_field(caplog: Any) -> None:
    s = svc(ns="shop", name="cart", ports=[{"name": "a", "port": 80}, {"name": "b", "port": 90, "protocol": "SCTP"},
                                           {"name": "c", "port": 91, "protocol": "QUIC"}])  # fmt: skip
    info, w = parse(s)
    assert info is not None and [p.port for p in info.ports] == [80]
    assert any("spec.ports[1].protocol" in m and "SCTP" in m for m in w)
    assert any("spec.ports[2].protocol" in m and "QUIC" in m for m in w)
    # only an SCTP port: nothing usable left, the whole service is rejected
    info, w = parse(svc(ports=[{"port": 90, "protocol": "SCTP"}]))
    assert info is None and any("spec.ports[0].protocol" in m for m in w)
    # The manager's warnings name namespace/name.
    from pycilium.agent.services.manager import ServiceManager

    mgr = ServiceManager(node_name="n1", bpf_root="/nonexistent")
    with caplog.at_level(logging.WARNING, logger="pycilium.services"):
        mgr.on_service(s)
    assert any("Service shop/cart" in r.getMessage() and "spec.ports[1].protocol" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_headless_external_name_and_ipv6_only_services_are_ignored() -> None:
    assert parse(svc(clusterIP="None"))[0] is None
    assert parse(svc(clusterIP="None", clusterIPs=["None"]))[0] is None
    assert parse(svc(type="ExternalName", externalName="example.com", clusterIP=""))[0] is None
    info, w = parse(svc(clusterIP="fd00::10", clusterIPs=["fd00::10"]))
    assert info is None and not w  # IPv6: silently not ours
    info, w = parse(svc(clusterIP="10.96.0.10", clusterIPs=["10.96.0.10", "fd00::10"]))
    assert info is not None and info.cluster_ips == ("10.96.0.10",) and not w


def test_node_port_frontend_is_address_zero() -> None:
    s = svc(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}])
    p = by_frontend(plan(s, eps(endpoints=[ep("10.0.1.1")])))
    np_ = p[("0.0.0.0", 30080, TCP)]
    assert np_.frontend.kind == "NodePort"
    assert np_.frontend.flags == SVC_FLAG_NODEPORT | SVC_FLAG_ROUTABLE
    assert np_.slots == p[("10.96.0.10", 80, TCP)].slots == (("10.0.1.1", 8080, TCP),)
    # a ClusterIP service never gets node ports even if the field is set
    assert ("0.0.0.0", 30080, TCP) not in by_frontend(
        plan(svc(ports=[{"name": "http", "port": 80, "nodePort": 30080}]))
    )


def test_load_balancer_ingress_ips_and_external_ips() -> None:
    s = svc(type="LoadBalancer", externalIPs=["192.0.2.7", "bogus", "192.0.2.7"],
            ports=[{"name": "http", "port": 80, "nodePort": 30080}],
            status={"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}, {"hostname": "lb.example.com"},
                                                 {"ip": "2001:db8::1"}]}})  # fmt: skip
    info, w = parse(s)
    assert info is not None
    assert info.lb_ips == ("198.51.100.1",) and info.external_ips == ("192.0.2.7",)
    assert any("spec.externalIPs[1]" in m for m in w)
    p = by_frontend(plan_service(info, [], "n1"))
    assert p[("198.51.100.1", 80, TCP)].frontend.flags == SVC_FLAG_LOADBALANCER | SVC_FLAG_ROUTABLE
    assert p[("192.0.2.7", 80, TCP)].frontend.flags == SVC_FLAG_EXTERNAL_IP | SVC_FLAG_ROUTABLE
    assert p[("0.0.0.0", 30080, TCP)].frontend.flags == SVC_FLAG_NODEPORT | SVC_FLAG_ROUTABLE
    assert p[("10.96.0.10", 80, TCP)].frontend.flags == SVC_FLAG_CLUSTERIP
    # allocateLoadBalancerNodePorts=false: no nodePort, no NodePort frontend
    s2 = svc(type="LoadBalancer", ports=[{"name": "http", "port": 80}])
    assert all(fp.frontend.kind != "NodePort" for fp in plan(s2).frontends)


def test_session_affinity_client_ip_default_and_custom_timeout() -> None:
    p = plan(svc(sessionAffinity="ClientIP"))
    (fp,) = p.frontends
    assert fp.frontend.flags == SVC_FLAG_CLUSTERIP | SVC_FLAG_AFFINITY
    assert fp.frontend.affinity_timeout == DEFAULT_AFFINITY_TIMEOUT == 10800
    p = plan(svc(type="NodePort", sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
                 ports=[{"name": "http", "port": 80, "nodePort": 30001}]))  # fmt: skip
    assert {fp.frontend.affinity_timeout for fp in p.frontends} == {60}
    assert all(fp.frontend.flags & SVC_FLAG_AFFINITY for fp in p.frontends)
    info, w = parse(
        svc(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": -1}})
    )
    assert info is not None and info.affinity_timeout == 10800 and any("timeoutSeconds" in m for m in w)
    info, _ = parse(svc(sessionAffinity="None"))
    assert info is not None and info.affinity_timeout == 0


def test_traffic_policies_local_first_and_local_count() -> None:
    s = svc(type="NodePort", externalTrafficPolicy="Local", internalTrafficPolicy="Local",
            ports=[{"name": "http", "port": 80, "nodePort": 30080}])  # fmt: skip
    sl = eps(
        endpoints=[ep("10.0.2.9", "n2"), ep("10.0.1.7", "n1"), ep("10.0.2.1", "n3"), ep("10.0.1.3", "n1")]
    )
    p = by_frontend(plan(s, sl, node="n1"))
    cip, nodeport = p[("10.96.0.10", 80, TCP)], p[("0.0.0.0", 30080, TCP)]
    expect = (
        ("10.0.1.3", 8080, TCP),
        ("10.0.1.7", 8080, TCP),
        ("10.0.2.1", 8080, TCP),
        ("10.0.2.9", 8080, TCP),
    )
    assert cip.slots == nodeport.slots == expect
    assert cip.local_count == nodeport.local_count == 2
    assert nodeport.frontend.flags & SVC_FLAG_EXT_LOCAL_SCOPE
    assert not cip.frontend.flags & SVC_FLAG_EXT_LOCAL_SCOPE  # eTP is about north-south frontends
    assert cip.frontend.flags2 == SVC_FLAG2_INT_LOCAL_SCOPE
    assert nodeport.frontend.flags2 == 0
    # no local backend: local_count 0 (the datapath drops north-south traffic)
    p = by_frontend(plan(s, sl, node="n9"))
    assert p[("0.0.0.0", 30080, TCP)].local_count == 0 and len(p[("0.0.0.0", 30080, TCP)].slots) == 4


def test_endpoint_conditions() -> None:
    sl = eps(endpoints=[
        ep("10.0.1.1", ready=True),
        ep("10.0.1.2"),  # no conditions: ready
        ep("10.0.1.3", ready=False, serving=True, terminating=True),  # draining
        ep("10.0.1.4", ready=False, serving=False, terminating=True),  # terminating, not serving
        ep("10.0.1.5", ready=False),  # not ready yet: no backend at all
    ])  # fmt: skip
    p = plan(svc(), sl)
    (fp,) = p.frontends
    assert fp.slots == (("10.0.1.1", 8080, TCP), ("10.0.1.2", 8080, TCP))
    assert fp.terminating == (("10.0.1.3", 8080, TCP), ("10.0.1.4", 8080, TCP))
    assert p.backends == {
        ("10.0.1.1", 8080, TCP): (True, "n2"),
        ("10.0.1.2", 8080, TCP): (True, "n2"),
        ("10.0.1.3", 8080, TCP): (False, "n2"),
        ("10.0.1.4", 8080, TCP): (False, "n2"),
    }


def test_serving_terminating_fill_the_slots_only_when_nothing_is_ready() -> None:
    sl = eps(endpoints=[
        ep("10.0.1.3", ready=False, serving=True, terminating=True),
        ep("10.0.1.4", ready=False, serving=False, terminating=True),
        ep("10.0.1.5", ready=False),
    ])  # fmt: skip
    p = plan(svc(), sl)
    (fp,) = p.frontends
    assert fp.slots == (("10.0.1.3", 8080, TCP),)
    assert fp.terminating == (("10.0.1.4", 8080, TCP),)
    assert all(not active for active, _ in p.backends.values())


def test_service_without_endpoints_has_frontends_with_no_slots() -> None:
    p = plan(svc(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080}]))
    assert len(p.frontends) == 2 and all(fp.slots == () and fp.local_count == 0 for fp in p.frontends)
    assert p.backends == {}


def test_duplicate_endpoint_across_slices_is_merged_preferring_ready() -> None:
    a = eps("web-a", endpoints=[ep("10.0.1.1", ready=False, serving=True, terminating=True)])
    b = eps("web-b", endpoints=[ep("10.0.1.1", ready=True), ep("10.0.1.2")])
    (fp,) = plan(svc(), a, b).frontends
    assert fp.slots == (("10.0.1.1", 8080, TCP), ("10.0.1.2", 8080, TCP))
    assert fp.terminating == ()


def test_ipv6_slices_and_unlabelled_slices_are_ignored() -> None:
    w = Warnings()
    assert parse_endpoint_slice(eps(address_type="IPv6", endpoints=[ep("fd00::1")]), w) is None
    unlabelled = eps(endpoints=[ep("10.0.1.1")])
    del unlabelled["metadata"]["labels"]
    assert parse_endpoint_slice(unlabelled, w) is None
    assert parse_endpoint_slice(eps(address_type="FQDN"), w) is None
    assert not w


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"kind": "Service", "metadata": {"name": "x", "namespace": "d"}}, "spec"),
        (svc(ports="80"), "spec.ports"),
        (svc(ports=[{"name": "a", "port": 0}]), "spec.ports[0].port"),
        (svc(ports=[{"name": "a", "port": "eighty"}]), "spec.ports[0].port"),
        (svc(ports=[{"name": "a", "port": 70000}]), "spec.ports[0].port"),
        (svc(ports=["x"]), "spec.ports[0]"),
        (svc(type="Weird"), "spec.type"),
        (svc(clusterIP="10.96.0.300", clusterIPs=["10.96.0.300"]), "spec.clusterIPs[0]"),
    ],
)
def test_bad_services_are_reported_with_the_field(bad: Obj, field: str) -> None:
    info, w = parse(bad)
    assert info is None
    assert any(m.startswith(field) for m in w), w


def test_bad_fields_are_skipped_but_the_rest_is_used() -> None:
    s = svc(ports=[{"name": "a", "port": 80, "nodePort": "x"}, {"name": "b", "port": 81}], type="NodePort")
    info, w = parse(s)
    assert info is not None and [(p.port, p.node_port) for p in info.ports] == [(80, 0), (81, 0)]
    assert any("spec.ports[0].nodePort" in m for m in w)
    sl = eps(ports=[{"name": "http", "port": 8080}, {"name": "x", "port": 99999}, {"name": "s", "port": 1,
             "protocol": "SCTP"}, "junk"],
             endpoints=[ep("10.0.1.1"), {"addresses": ["not-an-ip"]}, "junk", {"addresses": []},
                        {"addresses": ["10.0.1.2", "10.0.1.3"], "conditions": "junk"}])  # fmt: skip
    w = Warnings()
    info2 = parse_endpoint_slice(sl, w)
    assert info2 is not None
    assert [p.port for p in info2.ports] == [8080]
    assert [e.ip for e in info2.endpoints] == ["10.0.1.1", "10.0.1.2"]  # first address of each endpoint
    for fragment in (
        "ports[1].port",
        "ports[2].protocol",
        "ports[3]",
        "endpoints[1].addresses[0]",
        "endpoints[2]",
    ):
        assert any(fragment in m for m in w), (fragment, w)


def test_compact_transforms_keep_what_parsing_needs() -> None:
    full = svc(type="LoadBalancer", externalIPs=["192.0.2.7"], sessionAffinity="ClientIP",
               externalTrafficPolicy="Local", internalTrafficPolicy="Local", selector={"app": "web"},
               ports=[{"name": "http", "port": 80, "nodePort": 30080}],
               status={"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}})  # fmt: skip
    full["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    full["metadata"]["annotations"] = {"kubectl.kubernetes.io/last-applied-configuration": "{" * 1000}
    small = compact_service(copy.deepcopy(full))
    assert "managedFields" not in small["metadata"] and "annotations" not in small["metadata"]
    assert "selector" not in small["spec"]
    assert parse(small) == parse(full)
    sl = eps(endpoints=[{**ep("10.0.1.1", ready=True), "targetRef": {"kind": "Pod", "name": "p"},
                         "zone": "a", "hints": {}}])  # fmt: skip
    sl["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] = "controller"
    small_sl = compact_endpoint_slice(copy.deepcopy(sl))
    assert "targetRef" not in small_sl["endpoints"][0]
    assert small_sl["metadata"]["labels"] == {"kubernetes.io/service-name": "web"}
    assert parse_endpoint_slice(small_sl, Warnings()) == parse_endpoint_slice(sl, Warnings())


def test_flags_match_the_header() -> None:
    assert SVC_FLAG_NODEPORT == d("SVC_FLAG_NODEPORT") == 0x02
    assert SVC_FLAG_AFFINITY == 0x10 and SVC_FLAG2_INT_LOCAL_SCOPE == 0x01
