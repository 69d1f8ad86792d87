"""Tunnel routing mode through the kernel: two node namespaces on one underlay, a pod on each, the
VXLAN device and routes set up by agent/nodes/tunnel.py + RouteProgrammer, bpf_overlay.c attached,
maps written by the test. Pod-to-pod traffic crosses the underlay only as VXLAN with the source's
identity as VNI; unknown tunnel peers and destinations without a tunnel endpoint are dropped and
counted."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from pycilium.agent.nodes.routes import RouteProgrammer
from pycilium.agent.nodes.tunnel import TUNNEL_GATEWAY, TUNNEL_PORT, ensure_device, tunnel_mac
from pycilium.bpf import loader
from pycilium.bpf.maps import BY_NAME, PinnedMap
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.endpointmap import EndpointInfo, EndpointKey
from pycilium.bpf.maps.ipcache import IpcacheKey, RemoteEndpointInfo
from pycilium.bpf.maps.util import ip_to_be32
from pycilium.lab import netns

pytestmark = pytest.mark.kernel

ID_REMOTE_NODE, ID_HOST = d("ID_REMOTE_NODE"), d("ID_HOST")
F_REMOTE = d("IPCACHE_F_REMOTE_NODE")
OVERLAY_TX, OVERLAY_RX = d("METRIC_DIR_OVERLAY_TX"), d("METRIC_DIR_OVERLAY_RX")
EGRESS = d("METRIC_DIR_EGRESS")


@dataclass
class OvNode:
    name: str
    ns: str
    node_ip: str
    pod_ip: str
    pod_ns: str
    pod_cidr: str
    identity: int
    pin_root: str
    progs: list[loader.LoadedProgram] = field(default_factory=list)

    def ipcache(self, cidr: str, identity: int, tunnel: str = "", flags: int = 0) -> None:
        ip, _, plen = cidr.partition("/")
        with PinnedMap(BY_NAME["ipcache"], self.pin_root) as m:
            m.update(IpcacheKey(int(plen or 32), ip_to_be32(ip)),
                     RemoteEndpointInfo(identity, ip_to_be32(tunnel) if tunnel else 0, 0, flags))  # fmt: skip

    def ipcache_delete(self, cidr: str) -> None:
        ip, _, plen = cidr.partition("/")
        with PinnedMap(BY_NAME["ipcache"], self.pin_root) as m:
            m.delete(IpcacheKey(int(plen or 32), ip_to_be32(ip)))

    def metric(self, reason: int, direction: int) -> int:
        with PinnedMap(BY_NAME["metrics"], self.pin_root) as m:
            return sum(v.count for k, vs in m.items_percpu() if k.reason == reason and k.dir == direction
                       for v in vs)  # fmt: skip


def _node(topo: netns.Topology, tag: str, i: int, pin_root: str) -> OvNode:
    n = OvNode(name=f"n{i}", ns=topo.add_netns(f"pcov{tag}n{i}"), node_ip=f"192.168.77.{i}",
               pod_ip=f"10.231.{i}.10", pod_ns=topo.add_netns(f"pcov{tag}p{i}"), pod_cidr=f"10.231.{i}.0/24",
               identity=40000 + i, pin_root=pin_root)  # fmt: skip
    topo.add_veth("lxcov", "eth0", n.ns, n.pod_ns)
    netns.ip("addr", "add", f"{n.pod_ip}/32", "dev", "eth0", netns=n.pod_ns)
    netns.ip("route", "add", "default", "dev", "eth0", netns=n.pod_ns)
    netns.ip("route", "add", f"{n.pod_ip}/32", "dev", "lxcov", netns=n.ns)
    for k in (
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.lxcov.proxy_arp=1",
        "net.ipv4.neigh.lxcov.proxy_delay=0",
    ):
        netns.run(["sysctl", "-qw", k], netns=n.ns)
    return n


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[OvNode, OvNode]]:
    tag = netns.unique("", 4)
    with netns.topology() as topo:
        roots: list[str] = []
        try:
            a = _node(topo, tag, 1, f"/sys/fs/bpf/pyc-test-ov1-{tag}")
            b = _node(topo, tag, 2, f"/sys/fs/bpf/pyc-test-ov2-{tag}")
            roots += [a.pin_root, b.pin_root]
            topo.add_veth("eth0", "eth0", a.ns, b.ns)
            for n, peer in ((a, b), (b, a)):
                netns.ip("addr", "add", f"{n.node_ip}/24", "dev", "eth0", netns=n.ns)
                with netns.in_netns(n.ns):
                    dev = ensure_device(n.node_ip, 1450)
                    assert ensure_device(n.node_ip, 1450) == dev  # idempotent
                    rp = RouteProgrammer(netns=n.ns)
                    rp.oif = dev.ifindex
                    installed, failed = rp.apply({peer.pod_cidr: TUNNEL_GATEWAY}, delete_stale=True)
                    assert not failed and installed == {peer.pod_cidr: TUNNEL_GATEWAY}
                    defines = loader.NodeDefines(n.pin_root, loader.sizes_from_config(None),
                                                 values={"NODE_IP": ip_to_be32(n.node_ip)})  # fmt: skip
                    prog = loader.compile_program("bpf_overlay", defines)
                    n.progs.append(prog)
                    loader.attach_tc(dev.name, prog.fd("to_overlay"), loader.TC_EGRESS, "to-overlay")
                    loader.attach_tc(dev.name, prog.fd("from_overlay"), loader.TC_INGRESS, "from-overlay")
                    netns.run(["sysctl", "-qw", f"net.ipv4.conf.{dev.name}.rp_filter=0"], netns=n.ns)
                n.ipcache(f"{n.node_ip}/32", ID_HOST)
                n.ipcache(f"{peer.node_ip}/32", ID_REMOTE_NODE, flags=F_REMOTE)
                n.ipcache(f"{n.pod_ip}/32", n.identity)
                n.ipcache(f"{peer.pod_ip}/32", peer.identity, tunnel=peer.node_ip, flags=F_REMOTE)
                with PinnedMap(BY_NAME["endpoints"], n.pin_root) as m:
                    m.update(EndpointKey(ip_to_be32(n.pod_ip)), EndpointInfo(lxc_id=1, sec_id=n.identity))
            yield a, b
        finally:
            for n in (a, b) if "b" in locals() else ():
                for p in n.progs:
                    p.close()
            for r in roots:
                loader.remove_pin_root(r)


def _ping(frm: str, to: str) -> bool:
    """At least one echo reply out of a few (the first may wait for neighbour resolution)."""
    r = netns.run(["ping", "-c", "4", "-i", "0.2", "-w", "3", to], netns=frm, check=False)
    return r.returncode == 0


def _vxlan_vnis(ns: str, send: list[str]) -> list[tuple[str, str, int]]:
    """Run `send` (a command in another namespace) while capturing VXLAN frames on ns's eth0:
    (outer src, outer dst, VNI) of each."""
    seen: list[tuple[str, str, int]] = []
    with netns.in_netns(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind(("eth0", 0))
    s.settimeout(0.2)
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                frame = s.recv(65535)
            except TimeoutError:
                continue
            if len(frame) < 14 + 20 + 8 + 8 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
                continue
            ihl = (frame[14] & 0x0F) * 4
            udp = 14 + ihl
            if struct.unpack("!H", frame[udp + 2 : udp + 4])[0] != TUNNEL_PORT:
                continue
            vni = int.from_bytes(frame[udp + 12 : udp + 15], "big")
            seen.append((socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34]), vni))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        subprocess.run(send, capture_output=True, timeout=30)
        time.sleep(0.3)
    finally:
        done.set()
        t.join()
        s.close()
    return seen


def test_device_mac_is_derived_from_the_node_ip() -> None:
    assert tunnel_mac("192.168.77.2") == f"{d('TUNNEL_MAC_0'):02x}:{d('TUNNEL_MAC_1'):02x}:c0:a8:4d:02"


def test_pods_on_two_nodes_talk_through_the_tunnel(nodes: tuple[OvNode, OvNode]) -> None:
    a, b = nodes
    tx0, rx0 = a.metric(0, OVERLAY_TX), b.metric(0, OVERLAY_RX)
    assert _ping(a.pod_ns, b.pod_ip) and _ping(b.pod_ns, a.pod_ip)
    assert a.metric(0, OVERLAY_TX) > tx0 and b.metric(0, OVERLAY_RX) > rx0
    # and what Prometheus scrapes from the agent names the tunnel directions
    from pycilium.agent.metrics import DatapathCollector

    fwd = {s.labels["direction"]: s.value for fam in DatapathCollector(a.pin_root).collect()
           if fam.name == "pycilium_forward_count" for s in fam.samples if s.name.endswith("_total")}  # fmt: skip
    assert fwd.get("OVERLAY_TX", 0) > 0 and fwd.get("OVERLAY_RX", 0) > 0, fwd
    # TCP across, with a reply: the lab's probe against a one-shot echo server on b's pod
    srv = subprocess.Popen(["ip", "netns", "exec", b.pod_ns, sys.executable, "-m", "pycilium.lab.podserver",
                            "--name", "podb", "--tcp", "8080"])  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        ok = False
        while time.monotonic() < deadline and not ok:
            r = netns.run([sys.executable, "-m", "pycilium.lab.probe", b.pod_ip, "8080", "--timeout", "2"],
                          netns=a.pod_ns, check=False)  # fmt: skip
            ok = r.returncode == 0 and "podb" in r.stdout
            if not ok:
                time.sleep(0.2)
        assert ok, r.stdout + r.stderr
    finally:
        srv.kill()
        srv.wait()


def test_underlay_carries_vxlan_with_the_source_identity_as_vni(nodes: tuple[OvNode, OvNode]) -> None:
    a, b = nodes
    seen = _vxlan_vnis(b.ns, ["ip", "netns", "exec", a.pod_ns, "ping", "-c", "2", "-W", "1", b.pod_ip])
    assert (a.node_ip, b.node_ip, a.identity) in seen, seen
    assert (b.node_ip, a.node_ip, b.identity) in seen, seen  # the echo reply, encapsulated by b


def test_no_tunnel_endpoint_is_dropped_and_counted(nodes: tuple[OvNode, OvNode]) -> None:
    a, b = nodes
    before = a.metric(d("DROP_NO_TUNNEL_ENDPOINT"), EGRESS)
    a.ipcache(f"{b.pod_ip}/32", b.identity)  # known identity, but no node to tunnel to
    try:
        assert not _ping(a.pod_ns, b.pod_ip)
        assert a.metric(d("DROP_NO_TUNNEL_ENDPOINT"), EGRESS) > before
    finally:
        a.ipcache(f"{b.pod_ip}/32", b.identity, tunnel=b.node_ip, flags=F_REMOTE)
    assert _ping(a.pod_ns, b.pod_ip)


def test_tunnel_packets_from_an_unknown_peer_are_dropped(nodes: tuple[OvNode, OvNode]) -> None:
    a, b = nodes
    before = b.metric(d("DROP_UNKNOWN_TUNNEL_PEER"), OVERLAY_RX)
    b.ipcache_delete(f"{a.node_ip}/32")  # b no longer knows a as a node of the cluster
    try:
        assert not _ping(a.pod_ns, b.pod_ip)
        assert b.metric(d("DROP_UNKNOWN_TUNNEL_PEER"), OVERLAY_RX) > before
    finally:
        b.ipcache(f"{a.node_ip}/32", ID_REMOTE_NODE, flags=F_REMOTE)
    assert _ping(a.pod_ns, b.pod_ip)
