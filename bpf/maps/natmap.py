"""The masquerade / NodePort SNAT table snat_v4_external (both directions of each flow)."""

from __future__ import annotations

import ctypes as C

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps.ctmap import Ct4Key
from pycilium.bpf.maps.pinned import MapSpec


class Nat4Entry(C.Structure):
    _fields_ = [("created", C.c_uint64), ("to_addr", C.c_uint32), ("to_port", C.c_uint16),
                ("needs_ct", C.c_uint8), ("pad", C.c_uint8)]  # fmt: skip


SNAT_V4_EXTERNAL = MapSpec("snat_v4_external", sc.MAP_TYPE_LRU_HASH, Ct4Key, Nat4Entry, "NAT_MAP_SIZE", 524288,
                           "nat_global_max")  # fmt: skip
