"""Pod-to-pod, Services (ClusterIP, affinity and its timeout, no endpoints, NodePort TCP and UDP),
masquerade and conntrack on a 2-node lab with real agents."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from pycilium.bpf.maps import BY_NAME, PinnedMap
from pycilium.bpf.maps.util import be32_to_ip
from pycilium.lab.cluster.lab import Paths

from tests.e2e.conftest import BACKENDS, LAB_NAME, NODE_IPS, WORLD_IP, Lab

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


def _frontend(lab: Lab, node: str, vip: str, port: int, proto: str) -> dict[str, Any]:
    """The service entry `pycilium bpf lb list -o json` shows on a node for VIP:PORT/PROTO."""
    out = json.loads(lab.exec(node, "pycilium", "bpf", "lb", "list", "-o", "json").stdout)
    (fe,) = [f for f in out if (f["address"], f["port"], f["proto"]) == (vip, port, proto)]
    return dict(fe)


def _affinity(node: str, rev_nat: int) -> dict[str, tuple[int, int]]:
    """A node's session-affinity entries of one service: client IP -> (last_used seconds, backend id)."""
    with PinnedMap(BY_NAME["lb4_affinity"], Paths(LAB_NAME).node_bpf_root(node)) as m:
        return {be32_to_ip(k.client_ip): (int(v.last_used), int(v.backend_id))
                for k, v in m.items() if k.rev_nat_index == rev_nat}  # fmt: skip


def test_session_affinity_timeout_expires_then_selects_again(app: Lab) -> None:
    """sticky-short has timeoutSeconds 2: within it a client keeps its backend; once it has been idle
    for longer, its affinity entry is not honoured and a new selection is written. Selection is random
    over 4 backends, so rounds go on (up to 10) until a second backend was chosen."""
    vip = app.cluster_ip("e2e/sticky-short")
    client = app.pod_ip("e2e/client2")
    fe = _frontend(app, "node2", vip, 80, "TCP")
    timeout = fe["affinity_timeout"]
    assert timeout == 2 and "sessionAffinity" in fe["flag_names"], fe
    pod_of = {b["backend_id"]: b["address"] for b in fe["backends"]}
    ips = {app.pod_ip(f"e2e/{b}"): b for b in BACKENDS}
    assert sorted(ips[a] for a in pod_of.values()) == sorted(BACKENDS)

    def one_round() -> tuple[str, int]:
        results = app.probe("e2e/client2", f"{vip}:80", count=4)
        assert all(r["result"] == "ok" for r in results), results
        pods = {r["pod"] for r in results}
        assert len(pods) == 1, results  # sticky while the entry is fresh
        last_used, backend_id = _affinity("node2", fe["rev_nat"])[client]
        assert ips[pod_of[backend_id]] in pods  # the entry names the backend that answered
        return pods.pop(), last_used

    chosen = [one_round()]
    while len({pod for pod, _ in chosen}) == 1 and len(chosen) <= 10:
        time.sleep(timeout + 1.5)  # idle past the timeout (the datapath counts whole seconds)
        pod, last_used = one_round()
        assert last_used - chosen[-1][1] > timeout  # the expired entry was replaced by a new selection
        chosen.append((pod, last_used))
    assert len({pod for pod, _ in chosen}) > 1, (
        f"{len(chosen)} selections after expiry all chose {chosen[0][0]}"
    )


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


def test_udp_nodeport_cluster_policy_from_world(app: Lab) -> None:
    port = app.node_port("e2e/np-udp")
    for entry in ("node1", "node2"):
        results = app.probe("world", f"{NODE_IPS[entry]}:{port}", "udp", count=20)
        assert all(r["result"] == "ok" for r in results), results  # every datagram's reply came back
        assert {BACKENDS[r["pod"]] for r in results} == {"node1", "node2"}
        for r in results:
            client = r["client"].split(":")[0]
            # as for TCP: local backends see the world; remote ones the entry node (SNAT for the return path)
            assert client == (WORLD_IP if BACKENDS[r["pod"]] == entry else NODE_IPS[entry]), (entry, r)


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
