"""How the endpoint manager attaches the lxc datapath programs to a pod's host veth.

The manager only knows the small `EndpointDatapath` hook; the agent passes a `TcProgramAttacher`
built from the loaded bpf_lxc programs, or `NoopDatapath` when no programs are loaded (tests,
datapath disabled). Both calls run in a worker thread of the agent, in the node's netns. The tc work
is pycilium.bpf.loader's (attach_tc/detach_tc over a plain rtnetlink socket: it runs on every ADD
and DEL).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pycilium.bpf import loader


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
        loader.attach_tc(host_ifname, self.from_container_fd, loader.TC_INGRESS, "from-container")
        loader.attach_tc(host_ifname, self.to_container_fd, loader.TC_EGRESS, "to-container")

    def detach(self, host_ifname: str) -> None:
        loader.detach_tc(
            host_ifname
        )  # removing the clsact qdisc drops both filters; a vanished device is fine

    def attached(self, host_ifname: str) -> bool:
        return all(loader.tc_attached(host_ifname, d) for d in (loader.TC_INGRESS, loader.TC_EGRESS))
