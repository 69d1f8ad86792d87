"""The XDP CIDR prefilter: source prefixes dropped on the external device before anything else."""

from __future__ import annotations

import ctypes as C

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps.ipcache import IpcacheKey
from pycilium.bpf.maps.pinned import MapSpec


class PrefilterValue(C.Structure):
    _fields_ = [("flags", C.c_uint32)]


PREFILTER_V4 = MapSpec(
    "prefilter_v4",
    sc.MAP_TYPE_LPM_TRIE,
    IpcacheKey,
    PrefilterValue,
    "PREFILTER_MAP_SIZE",
    16384,
    flags=sc.BPF_F_NO_PREALLOC,
)
