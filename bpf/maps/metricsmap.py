"""Per-CPU counters of forwarded and dropped packets, by reason and direction."""

from __future__ import annotations

import ctypes as C

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps.pinned import MapSpec


class MetricsKey(C.Structure):
    """Read as a little-endian u32, the key is the array index reason | dir << 8."""

    _fields_ = [("reason", C.c_uint8), ("dir", C.c_uint8), ("pad", C.c_uint16)]


class MetricsValue(C.Structure):
    _fields_ = [("count", C.c_uint64), ("bytes", C.c_uint64)]


METRICS = MapSpec("metrics", sc.MAP_TYPE_PERCPU_ARRAY, MetricsKey, MetricsValue, "METRICS_MAP_SIZE", 2048)
