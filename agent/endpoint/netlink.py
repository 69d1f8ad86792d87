"""The netlink work behind an endpoint: veth pair, addresses, routes, static neighbour, sysctls.

Everything runs synchronously in the calling thread (a worker thread of the agent), over the
plain rtnetlink socket of pycilium.bpf.rtnl (`Rtnl`, batched requests): an endpoint needs a
handful of fixed requests, and pyroute2's per-call event loop was most of an ADD's agent-side time.

Host-side work happens in the calling thread's network namespace. Pod-side work uses a netlink
socket opened inside the pod netns (`Rtnl.inside`): the calling thread enters the netns with
setns(2) just long enough to create the socket and returns at once, so the pod's namespace is
entered once per operation, with no helper thread; a netns path that does not exist is never
created. Errors are pyroute2's ``NetlinkError`` (code = errno), as elsewhere in the agent.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass, field

from pycilium.bpf.rtnl import I32 as _I32
from pycilium.bpf.rtnl import (
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    Reply,
    Request,
    Rtnl,
    attr,
    attr_str,
    attr_u32,
    parse_attrs,
    str_attr,
)
from pycilium.bpf.rtnl import U32 as _U32
from pycilium.bpf.rtnl import NetnsError as NetnsError  # re-exported: the manager catches it
from pycilium.bpf.rtnl import check as _check
from pycilium.bpf.rtnl import open_netns as open_netns  # re-exported: the manager checks pod netns

NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 4
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
IFF_UP = 0x1

# ---- rtnetlink constants (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, linux/veth.h) ----
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 4, 5, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NDA_DST, NDA_LLADDR = 1, 2
NLA_F_NESTED = 0x8000
RT_TABLE_MAIN = 254
RTPROT_STATIC = 4
RTN_UNICAST = 1

_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst_len, src_len, tos, table, proto, scope, type, flags
_NDMSG = struct.Struct("=BxxxiHBB")  # ndmsg: family, ifindex, state, flags, type


def _ipv4(ip: str) -> bytes:
    return socket.inet_aton(ip)


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _mac_str(v: memoryview) -> str:
    return ":".join(f"{b:02x}" for b in bytes(v))


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFO.pack(socket.AF_UNSPEC, 0, index, flags, change)


def get_link_request(name: str | None = None, index: int = 0) -> Request:
    return Request(RTM_GETLINK, 0, _ifinfo(index) + (attr_str(IFLA_IFNAME, name) if name else b""), get=True)


def delete_link_request(name: str | None = None, index: int = 0) -> Request:
    return Request(RTM_DELLINK, 0, _ifinfo(index) + (attr_str(IFLA_IFNAME, name) if name else b""))


def link_up_request(name: str | None = None, index: int = 0) -> Request:
    body = _ifinfo(index, IFF_UP, IFF_UP) + (attr_str(IFLA_IFNAME, name) if name else b"")
    return Request(RTM_NEWLINK, 0, body)


def veth_request(host: str, peer: str, netns_fd: int, mtu: int) -> Request:
    peer_info = _ifinfo() + attr_str(IFLA_IFNAME, peer) + attr_u32(IFLA_NET_NS_FD, netns_fd)
    peer_info += attr_u32(IFLA_MTU, mtu)
    linkinfo = attr_str(IFLA_INFO_KIND, "veth")
    linkinfo += attr(IFLA_INFO_DATA | NLA_F_NESTED, attr(VETH_INFO_PEER | NLA_F_NESTED, peer_info))
    body = _ifinfo() + attr_str(IFLA_IFNAME, host) + attr_u32(IFLA_MTU, mtu)
    body += attr(IFLA_LINKINFO | NLA_F_NESTED, linkinfo)
    return Request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)


def route_request(dst: str, dst_len: int, oif: int, *, scope: int = RT_SCOPE_UNIVERSE,
                  gateway: str | None = None, flags: int = 0) -> Request:  # fmt: skip
    """``ip route replace`` in the main table, protocol static."""
    body = _RTMSG.pack(socket.AF_INET, dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, scope, RTN_UNICAST, flags)
    if dst_len:
        body += attr(RTA_DST, _ipv4(dst))
    if gateway:
        body += attr(RTA_GATEWAY, _ipv4(gateway))
    body += attr_u32(RTA_OIF, oif)
    return Request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)


def addr_request(index: int, ip: str, prefixlen: int) -> Request:
    """``ip addr replace ip/prefixlen dev index``."""
    body = _IFADDR.pack(socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
    body += attr(IFA_ADDRESS, _ipv4(ip)) + attr(IFA_LOCAL, _ipv4(ip))
    return Request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, body)


def neigh_request(index: int, ip: str, lladdr: str, state: int) -> Request:
    """``ip neigh replace ip lladdr lladdr dev index nud state``."""
    body = _NDMSG.pack(socket.AF_INET, index, state, 0, 0)
    body += attr(NDA_DST, _ipv4(ip)) + attr(NDA_LLADDR, _mac_bytes(lladdr))
    return Request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body)


SYSCTL_ROOT = "/proc/sys"


def set_sysctl_root(root: str) -> None:
    """Where the node's sysctls are writable (agent setting proc-sys-root); host-side writes only."""
    global SYSCTL_ROOT
    SYSCTL_ROOT = root.rstrip("/") or "/proc/sys"


def write_sysctl(path: str, value: str) -> None:
    """Write <proc-sys-root>/<path> (the node's sysctls)."""
    with open(f"{SYSCTL_ROOT}/{path}", "w") as f:
        f.write(value)


def read_sysctl(path: str) -> str:
    with open(f"{SYSCTL_ROOT}/{path}") as f:
        return f.read().strip()


# ---- links ---------------------------------------------------------------------------------------


@dataclass
class LinkInfo:
    index: int
    name: str
    mac: str
    mtu: int
    up: bool
    kind: str = ""
    peer_index: int | None = None  # IFLA_LINK: a veth's peer ifindex (in the peer's netns)


def parse_link(body: bytes) -> LinkInfo:
    _family, _type, index, flags, _change = _IFINFO.unpack_from(body)
    a = parse_attrs(body, _IFINFO.size)
    kind = ""
    if IFLA_LINKINFO in a:
        info = parse_attrs(a[IFLA_LINKINFO])
        if IFLA_INFO_KIND in info:
            kind = str_attr(info[IFLA_INFO_KIND])
    name = str_attr(a[IFLA_IFNAME]) if IFLA_IFNAME in a else ""
    mac = _mac_str(a[IFLA_ADDRESS]) if IFLA_ADDRESS in a else ""
    mtu = _U32.unpack(a[IFLA_MTU])[0] if IFLA_MTU in a else 0
    peer = _I32.unpack(a[IFLA_LINK])[0] if IFLA_LINK in a else None
    return LinkInfo(index, name, mac, mtu, bool(flags & IFF_UP), kind, peer)


def _link_from(reply: Reply) -> LinkInfo | None:
    if reply.error in (errno.ENODEV, errno.ENOENT):
        return None
    _check(reply)
    for kind, body in reply.messages:
        if kind == RTM_NEWLINK:
            return parse_link(body)
    return None


def link_info(rt: Rtnl, name: str) -> LinkInfo | None:
    return _link_from(rt.call(get_link_request(name)))


def _deleted(reply: Reply) -> bool:
    if reply.error in (errno.ENODEV, errno.ENOENT):
        return False
    _check(reply)
    return True


def delete_link(rt: Rtnl, name: str) -> bool:
    """Delete a link by name; False when it does not exist."""
    return _deleted(rt.call(delete_link_request(name)))


def delete_link_index(rt: Rtnl, index: int) -> bool:
    """Delete a link by ifindex; False when it does not exist."""
    return _deleted(rt.call(delete_link_request(index=index)))


def delete_host_link(name: str) -> bool:
    """`delete_link` on a socket of its own (rollback steps)."""
    with Rtnl() as rt:
        return delete_link(rt, name)


# ---- host side -----------------------------------------------------------------------------------


def create_veth(rt: Rtnl, host: str, peer: str, netns_fd: int, mtu: int) -> LinkInfo:
    """veth `host` here, its peer named `peer` directly inside the netns (no rename race)."""
    create, get = rt.batch([veth_request(host, peer, netns_fd, mtu), get_link_request(host)])
    _check(create)
    info = _link_from(get)
    if info is None:
        raise OSError(errno.ENODEV, f"veth {host} vanished right after creation")
    return info


def setup_host_side(rt: Rtnl, link: LinkInfo, pod_ip: str) -> None:
    """Forwarding on, rp_filter off, up, and the /32 route to the pod through the host veth."""
    for key, value in (("forwarding", "1"), ("rp_filter", "0")):
        write_sysctl(f"net/ipv4/conf/{link.name}/{key}", value)
    up, route = rt.batch([link_up_request(index=link.index),
                          route_request(pod_ip, 32, link.index, scope=RT_SCOPE_LINK)])  # fmt: skip
    _check(up)
    _check(route)


def host_route_ok(rt: Rtnl, link_index: int, pod_ip: str) -> bool:
    want = _ipv4(pod_ip)
    for _kind, body in rt.dump(RTM_GETROUTE, _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)):
        _f, dst_len, _s, _t, table, _p, _sc, _ty, _fl = _RTMSG.unpack_from(body)
        a = parse_attrs(body, _RTMSG.size)
        if RTA_TABLE in a:
            table = _U32.unpack(a[RTA_TABLE])[0]
        if dst_len != 32 or table != RT_TABLE_MAIN or bytes(a.get(RTA_DST, b"")) != want:
            continue
        if RTA_OIF in a and _I32.unpack(a[RTA_OIF])[0] == link_index:
            return True
    return False


# ---- pod side (on a socket from Rtnl.inside) -----------------------------------------------------


def setup_pod_side(
    rt: Rtnl, ifname: str, index: int | None, pod_ip: str, gateway: str, gateway_mac: str
) -> str:
    """lo up; address/32, up, default route via the link-local gateway (onlink), permanent
    neighbour for it, all in one batch. `index` is the interface's ifindex when known (the host
    veth's peer index), else it is looked up by name. Returns the pod interface's MAC.
    """
    if index is None:
        link = link_info(rt, ifname)
        if link is None:
            raise OSError(errno.ENODEV, f"interface {ifname} not found in the pod netns")
        index = link.index
    lo, addr, up, neigh, route, get = rt.batch([
        link_up_request("lo"),
        addr_request(index, pod_ip, 32),
        link_up_request(index=index),
        neigh_request(index, gateway, gateway_mac, NUD_PERMANENT),
        route_request("0.0.0.0", 0, index, gateway=gateway, flags=RTNH_F_ONLINK),
        get_link_request(index=index),
    ])  # fmt: skip
    if lo.error != errno.ENODEV:  # a netns without lo: nothing to bring up
        _check(lo)
    for reply in (addr, up, neigh, route):
        _check(reply)
    link = _link_from(get)
    if link is None or link.name != ifname:
        raise OSError(errno.ENODEV, f"interface {ifname} not found in the pod netns")
    return link.mac


@dataclass
class PodView:
    """What CHECK sees inside the pod netns."""

    link: LinkInfo | None = None
    addresses: list[str] = field(default_factory=list)  # "ip/prefix"
    default_gw: str | None = None
    default_oif: int | None = None
    neighbours: dict[str, tuple[str, int]] = field(default_factory=dict)  # ip -> (lladdr, state)


def inspect_pod(rt: Rtnl, ifname: str) -> PodView:
    view = PodView()
    view.link = link_info(rt, ifname)
    if view.link is None:
        return view
    i = view.link.index
    for _k, body in rt.dump(RTM_GETADDR, _IFADDR.pack(socket.AF_INET, 0, 0, 0, 0)):
        family, prefixlen, _f, _scope, index = _IFADDR.unpack_from(body)
        a = parse_attrs(body, _IFADDR.size)
        if family == socket.AF_INET and index == i and IFA_ADDRESS in a:
            view.addresses.append(f"{socket.inet_ntoa(a[IFA_ADDRESS])}/{prefixlen}")
    for _k, body in rt.dump(RTM_GETROUTE, _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)):
        family, dst_len, _s, _t, table, _p, _sc, _ty, _fl = _RTMSG.unpack_from(body)
        a = parse_attrs(body, _RTMSG.size)
        if RTA_TABLE in a:
            table = _U32.unpack(a[RTA_TABLE])[0]
        if family == socket.AF_INET and table == RT_TABLE_MAIN and dst_len == 0:
            view.default_gw = socket.inet_ntoa(a[RTA_GATEWAY]) if RTA_GATEWAY in a else None
            view.default_oif = _I32.unpack(a[RTA_OIF])[0] if RTA_OIF in a else None
    for _k, body in rt.dump(RTM_GETNEIGH, _NDMSG.pack(socket.AF_INET, 0, 0, 0, 0)):
        family, index, state, _f, _t = _NDMSG.unpack_from(body)
        a = parse_attrs(body, _NDMSG.size)
        if family == socket.AF_INET and index == i and NDA_DST in a:
            lladdr = _mac_str(a[NDA_LLADDR]) if NDA_LLADDR in a else ""
            view.neighbours[socket.inet_ntoa(a[NDA_DST])] = (lladdr, state)
    return view
