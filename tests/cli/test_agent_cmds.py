"""`service list`, `endpoint list|get|delete`, `identity list|get`, `status` against the real gRPC server
(started in-process on a temp socket) answering from a plain-Python AgentStateProvider."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.conftest import PYCILIUM, cli, cli_subprocess
from tests.cli.fake_agent import FakeAgent, running_agent


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[str, FakeAgent]]:
    sock = tmp_path / "run" / "pycilium.sock"
    with running_agent(sock) as state:
        yield str(sock), state


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.split("   ") if c.strip()]


def test_service_list(agent: tuple[str, FakeAgent]) -> None:
    sock, _ = agent
    r = cli("-H", sock, "service", "list")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert _cells(lines[0]) == ["ID", "Frontend", "Service Type", "Backend"]
    assert _cells(lines[1]) == ["1", "10.96.0.10:80/TCP", "ClusterIP", "1 => 10.0.1.7:80/TCP (active)"]
    assert _cells(lines[2]) == ["2 => 10.0.1.8:80/TCP (terminating)"]
    assert lines[2].index("2 =>") == lines[0].index("Backend")  # continuation under Backend
    assert _cells(lines[3]) == ["2", "0.0.0.0:30080/TCP", "NodePort", "1 => 10.0.1.7:80/TCP (active)"]
    assert _cells(lines[4]) == ["3", "10.96.0.53:53/UDP", "ClusterIP"]
    j = json.loads(cli("-H", sock, "service", "list", "-o", "json").out)
    assert [s["id"] for s in j] == [1, 2, 3]
    assert j[0]["backends"][1] == {"id": 12, "ip": "10.0.1.8", "port": 80, "protocol": "TCP",
                                   "state": "terminating", "node_name": ""}  # fmt: skip
    assert j[1]["external_traffic_policy"] == "Local"
    assert j[2]["backends"] == []


def test_service_list_subprocess_with_unix_url(agent: tuple[str, FakeAgent]) -> None:
    sock, _ = agent
    r = cli_subprocess("-H", f"unix://{sock}", "service", "list")
    assert r.code == 0, r.err
    assert "10.96.0.10:80/TCP" in r.out
    r = cli_subprocess("service", "list", "-o", "json", env={"PYCILIUM_SOCKET": sock})
    assert r.code == 0 and len(json.loads(r.out)) == 3


def test_endpoint_list_get_delete(agent: tuple[str, FakeAgent]) -> None:
    sock, state = agent
    r = cli("-H", sock, "endpoint", "list")
    assert r.code == 0
    lines = r.out.splitlines()
    assert _cells(lines[0]) == ["ENDPOINT", "POLICY (ingress)", "POLICY (egress)", "IDENTITY",
                                "LABELS (source:key[=value])", "IPv6", "IPv4", "STATUS"]  # fmt: skip
    assert _cells(lines[1]) == ["ENFORCEMENT", "ENFORCEMENT"]
    assert lines[1].index("ENFORCEMENT") == lines[0].index("POLICY (ingress)")
    assert _cells(lines[2]) == ["12", "Disabled", "Disabled", "1", "reserved:host", "ready"]
    assert _cells(lines[3]) == ["339", "Enabled", "Disabled", "6443", "k8s:app=x", "10.244.2.65", "ready"]
    assert _cells(lines[4]) == ["k8s:io.kubernetes.pod.namespace=default"]
    assert lines[4].index("k8s:io") == lines[0].index("LABELS")
    assert lines[3].index("10.244.2.65") == lines[0].index("IPv4")
    j = json.loads(cli("-H", sock, "-o", "json", "endpoint", "list").out)
    assert j[1]["id"] == 339 and j[1]["ingress_enforced"] is True and j[1]["ipv4"] == "10.244.2.65"

    r = cli("-H", sock, "endpoint", "get", "339")
    assert r.code == 0 and "default/x-1" in r.out and "lxc1234 (ifindex 29)" in r.out
    r = cli("-H", sock, "endpoint", "get", "77")
    assert r.code == 1 and "Error: endpoint 77 not found" in r.err
    assert cli("-H", sock, "endpoint", "delete", "339").out.strip() == "Endpoint 339 deleted"
    assert state.deleted == [339]
    r = cli("-H", sock, "endpoint", "delete", "339")
    assert r.code == 1 and "Endpoint 339 not found" in r.out


def test_identity_list_get(agent: tuple[str, FakeAgent]) -> None:
    sock, _ = agent
    r = cli_subprocess("-H", sock, "identity", "list")
    assert r.code == 0, r.err
    assert [_cells(line) for line in r.out.splitlines()] == [
        ["ID", "LABELS"],
        ["1", "reserved:host"],
        ["2", "reserved:world"],
        ["6443", "k8s:app=x"],
        ["k8s:io.kubernetes.pod.namespace=default"],
        ["12345", "k8s:app=web"],
        ["k8s:io.kubernetes.pod.namespace=default"],
    ]
    j = json.loads(cli("-H", sock, "identity", "get", "12345", "-o", "json").out)
    assert j == {"id": 12345, "labels": ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=default"]}
    r = cli("-H", sock, "identity", "get", "999")
    assert r.code == 1 and "identity 999 not found" in r.err


def test_status(agent: tuple[str, FakeAgent]) -> None:
    sock, state = agent
    r = cli("-H", sock, "status")
    assert r.code == 0, r.err
    lines = {_cells(line)[0]: " ".join(_cells(line)[1:]) for line in r.out.splitlines()}
    assert lines["Node:"] == "node-1 (172.18.0.2)"
    assert lines["Kubernetes:"] == "Ok 1.30"
    assert lines["KubeProxyReplacement:"] == "True [eth0 (Direct Routing)]"
    assert lines["CNI Config file:"] == "/etc/cni/net.d/05-pycilium.conflist"
    assert lines["pycilium:"] == "Ok 0.1.0 (up 1h2m5s)"
    assert lines["IPAM:"] == "IPv4: 2/254 allocated from 10.0.1.0/24"
    assert lines["Routing:"] == "Network: Native Host: BPF"
    assert lines["Masquerading:"] == "BPF [eth0] 10.0.0.0/16"
    assert lines["Controller Status:"] == "2/2 healthy"
    assert lines["Cluster health:"] == "Ok 3/3 reachable"
    assert state.status_calls == [False]

    r = cli("-H", sock, "status", "--verbose")
    assert r.code == 0 and state.status_calls[-1] is True
    assert "KubeProxyReplacement Details:" in r.out and "Session Affinity:" in r.out
    assert "10.0.1.7 (default/web-1)" in r.out and "sync-services" in r.out

    assert cli("-H", sock, "status", "--brief").out.strip() == "OK"
    state.broken = True
    r = cli("-H", sock, "status", "--brief")
    assert r.code == 1 and r.out.strip() == "controllers failing: identity-gc"
    assert "1/2 healthy" in cli("-H", sock, "status").out
    j = json.loads(cli("-H", sock, "status", "-o", "json").out)
    assert j["node_name"] == "node-1" and j["ipam"]["capacity"] == 254
    assert j["kube_proxy_replacement"]["devices"] == ["eth0"]


def test_internal_error_is_reported(agent: tuple[str, FakeAgent]) -> None:
    sock, state = agent
    state.broken = True
    r = cli("-H", sock, "endpoint", "list")
    assert r.code == 1
    assert "agent API error (INTERNAL): RuntimeError: endpoint manager exploded" in r.err


@pytest.mark.parametrize(
    "command",
    [["service", "list"], ["endpoint", "list"], ["identity", "list"], ["status"], ["status", "--brief"]],
)
def test_unreachable_agent(tmp_path: Path, command: list[str]) -> None:
    sock = str(tmp_path / "nobody.sock")
    r = cli("-H", sock, *command)
    assert r.code == 2
    assert r.err.strip() == f"Error: cannot reach the agent at {sock}: is it running?"
    assert r.out == ""


def test_unreachable_agent_stale_socket_subprocess(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))  # a socket file nobody accepts on
    s.close()
    r = cli_subprocess("-H", str(path), "status", timeout=20)
    assert r.code == 2
    assert f"cannot reach the agent at {path}: is it running?" in r.err


def test_malformed_arguments() -> None:
    r = cli("endpoint", "get", "x")
    assert r.code == 2 and "not a number: 'x'" in r.err
    r = cli("status", "--brief", "--verbose")
    assert r.code == 2 and "not allowed with argument" in r.err
    r = cli("service")
    assert r.code == 2 and "required: COMMAND" in r.err


@pytest.mark.kernel  # needs root (to drop to nobody); runuser comes with util-linux (scripts/setup.sh)
def test_socket_permission_denied_for_non_root(agent: tuple[str, FakeAgent]) -> None:
    sock, _ = agent
    p = subprocess.run(["runuser", "-u", "nobody", "--", PYCILIUM, "-H", sock, "status"], capture_output=True,
                       text=True, timeout=30)  # fmt: skip
    assert p.returncode == 2
    assert (
        p.stderr.strip()
        == f"Error: cannot reach the agent at {sock}: permission denied (the socket is root-only)"
    )
