"""Pod-to-pod, Services (ClusterIP, affinity, no endpoints, NodePort), masquerade and conntrack on a
2-node lab with real agents."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import BACKENDS, NODE_IPS, WORLD_IP, Lab

pytestmark = pytest.mark.e2e


def test_pod_to_pod_same_node_and_across_nodes(app: Lab) -> None:
    client_ip = app.pod_ip("e2e/client1")
    for backend in ("be-1a", "be-2a"):  # node1 (same node as client1), node2
        ip = app.pod_ip(f"e2e/{backend}")
        for proto in ("tcp", "udp"):
            r = app.probe1("e2e/client1", f"{ip}:8080", proto)
            assert r["result"] == "ok", (backend, proto, r)
            assert r["pod"] == backend
            assert r["client"].split(":")[0] == client_ip  # no NAT between pods


@pytest.mark.parametrize(("proto", "port"), [("tcp", 80), ("udp", 53)])
def test_clusterip_spreads_over_backends_on_both_nodes(app: Lab, proto: str, port: int) -> None:
    vip = app.cluster_ip("e2e/echo")
    results = app.probe("e2e/client2", f"{vip}:{port}", proto, count=40)
    assert all(r["result"] == "ok" for r in results), results
    seen = {r["pod"] for r in results}
    assert seen == set(BACKENDS), f"40 connections reached only {seen}"
    client_ip = app.pod_ip("e2e/client2")
    assert {r["client"].split(":")[0] for r in results} == {client_ip}  # the backend sees the pod


def test_session_affinity_keeps_a_client_on_one_backend(app: Lab) -> None:
    vip = app.cluster_ip("e2e/sticky")
    for client in ("e2e/client1", "e2e/client2"):
        results = app.probe(client, f"{vip}:80", count=12)
        assert all(r["result"] == "ok" for r in results)
        assert len({r["pod"] for r in results}) == 1, results


@pytest.mark.parametrize(("proto", "port"), [("tcp", 80), ("udp", 53)])
def test_service_without_endpoints_rejects(app: Lab, proto: str, port: int) -> None:
    vip = app.cluster_ip("e2e/nobody")
    r = app.probe1("e2e/client1", f"{vip}:{port}", proto, timeout=3)
    assert r["result"] == "refused", r  # rejected (ICMP unreachable / RST), not dropped


def test_nodeport_cluster_policy_from_world(app: Lab) -> None:
    port = app.node_port("e2e/np-cluster")
    results = app.probe("world", f"{NODE_IPS['node1']}:{port}", count=30)
    assert all(r["result"] == "ok" for r in results), results
    assert {BACKENDS[r["pod"]] for r in results} == {"node1", "node2"}
    for r in results:
        client = r["client"].split(":")[0]
        # local backends see the world's address; remote ones the entry node's (SNAT for the return path)
        assert client == (WORLD_IP if BACKENDS[r["pod"]] == "node1" else NODE_IPS["node1"]), r


def test_nodeport_local_policy_keeps_the_source_ip(app: Lab) -> None:
    port = app.node_port("e2e/np-local")
    for node in ("node1", "node2"):
        results = app.probe("world", f"{NODE_IPS[node]}:{port}", count=12)
        assert all(r["result"] == "ok" for r in results), results
        assert {BACKENDS[r["pod"]] for r in results} == {node}  # only the node's own backends
        assert {r["client"].split(":")[0] for r in results} == {WORLD_IP}


def test_pod_to_world_is_masqueraded_in_bpf(app: Lab) -> None:
    r = app.probe1("e2e/client1", f"{WORLD_IP}:8080")
    assert r["result"] == "ok" and r["pod"] == "world"
    ip, port = r["client"].split(":")
    assert ip == NODE_IPS["node1"]
    nat = app.exec("node1", "pycilium", "bpf", "nat", "list").stdout
    client_ip = app.pod_ip("e2e/client1")
    lines = [line for line in nat.splitlines() if f"{WORLD_IP}:8080" in line]
    assert any(client_ip in line and f"{NODE_IPS['node1']}:{port}" in line for line in lines), nat
    # the other node never saw this flow
    assert client_ip not in app.exec("node2", "pycilium", "bpf", "nat", "list").stdout


def test_conntrack_entries_are_visible_per_node(app: Lab) -> None:
    vip = app.cluster_ip("e2e/echo")
    r = app.probe1("e2e/client1", f"{vip}:80")
    assert r["result"] == "ok"
    sport = r["client"].split(":")[1]
    client_ip = app.pod_ip("e2e/client1")
    ct = app.exec("node1", "pycilium", "bpf", "ct", "list", "global").stdout
    flow = [line for line in ct.splitlines() if f"{client_ip}:{sport} " in line]
    assert any(f"-> {vip}:80" in line and line.startswith("TCP SVC") for line in flow), ct
    assert any(line.startswith("TCP OUT") for line in flow), flow
    # `exec NODE` runs with that node's agent context: node2's maps do not have node1's flow
    ct2 = app.exec("node2", "pycilium", "bpf", "ct", "list", "global").stdout
    assert f"{client_ip}:{sport} -> {vip}:80" not in ct2
