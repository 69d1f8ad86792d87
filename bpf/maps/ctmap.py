"""Conntrack maps ct4_global (TCP) and ct_any4_global (UDP, ICMP, others)."""

from __future__ import annotations

import ctypes as C

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps.pinned import MapSpec


class Ct4Key(C.Structure):
    _fields_ = [("saddr", C.c_uint32), ("daddr", C.c_uint32), ("sport", C.c_uint16), ("dport", C.c_uint16),
                ("nexthdr", C.c_uint8), ("flags", C.c_uint8), ("pad", C.c_uint8 * 2)]  # fmt: skip


class CtEntry(C.Structure):
    _fields_ = [("backend_id", C.c_uint32), ("src_sec_id", C.c_uint32), ("packets", C.c_uint64),
                ("bytes", C.c_uint64), ("lifetime", C.c_uint32), ("flags", C.c_uint16),
                ("rev_nat_index", C.c_uint16), ("ifindex", C.c_uint16), ("tx_flags_seen", C.c_uint8),
                ("rx_flags_seen", C.c_uint8), ("last_tx_report", C.c_uint32), ("last_rx_report", C.c_uint32),
                ("reserved", C.c_uint32)]  # fmt: skip


CT4_GLOBAL = MapSpec("ct4_global", sc.MAP_TYPE_LRU_HASH, Ct4Key, CtEntry, "CT_MAP_SIZE_TCP", 524288,
                     "ct_global_tcp_max")  # fmt: skip
CT_ANY4_GLOBAL = MapSpec("ct_any4_global", sc.MAP_TYPE_LRU_HASH, Ct4Key, CtEntry, "CT_MAP_SIZE_ANY", 262144,
                         "ct_global_any_max")  # fmt: skip
