"""Python mirror of every datapath map (one module per map) and the registry of all of them.

The C layouts are defined once in bpf/lib/map_layouts.h; tests/bpf/test_layouts.py compiles that
header and checks every size and offset here against it.
"""

from __future__ import annotations

import ctypes
from typing import Any

from pycilium.bpf.maps import (
    ctmap,
    endpointmap,
    events,
    ipcache,
    lbmap,
    metricsmap,
    natmap,
    policymap,
    prefilter,
)
from pycilium.bpf.maps.pinned import MapNotPinnedError, MapSpec, PinnedMap

ALL_MAPS: tuple[MapSpec[Any, Any], ...] = (
    lbmap.SERVICES,
    lbmap.BACKENDS,
    lbmap.REVERSE_NAT,
    lbmap.AFFINITY,
    lbmap.AFFINITY_MATCH,
    lbmap.MAGLEV,
    lbmap.REVERSE_SK,
    ctmap.CT4_GLOBAL,
    ctmap.CT_ANY4_GLOBAL,
    natmap.SNAT_V4_EXTERNAL,
    ipcache.IPCACHE,
    endpointmap.ENDPOINTS,
    policymap.POLICY,
    metricsmap.METRICS,
    prefilter.PREFILTER_V4,
    events.EVENTS,
)
BY_NAME = {m.name: m for m in ALL_MAPS}

# Every ctypes mirror of a C struct, by C struct name (checked against the header by a test).
C_STRUCTS: dict[str, type[ctypes.Structure]] = {
    "lb4_key": lbmap.Lb4Key,
    "lb4_service": lbmap.Lb4Service,
    "lb4_backend_key": lbmap.Lb4BackendKey,
    "lb4_backend": lbmap.Lb4Backend,
    "lb4_reverse_nat_key": lbmap.Lb4ReverseNatKey,
    "lb4_reverse_nat": lbmap.Lb4ReverseNat,
    "lb4_affinity_key": lbmap.Lb4AffinityKey,
    "lb_affinity_val": lbmap.LbAffinityVal,
    "lb_affinity_match": lbmap.LbAffinityMatch,
    "lb4_maglev_key": lbmap.Lb4MaglevKey,
    "lb4_maglev_chunk": lbmap.Lb4MaglevChunk,
    "lb4_reverse_sk_key": lbmap.Lb4ReverseSkKey,
    "lb4_reverse_sk": lbmap.Lb4ReverseSk,
    "ct4_key": ctmap.Ct4Key,
    "ct_entry": ctmap.CtEntry,
    "nat4_entry": natmap.Nat4Entry,
    "ipcache_key": ipcache.IpcacheKey,
    "remote_endpoint_info": ipcache.RemoteEndpointInfo,
    "endpoint_key": endpointmap.EndpointKey,
    "endpoint_info": endpointmap.EndpointInfo,
    "policy_key": policymap.PolicyKey,
    "policy_entry": policymap.PolicyEntry,
    "metrics_key": metricsmap.MetricsKey,
    "metrics_value": metricsmap.MetricsValue,
    "monitor_event": events.MonitorEvent,
    "prefilter_value": prefilter.PrefilterValue,
}

__all__ = ["ALL_MAPS", "BY_NAME", "C_STRUCTS", "MapNotPinnedError", "MapSpec", "PinnedMap"]
