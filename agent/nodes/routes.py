"""Routes to other nodes' pod CIDRs, through pyroute2, marked with our own routing protocol number.

Every route the agent installs carries `proto RTPROT_PYCILIUM`, so listing and deleting only ever
touch our own routes: `ip route` entries of the kernel, DHCP, an operator or another CNI are never
changed, even when they overlap. pyroute2's `IPRoute` is a synchronous facade over its own event
loop, so this module must be used from a plain thread, never from inside a running asyncio loop.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("pycilium.nodes.routes")

RTPROT_PYCILIUM = 194  # unassigned in /etc/iproute2/rt_protos
MAIN_TABLE = 254
RTNH_F_ONLINK = 4
_ENOENT, _ESRCH = 2, 3


@dataclass(frozen=True)
class Route:
    dst: str  # "10.200.1.0/24"
    gateway: str


class RouteProgrammer:
    """Replace/delete/list our routes in one network namespace (None: the agent's own)."""

    def __init__(self, *, proto: int = RTPROT_PYCILIUM, table: int = MAIN_TABLE, netns: str | None = None):
        if not 0 < proto < 256 or proto in (1, 2, 3, 4):  # redirect/kernel/boot/static are not ours
            raise ValueError(f"route protocol {proto} is reserved")
        self.proto = proto
        self.table = table
        self.netns = netns
        # tunnel routing: every route leaves through this device, its gateway marked on-link
        self.oif: int | None = None

    def _open(self) -> Any:
        if self.netns:
            return IPRoute(netns=self.netns, flags=0)  # flags=0: never create a missing netns
        return IPRoute()

    def list(self) -> dict[str, str]:
        """Our routes: destination CIDR -> gateway."""
        out: dict[str, str] = {}
        with self._open() as ipr:
            for r in ipr.route("dump", family=2, proto=self.proto):
                if r["proto"] != self.proto or _table(r) != self.table:
                    continue
                dst = r.get("dst") or "0.0.0.0"
                out[f"{dst}/{r['dst_len']}"] = r.get("gateway") or ""
        return out

    def apply(self, want: dict[str, str], *, delete_stale: bool) -> tuple[dict[str, str], dict[str, str]]:
        """Make our routes equal to `want` (dst -> gateway); stale ones only go with delete_stale.

        Returns (installed, failed) where failed maps dst -> error text (e.g. gateway unreachable).
        """
        failed: dict[str, str] = {}
        installed: dict[str, str] = {}
        with self._open() as ipr:
            have: dict[str, str] = {}
            have_oif: dict[str, int | None] = {}
            for r in ipr.route("dump", family=2, proto=self.proto):
                if r["proto"] == self.proto and _table(r) == self.table:
                    key = f"{r.get('dst') or '0.0.0.0'}/{r['dst_len']}"
                    have[key] = r.get("gateway") or ""
                    have_oif[key] = r.get("oif")
            for dst, gw in want.items():
                if have.get(dst) == gw and (self.oif is None or have_oif.get(dst) == self.oif):
                    installed[dst] = gw
                    continue
                try:
                    via: dict[str, Any] = (
                        {} if self.oif is None else {"oif": self.oif, "flags": RTNH_F_ONLINK}
                    )
                    ipr.route("replace", dst=dst, gateway=gw, proto=self.proto, table=self.table, **via)
                    installed[dst] = gw
                    log.info("route %s via %s installed", dst, gw)
                except NetlinkError as e:
                    failed[dst] = f"{e}"
            if delete_stale:
                for dst, gw in have.items():
                    if dst in want:
                        continue
                    try:
                        ipr.route("del", dst=dst, gateway=gw or None, proto=self.proto, table=self.table)
                        log.info("stale route %s via %s removed", dst, gw)
                    except NetlinkError as e:
                        if e.code not in (_ENOENT, _ESRCH):
                            failed[dst] = f"delete: {e}"
        return installed, failed


def _table(r: Any) -> int:
    return int(r.get("RTA_TABLE") or r["table"])


def valid_cidr(cidr: str) -> str | None:
    try:
        return str(ipaddress.IPv4Network(cidr, strict=False))
    except ValueError:
        return None
