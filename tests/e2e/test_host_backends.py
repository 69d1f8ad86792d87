"""Service backends that are not pod IPs: the API server behind `default/kubernetes`, and a
hostNetwork pod (its node's IP) behind a ClusterIP."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import NODE_IPS, WORLD_IP, Lab, eventually

pytestmark = pytest.mark.e2e

API_VIP, API_BACKEND = "10.96.0.1", "192.168.200.1:6443"  # the underlay bridge: where nodes reach the server

GET_VERSION = """
import json, urllib.request
with urllib.request.urlopen("http://10.96.0.1:443/version", timeout=5) as r:
    print(json.dumps({"status": r.status, "body": json.loads(r.read())}))
"""


def _service_list(lab: Lab, node: str) -> list[dict[str, object]]:
    return list(json.loads(lab.exec(node, "pycilium", "service", "list", "-o", "json").stdout))


def test_pods_reach_the_api_server_through_the_kubernetes_service(app: Lab) -> None:
    svc = app.get("service", "kubernetes", "default")
    assert svc["spec"]["clusterIP"] == API_VIP and "selector" not in svc["spec"]
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [("https", 443, 6443)]
    sl = app.get("endpointslice", "kubernetes", "default")
    assert [e["addresses"] for e in sl["endpoints"]] == [["192.168.200.1"]]
    for node in NODE_IPS:
        table = app.exec(node, "pycilium", "service", "list").stdout
        assert f"{API_VIP}:443/TCP" in table and API_BACKEND in table, table
        (entry,) = [
            s for s in _service_list(app, node) if (s["frontend_ip"], s["frontend_port"]) == (API_VIP, 443)
        ]
        backends = entry["backends"]
        assert isinstance(backends, list) and [f"{b['ip']}:{b['port']}" for b in backends] == [API_BACKEND]
    for client in ("e2e/client1", "e2e/client2"):  # node1, node2
        out = app.exec(client, "python3", "-c", GET_VERSION).stdout
        got = json.loads(out)
        assert got["status"] == 200 and got["body"]["major"] == "1" and got["body"]["gitVersion"], (
            client,
            got,
        )


HOSTNET = """
apiVersion: v1
kind: Namespace
metadata: {name: hostnet}
---
apiVersion: v1
kind: Pod
metadata: {name: hn-a, namespace: hostnet, labels: {app: hn}}
spec: {nodeName: node2, hostNetwork: true, containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: hn, namespace: hostnet}
spec:
  type: NodePort
  selector: {app: hn}
  ports: [{port: 80, targetPort: http}]
"""

NAMESPACE = HOSTNET.split("---")[0]
POD_A = HOSTNET.split("---")[1]

SECOND = """
apiVersion: v1
kind: Pod
metadata: {name: hn-b, namespace: hostnet, labels: {app: hn}}
spec: {nodeName: node2, hostNetwork: true, containers: [{name: c, ports: [{containerPort: 9090}]}]}
"""


def test_host_network_pod_behind_a_cluster_ip(app: Lab) -> None:
    try:
        _host_network_pod_behind_a_cluster_ip(app)
    finally:
        app.delete(NAMESPACE)


def _host_network_pod_behind_a_cluster_ip(app: Lab) -> None:
    app.apply(HOSTNET)  # --wait: running, and the ClusterIP has its one backend on every node
    pod = app.get("pod", "hn-a", "hostnet")
    st = pod["status"]
    node_ip = NODE_IPS["node2"]
    assert (st["phase"], st["podIP"], st["podIPs"], st["hostIP"]) == (
        "Running",
        node_ip,
        [{"ip": node_ip}],
        node_ip,
    )
    slices = json.loads(
        app.kubectl(
            "-n", "hostnet", "get", "endpointslices", "-l", "kubernetes.io/service-name=hn", "-o", "json"
        ).stdout
    )["items"]
    assert [(e["addresses"], e["nodeName"]) for s in slices for e in s["endpoints"]] == [([node_ip], "node2")]
    # the server runs in node2's own namespace: the world reaches it at the node IP
    r = app.probe1("world", f"{node_ip}:9090")
    assert (r["result"], r["pod"], r["client"].split(":")[0]) == ("ok", "hn-a", WORLD_IP)
    vip = app.cluster_ip("hostnet/hn")
    for client in ("e2e/client1", "e2e/client2"):  # another node, the backend's node
        results = app.probe(client, f"{vip}:80", count=3)
        assert [(r["result"], r["pod"]) for r in results] == [("ok", "hn-a")] * 3, (client, results)
    # NodePort through the other node: SNATed to node1, forwarded to node2's address
    r = app.probe1("world", f"{NODE_IPS['node1']}:{app.node_port('hostnet/hn')}")
    assert (r["result"], r["pod"], r["client"].split(":")[0]) == ("ok", "hn-a", NODE_IPS["node1"])

    # a second hostNetwork pod wanting the same port on that node is refused, not started
    app.apply(SECOND, wait=False)

    def rejected() -> dict[str, object] | None:
        s = app.get("pod", "hn-b", "hostnet").get("status") or {}
        return s if s.get("phase") == "Failed" else None

    st_b = eventually(rejected, timeout=20, what="hn-b rejected")
    assert st_b["reason"] == "NodePorts" and "TCP/9090 is used by pod hostnet/hn-a" in str(st_b["message"])
    assert "podIP" not in st_b
    r = app.probe1("e2e/client1", f"{vip}:80")  # hn-a keeps the port, the kubelet goes on
    assert (r["result"], r["pod"]) == ("ok", "hn-a")

    # deleting the pod stops its server in the node's namespace
    app.delete(POD_A)
    assert app.probe1("world", f"{node_ip}:9090", timeout=1.0)["result"] == "refused"


LOCAL_NP = """
apiVersion: v1
kind: Namespace
metadata: {name: hostnet-np}
---
apiVersion: v1
kind: Pod
metadata: {name: hn-np, namespace: hostnet-np, labels: {app: hn-np}}
spec: {nodeName: node2, hostNetwork: true, containers: [{name: c, ports: [{containerPort: 9091}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: hn-np, namespace: hostnet-np}
spec:
  type: NodePort
  selector: {app: hn-np}
  ports: [{port: 80, targetPort: 9091}]
---
apiVersion: v1
kind: Service
metadata: {name: hn-np-local, namespace: hostnet-np}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: hn-np}
  ports: [{port: 80, targetPort: 9091}]
"""


def test_node_port_to_a_host_network_backend_on_the_same_node(lab: Lab) -> None:
    """bpf_host.c hands a backend at the node's own address to the stack (no SNAT, no FIB redirect);
    the reply is translated back to the NodePort by to_netdev. Local policy keeps the client IP."""
    try:
        lab.apply(LOCAL_NP)
        for svc in ("hostnet-np/hn-np", "hostnet-np/hn-np-local"):
            np = lab.node_port(svc)
            r = lab.probe1("world", f"{NODE_IPS['node2']}:{np}", timeout=2.0)
            assert (r["result"], r.get("pod")) == ("ok", "hn-np"), (svc, r)
            assert r["client"].split(":")[0] == WORLD_IP, (svc, r)  # delivered locally: never SNATed
    finally:
        lab.delete(LOCAL_NP.split("---")[0])
