"""Maglev: the table (balance, determinism, minimal disruption), the service manager writing it for
north-south frontends only, and the host program choosing exactly table[hash % M] for NodePort
traffic, so every node picks the same backend for a flow."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from pycilium.agent.services import ServiceManager
from pycilium.agent.services.lbmaps import MAGLEV, maglev_entries
from pycilium.agent.services.maglev import backend_table, flow_hash, is_prime, table
from pycilium.bpf import loader, progtest
from pycilium.bpf import syscall as sc
from pycilium.bpf.maps import BY_NAME, PinnedMap
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.lbmap import LB_MAGLEV_CHUNK, Lb4Key
from pycilium.bpf.maps.util import ip_to_be32, port_to_be16
from pycilium.lab.mapwriter import Maps
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from tests.agent.test_services_maps import ep, eps, make_maps, svc

M = 251


def test_table_is_balanced_and_deterministic() -> None:
    names = tuple(f"10.0.0.{i}:80/6" for i in range(7))
    t = table(names, 16381)
    counts = Counter(t)
    assert len(t) == 16381 and set(counts) == set(range(7))
    assert max(counts.values()) - min(counts.values()) <= 1
    table.cache_clear()
    assert table(names, 16381) == t


def test_removing_a_backend_only_moves_its_flows() -> None:
    be = [(f"10.0.0.{i}", 80, 6) for i in range(5)]
    before = backend_table(be, [1, 2, 3, 4, 5], 16381)
    after = backend_table(be[:2] + be[3:], [1, 2, 4, 5], 16381)
    moved = sum(1 for a, b in zip(before, after, strict=True) if a != b and a != 3)
    assert moved / 16381 < 0.01  # Maglev keeps disruption minimal (the paper: near 0)


def test_table_does_not_depend_on_backend_order_or_ids() -> None:
    be = [("10.0.0.1", 80, 6), ("10.0.0.2", 80, 6), ("10.0.0.3", 80, 6)]
    a = backend_table(be, [11, 12, 13], M)
    b = backend_table(list(reversed(be)), [23, 22, 21], M)
    assert [{11: 1, 12: 2, 13: 3}[x] for x in a] == [{21: 1, 22: 2, 23: 3}[x] for x in b]


def test_prime_check() -> None:
    assert is_prime(16381) and is_prime(251) and not is_prime(16383)
    with pytest.raises(ValueError, match="prime"):
        table(("a",), 1000)


@pytest.fixture
def root(pin_root: str) -> str:
    make_maps(pin_root)
    return pin_root


def _chunks(root: str) -> dict[tuple[int, int], list[int]]:
    with PinnedMap(BY_NAME[MAGLEV], root) as m:
        return {(k.rev_nat_index, k.chunk): list(v.backend_ids) for k, v in m.items()}


@pytest.mark.kernel
def test_manager_writes_tables_for_north_south_frontends_only(root: str) -> None:
    m = ServiceManager(node_name="n1", bpf_root=root, registry=CollectorRegistry(), lb_algorithm="maglev",
                       maglev_table_size=M)  # fmt: skip
    m.start()
    try:
        m.on_service(
            svc(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}])
        )
        m.on_endpoint_slice(eps([ep("10.0.1.1"), ep("10.0.1.2"), ep("10.0.1.3")]))
        assert m.flush(5)
        views = {v.type: v for v in m.list_services()}
        np_rn, cip_rn = views["NodePort"].id, views["ClusterIP"].id
        chunks = _chunks(root)
        assert {rn for rn, _ in chunks} == {np_rn}  # ClusterIP (east-west) stays random
        assert len(chunks) == (M + LB_MAGLEV_CHUNK - 1) // LB_MAGLEV_CHUNK
        flat = [i for c in range(len(chunks)) for i in chunks[(np_rn, c)]][:M]
        assert set(flat) == {b.id for b in views["NodePort"].backends}
        with PinnedMap(BY_NAME["lb4_services"], root) as sv:
            fe = sv.lookup(Lb4Key(0, port_to_be16(30080), 0, 6))
            cip = sv.lookup(Lb4Key(ip_to_be32("10.96.0.10"), port_to_be16(80), 0, 6))
        assert fe is not None and fe.flags2 & d("SVC_FLAG2_MAGLEV")
        assert cip is not None and not cip.flags2 & d("SVC_FLAG2_MAGLEV") and cip.rev_nat_index == cip_rn
        m.on_service_deleted(svc(type="NodePort"))
        assert m.flush(5)
        assert _chunks(root) == {}
    finally:
        m.stop()


@pytest.fixture
def host_prog(pin_root: str) -> Iterator[tuple[str, int]]:
    defines = loader.NodeDefines(pin_root, loader.sizes_from_config(None),
                                 {"NODE_IP": ip_to_be32("192.168.9.1"), "LB_MAGLEV_TABLE_SIZE": M})  # fmt: skip
    prog = loader.compile_program("bpf_host", defines)
    try:
        yield pin_root, prog.fd("from_netdev")
    finally:
        prog.close()


@pytest.mark.kernel
def test_datapath_uses_the_table_entry_of_the_flow_hash(host_prog: tuple[str, int]) -> None:
    root, fd = host_prog
    backends = [("10.210.7.1", 8080), ("10.210.7.2", 8080), ("10.210.7.3", 8080)]
    ids = Maps(root).service("0.0.0.0", 30080, "tcp", backends, rev_nat=9,
                             flags=d("SVC_FLAG_NODEPORT"))  # fmt: skip
    tbl = backend_table([(ip, p, 6) for ip, p in backends], ids, M)
    keys, values = maglev_entries(9, tbl)
    with PinnedMap(BY_NAME[MAGLEV], root) as mg:
        sc.map_update_batch(mg.fd, keys, values)
    with PinnedMap(BY_NAME["lb4_services"], root) as sv:
        k = Lb4Key(0, port_to_be16(30080), 0, 6)
        fe = sv.lookup(k)
        assert fe is not None
        fe.flags2 |= d("SVC_FLAG2_MAGLEV")
        sv.update(k, fe)
    by_id = dict(zip(ids, backends, strict=True))
    for sport in range(40000, 40040):
        pkt = bytes(Ether() / IP(src="192.0.2.77", dst="192.168.9.1") / TCP(sport=sport, dport=30080))
        r = progtest.run_tc(fd, pkt)
        got = Ether(r.data)[IP].dst
        h = flow_hash(ip_to_be32("192.0.2.77"), ip_to_be32("192.168.9.1"), port_to_be16(sport),
                      port_to_be16(30080), 6)  # fmt: skip
        assert got == by_id[tbl[h % M]][0], sport
