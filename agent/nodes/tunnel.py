"""Tunnel routing mode: the node's VXLAN device and how routes reach it.

One collect-metadata VXLAN device per node (`pyc_vxlan`, UDP TUNNEL_PORT): it carries no remote of
its own, bpf/bpf_overlay.c sets the destination node per packet from the ipcache. Routes to other
nodes' pod CIDRs go `via TUNNEL_GATEWAY dev pyc_vxlan onlink`, a link-local next hop with a
permanent neighbour entry, so the stack never ARPs on the tunnel. The device's MAC is derived from
the node IP (TUNNEL_MAC_0:TUNNEL_MAC_1:<ip>), which is how a sender knows the inner destination
MAC of its peer without exchanging neighbour state. Its MTU is the node's minus the VXLAN overhead.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from pycilium.bpf.maps.defines import d
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("pycilium.nodes.tunnel")

TUNNEL_DEVICE = "pyc_vxlan"
TUNNEL_PORT = d("TUNNEL_PORT")
TUNNEL_GATEWAY = "169.254.42.1"  # next hop of tunnel routes; never on the wire
VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
NUD_PERMANENT = 0x80


def tunnel_mac(node_ip: str) -> str:
    """The VXLAN device MAC of the node with this IP (bpf_overlay.c derives the same)."""
    b = ipaddress.IPv4Address(node_ip).packed
    return ":".join(f"{x:02x}" for x in (d("TUNNEL_MAC_0"), d("TUNNEL_MAC_1"), *b))


def tunnel_mtu(device_mtu: int) -> int:
    return device_mtu - VXLAN_OVERHEAD


@dataclass(frozen=True)
class TunnelDevice:
    name: str
    ifindex: int
    mac: str
    mtu: int


def ensure_device(
    node_ip: str, mtu: int, *, name: str = TUNNEL_DEVICE, port: int = TUNNEL_PORT
) -> TunnelDevice:
    """Create or repair the VXLAN device (idempotent; a device of another kind is replaced)."""
    mac = tunnel_mac(node_ip)
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if idx:
            link = ipr.get_links(idx[0])[0]
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info else None
            data = info.get_attr("IFLA_INFO_DATA") if info else None
            ok = (
                kind == "vxlan"
                and data is not None
                and data.get_attr("IFLA_VXLAN_COLLECT_METADATA")
                and data.get_attr("IFLA_VXLAN_PORT") == port
            )
            if not ok:
                log.warning(
                    "replacing a device that is not our VXLAN device", extra={"device": name, "kind": kind}
                )
                ipr.link("del", index=idx[0])
                idx = []
        if not idx:
            ipr.link("add", ifname=name, kind="vxlan", vxlan_collect_metadata=1, vxlan_port=port,
                     vxlan_learning=0)  # fmt: skip
            idx = ipr.link_lookup(ifname=name)
            log.info("tunnel device created", extra={"device": name, "port": port})
        ipr.link("set", index=idx[0], address=mac, mtu=mtu)
        ipr.link("set", index=idx[0], state="up")
        ipr.neigh("replace", dst=TUNNEL_GATEWAY, lladdr=mac, ifindex=idx[0], state=NUD_PERMANENT)
        return TunnelDevice(name, idx[0], mac, mtu)


def remove_device(name: str = TUNNEL_DEVICE) -> bool:
    """Delete the VXLAN device (native routing mode); its routes go with it. True if it existed."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return False
        try:
            ipr.link("del", index=idx[0])
        except NetlinkError as e:
            log.warning("cannot delete the tunnel device", extra={"device": name, "error": str(e)})
            return False
        log.info("tunnel device removed", extra={"device": name})
        return True
