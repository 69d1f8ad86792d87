"""The policy map: (endpoint, remote identity, direction, protocol, port prefix) -> allow/deny."""

from __future__ import annotations

import ctypes as C

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps.pinned import MapSpec


class PolicyKey(C.Structure):
    _fields_ = [("prefixlen", C.c_uint32), ("sec_label", C.c_uint32), ("ep_id", C.c_uint16),
                ("egress", C.c_uint8), ("protocol", C.c_uint8), ("dport", C.c_uint16), ("pad", C.c_uint16)]  # fmt: skip


class PolicyEntry(C.Structure):
    _fields_ = [("flags", C.c_uint8), ("auth_type", C.c_uint8), ("proxy_port", C.c_uint16), ("pad", C.c_uint32),
                ("packets", C.c_uint64), ("bytes", C.c_uint64)]  # fmt: skip


POLICY = MapSpec("policy", sc.MAP_TYPE_LPM_TRIE, PolicyKey, PolicyEntry, "POLICY_MAP_SIZE", 65536,
                 "policy_map_max", flags=sc.BPF_F_NO_PREALLOC)  # fmt: skip
