"""The ipcache map manager: pod IPs of the whole cluster and policy CIDRs -> identity, node."""

from pycilium.agent.ipcache.datapath import (
    IPCacheDatapath,
    IPCacheEntry,
    MemoryIPCacheDatapath,
    PinnedIPCacheDatapath,
)
from pycilium.agent.ipcache.manager import IPCacheManager, node_internal_ip

__all__ = [
    "IPCacheDatapath",
    "IPCacheEntry",
    "IPCacheManager",
    "MemoryIPCacheDatapath",
    "PinnedIPCacheDatapath",
    "node_internal_ip",
]
