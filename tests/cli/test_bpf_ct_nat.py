"""`bpf ct list|flush global` and `bpf nat list|flush` against real pinned maps."""

from __future__ import annotations

import json
import re
import time

import pytest
from pycilium.bpf.maps import BY_NAME, PinnedMap
from pycilium.bpf.maps.ctmap import Ct4Key, CtEntry
from pycilium.bpf.maps.natmap import Nat4Entry
from pycilium.bpf.maps.util import ip_to_be32, port_to_be16

from tests.cli.conftest import cli, cli_subprocess

pytestmark = pytest.mark.kernel

TCP, UDP, ICMP = 6, 17, 1
OUT, IN, SVC = 0, 1, 4


def ct_key(src: str, sport: int, dst: str, dport: int, proto: int = TCP, direction: int = OUT) -> Ct4Key:
    return Ct4Key(
        ip_to_be32(src), ip_to_be32(dst), port_to_be16(sport), port_to_be16(dport), proto, direction
    )


def fill_ct(root: str, lifetime: int) -> None:
    with PinnedMap(BY_NAME["ct4_global"], root) as m:
        m.update(
            ct_key("10.0.1.5", 43210, "10.96.0.10", 80, TCP, SVC),
            CtEntry(
                backend_id=3,
                src_sec_id=12345,
                packets=4,
                bytes=312,
                lifetime=lifetime,
                flags=0x13,
                rev_nat_index=5,
                tx_flags_seen=0x1B,
                rx_flags_seen=0x1B,
                last_tx_report=8720,
                last_rx_report=8720,
            ),
        )
        m.update(
            ct_key("10.0.1.5", 43210, "10.0.2.7", 8080, TCP, OUT),
            CtEntry(src_sec_id=12345, packets=1, bytes=60, lifetime=lifetime, flags=0x8420, rev_nat_index=5),
        )
    with PinnedMap(BY_NAME["ct_any4_global"], root) as m:
        m.update(
            ct_key("10.0.1.5", 777, "8.8.8.8", 0, ICMP, OUT), CtEntry(lifetime=lifetime - 100, packets=2)
        )
        m.update(ct_key("192.0.2.1", 5353, "10.0.1.5", 53, UDP, IN), CtEntry(lifetime=lifetime, src_sec_id=2))


def test_ct_list_prints_cilium_lines(maps: str) -> None:
    lifetime = int(time.monotonic()) + 42
    fill_ct(maps, lifetime)
    r = cli("--bpf-root", maps, "bpf", "ct", "list", "global")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert len(lines) == 4
    assert (
        f"TCP SVC 10.0.1.5:43210 -> 10.96.0.10:80 expires={lifetime} Packets=4 Bytes=312 RxFlagsSeen=0x1b "
        "LastRxReport=8720 TxFlagsSeen=0x1b LastTxReport=8720 Flags=0x0013 [ RxClosing TxClosing SeenNonSyn ] "
        "RevNAT=5 SourceSecurityID=12345 BackendID=3"
    ) in lines
    out_line = next(line for line in lines if "10.0.2.7" in line)
    assert out_line.startswith("TCP OUT 10.0.1.5:43210 -> 10.0.2.7:8080 ")
    assert "Flags=0x8420 [ NodePort FromTunnel Unknown=0x8000 ]" in out_line
    assert any(line.startswith("ICMP OUT 10.0.1.5:777 -> 8.8.8.8:0 ") for line in lines)  # echo id as port
    assert any(line.startswith("UDP IN 192.0.2.1:5353 -> 10.0.1.5:53 ") for line in lines)
    assert all("remaining" not in line for line in lines)


def test_ct_list_time_diff_and_expired_entries(maps: str) -> None:
    now = int(time.monotonic())
    fill_ct(maps, now + 42)
    r = cli("--bpf-root", maps, "bpf", "ct", "list", "global", "-d")
    assert r.code == 0
    remaining = {}
    for line in r.out.splitlines():
        m = re.search(r"-> (\S+) expires=(\d+) \(remaining: (-?\d+) sec\(s\)\) Packets=", line)
        assert m, line
        remaining[m.group(1)] = int(m.group(3))
    assert 40 <= remaining["10.96.0.10:80"] <= 42
    assert -60 <= remaining["8.8.8.8:0"] <= -58  # expired, not yet collected: negative, as Cilium prints


def test_ct_list_json(maps: str) -> None:
    lifetime = int(time.monotonic()) + 100
    fill_ct(maps, lifetime)
    r = cli("--bpf-root", maps, "bpf", "ct", "list", "global", "-o", "json")
    assert r.code == 0
    entries = json.loads(r.out)
    assert len(entries) == 4
    svc = next(e for e in entries if e["direction"] == "SVC")
    assert svc == {
        "map": "ct4_global", "proto": "TCP", "nexthdr": 6, "direction": "SVC", "src": "10.0.1.5", "sport": 43210,
        "dst": "10.96.0.10", "dport": 80, "expires": lifetime, "remaining": svc["remaining"], "packets": 4,
        "bytes": 312, "rx_flags_seen": 0x1B, "last_rx_report": 8720, "tx_flags_seen": 0x1B, "last_tx_report": 8720,
        "flags": 0x13, "flag_names": ["RxClosing", "TxClosing", "SeenNonSyn"], "rev_nat": 5,
        "source_security_id": 12345, "backend_id": 3, "ifindex": 0,
    }  # fmt: skip
    assert {e["map"] for e in entries} == {"ct4_global", "ct_any4_global"}


def test_ct_list_empty(maps: str) -> None:
    r = cli("--bpf-root", maps, "bpf", "ct", "list", "global")
    assert r.code == 0
    assert r.out == ""
    assert "No entries found." in r.err
    r = cli("--bpf-root", maps, "bpf", "ct", "list", "global", "-o", "json")
    assert json.loads(r.out) == []


def test_ct_flush(maps: str) -> None:
    fill_ct(maps, int(time.monotonic()) + 42)
    r = cli("--bpf-root", maps, "bpf", "ct", "flush", "global")
    assert r.code == 0
    assert "Flushed 2 entries from" in r.out and "ct4_global" in r.out
    assert f"Flushed 2 entries from {maps}/ct_any4_global" in r.out
    assert cli("--bpf-root", maps, "bpf", "ct", "list", "global").out == ""


def test_ct_subprocess_and_not_pinned(maps: str, tmp_path: object) -> None:
    fill_ct(maps, int(time.monotonic()) + 42)
    r = cli_subprocess("bpf", "ct", "list", "global", env={"PYCILIUM_BPF_ROOT": maps})
    assert r.code == 0, r.err
    assert len(r.out.splitlines()) == 4
    missing = maps + "-missing"
    r = cli_subprocess("--bpf-root", missing, "bpf", "ct", "list", "global")
    assert r.code == 2
    assert (
        f"map ct4_global is not pinned at {missing}/ct4_global: is the agent running on this node?" in r.err
    )
    assert r.out == ""


def test_ct_malformed_arguments() -> None:
    r = cli("bpf", "ct", "list", "local")
    assert r.code == 2
    assert "invalid choice: 'local'" in r.err
    r = cli("bpf", "ct", "list")
    assert r.code == 2 and "scope" in r.err
    r = cli("bpf", "ct", "list", "global", "-o", "yaml")
    assert r.code == 2 and "invalid choice: 'yaml'" in r.err


# ---- NAT ----------------------------------------------------------------------------------------------


def fill_nat(root: str, created: int) -> None:
    with PinnedMap(BY_NAME["snat_v4_external"], root) as m:
        m.update(
            ct_key("10.0.1.5", 43210, "192.0.2.9", 443, TCP, OUT),
            Nat4Entry(
                created=created, to_addr=ip_to_be32("172.18.0.2"), to_port=port_to_be16(43210), needs_ct=1
            ),
        )
        m.update(
            ct_key("192.0.2.9", 443, "172.18.0.2", 43210, TCP, IN),
            Nat4Entry(
                created=created, to_addr=ip_to_be32("10.0.1.5"), to_port=port_to_be16(43210), needs_ct=1
            ),
        )


def test_nat_list(maps: str) -> None:
    fill_nat(maps, int(time.monotonic()) - 120)
    r = cli("--bpf-root", maps, "bpf", "nat", "list")
    assert r.code == 0
    lines = sorted(r.out.splitlines())
    assert len(lines) == 2
    assert re.fullmatch(
        r"TCP IN 192\.0\.2\.9:443 -> 172\.18\.0\.2:43210 XLATE_DST 10\.0\.1\.5:43210 Created=12[01]sec ago NeedsCT=1",
        lines[0],
    )
    assert re.fullmatch(
        r"TCP OUT 10\.0\.1\.5:43210 -> 192\.0\.2\.9:443 XLATE_SRC 172\.18\.0\.2:43210 Created=12[01]sec ago NeedsCT=1",
        lines[1],
    )
    entries = json.loads(cli("--bpf-root", maps, "-o", "json", "bpf", "nat", "list").out)
    out = next(e for e in entries if e["direction"] == "OUT")
    assert out["xlate"] == "XLATE_SRC" and out["to_addr"] == "172.18.0.2" and out["to_port"] == 43210
    assert out["needs_ct"] == 1 and 120 <= out["age"] <= 121


def test_nat_empty_flush_and_subprocess(maps: str) -> None:
    r = cli("--bpf-root", maps, "bpf", "nat", "list")
    assert r.code == 0 and r.out == "" and "No entries found." in r.err
    fill_nat(maps, int(time.monotonic()))
    r = cli_subprocess("--bpf-root", maps, "bpf", "nat", "list")
    assert r.code == 0 and len(r.out.splitlines()) == 2
    r = cli_subprocess("--bpf-root", maps, "bpf", "nat", "flush")
    assert r.code == 0 and "Flushed 2 entries" in r.out
    assert cli("--bpf-root", maps, "bpf", "nat", "list", "-o", "json").out.strip() == "[]"


def test_nat_not_pinned(pin_root: str) -> None:
    r = cli("--bpf-root", pin_root, "bpf", "nat", "list")
    assert r.code == 2
    assert "map snat_v4_external is not pinned" in r.err
