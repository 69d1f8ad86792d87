"""Local endpoints: pod IP -> host veth ifindex, endpoint id, MACs, identity, enforcement flags."""

from __future__ import annotations

import ctypes as C

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps.pinned import MapSpec


class EndpointKey(C.Structure):
    _fields_ = [("ip", C.c_uint32)]


class EndpointInfo(C.Structure):
    _fields_ = [("ifindex", C.c_uint32), ("lxc_id", C.c_uint16), ("flags", C.c_uint16),
                ("mac", C.c_uint8 * 6), ("pad1", C.c_uint8 * 2), ("node_mac", C.c_uint8 * 6),
                ("pad2", C.c_uint8 * 2), ("sec_id", C.c_uint32), ("pad3", C.c_uint32)]  # fmt: skip


ENDPOINTS = MapSpec("endpoints", sc.MAP_TYPE_HASH, EndpointKey, EndpointInfo, "ENDPOINTS_MAP_SIZE", 65535)
