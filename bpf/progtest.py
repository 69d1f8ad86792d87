"""BPF_PROG_TEST_RUN harness: run a loaded program on a packet and get verdict and output bytes.

Used by the datapath unit tests and the per-packet benchmarks. TC programs get a `__sk_buff`
context so tests can set the ingress ifindex (which endpoint a packet comes from) and the mark.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from pycilium.bpf import syscall as sc

TC_ACT_UNSPEC = 0xFFFFFFFF
TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 0, 1, 2, 3, 4

TC_VERDICTS = {TC_ACT_UNSPEC: "UNSPEC", TC_ACT_OK: "OK", TC_ACT_SHOT: "SHOT", TC_ACT_REDIRECT: "REDIRECT"}
XDP_VERDICTS = {
    XDP_ABORTED: "ABORTED",
    XDP_DROP: "DROP",
    XDP_PASS: "PASS",
    XDP_TX: "TX",
    XDP_REDIRECT: "REDIRECT",
}


class SkBuff(ctypes.Structure):
    """struct __sk_buff (uapi), the context a TC program sees; only some fields may be set."""

    _fields_ = [("len", ctypes.c_uint32), ("pkt_type", ctypes.c_uint32), ("mark", ctypes.c_uint32),
                ("queue_mapping", ctypes.c_uint32), ("protocol", ctypes.c_uint32),
                ("vlan_present", ctypes.c_uint32), ("vlan_tci", ctypes.c_uint32), ("vlan_proto", ctypes.c_uint32),
                ("priority", ctypes.c_uint32), ("ingress_ifindex", ctypes.c_uint32), ("ifindex", ctypes.c_uint32),
                ("tc_index", ctypes.c_uint32), ("cb", ctypes.c_uint32 * 5), ("hash", ctypes.c_uint32),
                ("tc_classid", ctypes.c_uint32), ("data", ctypes.c_uint32), ("data_end", ctypes.c_uint32),
                ("napi_id", ctypes.c_uint32), ("family", ctypes.c_uint32), ("remote_ip4", ctypes.c_uint32),
                ("local_ip4", ctypes.c_uint32), ("remote_ip6", ctypes.c_uint32 * 4),
                ("local_ip6", ctypes.c_uint32 * 4), ("remote_port", ctypes.c_uint32),
                ("local_port", ctypes.c_uint32), ("data_meta", ctypes.c_uint32), ("flow_keys", ctypes.c_uint64),
                ("tstamp", ctypes.c_uint64), ("wire_len", ctypes.c_uint32), ("gso_segs", ctypes.c_uint32),
                ("sk", ctypes.c_uint64), ("gso_size", ctypes.c_uint32), ("tstamp_type", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 3), ("hwtstamp", ctypes.c_uint64)]  # fmt: skip


assert ctypes.sizeof(SkBuff) == 192


@dataclass(frozen=True)
class RunResult:
    verdict: int
    data: bytes
    duration_ns: int  # average per repeat, as the kernel reports it

    def tc_name(self) -> str:
        return TC_VERDICTS.get(self.verdict, str(self.verdict))

    def xdp_name(self) -> str:
        return XDP_VERDICTS.get(self.verdict, str(self.verdict))


def run_tc(
    prog_fd: int, packet: bytes, *, ingress_ifindex: int = 0, mark: int = 0, repeat: int = 1
) -> RunResult:
    """Run a SCHED_CLS program; the packet must start with the Ethernet header."""
    if len(packet) < 14:
        raise ValueError("packet shorter than an Ethernet header")
    ctx = SkBuff(ingress_ifindex=ingress_ifindex, mark=mark)
    r = sc.prog_test_run(prog_fd, packet, repeat=repeat, ctx=bytes(ctx), data_out_size=len(packet) + 512)
    verdict = r.retval if r.retval != 0xFFFFFFFF else TC_ACT_UNSPEC
    return RunResult(verdict, r.data, r.duration_ns)


def run_xdp(prog_fd: int, packet: bytes, *, repeat: int = 1) -> RunResult:
    r = sc.prog_test_run(prog_fd, packet, repeat=repeat, data_out_size=len(packet) + 512)
    return RunResult(r.retval, r.data, r.duration_ns)
