"""Pod address management: host-scope IPv4 allocation from the node's PodCIDR."""

from pycilium.agent.ipam.hostscope import (
    ROUTER_OWNER,
    Allocation,
    HostScopeIPAM,
    IPAMConflictError,
    IPAMError,
    IPAMExhaustedError,
    IPAMNotReadyError,
    IPAMStatus,
    owner_key,
)

__all__ = [
    "ROUTER_OWNER",
    "Allocation",
    "HostScopeIPAM",
    "IPAMConflictError",
    "IPAMError",
    "IPAMExhaustedError",
    "IPAMNotReadyError",
    "IPAMStatus",
    "owner_key",
]
