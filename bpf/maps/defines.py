"""Numeric codes shared with the datapath, read from bpf/lib/map_layouts.h (their one definition)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

HEADER = Path(__file__).resolve().parent.parent / "lib" / "map_layouts.h"
_DEFINE = re.compile(r"^#define\s+([A-Z][A-Z0-9_]*)\s+(0x[0-9a-fA-F]+|\d+)\b", re.M)


@cache
def header_defines() -> dict[str, int]:
    return {m.group(1): int(m.group(2), 0) for m in _DEFINE.finditer(HEADER.read_text())}


def d(name: str) -> int:
    return header_defines()[name]


def with_prefix(prefix: str) -> dict[str, int]:
    return {k: v for k, v in header_defines().items() if k.startswith(prefix)}


# Human-readable drop reasons (what `pycilium monitor` and metrics print).
REASON_TEXT: dict[str, str] = {
    "REASON_FORWARDED": "Forwarded",
    "DROP_INVALID_SMAC": "Invalid source mac",
    "DROP_INVALID_DMAC": "Invalid destination mac",
    "DROP_INVALID_SIP": "Invalid source ip",
    "DROP_POLICY": "Policy denied",
    "DROP_INVALID": "Invalid packet",
    "DROP_CT_INVALID_HDR": "CT: Invalid header",
    "DROP_CT_UNKNOWN_PROTO": "CT: Unknown L4 protocol",
    "DROP_UNKNOWN_L3": "Unknown L3 target address",
    "DROP_WRITE_ERROR": "Error writing to packet",
    "DROP_UNKNOWN_L4": "Unknown L4 protocol",
    "DROP_UNKNOWN_ICMP_TYPE": "Unknown ICMPv4 type",
    "DROP_UNROUTABLE": "Unroutable",
    "DROP_CSUM_L3": "Invalid L3 checksum",
    "DROP_CT_CREATE_FAILED": "CT: Map insertion failed",
    "DROP_FRAG_NOSUPPORT": "Fragmentation not supported",
    "DROP_NO_SERVICE": "Service backend not found",
    "DROP_NO_TUNNEL_ENDPOINT": "No tunnel endpoint",
    "DROP_NAT_NO_MAPPING": "No mapping for NAT masquerade",
    "DROP_NAT_UNSUPP_PROTO": "Unsupported L4 protocol for NAT",
    "DROP_NO_FIB": "No FIB entry found",
    "DROP_POLICY_DENY": "Policy denied by denylist",
    "DROP_PREFILTER": "CIDR prefilter denied",
    "DROP_NO_LOCAL_BACKEND": "No local backend for traffic-policy Local",
    "DROP_INVALID_SVC_SLOT": "Service slot without backend",
    "DROP_UNKNOWN_TUNNEL_PEER": "Tunnel packet from an unknown node",
    "REASON_POLICY_ALLOWED": "Policy allowed",
    "REASON_CT_CREATED": "Conntrack entry created",
}


@cache
def reason_names() -> dict[int, str]:
    """Numeric reason -> text, for every reason the header defines."""
    out: dict[int, str] = {}
    for name, value in header_defines().items():
        if name.startswith("DROP_") or name.startswith("REASON_"):
            out[value] = REASON_TEXT.get(name, name)
    return out


def reason_text(code: int) -> str:
    return reason_names().get(code, f"Unknown reason {code}")
