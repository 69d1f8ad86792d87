"""Host-scope IPv4 IPAM: addresses for this node's pods from the node's PodCIDR.

The network address, the broadcast address and the first host address (the router, owned by the
reserved owner ``router``) are never handed out; the router counts as allocated, so a /24 shows
``IPv4: 1/254 allocated from 10.0.1.0/24`` before any pod starts, like ``cilium status``.

Allocations are keyed by owner (``<containerID>/<ifname>``): allocating twice for the same owner
returns the same address. Every change is written to ``ipam.json`` atomically (temp + fsync +
rename) before the caller sees the address, so a restarted agent never hands an address out twice.
Writes are group commits: a change is made under the state lock, the file is written outside it,
and one write carries every change made before it, so concurrent ADDs do not queue behind each
other's fsync.
Addresses are handed out round-robin after the last one allocated, so a just-released address is
not immediately reused. All methods are thread-safe.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pycilium.cni import protocol as cniproto

log = logging.getLogger("pycilium.ipam")

ROUTER_OWNER = "router"
STATE_VERSION = 1


class IPAMError(Exception):
    """An IPAM failure, carrying the CNI error code the plugin reports."""

    cni_code = cniproto.ERR_INTERNAL


class IPAMNotReadyError(IPAMError):
    """No PodCIDR yet (neither configured nor learnt from the Node object): try again later."""

    cni_code = cniproto.ERR_TRY_AGAIN_LATER


class IPAMExhaustedError(IPAMError):
    """Every address of the range is allocated."""

    cni_code = cniproto.ERR_IPAM_EXHAUSTED


class IPAMConflictError(IPAMError):
    """An address was claimed that another owner holds, or lies outside the range."""


@dataclass(frozen=True)
class Allocation:
    ip: str
    owner: str
    pod: str = ""  # "namespace/name", informational
    since: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"owner": self.owner, "pod": self.pod, "since": self.since}


@dataclass(frozen=True)
class IPAMStatus:
    cidr: str | None
    allocated: int  # includes the router address
    total: int  # usable host addresses of the range (network and broadcast excluded)

    @property
    def free(self) -> int:
        return max(self.total - self.allocated, 0)

    def __str__(self) -> str:
        if self.cidr is None:
            return "IPv4: no PodCIDR assigned yet"
        return f"IPv4: {self.allocated}/{self.total} allocated from {self.cidr}"

    def to_dict(self) -> dict[str, Any]:
        return {"cidr": self.cidr, "allocated": self.allocated, "total": self.total, "free": self.free}


def owner_key(container_id: str, ifname: str) -> str:
    return f"{container_id}/{ifname}"


class HostScopeIPAM:
    """Allocate pod addresses from one IPv4 PodCIDR, persisted in ``state_path``."""

    def __init__(self, state_path: str | Path, pod_cidr: str | None = None):
        self.state_path = Path(state_path)
        self._lock = threading.Lock()
        self._net: ipaddress.IPv4Network | None = None
        self._alloc: dict[str, Allocation] = {}  # ip -> allocation
        self._by_owner: dict[str, str] = {}  # owner -> ip
        self._last: int | None = None  # integer value of the last address handed out
        self._write_lock = threading.Lock()  # serialises file writes; taken before _lock, never inside
        self._gen = 0  # bumped by every change (under _lock)
        self._saved_gen = 0  # the newest change on disk (under _write_lock)
        self._load()
        if pod_cidr is not None:
            self.set_pod_cidr(pod_cidr)

    # ---- state ---------------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            raw = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            # a corrupt file must not silently become "everything free": refuse to start
            raise IPAMError(f"IPAM state {self.state_path} is unreadable: {e}") from e
        if raw.get("version") != STATE_VERSION:
            raise IPAMError(f"IPAM state {self.state_path} has unknown version {raw.get('version')!r}")
        if raw.get("cidr"):
            self._net = ipaddress.IPv4Network(raw["cidr"])
        for ip, a in raw.get("allocations", {}).items():
            alloc = Allocation(ip, a["owner"], a.get("pod", ""), a.get("since", 0.0))
            self._alloc[ip] = alloc
            self._by_owner[alloc.owner] = ip
        if raw.get("last"):
            self._last = int(ipaddress.IPv4Address(raw["last"]))

    def _changed(self) -> int:
        """Mark a change (caller holds _lock); returns the generation to commit."""
        self._gen += 1
        return self._gen

    def _commit(self, gen: int) -> None:
        """Return once the file holds change `gen` or a newer state (never called under _lock)."""
        with self._write_lock:
            if self._saved_gen >= gen:
                return  # a write that started after our change already carried it
            with self._lock:
                cur = self._gen
                state = {
                    "version": STATE_VERSION,
                    "cidr": str(self._net) if self._net else None,
                    "last": str(ipaddress.IPv4Address(self._last)) if self._last is not None else None,
                    "allocations": {ip: a.to_dict() for ip, a in sorted(self._alloc.items())},
                }
            self.state_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            cniproto.atomic_write_json(self.state_path, state, pretty=True)
            self._saved_gen = cur

    # ---- range ---------------------------------------------------------------------------------
    @property
    def pod_cidr(self) -> str | None:
        return str(self._net) if self._net else None

    def router_ip(self) -> str | None:
        return str(self._net.network_address + 1) if self._net else None

    def set_pod_cidr(self, cidr: str) -> None:
        """Set (or change) the range; allocations of a previous range stay until released."""
        net = ipaddress.IPv4Network(cidr, strict=True)
        if net.prefixlen > 30:
            raise IPAMError(f"PodCIDR {cidr} is too small (at most /30)")
        with self._lock:
            if self._net == net and self._by_owner.get(ROUTER_OWNER) == str(net.network_address + 1):
                return
            if self._net is not None and self._net != net:
                stale = [a for a in self._alloc.values() if ipaddress.IPv4Address(a.ip) not in net]
                log.warning("PodCIDR changed", extra={"old": str(self._net), "new": str(net),
                                                      "allocations_outside": len(stale)})  # fmt: skip
                old_router = self._by_owner.pop(ROUTER_OWNER, None)
                if old_router:
                    self._alloc.pop(old_router, None)
                self._last = None
            self._net = net
            router = str(net.network_address + 1)
            holder = self._alloc.get(router)
            if holder is not None and holder.owner != ROUTER_OWNER:
                log.error("router address is allocated to a pod", extra={"ip": router, "owner": holder.owner})
            else:
                self._alloc[router] = Allocation(router, ROUTER_OWNER, "", time.time())
                self._by_owner[ROUTER_OWNER] = router
            gen = self._changed()
        self._commit(gen)

    def _usable(self) -> tuple[int, int]:
        assert self._net is not None
        first = int(self._net.network_address) + 1
        last = int(self._net.broadcast_address) - 1
        return first, last

    # ---- allocation ----------------------------------------------------------------------------
    def allocate(self, owner: str, pod: str = "") -> str:
        """The address for `owner` (the same one if it already has one)."""
        with self._lock:
            have = self._by_owner.get(owner)
            if have is not None:
                return have
            if self._net is None:
                raise IPAMNotReadyError("IPAM: no PodCIDR assigned to this node yet")
            first, last = self._usable()
            size = last - first + 1
            start = self._last + 1 if self._last is not None and first <= self._last < last else first
            for i in range(size):
                cand = first + (start - first + i) % size
                ip = str(ipaddress.IPv4Address(cand))
                if ip not in self._alloc:
                    break
            else:
                used = sum(1 for a in self._alloc if ipaddress.IPv4Address(a) in self._net)
                raise IPAMExhaustedError(f"IPAM: range {self._net} is full ({used}/{size} allocated)")
            alloc = Allocation(ip, owner, pod, time.time())
            self._alloc[ip] = alloc
            self._by_owner[owner] = ip
            self._last = cand
            gen = self._changed()
        try:
            self._commit(gen)
        except BaseException:
            with self._lock:  # not on disk: nobody may use it
                if self._by_owner.get(owner) == ip:
                    del self._alloc[ip]
                    del self._by_owner[owner]
                    self._changed()
            raise
        return ip

    def claim(self, ip: str, owner: str, pod: str = "") -> None:
        """Record that `owner` holds `ip` (restore of an endpoint whose allocation was lost)."""
        ipaddress.IPv4Address(ip)
        with self._lock:
            cur = self._alloc.get(ip)
            if cur is not None:
                if cur.owner == owner:
                    return
                raise IPAMConflictError(
                    f"IPAM: {ip} is allocated to {cur.owner}, cannot claim it for {owner}"
                )
            prev = self._by_owner.get(owner)
            if prev is not None and prev != ip:
                raise IPAMConflictError(f"IPAM: {owner} already holds {prev}, cannot claim {ip}")
            self._alloc[ip] = Allocation(ip, owner, pod, time.time())
            self._by_owner[owner] = ip
            gen = self._changed()
        self._commit(gen)

    def release(self, owner: str) -> str | None:
        """Release the owner's address; returns it (None when the owner had none: idempotent)."""
        if owner == ROUTER_OWNER:
            raise IPAMError("the router address cannot be released")
        with self._lock:
            ip = self._by_owner.pop(owner, None)
            if ip is None:
                return None
            alloc = self._alloc.pop(ip)
            gen = self._changed()
        try:
            self._commit(gen)
        except BaseException:
            with self._lock:  # still allocated on disk: keep it allocated
                if ip not in self._alloc and owner not in self._by_owner:
                    self._alloc[ip] = alloc
                    self._by_owner[owner] = ip
                    self._changed()
            raise
        return ip

    def release_ip(self, ip: str) -> str | None:
        """Release an address by value; returns its former owner."""
        with self._lock:
            alloc = self._alloc.get(ip)
            if alloc is None or alloc.owner == ROUTER_OWNER:
                return None
            del self._alloc[ip]
            self._by_owner.pop(alloc.owner, None)
            gen = self._changed()
        self._commit(gen)
        return alloc.owner

    def gc(self, valid_owners: Iterable[str]) -> list[Allocation]:
        """Release every allocation whose owner is not in `valid_owners` (the router stays)."""
        keep = set(valid_owners) | {ROUTER_OWNER}
        with self._lock:
            stale = [a for a in self._alloc.values() if a.owner not in keep]
            if not stale:
                return []
            for a in stale:
                del self._alloc[a.ip]
                self._by_owner.pop(a.owner, None)
            gen = self._changed()
        self._commit(gen)
        for a in stale:
            log.info("IPAM GC released address", extra={"ip": a.ip, "owner": a.owner, "pod": a.pod})
        return stale

    # ---- queries -------------------------------------------------------------------------------
    def lookup(self, owner: str) -> str | None:
        with self._lock:
            return self._by_owner.get(owner)

    def owner_of(self, ip: str) -> str | None:
        with self._lock:
            a = self._alloc.get(ip)
            return a.owner if a else None

    def allocations(self) -> list[Allocation]:
        with self._lock:
            return sorted(self._alloc.values(), key=lambda a: ipaddress.IPv4Address(a.ip))

    def status(self) -> IPAMStatus:
        with self._lock:
            if self._net is None:
                return IPAMStatus(None, 0, 0)
            first, last = self._usable()
            used = sum(1 for a in self._alloc if ipaddress.IPv4Address(a) in self._net)
            return IPAMStatus(str(self._net), used, last - first + 1)

    def is_full(self) -> bool:
        st = self.status()
        return st.cidr is not None and st.free == 0
