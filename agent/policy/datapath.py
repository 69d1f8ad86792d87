"""Writing policy to the datapath: the pinned policy map and the policy fields of the endpoints map.

`PolicyDatapath` is what the engine needs; `PinnedPolicyDatapath` implements it on the pinned
maps, `MemoryPolicyDatapath` in memory (tests; it records the order of operations).

The policy map belongs to the policy engine alone. In the endpoints map (written by the endpoint
manager) the engine owns ``sec_id`` and the EP_F_POLICY_INGRESS / EP_F_POLICY_EGRESS bits of
``flags``, and changes them by read-modify-write.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pycilium.agent.policy.compiler import (
    POLICY_FULL_PREFIX,
    POLICY_STATIC_PREFIX,
    PROTO_BITS,
    PolicyMapKey,
)
from pycilium.bpf import syscall as sc
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.endpointmap import ENDPOINTS, EndpointKey
from pycilium.bpf.maps.pinned import PinnedMap
from pycilium.bpf.maps.policymap import POLICY, PolicyEntry, PolicyKey
from pycilium.bpf.maps.util import be16_to_port, ip_to_be32, port_to_be16

log = logging.getLogger("pycilium.agent.policy")

EP_F_POLICY_INGRESS = d("EP_F_POLICY_INGRESS")
EP_F_POLICY_EGRESS = d("EP_F_POLICY_EGRESS")
POLICY_FLAGS_MASK = EP_F_POLICY_INGRESS | EP_F_POLICY_EGRESS
POLICY_F_DENY = d("POLICY_F_DENY")


def enforcement_flags(ingress: bool, egress: bool) -> int:
    return (EP_F_POLICY_INGRESS if ingress else 0) | (EP_F_POLICY_EGRESS if egress else 0)


class PolicyDatapath(Protocol):
    """The policy map (owned by the policy engine alone)."""

    def dump(self) -> dict[int, set[PolicyMapKey]]:
        """Every entry of the policy map by endpoint id (read once at start)."""
        ...

    def write(self, ep_id: int, keys: Iterable[PolicyMapKey]) -> None: ...

    def remove(self, ep_id: int, keys: Iterable[PolicyMapKey]) -> None: ...


@runtime_checkable
class EndpointWriter(Protocol):
    """The policy fields (sec_id, EP_F_POLICY_* bits) of the endpoints map entry of an endpoint."""

    def read_endpoint(self, ep_id: int, ip: str) -> tuple[int, int] | None:
        """(sec_id, flags) of the endpoint's entry, None if there is none."""
        ...

    def write_endpoint(self, ep_id: int, ip: str, sec_id: int | None, flags: int, mask: int) -> bool:
        """Set sec_id (unless None) and the `mask` bits of flags to `flags`, keeping everything else;
        False when the endpoint has no entry (yet)."""
        ...


def to_bpf_key(ep_id: int, k: PolicyMapKey) -> PolicyKey:
    return PolicyKey(
        prefixlen=k.prefixlen,
        sec_label=k.identity,
        ep_id=ep_id,
        egress=1 if k.egress else 0,
        protocol=k.protocol,
        dport=port_to_be16(k.port if k.protocol else 0),
    )


def from_bpf_key(key: PolicyKey) -> tuple[int, PolicyMapKey] | None:
    plen = key.prefixlen
    if plen == POLICY_STATIC_PREFIX:
        return key.ep_id, PolicyMapKey(bool(key.egress), key.sec_label)
    if POLICY_STATIC_PREFIX + PROTO_BITS <= plen <= POLICY_FULL_PREFIX and key.protocol:
        pp = plen - POLICY_STATIC_PREFIX - PROTO_BITS
        port = be16_to_port(key.dport)
        mask = ((1 << pp) - 1) << (16 - pp) if pp else 0
        return key.ep_id, PolicyMapKey(bool(key.egress), key.sec_label, key.protocol, port & mask, pp)
    return None


class PinnedPolicyDatapath:
    """The pinned `policy` and `endpoints` maps under a node's bpf root."""

    def __init__(self, bpf_root: str | os.PathLike[str]):
        self.policy = PinnedMap(POLICY, bpf_root)
        self.endpoints = PinnedMap(ENDPOINTS, bpf_root)

    def close(self) -> None:
        self.policy.close()
        self.endpoints.close()

    def dump(self) -> dict[int, set[PolicyMapKey]]:
        out: dict[int, set[PolicyMapKey]] = {}
        odd: list[PolicyKey] = []
        for key in list(self.policy.keys()):
            got = from_bpf_key(key)
            if got is None:
                odd.append(key)
                continue
            out.setdefault(got[0], set()).add(got[1])
        if odd:  # not a layout this engine writes: remove
            log.warning("removing %d policy map entries with unexpected prefixes", len(odd))
            self.policy.delete_batch(odd)
        return out

    def write(self, ep_id: int, keys: Iterable[PolicyMapKey]) -> None:
        self.policy.update_batch((to_bpf_key(ep_id, k), PolicyEntry()) for k in keys)

    def remove(self, ep_id: int, keys: Iterable[PolicyMapKey]) -> None:
        self.policy.delete_batch(to_bpf_key(ep_id, k) for k in keys)

    def read_endpoint(self, ep_id: int, ip: str) -> tuple[int, int] | None:
        v = self.endpoints.lookup(EndpointKey(ip=ip_to_be32(ip)))
        return None if v is None or v.lxc_id != ep_id else (v.sec_id, v.flags)

    def write_endpoint(self, ep_id: int, ip: str, sec_id: int | None, flags: int, mask: int) -> bool:
        key = EndpointKey(ip=ip_to_be32(ip))
        v = self.endpoints.lookup(key)
        if v is None or v.lxc_id != ep_id:
            return False
        new_flags = (v.flags & ~mask) | (flags & mask)
        if v.flags == new_flags and (sec_id is None or v.sec_id == sec_id):
            return True
        v.flags = new_flags
        if sec_id is not None:
            v.sec_id = sec_id
        try:
            self.endpoints.update(key, v, sc.BPF_EXIST)
        except sc.BPFError as e:
            if e.errno == 2:  # removed meanwhile
                return False
            raise
        return True


class MemoryPolicyDatapath:
    """In-memory maps; `ops` records ("write"|"remove"|"endpoint", ep_id or ip, detail) in order."""

    def __init__(self) -> None:
        self.entries: dict[int, set[PolicyMapKey]] = {}
        self.endpoint_entries: dict[str, tuple[int, int]] = {}  # ip -> (sec_id, flags)
        self.ops: list[tuple[str, object, object]] = []

    def add_endpoint(self, ip: str, sec_id: int = 0, flags: int = 0) -> None:
        """What the endpoint manager does when it creates the entry."""
        self.endpoint_entries[ip] = (sec_id, flags)

    def dump(self) -> dict[int, set[PolicyMapKey]]:
        return {k: set(v) for k, v in self.entries.items()}

    def write(self, ep_id: int, keys: Iterable[PolicyMapKey]) -> None:
        ks = set(keys)
        self.entries.setdefault(ep_id, set()).update(ks)
        self.ops.append(("write", ep_id, frozenset(ks)))

    def remove(self, ep_id: int, keys: Iterable[PolicyMapKey]) -> None:
        ks = set(keys)
        cur = self.entries.get(ep_id, set())
        cur -= ks
        if not cur:
            self.entries.pop(ep_id, None)
        self.ops.append(("remove", ep_id, frozenset(ks)))

    def read_endpoint(self, ep_id: int, ip: str) -> tuple[int, int] | None:
        return self.endpoint_entries.get(ip)

    def write_endpoint(self, ep_id: int, ip: str, sec_id: int | None, flags: int, mask: int) -> bool:
        cur = self.endpoint_entries.get(ip)
        if cur is None:
            return False
        new = (cur[0] if sec_id is None else sec_id, (cur[1] & ~mask) | (flags & mask))
        self.endpoint_entries[ip] = new
        self.ops.append(("endpoint", ip, new))
        return True


class EndpointManagerWriter:
    """EndpointWriter through the endpoint manager (agent/endpoint), which owns the endpoints map
    entries and rewrites them from its own records: changes must go through its `update()`."""

    def __init__(self, manager: Any):
        self.manager = manager

    def read_endpoint(self, ep_id: int, ip: str) -> tuple[int, int] | None:
        ep = self.manager.get(ep_id)
        if ep is None or getattr(ep, "ipv4", ip) != ip:
            return None
        return int(ep.identity), int(ep.flags)

    def write_endpoint(self, ep_id: int, ip: str, sec_id: int | None, flags: int, mask: int) -> bool:
        ep = self.manager.get(ep_id)
        if ep is None or getattr(ep, "ipv4", ip) != ip:
            return False
        new_flags = (int(ep.flags) & ~mask) | (flags & mask)
        try:
            self.manager.update(ep_id, identity=sec_id, flags=new_flags)
        except KeyError:
            return False
        return True


@dataclass(frozen=True)
class PolicyMapRow:
    """One policy map entry, decoded for `pycilium bpf policy get`."""

    ep_id: int
    direction: str  # ingress / egress
    identity: int
    protocol: int
    port_first: int | None  # None: any port
    port_last: int | None
    prefixlen: int
    deny: bool
    packets: int
    bytes: int

    @property
    def port(self) -> str:
        if self.protocol == 0:
            return "ANY"
        proto = {6: "TCP", 17: "UDP", 1: "ICMP"}.get(self.protocol, str(self.protocol))
        if self.port_first is None:
            return f"ANY/{proto}"
        if self.port_first == self.port_last:
            return f"{self.port_first}/{proto}"
        return f"{self.port_first}-{self.port_last}/{proto}"


def dump_policy_map(bpf_root: str | os.PathLike[str], ep_id: int | None = None) -> list[PolicyMapRow]:
    """Read the pinned policy map without the agent (the CLI): rows sorted by endpoint, direction,
    identity, port. Identity labels come from the agent or the API server (IdentityAllocator.lookup)."""
    rows: list[PolicyMapRow] = []
    with PinnedMap(POLICY, bpf_root) as m:
        for key, val in m.items():
            if ep_id is not None and key.ep_id != ep_id:
                continue
            got = from_bpf_key(key)
            first: int | None = None
            last: int | None = None
            if got is not None:
                r = got[1].port_range()
                if r is not None:
                    first, last = r
            rows.append(
                PolicyMapRow(
                    ep_id=key.ep_id,
                    direction="egress" if key.egress else "ingress",
                    identity=key.sec_label,
                    protocol=key.protocol,
                    port_first=first,
                    port_last=last,
                    prefixlen=key.prefixlen,
                    deny=bool(val.flags & POLICY_F_DENY),
                    packets=val.packets,
                    bytes=val.bytes,
                )
            )
    rows.sort(key=lambda r: (r.ep_id, r.direction, r.identity, r.protocol, r.port_first or 0))
    return rows


def valid_ipv4(ip: str) -> bool:
    try:
        ipaddress.IPv4Address(ip)
        return True
    except ValueError:
        return False
