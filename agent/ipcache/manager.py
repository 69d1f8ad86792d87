"""The ipcache: every pod IP of the cluster -> {identity, node it runs on}, plus CIDR identities.

Entries this manager writes:
- ``<pod IP>/32`` for every pod with an IP that is not on the host network and not finished:
  its identity (reserved:init until the identity is allocated), tunnel endpoint = InternalIP of the
  pod's node (status.hostIP until the Node is known), 0 for pods of this node;
- ``<prefix>`` for NetworkPolicy ipBlock CIDRs: their node-local CIDR identity.

Node IPs and ``0.0.0.0/0 -> world`` belong to the node manager. Ownership is tracked: only keys
this manager wrote are ever changed or deleted by it, and a CIDR that equals a key someone else
owns is not written. After a restart the entries found in the map that look like ours (pod or
CIDR identities) are adopted, kept while the watches catch up, and the stale ones deleted by
`mark_synced()` only.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pycilium.agent.identity.labels import ID_INIT, MIN_GLOBAL_ID, is_local_id
from pycilium.agent.identity.pods import PodInfo
from pycilium.agent.ipcache.datapath import IPCACHE_F_REMOTE_NODE, IPCacheDatapath, IPCacheEntry, Prefix

log = logging.getLogger("pycilium.agent.ipcache")

Obj = dict[str, Any]


def _ours(prefix: Prefix, entry: IPCacheEntry) -> bool:
    """Entries a previous run of this manager wrote (node entries carry reserved identities)."""
    if entry.identity >= MIN_GLOBAL_ID:
        return True
    return entry.identity == ID_INIT and prefix.prefixlen == 32


def node_internal_ip(obj: Obj) -> str | None:
    addrs = (obj.get("status") or {}).get("addresses") or []
    for kind in ("InternalIP", "ExternalIP"):
        for a in addrs:
            ip = (a or {}).get("address") or ""
            if (a or {}).get("type") == kind and ip and ":" not in ip:
                return str(ip)
    return None


@dataclass(frozen=True)
class _PodEntry:
    key: str
    node: str
    host_ip: str | None
    identity: int | None
    rank: tuple[int, int]  # preference among pods sharing an IP (higher wins)


class IPCacheManager:
    def __init__(
        self,
        datapath: IPCacheDatapath,
        node_name: str,
        *,
        lock: threading.RLock | None = None,
    ) -> None:
        self.datapath = datapath
        self.node_name = node_name
        self.lock = lock or threading.RLock()
        self._seq = itertools.count()
        self._by_ip: dict[str, dict[str, _PodEntry]] = {}  # ip -> pod key -> entry
        self._pod_ip: dict[str, str] = {}  # pod key -> ip
        self._cidrs: dict[Prefix, int] = {}
        self._node_ips: dict[str, str] = {}
        self._written: dict[Prefix, IPCacheEntry] = {}  # what we own, as written
        self._skipped_foreign: set[Prefix] = set()
        self.synced = False
        found = datapath.dump()
        self._adopted: set[Prefix] = set()
        for prefix, entry in found.items():
            if _ours(prefix, entry):
                self._written[prefix] = entry
                self._adopted.add(prefix)
        self._foreign_at_start = {p for p in found if p not in self._written}
        log.info("ipcache: adopted %d entries from a previous run", len(self._adopted))

    # ---- restart support -----------------------------------------------------------------------
    def restored_cidr_identities(self) -> dict[Prefix, int]:
        """CIDR prefix -> node-local identity found in the map at start (IdentityAllocator.restore_cidr)."""
        with self.lock:
            return {
                p: e.identity
                for p, e in self._written.items()
                if p in self._adopted and is_local_id(e.identity)
            }

    def mark_synced(self) -> int:
        """All watches (pods, nodes, policies) have delivered their initial state: delete adopted
        entries nothing claimed. Returns how many were deleted."""
        with self.lock:
            self.synced = True
            stale = [p for p in self._adopted if self._desired(p) is None and p in self._written]
            for p in stale:
                self._write(p, None)
            self._adopted.clear()
            if stale:
                log.info("ipcache: deleted %d stale entries after sync", len(stale))
            return len(stale)

    # ---- nodes ---------------------------------------------------------------------------------
    def upsert_node(self, obj: Obj) -> None:
        name = str((obj.get("metadata") or {}).get("name") or "")
        ip = node_internal_ip(obj)
        with self.lock:
            if ip is None:
                changed = self._node_ips.pop(name, None) is not None
            else:
                changed = self._node_ips.get(name) != ip
                self._node_ips[name] = ip
            if changed:
                self._resync_node(name)

    def delete_node(self, obj: Obj) -> None:
        name = str((obj.get("metadata") or {}).get("name") or "")
        with self.lock:
            if self._node_ips.pop(name, None) is not None:
                self._resync_node(name)

    def _resync_node(self, node: str) -> None:
        for ip, owners in list(self._by_ip.items()):
            if any(e.node == node for e in owners.values()):
                self._sync(ipaddress.IPv4Network(f"{ip}/32"))

    # ---- pods (PodListener) --------------------------------------------------------------------
    def pod_changed(self, old: PodInfo | None, new: PodInfo | None) -> None:
        with self.lock:
            touched: set[str] = set()
            if old is not None:
                ip = self._pod_ip.pop(old.key, None)
                if ip is not None:
                    owners = self._by_ip.get(ip, {})
                    owners.pop(old.key, None)
                    if not owners:
                        self._by_ip.pop(ip, None)
                    touched.add(ip)
            if new is not None and new.ip and new.active:
                try:
                    ipaddress.IPv4Address(new.ip)
                except ValueError:
                    log.warning("pod %s: ignoring invalid IP %r", new.key, new.ip)
                else:
                    rank = (0 if new.terminating else 2 if new.phase == "Running" else 1, next(self._seq))
                    entry = _PodEntry(new.key, new.node_name, new.host_ip, new.identity, rank)
                    self._by_ip.setdefault(new.ip, {})[new.key] = entry
                    self._pod_ip[new.key] = new.ip
                    touched.add(new.ip)
            for ip in sorted(touched):
                self._sync(ipaddress.IPv4Network(f"{ip}/32"))

    # ---- CIDR identities -----------------------------------------------------------------------
    def upsert_cidr(self, prefix: str | Prefix, identity: int) -> None:
        net = ipaddress.IPv4Network(prefix, strict=False)
        if net.prefixlen == 0:
            return  # 0.0.0.0/0 is reserved:world, written by the node manager
        with self.lock:
            self._cidrs[net] = identity
            self._sync(net)

    def delete_cidr(self, prefix: str | Prefix) -> None:
        net = ipaddress.IPv4Network(prefix, strict=False)
        with self.lock:
            if self._cidrs.pop(net, None) is not None:
                self._sync(net)

    # ---- writing -------------------------------------------------------------------------------
    def _desired(self, prefix: Prefix) -> IPCacheEntry | None:
        if prefix.prefixlen == 32:
            owners = self._by_ip.get(str(prefix.network_address))
            if owners:
                best = max(owners.values(), key=lambda e: e.rank)
                identity = best.identity if best.identity is not None else ID_INIT
                if best.node == self.node_name:
                    return IPCacheEntry(identity)
                tunnel = self._node_ips.get(best.node) or best.host_ip
                return IPCacheEntry(identity, tunnel, IPCACHE_F_REMOTE_NODE)
        cidr_id = self._cidrs.get(prefix)
        if cidr_id is not None:
            return IPCacheEntry(cidr_id)
        return None

    def _sync(self, prefix: Prefix) -> None:
        want = self._desired(prefix)
        have = self._written.get(prefix)
        if want is None:
            if have is not None and (self.synced or prefix not in self._adopted):
                self._write(prefix, None)
            return
        if want == have:
            self._adopted.discard(prefix)
            return
        is_pod = prefix.prefixlen == 32 and str(prefix.network_address) in self._by_ip
        if have is None and (not is_pod or prefix in self._foreign_at_start):
            # a CIDR must not take over a key another component wrote (e.g. a node IP /32)
            foreign = self.datapath.lookup(prefix)
            if foreign is not None:
                if prefix not in self._skipped_foreign:
                    log.warning("ipcache: %s is owned by another component (identity %d); not overwriting",
                                prefix, foreign.identity)  # fmt: skip
                    self._skipped_foreign.add(prefix)
                return
        self._write(prefix, want)

    def _write(self, prefix: Prefix, entry: IPCacheEntry | None) -> None:
        self._adopted.discard(prefix)
        self._skipped_foreign.discard(prefix)
        if entry is None:
            self.datapath.delete(prefix)
            self._written.pop(prefix, None)
        else:
            self.datapath.update(prefix, entry)
            self._written[prefix] = entry

    def resync_all(self) -> None:
        """Re-apply every desired entry (after an error writing the map)."""
        with self.lock:
            for p in self._all_prefixes():
                self._sync(p)

    def _all_prefixes(self) -> Iterable[Prefix]:
        out = {ipaddress.IPv4Network(f"{ip}/32") for ip in self._by_ip}
        out |= set(self._cidrs)
        out |= set(self._written)
        return sorted(out)

    # ---- queries -------------------------------------------------------------------------------
    def entries(self) -> dict[Prefix, IPCacheEntry]:
        """What this manager has written (its share of the ipcache)."""
        with self.lock:
            return dict(self._written)

    def lookup_ip(self, ip: str) -> IPCacheEntry | None:
        """Longest-prefix match over this manager's entries."""
        addr = ipaddress.IPv4Address(ip)
        with self.lock:
            best: tuple[int, IPCacheEntry] | None = None
            for p, e in self._written.items():
                if addr in p and (best is None or p.prefixlen > best[0]):
                    best = (p.prefixlen, e)
            return best[1] if best else None
