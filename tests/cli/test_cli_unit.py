"""CLI pieces that need no kernel: start-up cost, lazy imports, argument errors, decoders, formatting."""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pycilium.bpf.maps.ctmap import Ct4Key, CtEntry
from pycilium.bpf.maps.events import MonitorEvent
from pycilium.bpf.maps.natmap import Nat4Entry
from pycilium.bpf.maps.policymap import PolicyKey
from pycilium.bpf.maps.util import ip_to_be32, port_to_be16

from tests.cli.conftest import PYCILIUM, cli, cli_subprocess


def test_help_is_fast_and_lists_every_command() -> None:
    best = min(_timed([PYCILIUM, "--help"]) for _ in range(3))
    assert best < 0.150, f"pycilium --help took {best * 1000:.0f} ms"
    out = subprocess.run([PYCILIUM, "--help"], capture_output=True, text=True, check=True).stdout
    for word in (
        "bpf",
        "monitor",
        "service",
        "endpoint",
        "identity",
        "status",
        "exit codes",
        "PYCILIUM_BPF_ROOT",
    ):
        assert word in out
    out = subprocess.run([PYCILIUM, "bpf", "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("ct", "nat", "lb", "ipcache", "policy", "endpoint", "metrics", "prefilter"):
        assert re.search(rf"\b{word}\b", out)


def _timed(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, capture_output=True, check=True)
    return time.perf_counter() - t


BPF_COMMANDS = [
    ["bpf", "ct", "list", "global"], ["bpf", "nat", "list"], ["bpf", "lb", "list"], ["bpf", "ipcache", "list"],
    ["bpf", "policy", "get", "1"], ["bpf", "endpoint", "list"], ["bpf", "metrics", "list"],
    ["bpf", "prefilter", "list"], ["monitor"],
]  # fmt: skip


@pytest.mark.parametrize("command", BPF_COMMANDS, ids=lambda c: " ".join(c))
def test_bpf_commands_import_neither_bcc_nor_grpc(command: list[str], tmp_path: Path) -> None:
    code = (
        "import sys\nfrom pycilium.cli.main import main\n"
        f"rc = main(['--bpf-root', {str(tmp_path / 'nothing')!r}, '-H', {str(tmp_path / 'none.sock')!r}, "
        f"*{command!r}])\n"
        "heavy = sorted(m for m in ('bcc', 'grpc', 'pydantic', 'google.protobuf') if m in sys.modules)\n"
        "print(rc, heavy)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert p.stdout.strip() == "2 []", p.stdout + p.stderr  # exit 2: nothing pinned under that root
    assert "is not pinned at" in p.stderr and "is the agent running on this node?" in p.stderr


def test_defaults_match_the_agent_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from pycilium.agent.config import DEFAULT_BPF_ROOT, AgentConfig
    from pycilium.cli import main

    assert main.DEFAULT_BPF_ROOT == DEFAULT_BPF_ROOT
    assert AgentConfig().socket_path == main.DEFAULT_SOCKET
    monkeypatch.delenv("PYCILIUM_BPF_ROOT", raising=False)
    monkeypatch.delenv("PYCILIUM_SOCKET", raising=False)
    args = main.build_parser().parse_args(["bpf", "ct", "list", "global"])
    assert (args.bpf_root, args.host, args.output) == (DEFAULT_BPF_ROOT, main.DEFAULT_SOCKET, "text")
    monkeypatch.setenv("PYCILIUM_BPF_ROOT", "/x")
    monkeypatch.setenv("PYCILIUM_SOCKET", "/y.sock")
    args = main.build_parser().parse_args(["bpf", "ct", "list", "global"])
    assert (args.bpf_root, args.host) == ("/x", "/y.sock")
    # options work before and after the command; after wins
    args = main.build_parser().parse_args(["-o", "json", "--bpf-root", "/a", "bpf", "lb", "list"])
    assert (args.output, args.bpf_root) == ("json", "/a")
    args = main.build_parser().parse_args(["--bpf-root", "/a", "bpf", "lb", "list", "--bpf-root", "/b"])
    assert args.bpf_root == "/b"


def test_usage_errors_exit_2() -> None:
    r = cli()
    assert r.code == 2 and "usage: pycilium" in r.err
    r = cli("bpf")
    assert r.code == 2 and "the following arguments are required: MAP" in r.err
    r = cli("bpf", "frobnicate")
    assert r.code == 2 and "invalid choice: 'frobnicate'" in r.err
    r = cli_subprocess("bpf", "ct", "list", "global", "--bogus")
    assert r.code == 2 and "unrecognized arguments: --bogus" in r.err
    assert cli("--version").out.startswith("pycilium ")


def test_ct_decoder_matches_the_ctypes_mirror() -> None:
    from pycilium.cli import bpf_ct

    k = Ct4Key(ip_to_be32("10.0.1.5"), ip_to_be32("10.96.0.10"), port_to_be16(43210), port_to_be16(80), 6, 4)
    v = CtEntry(backend_id=3, src_sec_id=12345, packets=4, bytes=312, lifetime=8723, flags=0x13, rev_nat_index=5,
                ifindex=9, tx_flags_seen=0x1B, rx_flags_seen=0x12, last_tx_report=8720, last_rx_report=8710,
                reserved=77)  # fmt: skip
    e = bpf_ct.entry_dict("ct4_global", bytes(k), bytes(v), now=8700)
    assert (e["src"], e["sport"], e["dst"], e["dport"], e["direction"]) == (
        "10.0.1.5",
        43210,
        "10.96.0.10",
        80,
        "SVC",
    )
    assert (e["backend_id"], e["source_security_id"], e["packets"], e["bytes"], e["expires"]) == (
        3,
        12345,
        4,
        312,
        8723,
    )
    assert (e["flags"], e["rev_nat"], e["ifindex"], e["tx_flags_seen"], e["rx_flags_seen"]) == (
        0x13,
        5,
        9,
        0x1B,
        0x12,
    )
    assert (e["last_tx_report"], e["last_rx_report"], e["remaining"]) == (8720, 8710, 23)
    assert bpf_ct.flag_names(0x1 | 0x2 | 0x8 | 0x10 | 0x20 | 0x40 | 0x400 | 0x4) == [
        "RxClosing", "TxClosing", "LbLoopback", "SeenNonSyn", "NodePort", "HostNat", "FromTunnel", "Unknown=0x4"]  # fmt: skip


def test_nat_and_event_decoders_match_the_ctypes_mirror() -> None:
    from pycilium.cli import bpf_nat, monitor

    k = Ct4Key(
        ip_to_be32("192.0.2.9"), ip_to_be32("172.18.0.2"), port_to_be16(443), port_to_be16(40000), 17, 1
    )
    v = Nat4Entry(created=100, to_addr=ip_to_be32("10.0.1.5"), to_port=port_to_be16(5353), needs_ct=1)
    e = bpf_nat._decode(bytes(k), bytes(v), now=220)
    assert bpf_nat.format_entry(e) == (
        "UDP IN 192.0.2.9:443 -> 172.18.0.2:40000 XLATE_DST 10.0.1.5:5353 Created=120sec ago NeedsCT=1"
    )
    ev = MonitorEvent(type=5, subtype=133, source=229, ifindex=4, src_label=1, dst_label=12345, orig_len=60,
                      saddr=ip_to_be32("10.0.0.3"), daddr=ip_to_be32("10.0.0.7"), sport=port_to_be16(59428),
                      dport=port_to_be16(15020), proto=6, tcp_flags=0x12, ct_state=4, egress=1, line=321, file=2,
                      ktime_ns=123456789)  # fmt: skip
    d = monitor.decode(bytes(ev), cpu=1)
    assert d is not None
    assert (d["type"], d["source"], d["ifindex"], d["orig_len"], d["line"], d["file"], d["ktime_ns"]) == (
        "policy-verdict", 229, 4, 60, 321, "bpf_host.c", 123456789)  # fmt: skip
    assert (d["ct_state"], d["direction"], d["remote_identity"], d["action"]) == (
        "reopened",
        "egress",
        12345,
        "deny",
    )
    assert d["summary"] == ("Policy verdict log: flow 0x0, local EP ID 229, remote ID 12345, proto 6, egress, "
                            "action deny (Policy denied), 10.0.0.3:59428 -> 10.0.0.7:15020 tcp SYN, ACK")  # fmt: skip
    assert monitor.decode(b"\x01" * 10) is None
    assert ctypes.sizeof(MonitorEvent) == monitor.EVENT.size


def test_monitor_file_ids_match_common_h() -> None:
    from pycilium.bpf.loader import LIB_DIR
    from pycilium.cli import monitor

    text = (LIB_DIR / "common.h").read_text()
    ids = {int(n): name for name, n in re.findall(r"#define FILE_(\w+) (\d+)", text)}
    assert {i: f"bpf_{ids[i].lower()}.c" for i in ids} == monitor.FILES


def test_policy_port_proto_rendering() -> None:
    from pycilium.cli.bpf_policy import STATIC, port_proto

    def key(bits: int, proto: int = 6, port: int = 0) -> PolicyKey:
        return PolicyKey(STATIC + bits, 0, 1, 0, proto, port_to_be16(port))

    assert port_proto(key(0, 0)) == "ANY"
    assert port_proto(key(8, 17)) == "UDP"
    assert port_proto(key(24, 6, 80)) == "80/TCP"
    assert port_proto(key(20, 6, 0x1F90)) == "0x1f90/12/TCP"


def test_table_layout() -> None:
    from pycilium.cli.output import table, tcp_flags_text

    assert table([["A", "BB", "C"], ["long cell", "x", "last"], ["", "", "cont"]]) == (
        "A           BB   C\nlong cell   x    last\n                 cont\n"
    )
    assert table([["ID", "X"], ["1"]]) == "ID   X\n1\n"  # min width 5
    assert table([]) == ""
    assert (
        tcp_flags_text(0x12) == "SYN, ACK" and tcp_flags_text(0x11) == "ACK, FIN" and tcp_flags_text(0) == ""
    )


def test_lab_is_delegated(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    seen: list[list[str]] = []
    fake = types.ModuleType("pycilium.lab.cli")

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 0

    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pycilium.lab.cli", fake)
    import pycilium.lab

    monkeypatch.setattr(pycilium.lab, "cli", fake, raising=False)
    assert cli("lab", "up", "--nodes", "2").code == 0
    assert cli("lab", "--help").code == 0
    assert seen == [["up", "--nodes", "2"], ["--help"]]


def test_large_json_lists_stay_valid_json() -> None:
    import io
    import json

    from pycilium.cli.output import COMPACT_LIST_THRESHOLD, print_json

    for n in (0, 1, COMPACT_LIST_THRESHOLD, COMPACT_LIST_THRESHOLD + 1, 5000):
        buf = io.StringIO()
        data = [{"i": i, "s": "x"} for i in range(n)]
        print_json(data, buf)
        assert json.loads(buf.getvalue()) == data
