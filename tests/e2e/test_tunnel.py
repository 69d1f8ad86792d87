"""Tunnel routing mode end to end: a second 2-node lab (`pycilium lab up --routing-mode tunnel`) whose
agents route other nodes' pod CIDRs into their VXLAN device instead of via node IPs. Pods talk across
nodes, a ClusterIP spreads over both nodes and a NodePort reaches a backend on the other node, all
through the tunnel, with the pods' MTU lowered by the VXLAN overhead."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import LAB_NAME, Lab

pytestmark = pytest.mark.e2e

TUNNEL_LAB = f"{LAB_NAME}-tun"

APP = """
apiVersion: v1
kind: Namespace
metadata: {name: tun}
---
apiVersion: v1
kind: Pod
metadata: {name: be-1, namespace: tun, labels: {app: echo}}
spec: {nodeName: node1, containers: [{name: c, ports: [{containerPort: 8080}, {containerPort: 8080, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: be-2, namespace: tun, labels: {app: echo}}
spec: {nodeName: node2, containers: [{name: c, ports: [{containerPort: 8080}, {containerPort: 8080, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client1, namespace: tun}
spec: {nodeName: node1, containers: [{name: c}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: tun}
spec:
  selector: {app: echo}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, targetPort: 8080, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: np, namespace: tun}
spec:
  type: NodePort
  selector: {app: echo}
  ports: [{port: 80, targetPort: 8080}]
"""


@pytest.fixture(scope="module")
def tun() -> Iterator[Lab]:
    lab = Lab()
    lab.env["PYCILIUM_LAB_NAME"] = TUNNEL_LAB
    try:
        t0 = time.monotonic()
        lab.run("up", "--nodes", "2", "--routing-mode", "tunnel", timeout=400)
        lab.apply(APP)
        print(f"\ntunnel lab up with its app in {time.monotonic() - t0:.1f}s")
        yield lab
    finally:
        lab.run("down", check=False, timeout=120)


def _vxlan_tx_packets(lab: Lab, node: str) -> int:
    (link,) = json.loads(lab.exec(node, "ip", "-s", "-j", "link", "show", "pyc_vxlan").stdout)
    return int(link["stats64"]["tx"]["packets"])


def test_routes_point_into_the_tunnel_and_pods_get_the_smaller_mtu(tun: Lab) -> None:
    status = tun.status()
    assert status["routingMode"] == "tunnel"
    cidrs = {n["name"]: n["podCIDR"] for n in status["nodes"]}
    routes = tun.exec("node1", "ip", "route", "show", "proto", "194").stdout
    assert f"{cidrs['node2']} via 169.254.42.1 dev pyc_vxlan" in routes, routes
    assert "dev eth0" not in routes  # nothing routed natively via the other node's IP
    link = tun.exec("node1", "ip", "-d", "link", "show", "pyc_vxlan").stdout
    assert "vxlan external" in link and "dstport 8472" in link and "mtu 1450" in link
    assert "mtu 1450" in tun.exec("tun/client1", "ip", "link", "show", "eth0").stdout


def test_pods_across_nodes_through_the_tunnel(tun: Lab) -> None:
    before = _vxlan_tx_packets(tun, "node1")
    client_ip, be2 = tun.pod_ip("tun/client1"), tun.pod_ip("tun/be-2")
    for proto in ("tcp", "udp"):
        r = tun.probe1("tun/client1", f"{be2}:8080", proto)
        assert r["result"] == "ok" and r["pod"] == "be-2", (proto, r)
        assert r["client"].split(":")[0] == client_ip  # no NAT between pods
    assert _vxlan_tx_packets(tun, "node1") > before


def test_clusterip_reaches_the_backend_on_the_other_node(tun: Lab) -> None:
    vip = tun.cluster_ip("tun/echo")
    for proto, port in (("tcp", 80), ("udp", 53)):
        results = tun.probe("tun/client1", f"{vip}:{port}", proto, count=24)
        assert all(r["result"] == "ok" for r in results), results
        assert {r["pod"] for r in results} == {"be-1", "be-2"}, (proto, results)


def test_nodeport_forwards_to_a_remote_backend_through_the_tunnel(tun: Lab) -> None:
    node1 = next(n["ip"] for n in tun.status()["nodes"] if n["name"] == "node1")
    before = _vxlan_tx_packets(tun, "node1")
    results = tun.probe("world", f"{node1}:{tun.node_port('tun/np')}", count=24)
    assert all(r["result"] == "ok" for r in results), results
    assert {r["pod"] for r in results} == {"be-1", "be-2"}, results
    # be-2 sees node1's address (SNAT for a remote backend), be-1 the world's
    by_pod = {r["pod"]: r["client"].split(":")[0] for r in results}
    assert by_pod["be-2"] == node1
    assert _vxlan_tx_packets(tun, "node1") > before
