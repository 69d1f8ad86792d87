"""`pycilium monitor` for real: a BPF program emits events through the pinned perf event array while
`pycilium monitor` runs as a subprocess against the same pin root."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from pycilium.bpf import loader, progtest
from pycilium.bpf.maps import BY_NAME, PinnedMap
from pycilium.bpf.maps.ipcache import IpcacheKey
from pycilium.bpf.maps.prefilter import PrefilterValue
from pycilium.bpf.maps.util import ip_to_be32
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from tests.cli.conftest import PYCILIUM, SMALL_SIZES, cli

pytestmark = pytest.mark.kernel

EMITTER = r"""
#define THIS_FILE FILE_LXC
#include "common.h"
#include "events.h"

static __always_inline void fill(struct flow_info *fi)
{
	fi->saddr = bpf_htonl(0x0a000005);  /* 10.0.0.5 */
	fi->daddr = bpf_htonl(0x0a000109);  /* 10.0.1.9 */
	fi->sport = bpf_htons(43210);
	fi->dport = bpf_htons(80);
	fi->proto = IPPROTO_TCP;
	fi->tcp_flags = 0x02;               /* SYN */
	fi->src_label = 12345;
	fi->dst_label = 2;
}

int emit_drop(struct __sk_buff *skb)
{
	struct flow_info fi = {};

	fill(&fi);
	fi.ep_id = 77;
	return DROP(skb, skb->len, DROP_POLICY, METRIC_DIR_EGRESS, &fi, 29, TC_ACT_SHOT);
}

int emit_trace(struct __sk_buff *skb)
{
	struct flow_info fi = {};

	fill(&fi);
	fi.ep_id = 229;
	emit_event(skb, EVENT_TRACE, TRACE_TO_LXC, &fi, skb->len, 0, CT_NEW, 0, __LINE__);
	emit_event(skb, EVENT_POLICY_VERDICT, REASON_POLICY_ALLOWED, &fi, skb->len, 0, CT_NEW, 0, __LINE__);
	return TC_ACT_OK;
}

/* 0 when a reader holds this CPU's slot, -ENOENT when the slot is empty */
int probe_slot(struct __sk_buff *skb)
{
	struct monitor_event ev = {};

	return bpf_perf_event_output(skb, MAP(events), BPF_F_CURRENT_CPU, &ev, sizeof(ev));
}
"""

NO_READER = 0xFFFFFFFE  # -ENOENT as the u32 retval


class Monitor:
    """`pycilium monitor ARGS` as a subprocess; lines read with a deadline."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [PYCILIUM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._sel.register(self.proc.stdout, selectors.EVENT_READ, "out")
        self._sel.register(self.proc.stderr, selectors.EVENT_READ, "err")
        self.err: list[str] = []

    def _read(self, which: str, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for key, _ in self._sel.select(deadline - time.monotonic()):
                line = key.fileobj.readline()  # type: ignore[union-attr]
                if key.data == "err":
                    if line:
                        self.err.append(line)
                    if which == "err" and line:
                        return str(line)
                elif which == "out" and line:
                    return str(line)
            if self.proc.poll() is not None and which == "err":
                return None
        return None

    def wait_ready(self) -> None:
        while True:
            line = self._read("err", 15)
            assert line is not None, f"monitor did not start: {''.join(self.err)}"
            if line.startswith("Listening for events"):
                return

    def line(self, timeout: float = 10) -> str:
        got = self._read("out", timeout)
        assert got is not None, f"no event printed; stderr: {''.join(self.err)}"
        return got.rstrip("\n")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        finally:
            self._sel.close()
            for f in (self.proc.stdout, self.proc.stderr):
                if f is not None:
                    f.close()


@pytest.fixture
def emitter(pin_root: str) -> Iterator[loader.LoadedProgram]:
    prog = loader.compile_program(
        "monitor_emitter", loader.NodeDefines(pin_root, SMALL_SIZES), source=EMITTER
    )
    try:
        yield prog
    finally:
        prog.close()


def _pkt() -> bytes:
    return bytes(Ether() / IP(src="10.0.0.5", dst="10.0.1.9") / TCP(sport=43210, dport=80, flags="S"))


def test_monitor_json_drop_event(emitter: loader.LoadedProgram, pin_root: str) -> None:
    probe = emitter.fd("probe_slot")
    assert progtest.run_tc(probe, _pkt()).verdict == NO_READER
    mon = Monitor("--bpf-root", pin_root, "monitor", "-o", "json")
    try:
        mon.wait_ready()
        assert progtest.run_tc(probe, _pkt()).verdict == 0
        assert json.loads(mon.line())["type"] == "type-0"  # the probe's empty event: unknown types print too
        assert progtest.run_tc(emitter.fd("emit_drop"), _pkt()).tc_name() == "SHOT"
        ev = json.loads(mon.line())
    finally:
        assert mon.stop() == 0
    assert ev["type"] == "drop"
    assert ev["reason"] == "Policy denied" and ev["subtype"] == 133
    assert (ev["src"], ev["sport"], ev["dst"], ev["dport"]) == ("10.0.0.5", 43210, "10.0.1.9", 80)
    assert (ev["src_label"], ev["dst_label"], ev["source"], ev["ifindex"]) == (12345, 2, 77, 29)
    assert ev["file"] == "bpf_lxc.c" and ev["line"] > 0 and ev["tcp_flags_text"] == "SYN"
    assert ev["orig_len"] == len(_pkt())
    assert ev["summary"] == (
        f"xx drop (Policy denied) flow 0x0 to endpoint 77, ifindex 29, file bpf_lxc.c:{ev['line']}, , "
        "identity 12345->2: 10.0.0.5:43210 -> 10.0.1.9:80 tcp SYN"
    )
    # the slots are empty again once the monitor is gone
    assert progtest.run_tc(probe, _pkt()).verdict == NO_READER


def test_monitor_text_filters_and_count(emitter: loader.LoadedProgram, pin_root: str) -> None:
    mon = Monitor("--bpf-root", pin_root, "monitor", "-t", "trace", "-t", "policy-verdict", "--related-to", "229",
                  "--count", "2")  # fmt: skip
    try:
        mon.wait_ready()
        progtest.run_tc(emitter.fd("emit_drop"), _pkt())  # filtered out (type and endpoint)
        progtest.run_tc(emitter.fd("emit_trace"), _pkt())
        trace, verdict = mon.line(), mon.line()
        assert mon.proc.wait(timeout=10) == 0  # --count 2 ends it
    finally:
        mon.stop()
    assert trace == (
        "-> endpoint 229 flow 0x0 , identity 12345->2 state new orig-ip 10.0.0.5: 10.0.0.5:43210 -> 10.0.1.9:80 tcp SYN"
    )
    assert verdict == (
        "Policy verdict log: flow 0x0, local EP ID 229, remote ID 12345, proto 6, ingress, action allow, "
        "10.0.0.5:43210 -> 10.0.1.9:80 tcp SYN"
    )


def test_monitor_reports_xdp_prefilter_drops(pin_root: str) -> None:
    prog = loader.compile_program("bpf_xdp", loader.NodeDefines(pin_root, SMALL_SIZES))
    try:
        with PinnedMap(BY_NAME["prefilter_v4"], pin_root) as m:
            m.update(IpcacheKey(16, ip_to_be32("10.1.0.0")), PrefilterValue(0))
        mon = Monitor("--bpf-root", pin_root, "monitor", "-t", "drop")
        try:
            mon.wait_ready()
            pkt = bytes(Ether() / IP(src="10.1.2.3", dst="192.0.2.1") / UDP(sport=1234, dport=53) / b"x")
            assert progtest.run_xdp(prog.fd("xdp_prefilter", loader.XDP), pkt).xdp_name() == "DROP"
            line = mon.line()
        finally:
            assert mon.stop() == 0
    finally:
        prog.close()
    assert line.startswith("xx drop (CIDR prefilter denied) flow 0x0 to endpoint 0, ifindex ")
    assert ", file bpf_xdp.c:" in line
    assert line.endswith(", , identity 2->0: 10.1.2.3:0 -> 192.0.2.1:0 udp")


def test_second_monitor_is_refused_and_not_pinned(emitter: loader.LoadedProgram, pin_root: str) -> None:
    mon = Monitor("--bpf-root", pin_root, "monitor")
    try:
        mon.wait_ready()
        r = cli("--bpf-root", pin_root, "monitor")
        assert r.code == 1
        assert f"another pycilium monitor (pid {mon.proc.pid}) is reading the events of {pin_root}" in r.err
    finally:
        assert mon.stop() == 0
    r = cli("--bpf-root", pin_root + "-x", "monitor")
    assert r.code == 2 and "map events is not pinned" in r.err
    r = cli("monitor", "-t", "debug")
    assert r.code == 2 and "invalid choice: 'debug'" in r.err
    assert os.path.exists(pin_root + "/events")
