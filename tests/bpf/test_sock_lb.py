"""Socket load-balancing (bpf_sock.c) for processes in the node's own network namespace: TCP and
UDP to a VIP reach the backends, a service without backends fails connect() at once, other
namespaces (pods) are untouched, and removing the node's maps detaches the programs."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
from pycilium.agent.config import AgentConfig
from pycilium.bpf import cgroup, loader
from pycilium.bpf.node_defines import node_defines
from pycilium.lab import netns
from pycilium.lab.singlenode import CLUSTER_CIDR, NODE_IP, POD_CIDR, SERVER_PORT, SingleNode

pytestmark = pytest.mark.kernel
VIP = "10.96.33.3"

PEER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
print(s.getpeername()[0])
"""


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[SingleNode, list[int]]]:
    lab = SingleNode.up(pin_root="/sys/fs/bpf/pyc-test-sock")
    root = cgroup.cgroup2_root()
    assert root, "no cgroup v2 mount"
    try:
        cookie = int(netns.run([sys.executable, "-c", "import socket; s = socket.socket(); "
                                "print(int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), 'little'))"],
                               netns=lab.node_ns).stdout)  # fmt: skip
        cfg = AgentConfig.model_validate({"cluster-pool-ipv4-cidr": CLUSTER_CIDR})
        d = node_defines(cfg, pin_root=lab.pin_root, node_ip=NODE_IP, pod_cidr=POD_CIDR)
        d = loader.NodeDefines(d.pin_root, d.sizes, {**d.values, "NETNS_COOKIE": cookie})
        prog = loader.compile_program("bpf_sock", d)
        owner = cgroup.node_map_ids(lab.pin_root)
        ids = []
        for fn, at in cgroup.SOCK_HOOKS:
            before = set(_attached(root, at))
            cgroup.attach(root, prog.fd(fn, loader.CGROUP_SOCK_ADDR, at), at, owner)
            ids += list(set(_attached(root, at)) - before)
        prog.close()
        backends = [(p.ip, SERVER_PORT) for p in lab.pods.values() if p.name != "client"]
        lab.maps.service(VIP, 80, "tcp", backends, rev_nat=1)
        lab.maps.service(VIP, 53, "udp", backends, rev_nat=2)
        lab.maps.service(VIP, 81, "tcp", [], rev_nat=3)
        yield lab, ids
    finally:
        lab.down()
    attached = {i for _fn, at in cgroup.SOCK_HOOKS for i in _attached(root, at)}
    assert not attached & set(ids), "socket LB programs left attached after the node's maps were removed"


def _attached(root: str, attach_type: int) -> list[int]:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return cgroup.attached_programs(fd, attach_type)
    finally:
        os.close(fd)


def test_node_processes_reach_the_backends_over_tcp_and_udp(node: tuple[SingleNode, list[int]]) -> None:
    lab, _ = node
    for proto, port in (("tcp", 80), ("udp", 53)):
        res = lab.probe("node", VIP, port, proto=proto, count=12)
        assert all(r["result"] == "ok" for r in res), res
        assert {r["reply"].split()[0] for r in res} == {"be1", "be2", "be3"}
        assert all(
            r["reply"].split()[1].startswith(NODE_IP + ":") for r in res
        )  # no NAT: the node's own address


def test_service_without_backends_fails_connect_at_once(node: tuple[SingleNode, list[int]]) -> None:
    lab, _ = node
    (r,) = lab.probe("node", VIP, 81, timeout=5)
    assert r["result"] == "refused"


def test_only_the_node_namespace_is_translated(node: tuple[SingleNode, list[int]]) -> None:
    lab, _ = node
    in_node = lab.exec_in("node", [sys.executable, "-c", PEER, VIP, "53"]).stdout.strip()
    in_pod = lab.exec_in("client", [sys.executable, "-c", PEER, VIP, "53"]).stdout.strip()
    assert in_node in {p.ip for p in lab.pods.values()}  # pointed at a backend before any packet
    assert in_pod == VIP  # pods are load-balanced per packet by bpf_lxc.c instead


def test_removing_the_node_detaches_its_programs() -> None:
    lab = SingleNode.up(pin_root="/sys/fs/bpf/pyc-test-sock2")
    root = cgroup.cgroup2_root()
    assert root
    try:
        prog = loader.compile_program("bpf_sock", loader.NodeDefines(lab.pin_root, loader.sizes_from_config(None),
                                                                     {"NETNS_COOKIE": 1}))  # fmt: skip
        owner = cgroup.node_map_ids(lab.pin_root)
        cgroup.attach(root, prog.fd("sock4_connect", loader.CGROUP_SOCK_ADDR, cgroup.CGROUP_INET4_CONNECT),
                      cgroup.CGROUP_INET4_CONNECT, owner)  # fmt: skip
        # attaching again replaces in place (an agent restart)
        n = len(_attached(root, cgroup.CGROUP_INET4_CONNECT))
        cgroup.attach(root, prog.fd("sock4_connect", loader.CGROUP_SOCK_ADDR, cgroup.CGROUP_INET4_CONNECT),
                      cgroup.CGROUP_INET4_CONNECT, owner)  # fmt: skip
        assert len(_attached(root, cgroup.CGROUP_INET4_CONNECT)) == n
        prog.close()
    finally:
        lab.down()
    assert len(_attached(root, cgroup.CGROUP_INET4_CONNECT)) == n - 1  # detached with the node's maps
