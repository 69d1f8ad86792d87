"""The agent end to end on one node: a node namespace running the embedded API server and the real
`pycilium-agent`; pods created through the real CNI plugin; a Service written through the API.

Proves the agent programs the datapath from the Kubernetes API, that the CLI reads it, and that an
agent restart keeps an established connection through a VIP, IPAM and endpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pycilium.bpf.loader import remove_pin_root
from pycilium.lab import netns

pytestmark = pytest.mark.kernel

NODE_IP = "192.168.241.1"
POD_CIDR = "10.201.1.0/24"
API_PORT = 18241
VENV_BIN = Path(sys.executable).parent

ECHO_SERVER = r"""
import socket, sys, threading
name = sys.argv[1]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 8080)); s.listen(16)
def serve(c):
    while True:
        d = c.recv(1024)
        if not d: return
        c.sendall(name.encode() + b":" + d)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

LONG_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
for line in sys.stdin:
    s.sendall(line.strip().encode())
    print(s.recv(1024).decode(), flush=True)
"""


@dataclass
class Node:
    ns: str
    tmp: Path
    pin_root: str
    kubeconfig: str
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    pods: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (netns, ip)

    def agent_cmd(self) -> list[str]:
        st = self.tmp / "state"
        sets = {"node-name": "n1", "kubeconfig": self.kubeconfig, "bpf-root": self.pin_root, "state-dir": str(st),
                "socket-path": str(st / "pycilium.sock"), "cni-socket-path": str(st / "cni.sock"),
                "cni-conf-dir": str(self.tmp / "net.d"), "devices": "eth0", "health-port": "9879",
                "prometheus-serve-port": "0"}  # fmt: skip
        cmd = ["ip", "netns", "exec", self.ns, str(VENV_BIN / "pycilium-agent")]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        return cmd

    def start_agent(self) -> None:
        log = open(self.tmp / "agent.log", "a")  # noqa: SIM115 - owned by the process
        self.procs["agent"] = subprocess.Popen(self.agent_cmd(), stdout=log, stderr=log, text=True)
        self.wait_healthy()

    def stop_agent(self) -> None:
        p = self.procs.pop("agent")
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0, (self.tmp / "agent.log").read_text()[-3000:]

    def health(self) -> dict[str, str] | None:
        code = "import urllib.request,sys; print(urllib.request.urlopen('http://127.0.0.1:9879/healthz', timeout=2).read().decode())"
        r = netns.run([sys.executable, "-c", code], netns=self.ns, check=False)
        return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else None

    def wait_healthy(self, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            h = self.health()
            if h and h.get("status") == "ok":
                return
            agent = self.procs.get("agent")
            if agent is not None and agent.poll() is not None:
                break
            time.sleep(0.3)
        raise AssertionError("agent not healthy:\n" + (self.tmp / "agent.log").read_text()[-4000:])

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return netns.run(
            ["kubectl", "--kubeconfig", self.kubeconfig, *args], netns=self.ns, input=stdin
        ).stdout

    def cli(self, *args: str) -> str:
        env = [
            "env",
            f"PYCILIUM_BPF_ROOT={self.pin_root}",
            f"PYCILIUM_SOCKET={self.tmp / 'state' / 'pycilium.sock'}",
        ]
        return netns.run([*env, str(VENV_BIN / "pycilium"), *args], netns=self.ns).stdout

    def cni(self, command: str, pod: str, pod_ns: str) -> dict[str, object]:
        conf = json.loads((self.tmp / "net.d" / "05-pycilium.conflist").read_text())
        entry = {**conf["plugins"][0], "cniVersion": conf["cniVersion"], "name": conf["name"]}
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": f"cid{pod}", "CNI_NETNS": f"/var/run/netns/{pod_ns}",
               "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}"}  # fmt: skip
        p = subprocess.run(["ip", "netns", "exec", self.ns, "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                            str(VENV_BIN / "pycilium-cni")], input=json.dumps(entry), capture_output=True, text=True)  # fmt: skip
        assert p.returncode == 0, p.stdout + p.stderr
        return json.loads(p.stdout) if p.stdout.strip() else {}


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    tmp = Path(tempfile.mkdtemp(prefix="pyc-agent-test-"))
    pin_root = f"/sys/fs/bpf/pyc-test-agent-{os.getpid()}"
    topo = netns.Topology()
    n = Node(topo.add_netns(netns.unique("pycan")), tmp, pin_root, str(tmp / "kubeconfig"))
    try:
        peer = topo.add_netns(netns.unique("pycap"))
        topo.add_veth("eth0", "p0", n.ns, peer)
        netns.ip("addr", "add", f"{NODE_IP}/24", "dev", "eth0", netns=n.ns)
        api_log = open(tmp / "api.log", "w")  # noqa: SIM115
        n.procs["api"] = subprocess.Popen(
            ["ip", "netns", "exec", n.ns, sys.executable, "-m", "pycilium.lab.apiserver", "--host", "127.0.0.1",
             "--port", str(API_PORT), "--kubeconfig", n.kubeconfig], stdout=api_log, stderr=api_log)  # fmt: skip
        for _ in range(100):
            if Path(n.kubeconfig).exists():
                break
            time.sleep(0.1)
        n.kubectl("apply", "-f", "-", stdin=json.dumps({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}, "spec": {"podCIDR": POD_CIDR},
            "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}}))  # fmt: skip
        n.start_agent()
        for pod in ("client", "backend"):
            pns = topo.add_netns(netns.unique(f"pyc{pod[:3]}"))
            res = n.cni("ADD", pod, pns)
            ip = res["ips"][0]["address"].split("/")[0]  # type: ignore[index]
            n.pods[pod] = (pns, ip)
        bns = n.pods["backend"][0]
        n.procs["echo"] = subprocess.Popen(
            ["ip", "netns", "exec", bns, sys.executable, "-c", ECHO_SERVER, "backend"]
        )
        n.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "default"},
             "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "echo-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "echo"}},
             "addressType": "IPv4", "ports": [{"port": 8080, "protocol": "TCP"}],
             "endpoints": [{"addresses": [n.pods["backend"][1]], "conditions": {"ready": True}, "nodeName": "n1"}]},
        ]}))  # fmt: skip
        yield n
    finally:
        for name, p in n.procs.items():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if name == "agent" else signal.SIGKILL)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        topo.close()
        remove_pin_root(pin_root)
        shutil.rmtree(tmp, ignore_errors=True)


def _vip(node: Node) -> str:
    svc = json.loads(node.kubectl("get", "service", "echo", "-o", "json"))
    return str(svc["spec"]["clusterIP"])


def _wait_frontend(node: Node, vip: str) -> None:
    for _ in range(50):
        if f"{vip}:80" in node.cli("bpf", "lb", "list"):
            return
        time.sleep(0.2)
    raise AssertionError(node.cli("bpf", "lb", "list"))


def test_pods_get_addresses_from_the_node_pod_cidr(node: Node) -> None:
    for _pns, ip in node.pods.values():
        assert ip.startswith("10.201.1.")
    eps = json.loads(node.cli("endpoint", "list", "-o", "json"))
    assert {e["ipv4"] for e in eps} == {ip for _, ip in node.pods.values()}


def test_service_from_the_api_is_load_balanced_in_bpf(node: Node) -> None:
    vip = _vip(node)
    _wait_frontend(node, vip)
    r = netns.run(
        [sys.executable, "-c", LONG_CLIENT, vip, "80"], netns=node.pods["client"][0], input="hello\n"
    )
    assert r.stdout.strip() == "backend:hello"
    assert f"{node.pods['backend'][1]}:8080" in node.cli("service", "list")
    ct = node.cli("bpf", "ct", "list", "global")
    assert f"{node.pods['client'][1]}:" in ct and f"-> {vip}:80" in ct


def test_established_connection_survives_an_agent_restart(node: Node) -> None:
    vip = _vip(node)
    _wait_frontend(node, vip)
    lb_before = node.cli("bpf", "lb", "list")
    eps_before = json.loads(node.cli("endpoint", "list", "-o", "json"))
    client = subprocess.Popen(["ip", "netns", "exec", node.pods["client"][0], sys.executable, "-c", LONG_CLIENT, vip,
                               "80"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert client.stdin is not None and client.stdout is not None
    try:
        client.stdin.write("one\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "backend:one"
        node.stop_agent()
        client.stdin.write("two\n")  # agent down: the datapath keeps forwarding
        client.stdin.flush()
        assert client.stdout.readline().strip() == "backend:two"
        node.start_agent()
        client.stdin.write("three\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "backend:three"
    finally:
        client.kill()
        client.wait()
    assert node.cli("bpf", "lb", "list") == lb_before  # same ids and slots after the restart
    eps_after = json.loads(node.cli("endpoint", "list", "-o", "json"))
    assert {(e["id"], e["ipv4"]) for e in eps_after} == {(e["id"], e["ipv4"]) for e in eps_before}


def test_ipam_never_hands_out_an_address_twice_across_restarts(node: Node) -> None:
    topo = netns.Topology()
    try:
        pns = topo.add_netns(netns.unique("pycnew"))
        res = node.cni("ADD", "newpod", pns)
        ip = res["ips"][0]["address"].split("/")[0]  # type: ignore[index]
        assert ip not in {ip for _, ip in node.pods.values()}
        node.cni("DEL", "newpod", pns)
    finally:
        topo.close()


def test_metrics_export_datapath_counters(node: Node) -> None:
    vip = _vip(node)
    _wait_frontend(node, vip)
    netns.run([sys.executable, "-c", LONG_CLIENT, vip, "80"], netns=node.pods["client"][0], input="m\n")
    code = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9879/metrics', timeout=5).read().decode())"
    text = netns.run([sys.executable, "-c", code], netns=node.ns).stdout
    lines = {
        ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and not ln.startswith("#")
    }
    assert lines['pycilium_forward_count_total{direction="EGRESS"}'] > 0
    assert lines['pycilium_conntrack_created_total{map="ct4_global"}'] > 0
    assert 0 < lines['pycilium_bpf_map_pressure{map_name="ct4_global"}'] < 1
    assert 'pycilium_conntrack_evictions_estimated_total{map="ct4_global"}' in lines
    assert any(k.startswith("pycilium_services_sync_duration_seconds") for k in lines)


def test_node_processes_reach_services_through_socket_lb(node: Node) -> None:
    vip = _vip(node)
    _wait_frontend(node, vip)
    r = netns.run([sys.executable, "-c", LONG_CLIENT, vip, "80"], netns=node.ns, input="from-node\n")
    assert r.stdout.strip() == "backend:from-node"
