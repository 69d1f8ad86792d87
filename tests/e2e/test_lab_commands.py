"""The `pycilium lab` command contract on a running lab: status, kubeconfig with kubectl, apply
(round-robin scheduling, Deployments, re-apply in place), kubectl scale, exec into pods/nodes/world,
probe."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import LAB_NAME, NODE_IPS, WORLD_IP, Lab, eventually

pytestmark = pytest.mark.e2e

MANIFEST = """
apiVersion: v1
kind: Namespace
metadata: {name: cmds, labels: {a: "1"}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: dep, namespace: cmds}
spec:
  replicas: 4
  selector: {matchLabels: {app: dep}}
  template:
    metadata: {labels: {app: dep, tier: x}}
    spec: {containers: [{name: c, ports: [{containerPort: 7000}, {containerPort: 7001, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: solo, namespace: cmds, labels: {app: solo, v: "1"}}
spec: {containers: [{name: c, ports: [{containerPort: 9000}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: dep, namespace: cmds}
spec:
  type: NodePort
  selector: {app: dep}
  ports: [{name: t, port: 70, targetPort: 7000}, {name: u, port: 71, targetPort: 7001, protocol: UDP}]
"""


def test_status_kubeconfig_apply_exec(lab: Lab) -> None:
    out = lab.apply(MANIFEST)
    assert "deployment/cmds/dep created" in out and "pod/cmds/solo created" in out
    st = lab.status()
    assert [(n["name"], n["ip"], n["podCIDR"], n["agent"]["healthy"]) for n in st["nodes"]] == [
        ("node1", NODE_IPS["node1"], "10.200.1.0/24", True),
        ("node2", NODE_IPS["node2"], "10.200.2.0/24", True),
    ]
    assert st["world"]["ip"] == WORLD_IP
    assert st["apiServer"]["url"].startswith("http://127.0.0.1:")
    pods = {p["name"]: p for p in st["pods"] if p["namespace"] == "cmds"}
    assert len(pods) == 5 and all(p["phase"] == "Running" and p["ip"] for p in pods.values())
    dep_pods = [p for name, p in pods.items() if name.startswith("dep-")]
    nodes = [p["node"] for p in pods.values()]  # 5 unscheduled pods, bound round-robin
    assert sorted((nodes.count("node1"), nodes.count("node2"))) == [2, 3]
    for p in pods.values():
        assert p["ip"].startswith("10.200.1." if p["node"] == "node1" else "10.200.2.")
    (svc,) = [s for s in st["services"] if s["namespace"] == "cmds"]
    assert [(p["port"], p["protocol"]) for p in svc["ports"]] == [(70, "TCP"), (71, "UDP")]
    assert all(30000 <= p["nodePort"] <= 32767 for p in svc["ports"])

    # kubectl with the printed kubeconfig
    got = json.loads(lab.kubectl("-n", "cmds", "get", "pods", "-o", "json").stdout)
    assert len(got["items"]) == 5
    assert "node1" in lab.kubectl("get", "nodes").stdout

    # every declared port answers, TCP and UDP, through the Service and the NodePort
    vip = svc["clusterIP"]
    assert lab.probe1("world", f"{NODE_IPS['node2']}:{svc['ports'][0]['nodePort']}")["pod"].startswith("dep-")
    assert lab.probe1("cmds/solo", f"{vip}:71", "udp")["pod"].startswith("dep-")
    assert lab.probe1(f"cmds/{dep_pods[0]['name']}", f"{pods['solo']['ip']}:9000")["pod"] == "solo"

    # re-apply with other labels: updated in place, never recreated
    uid = lab.get("pod", "solo", "cmds")["metadata"]["uid"]
    out = lab.apply(MANIFEST.replace('app: solo, v: "1"', 'app: solo, v: "2"'))
    assert "pod/cmds/solo configured" in out and "deployment/cmds/dep unchanged" in out
    pod = lab.get("pod", "solo", "cmds")
    assert pod["metadata"]["uid"] == uid and pod["metadata"]["labels"] == {"app": "solo", "v": "2"}

    # exec: exit codes pass through; nodes run with their agent's context
    assert lab.exec("cmds/solo", "sh", "-c", "exit 5", check=False).returncode == 5
    assert pods["solo"]["ip"] in lab.exec("cmds/solo", "ip", "-br", "addr").stdout
    assert WORLD_IP in lab.exec("world", "ip", "-br", "addr").stdout
    node1 = lab.exec("node1", "sh", "-c", "echo $PYCILIUM_BPF_ROOT; ls /sys/class/net").stdout.split()
    assert node1[0] == f"/sys/fs/bpf/{LAB_NAME}/node1" and "eth0" in node1
    assert lab.exec("node2", "pycilium", "status", "--brief", check=False).returncode == 0
    assert lab.exec("node3", "true", check=False).returncode == 2
    nodes_seen = lab.exec("node1", "kubectl", "get", "nodes", "-o", "name").stdout  # KUBECONFIG for inside
    assert "node/node1" in nodes_seen

    # the world reaches node IPs, never pod IPs
    assert lab.probe1("world", f"{pods['solo']['ip']}:9000", timeout=1)["result"] != "ok"

    # kubectl scale goes through deployments/scale; the controller removes the surplus pods
    out = lab.kubectl("-n", "cmds", "scale", "deployment/dep", "--replicas=2").stdout
    assert out.strip() == "deployment.apps/dep scaled"

    def dep_pod_names() -> set[str] | None:
        items = json.loads(lab.kubectl("-n", "cmds", "get", "pods", "-o", "json").stdout)["items"]
        names = {p["metadata"]["name"] for p in items if p["metadata"]["name"].startswith("dep-")}
        return names if len(names) == 2 else None

    assert eventually(dep_pod_names, what="2 dep pods left") < {p["name"] for p in dep_pods}

    lab.delete(MANIFEST)
    assert "cmds" not in lab.kubectl("get", "namespaces").stdout
