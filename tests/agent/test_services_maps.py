"""The service manager against real pinned maps: every entry, the write order, restarts, CT purge,
audit repairs. Each test has its own bpffs directory (pin_root)."""

from __future__ import annotations

import os
import socket
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pycilium.agent.services import LBMaps, ServiceManager
from pycilium.agent.services.lbmaps import AFFINITY_MATCH, BACKENDS, MAGLEV, REVERSE_NAT, SERVICES
from pycilium.bpf import loader
from pycilium.bpf.maps import PinnedMap, ctmap, lbmap, natmap
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.util import be16_to_port, be32_to_ip, ip_to_be32, port_to_be16

pytestmark = pytest.mark.kernel

Obj = dict[str, Any]
TCP, UDP = 6, 17


# --- helpers --------------------------------------------------------------------------------------


def make_maps(root: str) -> None:
    sizes = loader.sizes_from_config(None)
    sizes.update(
        {"CT_MAP_SIZE_TCP": 4096, "CT_MAP_SIZE_ANY": 4096, "NAT_MAP_SIZE": 4096, "LB_MAP_SIZE": 65536}
    )
    for fd in loader.open_pinned_maps(root, sizes).values():
        os.close(fd)


@pytest.fixture
def root(pin_root: str) -> str:
    make_maps(pin_root)
    return pin_root


class RecordingMaps(LBMaps):
    """LBMaps that records every write: (op, map, [keys])."""

    def __init__(self, bpf_root: str) -> None:
        super().__init__(bpf_root)
        self.log: list[tuple[str, str, list[bytes]]] = []

    def update(self, name: str, keys: Any, values: Any) -> None:
        if keys:
            self.log.append(("update", name, list(keys)))
        super().update(name, keys, values)

    def delete(self, name: str, keys: Any) -> int:
        if keys:
            self.log.append(("delete", name, list(keys)))
        return super().delete(name, keys)


def manager(root: str, node: str = "n1", **kw: Any) -> ServiceManager:
    kw.setdefault("registry", CollectorRegistry())
    return ServiceManager(node_name=node, bpf_root=root, **kw)


def svc(name: str = "web", ns: str = "default", **spec: Any) -> Obj:
    spec.setdefault("clusterIP", "10.96.0.10")
    spec.setdefault("ports", [{"name": "http", "port": 80, "protocol": "TCP"}])
    status = spec.pop("status", None)
    o: Obj = {"metadata": {"name": name, "namespace": ns}, "spec": spec}
    if status:
        o["status"] = status
    return o


def ep(ip: str, node: str = "n2", **conds: Any) -> Obj:
    return {"addresses": [ip], "nodeName": node, "conditions": conds or {"ready": True}}


def eps(endpoints: list[Obj], name: str = "web-1", service: str = "web", port: int = 8080,
        proto: str = "TCP", pname: str = "http") -> Obj:  # fmt: skip
    return {
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": pname, "port": port, "protocol": proto}],
        "endpoints": endpoints,
    }


def lb_key(ip: str, port: int, proto: int, slot: int) -> lbmap.Lb4Key:
    return lbmap.Lb4Key(address=ip_to_be32(ip), dport=port_to_be16(port), backend_slot=slot, proto=proto)


def dump_services(root: str) -> dict[tuple[str, int, int, int], tuple[int, int, int, int, int, int]]:
    with PinnedMap(lbmap.SERVICES, root) as m:
        return {(be32_to_ip(k.address), be16_to_port(k.dport), k.proto, k.backend_slot):
                (v.backend_id, v.count, v.rev_nat_index, v.flags, v.flags2, v.local_count)
                for k, v in m.items()}  # fmt: skip


def dump_backends(root: str) -> dict[int, tuple[str, int, int, int, str]]:
    with PinnedMap(lbmap.BACKENDS, root) as m:
        return {k.backend_id: (be32_to_ip(v.address), be16_to_port(v.port), v.proto, v.flags, be32_to_ip(v.node_ip))
                for k, v in m.items()}  # fmt: skip


def dump_revnat(root: str) -> dict[int, tuple[str, int]]:
    with PinnedMap(lbmap.REVERSE_NAT, root) as m:
        return {k.rev_nat_index: (be32_to_ip(v.address), be16_to_port(v.port)) for k, v in m.items()}


def dump_affinity_match(root: str) -> set[tuple[int, int]]:
    with PinnedMap(lbmap.AFFINITY_MATCH, root) as m:
        return {(k.backend_id, k.rev_nat_index) for k, _ in m.items()}


def backend_ids(root: str) -> dict[tuple[str, int, int], int]:
    return {(ip, port, proto): bid for bid, (ip, port, proto, _s, _n) in dump_backends(root).items()}


class Source:
    """Stands in for a reflector: only its `synced` event matters to the manager."""

    def __init__(self) -> None:
        self.synced = threading.Event()


SVC_FLAG_CLUSTERIP = d("SVC_FLAG_CLUSTERIP")
SVC_FLAG_NODEPORT = d("SVC_FLAG_NODEPORT")
SVC_FLAG_ROUTABLE = d("SVC_FLAG_ROUTABLE")
SVC_FLAG_AFFINITY = d("SVC_FLAG_AFFINITY")
SVC_FLAG_LOADBALANCER = d("SVC_FLAG_LOADBALANCER")
SVC_FLAG_EXTERNAL_IP = d("SVC_FLAG_EXTERNAL_IP")
SVC_FLAG_EXT_LOCAL_SCOPE = d("SVC_FLAG_EXT_LOCAL_SCOPE")
SVC_FLAG2_INT_LOCAL_SCOPE = d("SVC_FLAG2_INT_LOCAL_SCOPE")
BE_ACTIVE = d("BE_STATE_ACTIVE")
BE_TERMINATING = d("BE_STATE_TERMINATING")


@pytest.fixture
def mgr(root: str) -> Iterator[ServiceManager]:
    m = manager(root, node_ip_of={"n1": "192.168.1.1", "n2": "192.168.1.2"}.get)
    m.start()
    assert m.flush(5)
    yield m
    m.stop()


# --- tests ----------------------------------------------------------------------------------------


def test_every_entry_of_a_full_featured_service(root: str, mgr: ServiceManager) -> None:
    mgr.on_service(svc(type="LoadBalancer", externalIPs=["192.0.2.7"], sessionAffinity="ClientIP",
                       sessionAffinityConfig={"clientIP": {"timeoutSeconds": 300}}, externalTrafficPolicy="Local",
                       internalTrafficPolicy="Local", ports=[{"name": "http", "port": 80, "nodePort": 30080}],
                       status={"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}))  # fmt: skip
    mgr.on_endpoint_slice(eps([ep("10.0.2.5", "n2"), ep("10.0.1.5", "n1"),
                               ep("10.0.1.9", "n1", ready=False, serving=True, terminating=True)]))  # fmt: skip
    assert mgr.flush(5)
    ids = backend_ids(root)
    b_local, b_remote, b_term = (
        ids[("10.0.1.5", 8080, TCP)],
        ids[("10.0.2.5", 8080, TCP)],
        ids[("10.0.1.9", 8080, TCP)],
    )
    assert dump_backends(root) == {
        b_local: ("10.0.1.5", 8080, TCP, BE_ACTIVE, "192.168.1.1"),
        b_remote: ("10.0.2.5", 8080, TCP, BE_ACTIVE, "192.168.1.2"),
        b_term: ("10.0.1.9", 8080, TCP, BE_TERMINATING, "192.168.1.1"),
    }
    services = dump_services(root)
    revnat = dump_revnat(root)
    routable = SVC_FLAG_ROUTABLE | SVC_FLAG_AFFINITY | SVC_FLAG_EXT_LOCAL_SCOPE
    expect_fe = {
        ("10.96.0.10", 80): (SVC_FLAG_CLUSTERIP | SVC_FLAG_AFFINITY, SVC_FLAG2_INT_LOCAL_SCOPE),
        ("0.0.0.0", 30080): (SVC_FLAG_NODEPORT | routable, 0),
        ("198.51.100.1", 80): (SVC_FLAG_LOADBALANCER | routable, 0),
        ("192.0.2.7", 80): (SVC_FLAG_EXTERNAL_IP | routable, 0),
    }
    rev_nats = set()
    expected_services = {}
    for (ip, port), (flags, flags2) in expect_fe.items():
        slot0 = services[(ip, port, TCP, 0)]
        rn = slot0[2]
        rev_nats.add(rn)
        expected_services[(ip, port, TCP, 0)] = (300, 2, rn, flags, flags2, 1)
        expected_services[(ip, port, TCP, 1)] = (b_local, 0, rn, 0, 0, 0)  # local first
        expected_services[(ip, port, TCP, 2)] = (b_remote, 0, rn, 0, 0, 0)
        assert revnat[rn] == (ip, port)
    assert services == expected_services
    assert len(rev_nats) == 4 and set(revnat) == rev_nats
    assert dump_affinity_match(root) == {(b, rn) for rn in rev_nats for b in (b_local, b_remote)}
    # the query API agrees
    views = {v.frontend: v for v in mgr.list_services()}
    assert set(views) == {"10.96.0.10:80/TCP", "0.0.0.0:30080/TCP", "198.51.100.1:80/TCP", "192.0.2.7:80/TCP"}
    v = views["0.0.0.0:30080/TCP"]
    assert (v.type, v.namespace, v.name, v.count, v.local_count, v.affinity_timeout) == (
        "NodePort", "default", "web", 2, 1, 300)  # fmt: skip
    assert [(b.endpoint, b.state, b.in_slots, b.local) for b in v.backends] == [
        ("10.0.1.5:8080/TCP", "active", True, True),
        ("10.0.2.5:8080/TCP", "active", True, False),
        ("10.0.1.9:8080/TCP", "terminating", False, False),
    ]
    assert mgr.audit() == 0


def test_udp_service_without_endpoints_has_count_zero(root: str, mgr: ServiceManager) -> None:
    mgr.on_service(
        svc(name="dns", clusterIP="10.96.0.53", ports=[{"name": "dns", "port": 53, "protocol": "UDP"}])
    )
    assert mgr.flush(5)
    services = dump_services(root)
    (key,) = services
    assert key == ("10.96.0.53", 53, UDP, 0)
    assert services[key][1] == 0 and services[key][3] == SVC_FLAG_CLUSTERIP
    assert dump_backends(root) == {}


def test_write_order_add_scale_and_delete(root: str) -> None:
    maps = RecordingMaps(root)
    m = manager(root, maps=maps)
    m.start()
    try:
        assert m.flush(5)
        m.on_service(svc(sessionAffinity="ClientIP"))
        m.on_endpoint_slice(eps([ep("10.0.1.1"), ep("10.0.1.2"), ep("10.0.1.3")]))
        maps.log.clear()
        assert m.flush(5)
        ops = [(op, name, {int.from_bytes(k[6:8], "little") for k in keys} if name == SERVICES else None)
               for op, name, keys in maps.log]  # fmt: skip
        assert ops == [
            ("update", BACKENDS, None),
            ("update", SERVICES, {1, 2, 3}),  # slots first
            ("update", REVERSE_NAT, None),
            ("update", AFFINITY_MATCH, None),
            ("update", SERVICES, {0}),  # the frontend last
        ]
        # Scale down to one backend: frontend first, then slots beyond the count, then backends.
        maps.log.clear()
        m.on_endpoint_slice(eps([ep("10.0.1.2")]))
        assert m.flush(5)
        names = [(op, name) for op, name, _ in maps.log]
        assert (
            names.index(("update", SERVICES))
            < names.index(("delete", SERVICES))
            < names.index(("delete", BACKENDS))
        )
        assert names.index(("delete", AFFINITY_MATCH)) < names.index(("delete", BACKENDS))
        deleted_slots = {int.from_bytes(k[6:8], "little") for op, n, keys in maps.log if op == "delete" and n == SERVICES
                         for k in keys}  # fmt: skip
        assert deleted_slots == {2, 3}
        services = dump_services(root)
        assert services[("10.96.0.10", 80, TCP, 0)][1] == 1
        assert set(backend_ids(root)) == {("10.0.1.2", 8080, TCP)}
        # Scale up again: only what changed is written; the unchanged slot 1 is not rewritten.
        maps.log.clear()
        m.on_endpoint_slice(eps([ep("10.0.1.2"), ep("10.0.1.4")]))
        assert m.flush(5)
        slot_writes = [k for op, n, keys in maps.log if op == "update" and n == SERVICES for k in keys]
        assert sorted(int.from_bytes(k[6:8], "little") for k in slot_writes) == [0, 2]
        # Delete the service: slot 0, then slots, reverse NAT, affinity match, backends.
        maps.log.clear()
        m.on_service_deleted(svc())
        assert m.flush(5)
        seq = [(op, name) for op, name, _ in maps.log]
        assert seq == [("delete", SERVICES), ("delete", SERVICES), ("delete", REVERSE_NAT),
                       ("delete", AFFINITY_MATCH), ("delete", BACKENDS)]  # fmt: skip
        first = maps.log[0][2]
        assert {int.from_bytes(k[6:8], "little") for k in first} == {0}
        assert dump_services(root) == {} and dump_backends(root) == {} and dump_revnat(root) == {}
        assert dump_affinity_match(root) == set()
    finally:
        m.stop()
        maps.close()


def test_terminating_backend_leaves_slots_but_stays_until_gone(root: str, mgr: ServiceManager) -> None:
    mgr.on_service(svc())
    mgr.on_endpoint_slice(eps([ep("10.0.1.1"), ep("10.0.1.2")]))
    assert mgr.flush(5)
    ids = backend_ids(root)
    mgr.on_endpoint_slice(eps([ep("10.0.1.1"), ep("10.0.1.2", ready=False, serving=True, terminating=True)]))
    assert mgr.flush(5)
    assert backend_ids(root) == ids  # same ids
    assert dump_backends(root)[ids[("10.0.1.2", 8080, TCP)]][3] == BE_TERMINATING
    s = dump_services(root)
    assert s[("10.96.0.10", 80, TCP, 0)][1] == 1 and ("10.96.0.10", 80, TCP, 2) not in s
    # the last ready one goes: the serving-terminating one fills the slot
    mgr.on_endpoint_slice(eps([ep("10.0.1.2", ready=False, serving=True, terminating=True)]))
    assert mgr.flush(5)
    s = dump_services(root)
    assert s[("10.96.0.10", 80, TCP, 0)][1] == 1
    assert s[("10.96.0.10", 80, TCP, 1)][0] == ids[("10.0.1.2", 8080, TCP)]
    mgr.on_endpoint_slice(eps([]))
    assert mgr.flush(5)
    assert dump_backends(root) == {} and dump_services(root)[("10.96.0.10", 80, TCP, 0)][1] == 0


def _ct_key(saddr: str, daddr: str, sport: int, dport: int, proto: int, flags: int) -> ctmap.Ct4Key:
    return ctmap.Ct4Key(saddr=ip_to_be32(saddr), daddr=ip_to_be32(daddr), sport=port_to_be16(sport),
                        dport=port_to_be16(dport), nexthdr=proto, flags=flags)  # fmt: skip


def test_removed_backend_conntrack_nat_and_affinity_are_purged(root: str, mgr: ServiceManager) -> None:
    mgr.on_service(svc(name="dns", clusterIP="10.96.0.53", sessionAffinity="ClientIP",
                       ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]))  # fmt: skip
    mgr.on_endpoint_slice(eps([ep("10.0.1.1"), ep("10.0.1.2")], name="dns-1", service="dns", port=5353,
                              proto="UDP", pname="dns"))  # fmt: skip
    assert mgr.flush(5)
    ids = backend_ids(root)
    gone, kept = ids[("10.0.1.1", 5353, UDP)], ids[("10.0.1.2", 5353, UDP)]
    rn = dump_services(root)[("10.96.0.53", 53, UDP, 0)][2]
    svc_dir, out_dir, in_dir = d("CT_DIR_SVC"), d("CT_DIR_OUT"), d("CT_DIR_IN")
    entries = {
        "svc-gone": (_ct_key("10.0.0.9", "10.96.0.53", 40000, 53, UDP, svc_dir), gone),
        "svc-kept": (_ct_key("10.0.0.9", "10.96.0.53", 40001, 53, UDP, svc_dir), kept),
        "out-gone": (_ct_key("10.0.0.9", "10.0.1.1", 40000, 5353, UDP, out_dir), 0),
        "in-gone": (_ct_key("10.0.0.9", "10.0.1.1", 40000, 5353, UDP, in_dir), 0),
        "out-kept": (_ct_key("10.0.0.9", "10.0.1.2", 40001, 5353, UDP, out_dir), 0),
        "other-port": (_ct_key("10.0.0.9", "10.0.1.1", 40002, 9999, UDP, out_dir), 0),
    }
    with PinnedMap(ctmap.CT_ANY4_GLOBAL, root) as ct:
        for k, bid in entries.values():
            ct.update(k, ctmap.CtEntry(backend_id=bid, rev_nat_index=rn, lifetime=999999))
    with PinnedMap(ctmap.CT4_GLOBAL, root) as ct_tcp:  # a TCP flow to the same address: untouched
        ct_tcp.update(_ct_key("10.0.0.9", "10.0.1.1", 40000, 5353, TCP, out_dir), ctmap.CtEntry(lifetime=1))
    with PinnedMap(natmap.SNAT_V4_EXTERNAL, root) as nat:
        nat.update(_ct_key("192.168.1.1", "10.0.1.1", 61000, 5353, UDP, 0), natmap.Nat4Entry(created=1))
        nat.update(_ct_key("10.0.1.1", "192.168.1.1", 5353, 61000, UDP, 1), natmap.Nat4Entry(created=1))
        nat.update(_ct_key("192.168.1.1", "10.0.1.2", 61001, 5353, UDP, 0), natmap.Nat4Entry(created=1))
    with PinnedMap(lbmap.AFFINITY, root) as aff:
        aff.update(lbmap.Lb4AffinityKey(client_ip=ip_to_be32("10.0.0.9"), rev_nat_index=rn),
                   lbmap.LbAffinityVal(last_used=1, backend_id=gone))  # fmt: skip
        aff.update(lbmap.Lb4AffinityKey(client_ip=ip_to_be32("10.0.0.8"), rev_nat_index=rn),
                   lbmap.LbAffinityVal(last_used=1, backend_id=kept))  # fmt: skip

    mgr.on_endpoint_slice(
        eps([ep("10.0.1.2")], name="dns-1", service="dns", port=5353, proto="UDP", pname="dns")
    )
    assert mgr.flush(5)

    with PinnedMap(ctmap.CT_ANY4_GLOBAL, root) as ct:
        left = {bytes(k) for k, _ in ct.items()}
    assert left == {bytes(entries[n][0]) for n in ("svc-kept", "out-kept", "other-port")}
    with PinnedMap(ctmap.CT4_GLOBAL, root) as ct_tcp:
        assert ct_tcp.count() == 1
    with PinnedMap(natmap.SNAT_V4_EXTERNAL, root) as nat:
        assert [be32_to_ip(k.daddr) for k, _ in nat.items()] == ["10.0.1.2"]
    with PinnedMap(lbmap.AFFINITY, root) as aff:
        assert [v.backend_id for _, v in aff.items()] == [kept]
    assert dump_affinity_match(root) == {(kept, rn)}


def test_restart_keeps_ids_and_deletes_stale_only_after_the_first_full_sync(root: str) -> None:
    m1 = manager(root)
    m1.start()
    assert m1.flush(5)
    for name, ip in (("a", "10.96.0.1"), ("b", "10.96.0.2")):
        m1.on_service(svc(name=name, clusterIP=ip))
        m1.on_endpoint_slice(eps([ep("10.0.1.1"), ep(f"10.0.2.{ip[-1]}")], name=f"{name}-1", service=name))
    assert m1.flush(5)
    before_services, before_backends = dump_services(root), dump_backends(root)
    before_revnat = dump_revnat(root)
    m1.stop()

    # A duplicate id for a backend that already has one (left by an interrupted write).
    with PinnedMap(lbmap.BACKENDS, root) as b:
        b.update(lbmap.Lb4BackendKey(backend_id=500), lbmap.Lb4Backend(address=ip_to_be32("10.0.1.1"),
                 port=port_to_be16(8080), proto=TCP))  # fmt: skip
    before_backends = dump_backends(root)
    # Restart: service b was deleted meanwhile, a has a new endpoint.
    svc_src, eps_src = Source(), Source()
    m2 = manager(root)
    m2.start([svc_src, eps_src])
    m2.on_service(svc(name="a", clusterIP="10.96.0.1"))
    m2.on_endpoint_slice(eps([ep("10.0.1.1"), ep("10.0.2.1"), ep("10.0.3.1")], name="a-1", service="a"))
    svc_src.synced.set()  # services listed, endpoint slices not yet
    assert not m2.flush(0.3)
    assert dump_services(root) == before_services and dump_backends(root) == before_backends
    eps_src.synced.set()
    assert m2.flush(5)
    after = dump_services(root)
    # a's frontend kept its rev_nat_index and backend ids; b is gone
    assert after[("10.96.0.1", 80, TCP, 0)][2] == before_services[("10.96.0.1", 80, TCP, 0)][2]
    assert not any(k[0] == "10.96.0.2" for k in after)
    ids_before = {v[:3]: k for k, v in before_backends.items() if k != 500}
    ids_after = backend_ids(root)
    assert ids_after[("10.0.1.1", 8080, TCP)] == ids_before[("10.0.1.1", 8080, TCP)]
    assert ids_after[("10.0.2.1", 8080, TCP)] == ids_before[("10.0.2.1", 8080, TCP)]
    assert ("10.0.2.2", 8080, TCP) not in ids_after and ("10.0.3.1", 8080, TCP) in ids_after
    assert 500 not in dump_backends(root) and len(dump_backends(root)) == 3
    rn_b = before_services[("10.96.0.2", 80, TCP, 0)][2]
    assert rn_b not in dump_revnat(root) and set(dump_revnat(root)) == set(before_revnat) - {rn_b}
    # a new frontend never reuses b's index right away
    m2.on_service(svc(name="c", clusterIP="10.96.0.3"))
    assert m2.flush(5)
    assert dump_services(root)[("10.96.0.3", 80, TCP, 0)][2] not in before_revnat
    assert m2.audit() == 0
    m2.stop()


def test_restart_with_state_dir_keeps_rev_nat_when_maps_were_lost(root: str, tmp_path: Any) -> None:
    m1 = manager(root, state_dir=str(tmp_path))
    m1.start()
    for i in range(3):
        m1.on_service(svc(name=f"s{i}", clusterIP=f"10.96.1.{i}"))
    assert m1.flush(5)
    rns = {k[0]: v[2] for k, v in dump_services(root).items()}
    m1.stop()
    assert (tmp_path / "lb-revnat.json").exists()
    with PinnedMap(lbmap.SERVICES, root) as m:  # the lb maps were recreated (e.g. a layout change)
        m.clear()
    with PinnedMap(lbmap.REVERSE_NAT, root) as m:
        m.clear()
    m2 = manager(root, state_dir=str(tmp_path))
    m2.start([types.SimpleNamespace(synced=threading.Event())])
    for i in (2, 0, 1):
        m2.on_service(svc(name=f"s{i}", clusterIP=f"10.96.1.{i}"))
    m2._sources[0].synced.set()  # type: ignore[attr-defined]
    assert m2.flush(5)
    assert {k[0]: v[2] for k, v in dump_services(root).items()} == rns
    m2.stop()


def test_audit_repairs_drift_and_counts_it(root: str) -> None:
    reg = CollectorRegistry()
    m = manager(root, registry=reg, audit_interval=3600)
    m.start()
    try:
        m.on_service(svc(sessionAffinity="ClientIP"))
        m.on_endpoint_slice(eps([ep("10.0.1.1"), ep("10.0.1.2")]))
        assert m.flush(5)
        good_s, good_b, good_r = dump_services(root), dump_backends(root), dump_revnat(root)
        good_a = dump_affinity_match(root)
        bid = next(iter(good_b))
        with PinnedMap(lbmap.SERVICES, root) as s:
            s.delete(lb_key("10.96.0.10", 80, TCP, 2))  # lost slot
            s.update(lb_key("10.96.0.99", 80, TCP, 0), lbmap.Lb4Service(count=0))  # foreign frontend
        with PinnedMap(lbmap.BACKENDS, root) as b:
            b.update(lbmap.Lb4BackendKey(backend_id=bid), lbmap.Lb4Backend(address=ip_to_be32("1.2.3.4")))
            b.update(lbmap.Lb4BackendKey(backend_id=999), lbmap.Lb4Backend(address=ip_to_be32("1.2.3.5")))
        with PinnedMap(lbmap.REVERSE_NAT, root) as r:
            r.clear()
        with PinnedMap(lbmap.AFFINITY_MATCH, root) as a:
            a.clear()
        assert m.audit() == 2 + 2 + 1 + 2
        assert dump_services(root) == good_s and dump_backends(root) == good_b
        assert dump_revnat(root) == good_r and dump_affinity_match(root) == good_a
        assert m.audit() == 0
        total = sum(reg.get_sample_value("pycilium_datapath_drift_repairs_total", {"map": n}) or 0
                    for n in (SERVICES, BACKENDS, REVERSE_NAT, AFFINITY_MATCH))  # fmt: skip
        assert total == 7
        assert (
            reg.get_sample_value("pycilium_services_sync_duration_seconds_count", {"mode": "incremental"})
            or 0
        ) >= 1
        end = time.monotonic() + 3  # gauges are refreshed at most once a second
        while (
            reg.get_sample_value("pycilium_services", {"type": "ClusterIP"}) != 1 and time.monotonic() < end
        ):
            time.sleep(0.05)
        assert reg.get_sample_value("pycilium_services", {"type": "ClusterIP"}) == 1
    finally:
        m.stop()


def test_frontend_conflict_between_services_is_resolved_when_the_owner_leaves(
    root: str, mgr: ServiceManager
) -> None:
    mgr.on_service(svc(name="a", clusterIP="10.96.0.1", externalIPs=["192.0.2.1"]))
    assert mgr.flush(5)
    mgr.on_service(svc(name="b", clusterIP="10.96.0.2", externalIPs=["192.0.2.1"]))
    assert mgr.flush(5)
    owners = {v.frontend: v.name for v in mgr.list_services()}
    assert owners["192.0.2.1:80/TCP"] == "a"
    mgr.on_service_deleted(svc(name="a"))
    assert mgr.flush(5)
    assert mgr.flush(5)
    owners = {v.frontend: v.name for v in mgr.list_services()}
    assert owners == {"10.96.0.2:80/TCP": "b", "192.0.2.1:80/TCP": "b"}


def test_struct_encoding_matches_the_ctypes_mirrors() -> None:
    from pycilium.agent.services import lbmaps

    k = lbmaps.svc_key(("10.1.2.3", 8080, TCP), 5)
    ref = lb_key("10.1.2.3", 8080, TCP, 5)
    assert k == bytes(ref)
    v = lbmaps.svc_value(7, 3, 9, 0x12, 0x01, 2)
    assert v == bytes(
        lbmap.Lb4Service(backend_id=7, count=3, rev_nat_index=9, flags=0x12, flags2=1, local_count=2)
    )
    b = lbmaps.backend_value(("10.0.0.1", 443, TCP), BE_TERMINATING, "192.168.1.9")
    assert b == bytes(lbmap.Lb4Backend(address=ip_to_be32("10.0.0.1"), port=port_to_be16(443), proto=TCP,
                                       flags=BE_TERMINATING, node_ip=ip_to_be32("192.168.1.9")))  # fmt: skip
    assert lbmaps.revnat_value(("10.0.0.1", 53, UDP)) == bytes(
        lbmap.Lb4ReverseNat(address=ip_to_be32("10.0.0.1"), port=port_to_be16(53)))  # fmt: skip
    assert lbmaps.affinity_match_key(5, 6) == bytes(lbmap.LbAffinityMatch(backend_id=5, rev_nat_index=6))
    assert socket.inet_ntoa(k[:4]) == "10.1.2.3"


def test_failed_map_write_is_repaired_by_the_audit(root: str) -> None:
    class FlakyMaps(LBMaps):
        fail_next = 0

        def update(self, name: str, keys: Any, values: Any) -> None:
            if name == SERVICES and keys and self.fail_next:
                self.fail_next -= 1
                raise OSError(28, "No space left on device (injected)")
            super().update(name, keys, values)

    maps = FlakyMaps(root)
    m = manager(root, maps=maps, audit_interval=3600)
    m.start()
    try:
        assert m.flush(5)
        maps.fail_next = 1
        m.on_service(svc())
        m.on_endpoint_slice(eps([ep("10.0.1.1")]))
        end = time.monotonic() + 5
        while time.monotonic() < end and ("10.96.0.10", 80, TCP, 0) not in dump_services(root):
            time.sleep(0.05)
        services = dump_services(root)
        assert services[("10.96.0.10", 80, TCP, 0)][1] == 1 and ("10.96.0.10", 80, TCP, 1) in services
        assert "No space left" in m.last_error
        assert m.audit() == 0
    finally:
        m.stop()
        maps.close()


def test_node_address_change_updates_backend_node_ip(root: str) -> None:
    ips = {"n1": "192.168.1.1", "n2": "192.168.1.2"}
    m = manager(root, node_ip_of=ips.get)
    m.start()
    try:
        m.on_service(svc())
        m.on_service(svc(name="other", clusterIP="10.96.0.11"))
        m.on_endpoint_slice(eps([ep("10.0.1.1", "n1"), ep("10.0.2.1", "n2")]))
        m.on_endpoint_slice(eps([ep("10.0.1.9", "n1")], name="other-1", service="other"))
        assert m.flush(5)
        assert {v[0]: v[4] for v in dump_backends(root).values()} == {
            "10.0.1.1": "192.168.1.1", "10.0.2.1": "192.168.1.2", "10.0.1.9": "192.168.1.1"}  # fmt: skip
        ips["n2"] = "192.168.1.22"
        cycles = m.cycles
        m.nodes_changed({"n2"})
        assert m.flush(5)
        assert {v[0]: v[4] for v in dump_backends(root).values()}["10.0.2.1"] == "192.168.1.22"
        assert m.cycles == cycles + 1
    finally:
        m.stop()


def dump_maglev(root: str) -> dict[tuple[int, int], tuple[int, ...]]:
    with PinnedMap(lbmap.MAGLEV, root) as m:
        return {(k.rev_nat_index, k.chunk): tuple(v.backend_ids) for k, v in m.items()}


def test_audit_repairs_maglev_tables_and_counts_it(root: str) -> None:
    reg = CollectorRegistry()
    maps = RecordingMaps(root)
    m = manager(
        root, registry=reg, maps=maps, audit_interval=3600, lb_algorithm="maglev", maglev_table_size=251
    )
    m.start()
    try:
        m.on_service(
            svc(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}])
        )
        m.on_endpoint_slice(eps([ep("10.0.1.1"), ep("10.0.1.2"), ep("10.0.1.3")]))
        assert m.flush(5)
        good = dump_maglev(root)
        rn = {v.type: v.id for v in m.list_services()}["NodePort"]
        n_chunks = (251 + lbmap.LB_MAGLEV_CHUNK - 1) // lbmap.LB_MAGLEV_CHUNK
        assert set(good) == {(rn, c) for c in range(n_chunks)}
        assert m.audit() == 0
        with PinnedMap(lbmap.MAGLEV, root) as mg:
            mg.delete(lbmap.Lb4MaglevKey(rn, 0))  # a lost chunk
            altered = lbmap.Lb4MaglevChunk()
            altered.backend_ids[:] = [v ^ 1 for v in good[(rn, 1)]]
            mg.update(lbmap.Lb4MaglevKey(rn, 1), altered)  # an altered chunk
            mg.update(lbmap.Lb4MaglevKey(rn, n_chunks), lbmap.Lb4MaglevChunk())  # beyond the table
            mg.update(lbmap.Lb4MaglevKey(rn + 100, 0), lbmap.Lb4MaglevChunk())  # no such frontend
        # a Maglev frontend's slot 0 is gone too: its table is rewritten before the frontend is
        with PinnedMap(lbmap.SERVICES, root) as s:
            s.delete(lb_key("0.0.0.0", 30080, TCP, 0))
        maps.log.clear()
        assert m.audit() == 2 + 2 + 1
        assert dump_maglev(root) == good
        writes = [(op, name) for op, name, _ in maps.log]
        assert writes == [("update", MAGLEV), ("update", SERVICES), ("delete", MAGLEV)]
        assert reg.get_sample_value("pycilium_datapath_drift_repairs_total", {"map": MAGLEV}) == 4
        assert reg.get_sample_value("pycilium_datapath_drift_repairs_total", {"map": SERVICES}) == 1
        assert m.audit() == 0

        # the service goes; its table is deleted. Chunks left behind (a lost delete) are stale.
        m.on_service_deleted(svc(type="NodePort"))
        assert m.flush(5)
        assert dump_maglev(root) == {}
        with PinnedMap(lbmap.MAGLEV, root) as mg:
            for (r, c), ids in good.items():
                v = lbmap.Lb4MaglevChunk()
                v.backend_ids[:] = ids
                mg.update(lbmap.Lb4MaglevKey(r, c), v)
        assert m.audit() == n_chunks
        assert dump_maglev(root) == {}
        assert reg.get_sample_value("pycilium_datapath_drift_repairs_total", {"map": MAGLEV}) == 4 + n_chunks
        assert m.audit() == 0
    finally:
        m.stop()
        maps.close()
