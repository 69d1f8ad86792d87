"""The loader: pinned maps reused across compiles, resized with their entries, recreated on layout
change; compiler and verifier errors that name the program; TC attach moving real packets."""

from __future__ import annotations

import ctypes
import os
import subprocess

import pytest
from pycilium.bpf import loader
from pycilium.bpf import syscall as sc
from pycilium.bpf.maps import BY_NAME, PinnedMap
from pycilium.bpf.maps.ctmap import CT_ANY4_GLOBAL, Ct4Key, CtEntry
from pycilium.bpf.maps.defines import d
from pycilium.lab import netns

pytestmark = pytest.mark.kernel

COUNT_SRC = """
#include "common.h"
#include "metrics.h"
int count(struct __sk_buff *skb)
{
	update_metrics(skb->len, REASON_FORWARDED, METRIC_DIR_EGRESS);
	return TC_ACT_OK;
}
"""


def _defines(root: str, **sizes: int) -> loader.NodeDefines:
    base = loader.sizes_from_config(None)
    base.update(sizes)
    return loader.NodeDefines(root, base)


def test_pinned_maps_survive_a_recompile(pin_root: str) -> None:
    p1 = loader.compile_program("count", _defines(pin_root), source=COUNT_SRC)
    p1.fd("count")
    key = Ct4Key(saddr=1, daddr=2, sport=3, dport=4, nexthdr=17)
    with PinnedMap(CT_ANY4_GLOBAL, pin_root) as ct:
        ct.update(key, CtEntry(lifetime=12345, packets=7))
    p1.close()
    p2 = loader.compile_program("count", _defines(pin_root), source=COUNT_SRC)
    try:
        with PinnedMap(CT_ANY4_GLOBAL, pin_root) as ct:
            e = ct.lookup(key)
            assert e is not None and e.lifetime == 12345 and e.packets == 7
    finally:
        p2.close()
    assert sorted(os.listdir(pin_root)) == sorted(s.name for s in BY_NAME.values())


def test_resize_keeps_entries(pin_root: str) -> None:
    loader.open_pinned_maps(pin_root, {"CT_MAP_SIZE_ANY": 2048})
    with PinnedMap(CT_ANY4_GLOBAL, pin_root) as ct:
        ct.update_batch((Ct4Key(saddr=i, nexthdr=17), CtEntry(lifetime=i)) for i in range(100))
    fds = loader.open_pinned_maps(pin_root, {"CT_MAP_SIZE_ANY": 4096})
    for fd in fds.values():
        os.close(fd)
    with PinnedMap(CT_ANY4_GLOBAL, pin_root) as ct:
        assert ct.info.max_entries == 4096
        got = {k.saddr: v.lifetime for k, v in ct.items()}
    assert got == {i: i for i in range(100)}


def test_layout_change_recreates_the_map(pin_root: str) -> None:
    os.makedirs(pin_root, exist_ok=True)
    old = sc.map_create(sc.MAP_TYPE_LRU_HASH, 12, 8, 1024, "old_ct")  # an older, smaller layout
    sc.obj_pin(old, f"{pin_root}/ct_any4_global")
    os.close(old)
    fds = loader.open_pinned_maps(pin_root, {})
    try:
        info = sc.map_info(fds["ct_any4_global"])
        assert (info.key_size, info.value_size) == (ctypes.sizeof(Ct4Key), ctypes.sizeof(CtEntry))
    finally:
        for fd in fds.values():
            os.close(fd)


def test_compile_error_names_the_program_and_shows_the_compiler_output(pin_root: str) -> None:
    with pytest.raises(loader.CompileError) as ei:
        loader.compile_program(
            "broken_prog", _defines(pin_root), source="int f(struct __sk_buff *s) { return x; }"
        )
    assert "broken_prog" in str(ei.value)
    assert "undeclared identifier 'x'" in str(ei.value)


def test_verifier_rejection_carries_the_verifier_log(pin_root: str) -> None:
    src = '#include "common.h"\nint unchecked(struct __sk_buff *s) { return *(int *)(long)s->data; }'
    prog = loader.compile_program("unchecked_prog", _defines(pin_root), source=src)
    try:
        with pytest.raises(loader.VerifierError) as ei:
            prog.fd("unchecked")
    finally:
        prog.close()
    msg = str(ei.value)
    assert "unchecked_prog" in msg and "'unchecked'" in msg
    assert "invalid access to packet" in msg


def test_tc_attach_counts_real_packets_and_detaches(pin_root: str) -> None:
    prog = loader.compile_program("count", _defines(pin_root), source=COUNT_SRC)
    with netns.topology() as topo:
        a = topo.add_netns(netns.unique("pyca"))
        b = topo.add_netns(netns.unique("pycb"))
        topo.add_veth("va", "vb", a, b)
        netns.ip("addr", "add", "10.250.0.1/24", "dev", "va", netns=a)
        netns.ip("addr", "add", "10.250.0.2/24", "dev", "vb", netns=b)
        fd = prog.fd("count")
        with netns.in_netns(a):
            loader.attach_tc("va", fd, loader.TC_EGRESS, "count")
            assert loader.tc_attached("va", loader.TC_EGRESS)
        netns.run(["ping", "-c", "3", "-i", "0.2", "-W", "1", "10.250.0.2"], netns=a)
        with PinnedMap(BY_NAME["metrics"], pin_root) as m:
            fwd = sum(v.count for k, vs in m.items_percpu()
                      if k.reason == 0 and k.dir == d("METRIC_DIR_EGRESS") for v in vs)  # fmt: skip
        assert fwd >= 3  # 3 echo requests (plus ARP) left through the program
        with netns.in_netns(a):
            loader.detach_tc("va", loader.TC_EGRESS)
            assert not loader.tc_attached("va", loader.TC_EGRESS)
            loader.detach_tc("va", loader.TC_EGRESS)  # idempotent
    prog.close()
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(["ip", "netns", "exec", a, "true"], check=True, capture_output=True)
