"""The XDP CIDR prefilter through BPF_PROG_TEST_RUN: verdicts, untouched bytes, drop counters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pycilium.bpf import loader, progtest
from pycilium.bpf.maps import BY_NAME, PinnedMap
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.ipcache import IpcacheKey
from pycilium.bpf.maps.prefilter import PrefilterValue
from pycilium.bpf.maps.util import ip_to_be32
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

pytestmark = pytest.mark.kernel


@pytest.fixture
def xdp(pin_root: str) -> Iterator[tuple[int, str]]:
    prog = loader.compile_program("bpf_xdp", loader.NodeDefines(pin_root, loader.sizes_from_config(None)))
    try:
        yield prog.fd("xdp_prefilter", loader.XDP), pin_root
    finally:
        prog.close()


def _packet(src: str) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst="192.0.2.1")
                 / UDP(sport=1234, dport=53) / b"payload")  # fmt: skip


def _drops(pin_root: str, reason: int) -> int:
    with PinnedMap(BY_NAME["metrics"], pin_root) as m:
        return sum(
            v.count
            for k, vs in m.items_percpu()
            if k.reason == reason and k.dir == d("METRIC_DIR_INGRESS")
            for v in vs
        )


def test_passes_when_no_prefix_matches(xdp: tuple[int, str]) -> None:
    fd, root = xdp
    pkt = _packet("10.1.2.3")
    r = progtest.run_xdp(fd, pkt)
    assert r.xdp_name() == "PASS"
    assert r.data == pkt
    assert _drops(root, d("DROP_PREFILTER")) == 0


def test_drops_and_counts_matching_sources_by_longest_prefix(xdp: tuple[int, str]) -> None:
    fd, root = xdp
    with PinnedMap(BY_NAME["prefilter_v4"], root) as m:
        m.update(IpcacheKey(16, ip_to_be32("10.1.0.0")), PrefilterValue(1))
    assert progtest.run_xdp(fd, _packet("10.1.200.7")).xdp_name() == "DROP"
    assert progtest.run_xdp(fd, _packet("10.1.2.3")).xdp_name() == "DROP"
    assert progtest.run_xdp(fd, _packet("10.2.0.1")).xdp_name() == "PASS"
    assert _drops(root, d("DROP_PREFILTER")) == 2


def test_non_ipv4_and_truncated_frames_pass(xdp: tuple[int, str]) -> None:
    fd, _ = xdp
    arp = bytes(Ether(type=0x0806) / (b"\0" * 28))
    assert progtest.run_xdp(fd, arp).xdp_name() == "PASS"
    short = bytes(Ether(type=0x0800)) + b"\x45\x00"
    assert progtest.run_xdp(fd, short.ljust(14 + 2, b"\0")).xdp_name() == "PASS"
