"""The ipcache map as the manager sees it: prefix -> (identity, tunnel endpoint, flags)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Protocol

from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.ipcache import IPCACHE, IpcacheKey, RemoteEndpointInfo
from pycilium.bpf.maps.pinned import PinnedMap
from pycilium.bpf.maps.util import be32_to_ip, ip_to_be32

IPCACHE_STATIC_PREFIX = d("IPCACHE_STATIC_PREFIX")
IPCACHE_F_REMOTE_NODE = d("IPCACHE_F_REMOTE_NODE")

Prefix = ipaddress.IPv4Network


@dataclass(frozen=True)
class IPCacheEntry:
    identity: int
    tunnel_endpoint: str | None = None  # node IP the address lives on; None: this node / outside
    flags: int = 0
    node_id: int = 0


class IPCacheDatapath(Protocol):
    def dump(self) -> dict[Prefix, IPCacheEntry]: ...

    def lookup(self, prefix: Prefix) -> IPCacheEntry | None: ...

    def update(self, prefix: Prefix, entry: IPCacheEntry) -> None: ...

    def delete(self, prefix: Prefix) -> None: ...


def to_bpf(prefix: Prefix, entry: IPCacheEntry | None = None) -> tuple[IpcacheKey, RemoteEndpointInfo]:
    key = IpcacheKey(
        prefixlen=IPCACHE_STATIC_PREFIX + prefix.prefixlen, addr=ip_to_be32(str(prefix.network_address))
    )
    val = RemoteEndpointInfo()
    if entry is not None:
        val.sec_identity = entry.identity
        val.tunnel_endpoint = ip_to_be32(entry.tunnel_endpoint) if entry.tunnel_endpoint else 0
        val.flags = entry.flags
        val.node_id = entry.node_id
    return key, val


def from_bpf(key: IpcacheKey, val: RemoteEndpointInfo) -> tuple[Prefix, IPCacheEntry]:
    plen = key.prefixlen - IPCACHE_STATIC_PREFIX
    prefix = ipaddress.IPv4Network(f"{be32_to_ip(key.addr)}/{plen}", strict=False)
    tun = be32_to_ip(val.tunnel_endpoint) if val.tunnel_endpoint else None
    return prefix, IPCacheEntry(val.sec_identity, tun, val.flags, val.node_id)


class PinnedIPCacheDatapath:
    def __init__(self, bpf_root: str | os.PathLike[str]):
        self.map = PinnedMap(IPCACHE, bpf_root)

    def close(self) -> None:
        self.map.close()

    def dump(self) -> dict[Prefix, IPCacheEntry]:
        return dict(from_bpf(k, v) for k, v in self.map.items())

    def lookup(self, prefix: Prefix) -> IPCacheEntry | None:
        """The entry stored under exactly `prefix`. A lookup in an LPM trie returns the longest
        match, which need not be this key, so the keys are scanned (used for rare CIDR writes)."""
        for k, v in self.map.items():
            if k.prefixlen - IPCACHE_STATIC_PREFIX == prefix.prefixlen:
                got, entry = from_bpf(k, v)
                if got == prefix:
                    return entry
        return None

    def update(self, prefix: Prefix, entry: IPCacheEntry) -> None:
        key, val = to_bpf(prefix, entry)
        self.map.update(key, val)

    def delete(self, prefix: Prefix) -> None:
        key, _ = to_bpf(prefix)
        self.map.delete(key)


class MemoryIPCacheDatapath:
    def __init__(self, entries: dict[Prefix, IPCacheEntry] | None = None) -> None:
        self.entries: dict[Prefix, IPCacheEntry] = dict(entries or {})
        self.ops: list[tuple[str, Prefix]] = []

    def dump(self) -> dict[Prefix, IPCacheEntry]:
        return dict(self.entries)

    def lookup(self, prefix: Prefix) -> IPCacheEntry | None:
        return self.entries.get(prefix)

    def update(self, prefix: Prefix, entry: IPCacheEntry) -> None:
        self.entries[prefix] = entry
        self.ops.append(("update", prefix))

    def delete(self, prefix: Prefix) -> None:
        self.entries.pop(prefix, None)
        self.ops.append(("delete", prefix))
