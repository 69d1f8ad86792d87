"""Conntrack GC: expired entries and their NAT pairs go, live ones stay; adaptive interval."""

from __future__ import annotations

import os
import time

import pytest
from pycilium.agent.datapath.ctgc import ConntrackGC, gc_pass, map_pressure, next_interval
from pycilium.bpf import loader
from pycilium.bpf.maps import PinnedMap
from pycilium.bpf.maps.ctmap import CT4_GLOBAL, CT_ANY4_GLOBAL, Ct4Key, CtEntry
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.natmap import SNAT_V4_EXTERNAL, Nat4Entry


def test_interval_adapts() -> None:
    assert next_interval(300, 0.5, 43200) == 150
    assert next_interval(300, 0.99, 43200) == pytest.approx(30)
    assert next_interval(20, 0.99, 43200) == 10  # floor
    assert next_interval(300, 0.01, 43200) == 450
    assert next_interval(40000, 0.0, 43200) == 43200  # cap
    assert next_interval(300, 0.1, 43200) == 300


@pytest.mark.kernel
def test_gc_deletes_expired_entries_and_their_nat_pairs(pin_root: str) -> None:
    for fd in loader.open_pinned_maps(pin_root, {}).values():
        os.close(fd)
    now = int(time.monotonic())
    out = d("CT_DIR_OUT")
    live = Ct4Key(saddr=1, daddr=2, sport=3, dport=4, nexthdr=6, flags=out)
    dead = Ct4Key(saddr=5, daddr=6, sport=7, dport=8, nexthdr=6, flags=out)
    dead_udp = Ct4Key(saddr=9, daddr=10, sport=11, dport=12, nexthdr=17, flags=d("CT_DIR_IN"))
    with PinnedMap(CT4_GLOBAL, pin_root) as tcp, PinnedMap(CT_ANY4_GLOBAL, pin_root) as anyct:
        tcp.update(live, CtEntry(lifetime=now + 100))
        tcp.update(dead, CtEntry(lifetime=now - 5))
        anyct.update(dead_udp, CtEntry(lifetime=now - 1))
    with PinnedMap(SNAT_V4_EXTERNAL, pin_root) as nat:
        nat.update(dead, Nat4Entry(to_addr=99, to_port=4000))
        nat.update(Ct4Key(saddr=6, daddr=99, sport=8, dport=4000, nexthdr=6, flags=d("CT_DIR_IN")),
                   Nat4Entry(to_addr=5, to_port=7))  # fmt: skip
        nat.update(live, Nat4Entry(to_addr=99, to_port=4001))
    res = gc_pass(pin_root)
    assert (res.scanned, res.deleted, res.nat_deleted) == (3, 2, 2)
    with PinnedMap(CT4_GLOBAL, pin_root) as tcp:
        assert [k.saddr for k, _ in tcp.items()] == [1]
    with PinnedMap(SNAT_V4_EXTERNAL, pin_root) as nat:
        assert [k.saddr for k, _ in nat.items()] == [1]
    p = map_pressure(pin_root)
    assert p["ct4_global"] == pytest.approx(1 / CT4_GLOBAL.default_size)


@pytest.mark.kernel
def test_gc_thread_runs_and_stops(pin_root: str) -> None:
    for fd in loader.open_pinned_maps(pin_root, {}).values():
        os.close(fd)
    gc = ConntrackGC(pin_root, fixed_interval=3600)
    gc.start()
    for _ in range(50):
        if gc.runs:
            break
        time.sleep(0.05)
    gc.stop()
    assert gc.runs >= 1 and gc.interval == 3600


def test_eviction_estimate() -> None:
    from pycilium.agent.datapath.ctgc import estimate_evictions

    assert estimate_evictions(prev_left=100, scanned=150, created_delta=50) == 0  # all new ones still there
    assert estimate_evictions(prev_left=100, scanned=100, created_delta=30) == 30  # table full: 30 pushed out
    assert estimate_evictions(prev_left=100, scanned=120, created_delta=10) == 0  # never negative


@pytest.mark.kernel
def test_full_table_evicts_and_the_estimate_sees_it(pin_root: str) -> None:
    """Real LRU eviction: a tiny ct_any4_global, more new flows through the lxc program than fit."""
    from pycilium.bpf import progtest
    from pycilium.lab.mapwriter import Maps
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    sizes = loader.sizes_from_config(None)
    sizes["CT_MAP_SIZE_ANY"] = 1024
    prog = loader.compile_program("bpf_lxc", loader.NodeDefines(pin_root, sizes))
    try:
        Maps(pin_root).endpoint("10.9.0.1", 7, 7, "02:00:00:00:00:07", "02:00:00:00:00:08", 1000)
        gc = ConntrackGC(pin_root)
        gc.run_once()

        def flow(i: int) -> None:
            pkt = bytes(Ether(src="02:00:00:00:00:07", dst="02:00:00:00:00:08") / IP(src="10.9.0.1", dst="10.9.1.1")
                        / UDP(sport=1024 + i, dport=53))  # fmt: skip
            assert (
                progtest.run_tc(prog.fd("from_container"), pkt, ingress_ifindex=7).verdict == 0
            )  # never fails

        for i in range(3000):
            flow(i)
        gc.run_once()
        with PinnedMap(CT_ANY4_GLOBAL, pin_root) as ct:
            left = sum(1 for _ in ct.raw_items())
        assert left <= 1024
        assert gc.evictions["ct_any4_global"] >= 3000 - 1024 - 64  # LRU keeps per-CPU slack
    finally:
        prog.close()
