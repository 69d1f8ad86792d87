"""`bpf ipcache list|get` and `bpf policy get` against real pinned maps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pycilium.bpf.maps import BY_NAME, PinnedMap
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.ipcache import IpcacheKey, RemoteEndpointInfo
from pycilium.bpf.maps.policymap import PolicyEntry, PolicyKey
from pycilium.bpf.maps.util import ip_to_be32, port_to_be16

from tests.cli.conftest import cli, cli_subprocess
from tests.cli.fake_agent import running_agent

pytestmark = pytest.mark.kernel


def fill_ipcache(root: str) -> None:
    with PinnedMap(BY_NAME["ipcache"], root) as m:
        m.update(IpcacheKey(32, ip_to_be32("10.0.1.23")),
                 RemoteEndpointInfo(12345, ip_to_be32("192.168.1.11"), 3, d("IPCACHE_F_REMOTE_NODE")))  # fmt: skip
        m.update(IpcacheKey(32, ip_to_be32("10.0.0.5")), RemoteEndpointInfo(6443, 0, 0, 0))
        m.update(IpcacheKey(24, ip_to_be32("10.0.1.0")), RemoteEndpointInfo(16777217, 0, 0, 0))
        m.update(IpcacheKey(0, 0), RemoteEndpointInfo(d("ID_WORLD"), 0, 0, 0))


def test_ipcache_list(maps: str) -> None:
    fill_ipcache(maps)
    r = cli("--bpf-root", maps, "bpf", "ipcache", "list")
    assert r.code == 0
    lines = r.out.splitlines()
    assert lines[0].split("   ")[0] == "IP PREFIX/ADDRESS"
    rows = [line.split(None, 1) for line in lines[1:]]
    assert rows == [
        ["0.0.0.0/0", "identity=2 tunnelendpoint=0.0.0.0 flags=<>"],
        ["10.0.0.5/32", "identity=6443 tunnelendpoint=0.0.0.0 flags=<>"],
        ["10.0.1.0/24", "identity=16777217 tunnelendpoint=0.0.0.0 flags=<>"],
        ["10.0.1.23/32", "identity=12345 tunnelendpoint=192.168.1.11 flags=<remote-node>"],
    ]
    j = json.loads(cli("--bpf-root", maps, "bpf", "ipcache", "list", "-o", "json").out)
    assert j[3] == {"prefix": "10.0.1.23/32", "identity": 12345, "tunnel_endpoint": "192.168.1.11", "node_id": 3,
                    "flags": 1, "flag_names": ["remote-node"]}  # fmt: skip


def test_ipcache_get_longest_prefix(maps: str) -> None:
    fill_ipcache(maps)
    r = cli("--bpf-root", maps, "bpf", "ipcache", "get", "10.0.1.23")
    assert r.code == 0
    assert (
        r.out.strip()
        == "10.0.1.23 maps to 10.0.1.23/32: identity=12345 tunnelendpoint=192.168.1.11 flags=<remote-node>"
    )
    r = cli("--bpf-root", maps, "bpf", "ipcache", "get", "10.0.1.99")
    assert r.out.strip() == "10.0.1.99 maps to 10.0.1.0/24: identity=16777217 tunnelendpoint=0.0.0.0 flags=<>"
    r = cli("--bpf-root", maps, "-o", "json", "bpf", "ipcache", "get", "1.1.1.1")
    assert json.loads(r.out)["prefix"] == "0.0.0.0/0" and json.loads(r.out)["identity"] == 2


def test_ipcache_empty_missing_and_bad_ip(maps: str) -> None:
    r = cli_subprocess("--bpf-root", maps, "bpf", "ipcache", "list")
    assert r.code == 0 and r.out.strip() == "No entries found."
    r = cli("--bpf-root", maps, "bpf", "ipcache", "get", "10.1.1.1")
    assert r.code == 1 and "does not map to any identity" in r.out
    r = cli("--bpf-root", maps, "bpf", "ipcache", "get", "10.1.1")
    assert r.code == 2 and "not an IPv4 address: '10.1.1'" in r.err
    r = cli_subprocess("--bpf-root", maps + "-x", "bpf", "ipcache", "list")
    assert r.code == 2 and "map ipcache is not pinned" in r.err


# ---- policy ----------------------------------------------------------------------------------------

STATIC = d("POLICY_STATIC_PREFIX")
TCP, UDP = 6, 17


def pkey(ep: int, ident: int, egress: int, proto: int = 0, port: int = 0, bits: int = 0) -> PolicyKey:
    return PolicyKey(STATIC + bits, ident, ep, egress, proto, port_to_be16(port))


def fill_policy(root: str) -> None:
    with PinnedMap(BY_NAME["policy"], root) as m:
        m.update(pkey(339, 1, 0), PolicyEntry(packets=12, bytes=1234))  # host: any port
        m.update(pkey(339, 12345, 1, TCP, 5432, 24), PolicyEntry(flags=d("POLICY_F_DENY")))
        m.update(pkey(339, 12345, 0, TCP, 80, 24), PolicyEntry(proxy_port=port_to_be16(15001), auth_type=1))
        m.update(pkey(339, 0, 1, UDP, 0, 8), PolicyEntry())  # any identity, any UDP port
        m.update(pkey(339, 6443, 0, TCP, 0x1F90, 20), PolicyEntry())  # port range as a 12-bit prefix
        m.update(pkey(340, 2, 0), PolicyEntry())


def _rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("   ") if c.strip()] for line in out.splitlines()]


def test_policy_get_with_labels_from_agent(maps: str, tmp_path: Path) -> None:
    fill_policy(maps)
    sock = tmp_path / "agent.sock"
    with running_agent(sock):
        r = cli("--bpf-root", maps, "-H", str(sock), "bpf", "policy", "get", "339")
    assert r.code == 0, r.err
    assert r.err == ""
    rows = _rows(r.out)
    assert rows[0] == ["POLICY", "DIRECTION", "LABELS (source:key[=value])", "PORT/PROTO", "PROXY PORT",
                       "AUTH TYPE", "BYTES", "PACKETS", "PREFIX"]  # fmt: skip
    assert rows[1:] == [
        ["Deny", "Egress", "k8s:app=web", "5432/TCP", "NONE", "disabled", "0", "0", "24"],
        ["k8s:io.kubernetes.pod.namespace=default"],
        ["Allow", "Ingress", "reserved:host", "ANY", "NONE", "disabled", "1234", "12", "0"],
        ["Allow", "Ingress", "k8s:app=x", "0x1f90/12/TCP", "NONE", "disabled", "0", "0", "20"],
        ["k8s:io.kubernetes.pod.namespace=default"],
        ["Allow", "Ingress", "k8s:app=web", "80/TCP", "15001", "spire", "0", "0", "24"],
        ["k8s:io.kubernetes.pod.namespace=default"],
        ["Allow", "Egress", "reserved:unknown", "UDP", "NONE", "disabled", "0", "0", "8"],
    ]
    # the continuation line sits under LABELS
    lines = r.out.splitlines()
    assert lines[2].index("k8s:io") == lines[0].index("LABELS")


def test_policy_get_without_agent_prints_identities(maps: str, tmp_path: Path) -> None:
    fill_policy(maps)
    r = cli_subprocess("--bpf-root", maps, "-H", str(tmp_path / "none.sock"), "bpf", "policy", "get", "339")
    assert r.code == 0
    assert f"note: cannot reach the agent at {tmp_path / 'none.sock'}" in r.err
    rows = _rows(r.out)
    assert ["Deny", "Egress", "12345", "5432/TCP", "NONE", "disabled", "0", "0", "24"] in rows
    assert ["Allow", "Ingress", "reserved:host", "ANY", "NONE", "disabled", "1234", "12", "0"] in rows


def test_policy_numeric_all_json_and_empty(maps: str, tmp_path: Path) -> None:
    fill_policy(maps)
    nosock = str(tmp_path / "none.sock")
    r = cli("--bpf-root", maps, "-H", nosock, "bpf", "policy", "get", "--all", "-n")
    assert r.code == 0 and r.err == ""  # -n never asks the agent
    assert "Endpoint 339:" in r.out and "Endpoint 340:" in r.out
    after = r.out.split("Endpoint 340:\n")[1]
    assert _rows(after)[0][2] == "IDENTITY"
    assert _rows(after)[1] == ["Allow", "Ingress", "2", "ANY", "NONE", "disabled", "0", "0", "0"]
    j = json.loads(cli("--bpf-root", maps, "-H", nosock, "bpf", "policy", "get", "340", "-o", "json").out)
    assert j == [{"endpoint": 340, "policy": "Allow", "direction": "Ingress", "identity": 2, "port_proto": "ANY",
                  "proto": "ANY", "port": 0, "prefix": 0, "proxy_port": 0, "auth_type": "disabled", "bytes": 0,
                  "packets": 0, "labels": ["reserved:world"]}]  # fmt: skip
    r = cli("--bpf-root", maps, "bpf", "policy", "get", "7")
    assert r.code == 0 and "Policy stats empty for endpoint 7" in r.out


def test_policy_malformed_and_not_pinned(pin_root: str) -> None:
    r = cli("bpf", "policy", "get")
    assert r.code == 2 and "one of the arguments endpoint --all is required" in r.err
    r = cli("bpf", "policy", "get", "abc")
    assert r.code == 2 and "not a number: 'abc'" in r.err
    r = cli("bpf", "policy", "get", "70000")
    assert r.code == 2 and "out of range" in r.err
    r = cli("--bpf-root", pin_root, "bpf", "policy", "get", "1")
    assert r.code == 2 and "map policy is not pinned" in r.err
