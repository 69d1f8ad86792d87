"""Monitor events sent on the perf buffer: drops, traces and policy verdicts."""

from __future__ import annotations

import ctypes as C

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps.pinned import MapSpec


class MonitorEvent(C.Structure):
    _fields_ = [("type", C.c_uint8), ("subtype", C.c_uint8), ("source", C.c_uint16), ("ifindex", C.c_uint32),
                ("src_label", C.c_uint32), ("dst_label", C.c_uint32), ("orig_len", C.c_uint32),
                ("saddr", C.c_uint32), ("daddr", C.c_uint32), ("sport", C.c_uint16), ("dport", C.c_uint16),
                ("proto", C.c_uint8), ("tcp_flags", C.c_uint8), ("ct_state", C.c_uint8), ("egress", C.c_uint8),
                ("line", C.c_uint16), ("file", C.c_uint8), ("pad", C.c_uint8), ("ktime_ns", C.c_uint64)]  # fmt: skip


EVENTS_MAP_NAME = "events"


class EventsKey(C.Structure):
    _fields_ = [("cpu", C.c_uint32)]


class EventsValue(C.Structure):
    _fields_ = [("fd", C.c_uint32)]


# max_entries 0: one slot per possible CPU, decided when the map is created.
EVENTS = MapSpec(EVENTS_MAP_NAME, sc.MAP_TYPE_PERF_EVENT_ARRAY, EventsKey, EventsValue, "EVENTS_MAP_SIZE", 0)
