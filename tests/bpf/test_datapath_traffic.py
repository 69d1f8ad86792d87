"""Real packets through the lxc and host programs between network namespaces (no agent: the test
writes the maps). One node namespace with four pod namespaces and a world namespace on its
underlay; the pods run the lab's pod server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pycilium.agent.config import AgentConfig
from pycilium.bpf import loader
from pycilium.bpf.maps.defines import d
from pycilium.bpf.node_defines import node_defines
from pycilium.lab import netns

from tests.bpf.dpmaps import Maps

pytestmark = pytest.mark.kernel

NODE_IP, WORLD_IP = "192.168.77.1", "192.168.77.100"
POD_CIDR = "10.210.1.0/24"
VIP = "10.96.7.7"
PODS = {"client": ("10.210.1.10", 1010), "be1": ("10.210.1.11", 2000), "be2": ("10.210.1.12", 2000),
        "be3": ("10.210.1.13", 2000)}  # fmt: skip


@dataclass
class Pod:
    name: str
    ns: str
    ip: str
    lxc: str
    ifindex: int
    lxc_id: int
    identity: int


@dataclass
class Node:
    ns: str
    world: str
    pods: dict[str, Pod]
    maps: Maps

    def probe(self, frm: str, host: str, port: int, proto: str = "tcp", count: int = 1,
              timeout: float = 2.0) -> list[dict[str, str]]:  # fmt: skip
        ns = self.world if frm == "world" else self.pods[frm].ns
        p = netns.run([sys.executable, "-m", "pycilium.lab.probe", host, str(port), "--proto", proto,
                       "--count", str(count), "--timeout", str(timeout)], netns=ns, check=False, timeout=60)  # fmt: skip
        return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def _wait_listening(ns: str, port: int) -> None:
    for _ in range(50):
        if f":{port} " in netns.run(["ss", "-ltn"], netns=ns).stdout:
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port} in {ns}")


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    root = "/sys/fs/bpf/pyc-test-traffic"
    loader.remove_pin_root(root)
    cfg = AgentConfig.model_validate({"cluster-pool-ipv4-cidr": "10.210.0.0/16"})
    defines = node_defines(cfg, pin_root=root, node_ip=NODE_IP, pod_cidr=POD_CIDR)
    lxc = loader.compile_program("bpf_lxc", defines)
    host = loader.compile_program("bpf_host", defines)
    procs: list[subprocess.Popen[bytes]] = []
    with netns.topology() as topo:
        n = topo.add_netns(netns.unique("pycn"))
        w = topo.add_netns(netns.unique("pycw"))
        topo.add_veth("eth0", "wld0", n, w)
        netns.ip("addr", "add", f"{NODE_IP}/24", "dev", "eth0", netns=n)
        netns.ip("addr", "add", f"{WORLD_IP}/24", "dev", "wld0", netns=w)
        netns.run(["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0"], netns=n)
        maps = Maps(root)
        pods: dict[str, Pod] = {}
        for i, (name, (ip, ident)) in enumerate(PODS.items()):
            pns = topo.add_netns(netns.unique(f"pyc{name[:2]}"))
            host_if = f"lxc{name}"
            topo.add_veth(host_if, "eth0", n, pns)
            netns.run(["sysctl", "-qw", f"net.ipv4.conf.{host_if}.rp_filter=0"], netns=n)
            netns.ip("addr", "add", f"{ip}/32", "dev", "eth0", netns=pns)
            hmac = netns.mac(host_if, n)
            netns.ip("route", "add", "169.254.1.1", "dev", "eth0", "scope", "link", netns=pns)
            netns.ip("route", "add", "default", "via", "169.254.1.1", "dev", "eth0", netns=pns)
            netns.ip(
                "neigh", "add", "169.254.1.1", "lladdr", hmac, "dev", "eth0", "nud", "permanent", netns=pns
            )
            netns.ip("route", "add", f"{ip}/32", "dev", host_if, netns=n)
            ifx = netns.ifindex(host_if, n)
            pods[name] = Pod(name, pns, ip, host_if, ifx, 100 + i, ident)
            maps.endpoint(ip, ifx, 100 + i, netns.mac("eth0", pns), hmac, ident)
            maps.ipcache(f"{ip}/32", ident)
            with netns.in_netns(n):
                loader.attach_tc(host_if, lxc.fd("from_container"), loader.TC_INGRESS, "from-container")
                loader.attach_tc(host_if, lxc.fd("to_container"), loader.TC_EGRESS, "to-container")
            if name != "client":
                procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", pns, sys.executable, "-m", "pycilium.lab.podserver", "--name", name,
                     "--tcp", "8080", "--udp", "8080"], stdout=subprocess.DEVNULL))  # fmt: skip
        maps.ipcache(f"{NODE_IP}/32", d("ID_HOST"))
        with netns.in_netns(n):
            loader.attach_tc("eth0", host.fd("from_netdev"), loader.TC_INGRESS, "from-netdev")
            loader.attach_tc("eth0", host.fd("to_netdev"), loader.TC_EGRESS, "to-netdev")
        procs.append(subprocess.Popen(["ip", "netns", "exec", w, sys.executable, "-m", "pycilium.lab.podserver",
                                       "--name", "world", "--tcp", "8080", "--udp", "8080"], stdout=subprocess.DEVNULL))  # fmt: skip
        for name in ("be1", "be2", "be3"):
            _wait_listening(pods[name].ns, 8080)
        _wait_listening(w, 8080)
        try:
            yield Node(n, w, pods, maps)
        finally:
            for pr in procs:
                pr.kill()
                pr.wait()
            lxc.close()
            host.close()
    loader.remove_pin_root(root)


@pytest.fixture
def fresh(node: Node) -> Node:
    """Empty services, policy and conntrack for each test (endpoints and ipcache stay)."""
    for name in ("lb4_services", "lb4_backends", "lb4_reverse_nat", "lb_affinity_match", "lb4_affinity", "policy",
                 "ct4_global", "ct_any4_global", "snat_v4_external"):  # fmt: skip
        with node.maps.m(name) as m:
            m.clear()
    for p in node.pods.values():
        node.maps.endpoint(
            p.ip, p.ifindex, p.lxc_id, netns.mac("eth0", p.ns), netns.mac(p.lxc, node.ns), p.identity
        )
    return node


def _backends(node: Node) -> list[tuple[str, int]]:
    return [(node.pods[n].ip, 8080) for n in ("be1", "be2", "be3")]


def test_pod_to_pod_direct(fresh: Node) -> None:
    (r,) = fresh.probe("client", fresh.pods["be1"].ip, 8080)
    assert r["result"] == "ok" and r["reply"].startswith(f"be1 {fresh.pods['client'].ip}:")


def test_tcp_and_udp_through_a_vip_reach_every_backend(fresh: Node) -> None:
    fresh.maps.service(VIP, 80, "tcp", _backends(fresh), rev_nat=1)
    fresh.maps.service(VIP, 53, "udp", _backends(fresh), rev_nat=2)
    tcp = fresh.probe("client", VIP, 80, count=24)
    assert all(r["result"] == "ok" for r in tcp), tcp
    assert {r["reply"].split()[0] for r in tcp} == {"be1", "be2", "be3"}
    assert all(r["reply"].split()[1].startswith(fresh.pods["client"].ip + ":") for r in tcp)
    udp = fresh.probe("client", VIP, 53, proto="udp", count=24)
    assert all(r["result"] == "ok" for r in udp), udp
    assert {r["reply"].split()[0] for r in udp} == {"be1", "be2", "be3"}


def test_session_affinity_keeps_one_backend(fresh: Node) -> None:
    fresh.maps.service(
        VIP, 80, "tcp", _backends(fresh), rev_nat=3, flags=d("SVC_FLAG_AFFINITY"), affinity_timeout=60
    )
    got = {r["reply"].split()[0] for r in fresh.probe("client", VIP, 80, count=12)}
    assert len(got) == 1


def test_service_without_backends_is_refused_not_hung(fresh: Node) -> None:
    fresh.maps.service(VIP, 80, "tcp", [], rev_nat=4)
    t0 = time.monotonic()
    (r,) = fresh.probe("client", VIP, 80, timeout=5)
    assert r["result"] == "refused"
    assert time.monotonic() - t0 < 4  # answered, not timed out


def test_policy_deny_then_allow(fresh: Node) -> None:
    be1 = fresh.pods["be1"]
    fresh.maps.endpoint(be1.ip, be1.ifindex, be1.lxc_id, netns.mac("eth0", be1.ns), netns.mac(be1.lxc, fresh.ns),
                        be1.identity, flags=d("EP_F_POLICY_INGRESS"))  # fmt: skip
    (r,) = fresh.probe("client", be1.ip, 8080, timeout=1)
    assert r["result"] == "timeout"
    fresh.maps.policy(be1.lxc_id, fresh.pods["client"].identity, egress=False, proto="tcp", port=8080)
    (r,) = fresh.probe("client", be1.ip, 8080)
    assert r["result"] == "ok"
    (r,) = fresh.probe("client", be1.ip, 8080, proto="udp", timeout=1)
    assert r["result"] == "timeout"  # only TCP/8080 is allowed


def test_masquerade_to_the_world(fresh: Node) -> None:
    (r,) = fresh.probe("client", WORLD_IP, 8080)
    assert r["result"] == "ok"
    assert r["reply"].startswith(f"world {NODE_IP}:")  # the world sees the node, not the pod
    with fresh.maps.m("snat_v4_external") as m:
        entries = list(m.items())
    dirs = sorted(k.flags for k, _ in entries)
    assert dirs == [d("CT_DIR_OUT"), d("CT_DIR_IN")]


def test_nodeport_from_the_world_keeps_the_client_ip_for_local_backends(fresh: Node) -> None:
    fresh.maps.service("0.0.0.0", 30080, "tcp", _backends(fresh), rev_nat=5, flags=d("SVC_FLAG_NODEPORT"))
    res = fresh.probe("world", NODE_IP, 30080, count=12)
    assert all(r["result"] == "ok" for r in res), res
    assert {r["reply"].split()[0] for r in res} <= {"be1", "be2", "be3"}
    assert all(r["reply"].split()[1].startswith(WORLD_IP + ":") for r in res)


def test_drops_are_counted_by_reason(fresh: Node) -> None:
    be2 = fresh.pods["be2"]
    before = fresh.maps.metric(d("DROP_POLICY"), d("METRIC_DIR_INGRESS"))
    fresh.maps.endpoint(be2.ip, be2.ifindex, be2.lxc_id, netns.mac("eth0", be2.ns), netns.mac(be2.lxc, fresh.ns),
                        be2.identity, flags=d("EP_F_POLICY_INGRESS"))  # fmt: skip
    fresh.probe("client", be2.ip, 8080, proto="udp", timeout=0.5)
    assert fresh.maps.metric(d("DROP_POLICY"), d("METRIC_DIR_INGRESS")) > before


def test_nothing_uses_netfilter(fresh: Node) -> None:
    fresh.maps.service(VIP, 80, "tcp", _backends(fresh), rev_nat=1)
    assert fresh.probe("client", VIP, 80)[0]["result"] == "ok"
    rules = netns.run(["iptables-save"], netns=fresh.ns, check=False).stdout
    assert "DNAT" not in rules and "MASQUERADE" not in rules
