"""Load-balancer maps: services (frontend slots), backends, reverse NAT, affinity, Maglev."""

from __future__ import annotations

import ctypes as C

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.pinned import MapSpec


class Lb4Key(C.Structure):
    _fields_ = [("address", C.c_uint32), ("dport", C.c_uint16), ("backend_slot", C.c_uint16),
                ("proto", C.c_uint8), ("scope", C.c_uint8), ("pad", C.c_uint8 * 2)]  # fmt: skip


class Lb4Service(C.Structure):
    _fields_ = [("backend_id", C.c_uint32), ("count", C.c_uint16), ("rev_nat_index", C.c_uint16),
                ("flags", C.c_uint8), ("flags2", C.c_uint8), ("local_count", C.c_uint16)]  # fmt: skip


class Lb4BackendKey(C.Structure):
    _fields_ = [("backend_id", C.c_uint32)]


class Lb4Backend(C.Structure):
    _fields_ = [("address", C.c_uint32), ("port", C.c_uint16), ("proto", C.c_uint8), ("flags", C.c_uint8),
                ("node_ip", C.c_uint32)]  # fmt: skip


class Lb4ReverseNatKey(C.Structure):
    _fields_ = [("rev_nat_index", C.c_uint16)]


class Lb4ReverseNat(C.Structure):
    _fields_ = [("address", C.c_uint32), ("port", C.c_uint16), ("pad", C.c_uint16)]


class Lb4AffinityKey(C.Structure):
    _fields_ = [("client_ip", C.c_uint32), ("rev_nat_index", C.c_uint16), ("pad", C.c_uint16)]


class LbAffinityVal(C.Structure):
    _fields_ = [("last_used", C.c_uint64), ("backend_id", C.c_uint32), ("pad", C.c_uint32)]


class LbAffinityMatch(C.Structure):
    _fields_ = [("backend_id", C.c_uint32), ("rev_nat_index", C.c_uint16), ("pad", C.c_uint16)]


class U8Value(C.Structure):
    _fields_ = [("value", C.c_uint8)]


class Lb4ReverseSkKey(C.Structure):
    _fields_ = [("cookie", C.c_uint64), ("address", C.c_uint32), ("port", C.c_uint16), ("pad", C.c_uint16)]


class Lb4ReverseSk(C.Structure):
    _fields_ = [("address", C.c_uint32), ("port", C.c_uint16), ("rev_nat_index", C.c_uint16)]


LB_MAGLEV_CHUNK = d("LB_MAGLEV_CHUNK")


class Lb4MaglevKey(C.Structure):
    _fields_ = [("rev_nat_index", C.c_uint16), ("chunk", C.c_uint16)]


class Lb4MaglevChunk(C.Structure):
    _fields_ = [("backend_ids", C.c_uint32 * LB_MAGLEV_CHUNK)]


SERVICES = MapSpec("lb4_services", sc.MAP_TYPE_HASH, Lb4Key, Lb4Service, "LB_MAP_SIZE", 65536, "lb_map_max")
BACKENDS = MapSpec("lb4_backends", sc.MAP_TYPE_HASH, Lb4BackendKey, Lb4Backend, "LB_MAP_SIZE", 65536,
                   "lb_map_max")  # fmt: skip
REVERSE_NAT = MapSpec("lb4_reverse_nat", sc.MAP_TYPE_HASH, Lb4ReverseNatKey, Lb4ReverseNat, "LB_MAP_SIZE",
                      65536, "lb_map_max")  # fmt: skip
AFFINITY = MapSpec("lb4_affinity", sc.MAP_TYPE_LRU_HASH, Lb4AffinityKey, LbAffinityVal, "LB_MAP_SIZE", 65536,
                   "lb_map_max")  # fmt: skip
AFFINITY_MATCH = MapSpec("lb_affinity_match", sc.MAP_TYPE_HASH, LbAffinityMatch, U8Value, "LB_MAP_SIZE",
                         65536, "lb_map_max")  # fmt: skip
# 256 chunks per service at the default table size 16381: room for 1,024 Maglev frontends.
MAGLEV = MapSpec("lb4_maglev", sc.MAP_TYPE_HASH, Lb4MaglevKey, Lb4MaglevChunk, "LB_MAGLEV_MAP_SIZE", 262144,
                 flags=sc.BPF_F_NO_PREALLOC)  # fmt: skip
REVERSE_SK = MapSpec("lb4_reverse_sk", sc.MAP_TYPE_LRU_HASH, Lb4ReverseSkKey, Lb4ReverseSk, "LB_REVERSE_SK_MAP_SIZE",
                     262144)  # fmt: skip
