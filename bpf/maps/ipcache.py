"""The ipcache: LPM trie from IP prefix to security identity and the node the address lives on."""

from __future__ import annotations

import ctypes as C

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps.pinned import MapSpec


class IpcacheKey(C.Structure):
    _fields_ = [("prefixlen", C.c_uint32), ("addr", C.c_uint32)]


class RemoteEndpointInfo(C.Structure):
    _fields_ = [("sec_identity", C.c_uint32), ("tunnel_endpoint", C.c_uint32), ("node_id", C.c_uint16),
                ("flags", C.c_uint8), ("pad", C.c_uint8)]  # fmt: skip


IPCACHE = MapSpec("ipcache", sc.MAP_TYPE_LPM_TRIE, IpcacheKey, RemoteEndpointInfo, "IPCACHE_MAP_SIZE", 512000,
                  "ipcache_map_max", flags=sc.BPF_F_NO_PREALLOC)  # fmt: skip
