"""The netlink work behind an endpoint: veth pair, addresses, routes, static neighbour, sysctls.

Everything runs synchronously in the calling thread (a worker thread of the agent, never a thread
with a running asyncio loop: pyroute2's IPRoute runs its own loop). Host-side work happens in the
calling thread's network namespace. Pod-side work runs in a short-lived thread that enters the pod
netns with setns(2) (per-thread), which costs ~2 ms instead of the ~11 ms of pyroute2's
fork-per-socket ``IPRoute(netns=...)``; a netns path that does not exist is never created.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

T = TypeVar("T")

NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 4
RT_SCOPE_LINK = 253
IFF_UP = 0x1
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(OSError):
    """The pod's network namespace is missing or is not a network namespace."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_netns(path: str) -> int:
    """An fd of the netns at `path`; NetnsError when it does not exist (never creates it)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(errno.ENOENT, f"network namespace {path} does not exist") from None
    except OSError as e:
        raise NetnsError(e.errno, f"network namespace {path}: {e.strerror}") from None


def run_in_netns(path: str, fn: Callable[[], T]) -> T:
    """Run `fn` in a fresh thread that has entered the netns at `path`; returns its result."""
    fd = open_netns(path)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            try:
                _setns(fd)
            except OSError as e:
                raise NetnsError(e.errno, f"{path} is not a usable network namespace: {e.strerror}") from None
            box["result"] = fn()
        except BaseException as e:
            box["error"] = e
        # the thread ends here: its namespace goes with it

    try:
        t = threading.Thread(target=target, name="pycilium-netns", daemon=True)
        t.start()
        t.join()
    finally:
        os.close(fd)
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


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


# ---- host side ---------------------------------------------------------------------------------


@dataclass
class LinkInfo:
    index: int
    name: str
    mac: str
    mtu: int
    up: bool
    kind: str = ""


def link_info(ipr: IPRoute, name: str) -> LinkInfo | None:
    idx = ipr.link_lookup(ifname=name)
    if not idx:
        return None
    try:
        msg = ipr.get_links(idx[0])[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else ""
    return LinkInfo(int(msg["index"]), name, str(msg.get_attr("IFLA_ADDRESS")), int(msg.get_attr("IFLA_MTU")),
                    bool(msg["flags"] & IFF_UP), kind or "")  # fmt: skip


def delete_link(ipr: IPRoute, name: str) -> bool:
    """Delete a link by name; False when it does not exist."""
    idx = ipr.link_lookup(ifname=name)
    if not idx:
        return False
    try:
        ipr.link("del", index=idx[0])
    except NetlinkError as e:
        if e.code in (errno.ENODEV, errno.ENOENT):
            return False
        raise
    return True


def create_veth(ipr: IPRoute, host: str, peer: str, netns_fd: int, mtu: int) -> LinkInfo:
    """veth `host` here, its peer named `peer` directly inside the netns (no rename race)."""
    ipr.link(
        "add", ifname=host, kind="veth", mtu=mtu, peer={"ifname": peer, "net_ns_fd": netns_fd, "mtu": mtu}
    )
    info = link_info(ipr, host)
    if info is None:
        raise OSError(errno.ENODEV, f"veth {host} vanished right after creation")
    return info


def setup_host_side(ipr: IPRoute, link: LinkInfo, pod_ip: str) -> None:
    """Forwarding on, rp_filter off, up, and the /32 route to the pod through the host veth."""
    for key, value in (("forwarding", "1"), ("rp_filter", "0")):
        write_sysctl(f"net/ipv4/conf/{link.name}/{key}", value)
    ipr.link("set", index=link.index, state="up")
    ipr.route("replace", dst=f"{pod_ip}/32", oif=link.index, scope=RT_SCOPE_LINK)


def host_route_ok(ipr: IPRoute, link_index: int, pod_ip: str) -> bool:
    for r in ipr.route("dump", dst=pod_ip, dst_len=32, table=254):
        if r.get_attr("RTA_OIF") == link_index:
            return True
    return False


# ---- pod side (call through run_in_netns) --------------------------------------------------------


def setup_pod_side(ifname: str, pod_ip: str, gateway: str, gateway_mac: str) -> str:
    """Address/32, up, default route via the link-local gateway (onlink), permanent neighbour for it.

    Returns the pod interface's MAC.
    """
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise OSError(errno.ENODEV, f"interface {ifname} not found in the pod netns")
        i = idx[0]
        lo = ipr.link_lookup(ifname="lo")
        if lo:
            ipr.link("set", index=lo[0], state="up")
        ipr.addr("replace", index=i, address=pod_ip, prefixlen=32)
        ipr.link("set", index=i, state="up")
        ipr.neigh("replace", dst=gateway, lladdr=gateway_mac, ifindex=i, state=NUD_PERMANENT)
        ipr.route("replace", dst="0.0.0.0/0", gateway=gateway, oif=i, flags=RTNH_F_ONLINK)
        return str(ipr.get_links(i)[0].get_attr("IFLA_ADDRESS"))


@dataclass
class PodView:
    """What CHECK sees inside the pod netns."""

    link: LinkInfo | None = None
    addresses: list[str] = field(default_factory=list)  # "ip/prefix"
    default_gw: str | None = None
    default_oif: int | None = None
    neighbours: dict[str, tuple[str, int]] = field(default_factory=dict)  # ip -> (lladdr, state)


def inspect_pod(ifname: str) -> PodView:
    view = PodView()
    with IPRoute() as ipr:
        view.link = link_info(ipr, ifname)
        if view.link is None:
            return view
        i = view.link.index
        for a in ipr.get_addr(index=i, family=2):
            view.addresses.append(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
        for r in ipr.route("dump", table=254, family=2):
            if r["dst_len"] == 0:
                view.default_gw = r.get_attr("RTA_GATEWAY")
                view.default_oif = r.get_attr("RTA_OIF")
        for n in ipr.get_neighbours(ifindex=i, family=2):
            dst = n.get_attr("NDA_DST")
            if dst:
                view.neighbours[str(dst)] = (str(n.get_attr("NDA_LLADDR") or ""), int(n["state"]))
    return view


def with_iproute(fn: Callable[[IPRoute], T]) -> T:
    with IPRoute() as ipr:
        return fn(ipr)
