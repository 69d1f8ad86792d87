"""How the endpoint manager attaches the lxc datapath programs to a pod's host veth.

The manager only knows the small `EndpointDatapath` hook; the agent passes a `TcProgramAttacher`
built from the loaded bpf_lxc programs, or `NoopDatapath` when no programs are loaded (tests,
datapath disabled). Both calls run in a worker thread of the agent, in the node's netns.

`TcProgramAttacher` sends the same tc requests as `pycilium.bpf.loader.attach_tc`/`detach_tc`
(clsact qdisc, direct-action bpf filter prio 1 handle 1 for ETH_P_ALL), over the endpoint
module's own rtnetlink socket: it runs on every ADD and DEL, where pyroute2's per-call event loop
cost several milliseconds of CPU.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from typing import Protocol, runtime_checkable

from pycilium.agent.endpoint import netlink as nl
from pycilium.bpf import loader
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("pycilium.endpoint.datapath")

RTM_NEWQDISC, RTM_DELQDISC, RTM_NEWTFILTER, RTM_GETTFILTER = 36, 37, 44, 46
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_CLASSID, TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS = 3, 6, 7, 8
TCA_BPF_FLAG_ACT_DIRECT = 1
TC_H_CLSACT = 0xFFFFFFF1
CLSACT_HANDLE = 0xFFFF0000
TC_PARENT = {loader.TC_INGRESS: 0xFFFFFFF2, loader.TC_EGRESS: 0xFFFFFFF3}
FILTER_PRIO, FILTER_HANDLE, ETH_P_ALL = 1, 1, 0x0003
_TCMSG = struct.Struct("=BxxxiIII")  # tcmsg: family, ifindex, handle, parent, info


def _tcmsg(index: int, handle: int, parent: int, info: int = 0) -> bytes:
    return _TCMSG.pack(socket.AF_UNSPEC, index, handle, parent, info)


def clsact_request(index: int, *, delete: bool = False) -> nl.Request:
    body = _tcmsg(index, CLSACT_HANDLE, TC_H_CLSACT) + nl.attr_str(TCA_KIND, "clsact")
    if delete:
        return nl.Request(RTM_DELQDISC, 0, body)
    return nl.Request(RTM_NEWQDISC, nl.NLM_F_CREATE | nl.NLM_F_EXCL, body)


def bpf_filter_request(index: int, direction: str, prog_fd: int, name: str) -> nl.Request:
    """``tc filter replace dev <index> <direction> prio 1 handle 1 protocol all bpf da fd <prog_fd>``."""
    info = FILTER_PRIO << 16 | socket.htons(ETH_P_ALL)
    options = nl.attr_u32(TCA_BPF_CLASSID, 1) + nl.attr_u32(TCA_BPF_FD, prog_fd)
    options += nl.attr_str(TCA_BPF_NAME, name) + nl.attr_u32(TCA_BPF_FLAGS, TCA_BPF_FLAG_ACT_DIRECT)
    body = _tcmsg(index, FILTER_HANDLE, TC_PARENT[direction], info)
    body += nl.attr_str(TCA_KIND, "bpf") + nl.attr(TCA_OPTIONS, options)
    return nl.Request(RTM_NEWTFILTER, nl.NLM_F_CREATE | nl.NLM_F_REPLACE, body)


@runtime_checkable
class EndpointDatapath(Protocol):
    def attach(self, host_ifname: str) -> None:
        """Attach (or atomically replace) the programs on the host veth; raise on failure."""

    def detach(self, host_ifname: str) -> None:
        """Remove the programs; a missing device or program is not an error."""


class NoopDatapath:
    """No programs loaded: the pod is plain routed (host veth + /32 route)."""

    def attach(self, host_ifname: str) -> None:
        return None

    def detach(self, host_ifname: str) -> None:
        return None


class TcProgramAttacher:
    """bpf_lxc's from-container on TC ingress and to-container on TC egress of the host veth."""

    def __init__(self, from_container_fd: int, to_container_fd: int):
        self.from_container_fd = from_container_fd
        self.to_container_fd = to_container_fd

    def attach(self, host_ifname: str) -> None:
        with nl.Rtnl() as rt:
            link = nl.link_info(rt, host_ifname)
            if link is None:
                raise loader.DatapathError(f"no such network device {host_ifname!r}")
            for direction, fd, name in ((loader.TC_INGRESS, self.from_container_fd, "from-container"),
                                        (loader.TC_EGRESS, self.to_container_fd, "to-container")):  # fmt: skip
                # the qdisc first (already there: fine), then the filter, as loader.attach_tc
                qdisc, filt = rt.batch(
                    [clsact_request(link.index), bpf_filter_request(link.index, direction, fd, name)]
                )
                if qdisc.error and qdisc.error != errno.EEXIST:
                    e = NetlinkError(qdisc.error)
                    raise loader.DatapathError(f"cannot add clsact qdisc on {host_ifname}: {e}") from e
                if filt.error:
                    e = NetlinkError(filt.error)
                    raise loader.DatapathError(
                        f"cannot attach {name} to {host_ifname} {direction}: {e}"
                    ) from e

    def detach(self, host_ifname: str) -> None:
        # removing the clsact qdisc drops both filters; a vanished device is fine
        with nl.Rtnl() as rt:
            link = nl.link_info(rt, host_ifname)
            if link is None:
                return
            reply = rt.call(clsact_request(link.index, delete=True))
            if reply.error and reply.error not in (errno.ENOENT, errno.EINVAL):  # nothing attached
                raise NetlinkError(reply.error)

    def attached(self, host_ifname: str) -> bool:
        with nl.Rtnl() as rt:
            link = nl.link_info(rt, host_ifname)
            if link is None:
                return False
            return all(self._has_bpf_filter(rt, link.index, d) for d in (loader.TC_INGRESS, loader.TC_EGRESS))

    @staticmethod
    def _has_bpf_filter(rt: nl.Rtnl, index: int, direction: str) -> bool:
        for _kind, body in rt.dump(RTM_GETTFILTER, _tcmsg(index, 0, TC_PARENT[direction])):
            kind = nl.parse_attrs(body, _TCMSG.size).get(TCA_KIND)
            if kind is not None and nl.str_attr(kind) == "bpf":
                return True
        return False
