"""The node manager: routes in a private netns (never the host's table), ipcache entries in a private
pin root, own pod CIDRs, restart reconciliation, and the Node reflector against the API server."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pycilium.agent.k8s import NODES, Reflector, new_api_client, request_json
from pycilium.agent.nodes import RTPROT_PYCILIUM, NodeManager, parse_node
from pycilium.bpf import loader
from pycilium.bpf.maps import PinnedMap
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.ipcache import IPCACHE
from pycilium.bpf.maps.util import be32_to_ip
from pycilium.lab import netns
from pycilium.lab.apiserver import APIServerThread, write_kubeconfig

Obj = dict[str, Any]
ID_HOST, ID_WORLD, ID_REMOTE_NODE, ID_INIT = d("ID_HOST"), d("ID_WORLD"), d("ID_REMOTE_NODE"), d("ID_INIT")
F_REMOTE = d("IPCACHE_F_REMOTE_NODE")


def node(name: str, ip: str, *cidrs: str, external: str | None = None) -> Obj:
    addrs = [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]
    if external:
        addrs.append({"type": "ExternalIP", "address": external})
    return {"metadata": {"name": name}, "spec": {"podCIDR": cidrs[0] if cidrs else "", "podCIDRs": list(cidrs)},
            "status": {"addresses": addrs}}  # fmt: skip


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_parse_node() -> None:
    n = parse_node(node("n2", "192.168.60.2", "10.200.2.0/24", "fd00::/64", external="203.0.113.2"))
    assert n is not None
    assert n.internal_ip == "192.168.60.2" and n.addresses == ("192.168.60.2", "203.0.113.2")
    assert n.pod_cidrs == ("10.200.2.0/24",)
    w: list[str] = []
    bad = node("n3", "999.1.1.1", "10.1.1.1/99")
    assert parse_node(bad, w.append) == parse_node(bad)
    assert any("status.addresses[0]" in m for m in w) and any("spec.podCIDRs[0]" in m for m in w)
    only_ext = parse_node({"metadata": {"name": "e"}, "status": {"addresses": [{"type": "ExternalIP",
                                                                               "address": "198.51.100.9"}]}})  # fmt: skip
    assert only_ext is not None and only_ext.internal_ip == "198.51.100.9"


# --- in a private netns with real maps ----------------------------------------------------------------


@pytest.fixture
def lab(pin_root: str) -> Iterator[tuple[str, str]]:
    """A netns "node" with an underlay address 192.168.60.1/24 (peer namespace on the other end)."""
    sizes = loader.sizes_from_config(None)
    sizes.update(
        {"CT_MAP_SIZE_TCP": 4096, "CT_MAP_SIZE_ANY": 4096, "NAT_MAP_SIZE": 4096, "IPCACHE_MAP_SIZE": 4096}
    )
    for fd in loader.open_pinned_maps(pin_root, sizes).values():
        os.close(fd)
    with netns.topology() as topo:
        a = topo.add_netns(netns.unique("pycnm"))
        b = topo.add_netns(netns.unique("pycnm"))
        suffix = a[-6:]
        topo.add_veth(f"nda{suffix}", f"ndb{suffix}", a, b)
        netns.ip("addr", "add", "192.168.60.1/24", "dev", f"nda{suffix}", netns=a)
        netns.ip("addr", "add", "192.168.60.2/24", "dev", f"ndb{suffix}", netns=b)
        # a route somebody else owns, overlapping what we will manage
        netns.ip("route", "add", "10.250.0.0/16", "via", "192.168.60.2", "proto", "static", netns=a)
        yield a, pin_root


def our_routes(ns: str) -> dict[str, str]:
    out = {}
    for line in netns.ip("route", "show", "proto", str(RTPROT_PYCILIUM), netns=ns).stdout.splitlines():
        parts = line.split()
        out[parts[0]] = parts[parts.index("via") + 1]
    return out


def all_routes(ns: str) -> str:
    return netns.ip("route", "show", netns=ns).stdout


def ipcache(root: str) -> dict[str, tuple[int, str, int]]:
    with PinnedMap(IPCACHE, root) as m:
        return {f"{be32_to_ip(k.addr)}/{k.prefixlen}": (v.sec_identity,
                be32_to_ip(v.tunnel_endpoint) if v.tunnel_endpoint else "", v.flags)
                for k, v in m.items()}  # fmt: skip


class Source:
    def __init__(self, synced: bool = False) -> None:
        self.synced = threading.Event()
        if synced:
            self.synced.set()


@pytest.mark.kernel
def test_routes_ipcache_and_own_pod_cidrs(lab: tuple[str, str]) -> None:
    ns, root = lab
    cidrs: list[list[str]] = []
    changed: list[set[str]] = []
    mgr = NodeManager(node_name="n1", bpf_root=root, netns=ns, on_pod_cidrs=cidrs.append,
                      on_nodes_changed=changed.append)  # fmt: skip
    mgr.start([Source(synced=True)])
    try:
        mgr.on_node(node("n1", "192.168.60.1", "10.200.1.0/24"))
        mgr.on_node(node("n2", "192.168.60.2", "10.200.2.0/24", "10.210.2.0/24", external="203.0.113.2"))
        mgr.on_node(node("n3", "192.168.60.3", "10.200.3.0/24"))
        mgr.on_node(node("n4", "192.168.99.4", "10.200.4.0/24"))  # gateway not reachable (yet)
        assert mgr.flush(5)
        assert cidrs == [["10.200.1.0/24"]] and mgr.own_pod_cidrs == ["10.200.1.0/24"]
        assert our_routes(ns) == {"10.200.2.0/24": "192.168.60.2", "10.210.2.0/24": "192.168.60.2",
                                  "10.200.3.0/24": "192.168.60.3"}  # fmt: skip
        assert "10.200.4.0/24" in mgr.route_errors
        assert "10.250.0.0/16 via 192.168.60.2 dev" in all_routes(ns)
        assert ipcache(root) == {
            "0.0.0.0/0": (ID_WORLD, "", 0),
            "192.168.60.1/32": (ID_HOST, "", 0),
            "192.168.60.2/32": (ID_REMOTE_NODE, "", F_REMOTE),
            "203.0.113.2/32": (ID_REMOTE_NODE, "", F_REMOTE),
            "192.168.60.3/32": (ID_REMOTE_NODE, "", F_REMOTE),
            "192.168.99.4/32": (ID_REMOTE_NODE, "", F_REMOTE),
        }
        assert mgr.node_ip_of("n2") == "192.168.60.2"
        assert set().union(*changed) == {"n1", "n2", "n3", "n4"}
        # n3 goes away, n2 moves its pod CIDR, n4 becomes reachable
        mgr.on_node_deleted({"metadata": {"name": "n3"}})
        mgr.on_node(node("n2", "192.168.60.2", "10.200.22.0/24", external="203.0.113.2"))
        netns.ip("addr", "add", "192.168.99.1/24", "dev", "lo", netns=ns)
        mgr.resync()
        assert mgr.flush(5)
        assert our_routes(ns) == {"10.200.22.0/24": "192.168.60.2", "10.200.4.0/24": "192.168.99.4"}
        assert "192.168.60.3/32" not in ipcache(root)
        # someone deletes our route and tampers with an entry: the resync repairs both
        netns.ip("route", "del", "10.200.22.0/24", netns=ns)
        with PinnedMap(IPCACHE, root) as m:
            for k, v in m.items():
                if be32_to_ip(k.addr) == "192.168.60.2":
                    v.sec_identity = 999
                    m.update(k, v)
        mgr.resync()
        assert mgr.flush(5)
        assert mgr.verify_ipcache() == 1
        assert our_routes(ns)["10.200.22.0/24"] == "192.168.60.2"
        assert ipcache(root)["192.168.60.2/32"][0] == ID_REMOTE_NODE
        # own pod CIDR change is reported
        mgr.on_node(node("n1", "192.168.60.1", "10.200.1.0/24", "10.201.1.0/24"))
        assert cidrs[-1] == ["10.200.1.0/24", "10.201.1.0/24"]
    finally:
        mgr.stop()
    assert "10.250.0.0/16" in all_routes(ns)  # never touched


@pytest.mark.kernel
def test_restart_keeps_routes_until_nodes_synced_then_removes_stale_only(lab: tuple[str, str]) -> None:
    ns, root = lab
    m1 = NodeManager(node_name="n1", bpf_root=root, netns=ns)
    m1.start([Source(synced=True)])
    for n in (node("n1", "192.168.60.1", "10.200.1.0/24"), node("n2", "192.168.60.2", "10.200.2.0/24"),
              node("n3", "192.168.60.3", "10.200.3.0/24")):  # fmt: skip
        m1.on_node(n)
    assert m1.flush(5)
    m1.stop()
    before = our_routes(ns)
    assert len(before) == 2
    # an ipcache entry of somebody else (a pod) stays whatever happens
    with PinnedMap(IPCACHE, root) as m:
        from pycilium.agent.nodes.manager import _ipc_key, _ipc_value

        m.update(_ipc_key("10.200.1.7/32"), _ipc_value((ID_INIT, "", 0)))

    src = Source()
    m2 = NodeManager(node_name="n1", bpf_root=root, netns=ns, resync_interval=3600)
    m2.start([src])
    try:
        m2.on_node(node("n1", "192.168.60.1", "10.200.1.0/24"))
        m2.on_node(node("n2", "192.168.60.2", "10.200.2.0/24"))
        time.sleep(0.3)
        assert our_routes(ns) == before  # n3 is not known yet: its route stays
        assert "192.168.60.3/32" in ipcache(root)
        src.synced.set()
        assert m2.flush(5)
        assert our_routes(ns) == {"10.200.2.0/24": "192.168.60.2"}
        entries = ipcache(root)
        assert "192.168.60.3/32" not in entries and entries["10.200.1.7/32"] == (ID_INIT, "", 0)
    finally:
        m2.stop()


@pytest.mark.kernel
def test_node_reflector_end_to_end(lab: tuple[str, str], tmp_path: Path) -> None:
    ns, root = lab
    with APIServerThread(bookmark_interval=0.3) as srv:
        api = new_api_client(kubeconfig=write_kubeconfig(tmp_path / "kc", srv.url))
        for n in (node("n1", "192.168.60.1", "10.200.1.0/24"), node("n2", "192.168.60.2", "10.200.2.0/24")):
            request_json(api, "POST", NODES.path(), body=n)
        got: list[list[str]] = []
        mgr = NodeManager(node_name="n1", bpf_root=root, netns=ns, on_pod_cidrs=got.append)
        r = Reflector(api, NODES, handlers=[mgr.handlers()])
        mgr.start([r])
        r.start()
        try:
            assert mgr.flush(5)
            assert our_routes(ns) == {"10.200.2.0/24": "192.168.60.2"} and got == [["10.200.1.0/24"]]
            request_json(api, "POST", NODES.path(), body=node("n3", "192.168.60.3", "10.200.3.0/24"))
            assert wait_until(lambda: "10.200.3.0/24" in our_routes(ns))
            request_json(api, "DELETE", NODES.path(name="n2"))
            assert wait_until(lambda: "10.200.2.0/24" not in our_routes(ns))
        finally:
            r.stop()
            mgr.stop()
            api.close()


@pytest.mark.kernel
def test_tunnel_mode_routes_every_pod_cidr_into_the_vxlan_device(lab: tuple[str, str]) -> None:
    from pycilium.agent.config import AgentConfig
    from pycilium.agent.nodes.tunnel import TUNNEL_DEVICE, TUNNEL_GATEWAY, ensure_device, remove_device

    ns, root = lab
    with netns.in_netns(ns):
        dev = ensure_device("192.168.60.1", AgentConfig(**{"routing-mode": "tunnel"}).pod_mtu)
    assert dev.mtu == 1450 and AgentConfig().pod_mtu == 1500
    mgr = NodeManager(
        node_name="n1", bpf_root=root, netns=ns, routing_mode="tunnel", tunnel_ifindex=dev.ifindex
    )
    mgr.start([Source(synced=True)])
    try:
        mgr.on_node(node("n1", "192.168.60.1", "10.200.1.0/24"))
        mgr.on_node(node("n2", "192.168.60.2", "10.200.2.0/24"))
        mgr.on_node(node("n4", "192.168.99.4", "10.200.4.0/24"))  # no underlay route needed: on-link
        assert mgr.flush(5)
        assert our_routes(ns) == {"10.200.2.0/24": TUNNEL_GATEWAY, "10.200.4.0/24": TUNNEL_GATEWAY}
        assert not mgr.route_errors
        routes = all_routes(ns)
        assert f"10.200.2.0/24 via {TUNNEL_GATEWAY} dev {TUNNEL_DEVICE}" in routes and "onlink" in routes
        assert "PERMANENT" in netns.ip("neigh", "show", "dev", TUNNEL_DEVICE, netns=ns).stdout
        assert ipcache(root)["192.168.60.2/32"] == (ID_REMOTE_NODE, "", F_REMOTE)
    finally:
        mgr.stop()
    # back to native routing: the device goes, and its routes with it
    with netns.in_netns(ns):
        assert remove_device() and not remove_device()
    assert our_routes(ns) == {}
