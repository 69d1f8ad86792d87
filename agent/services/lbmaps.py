"""Byte-level access to the load-balancer maps: encoders, batched writes, reads, conntrack purge.

Entries are built as bytes with precompiled `struct` formats derived from the ctypes mirrors
(bpf/maps/packing.py; no layout is written down here), and written with the batch syscalls: a full
sync of 10,000 services is a handful of BPF_MAP_UPDATE_BATCH calls, not 70,000 ctypes round trips.
All writes go through `LBMaps.update` and `LBMaps.delete`, so the order the manager writes in can be
observed (and is, by the tests).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps import PinnedMap, ctmap, lbmap, natmap
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.packing import packer

from .translate import BKey, FeKey

BE_STATE_ACTIVE = d("BE_STATE_ACTIVE")
BE_STATE_TERMINATING = d("BE_STATE_TERMINATING")
CT_DIR_OUT = d("CT_DIR_OUT")
CT_DIR_IN = d("CT_DIR_IN")
CT_DIR_SVC = d("CT_DIR_SVC")
LB_SCOPE_EXT = d("LB_SCOPE_EXT")

SERVICES = lbmap.SERVICES.name
BACKENDS = lbmap.BACKENDS.name
REVERSE_NAT = lbmap.REVERSE_NAT.name
AFFINITY = lbmap.AFFINITY.name
AFFINITY_MATCH = lbmap.AFFINITY_MATCH.name
MAGLEV = lbmap.MAGLEV.name
CT_TCP = ctmap.CT4_GLOBAL.name
CT_ANY = ctmap.CT_ANY4_GLOBAL.name
NAT = natmap.SNAT_V4_EXTERNAL.name

# Formats derived from the ctypes mirrors (bpf/maps/packing.py): __u16/__u32 fields in host order,
# addresses and ports as pre-encoded network-order bytes ("4s", "2s"), pad fields take no value.
_LB4_KEY = packer(lbmap.Lb4Key, {"address": "4s", "dport": "2s"}, skip=("pad",))
_LB4_SVC = packer(lbmap.Lb4Service)
_LB4_BE_KEY = packer(lbmap.Lb4BackendKey)
_LB4_BE = packer(lbmap.Lb4Backend, {"address": "4s", "port": "2s", "node_ip": "4s"})
_REVNAT_KEY = packer(lbmap.Lb4ReverseNatKey)
_REVNAT = packer(lbmap.Lb4ReverseNat, {"address": "4s", "port": "2s"}, skip=("pad",))
_AFF_MATCH = packer(lbmap.LbAffinityMatch, skip=("pad",))
_AFF_VAL_BACKEND = packer(lbmap.LbAffinityVal, only=("backend_id",))
_AFF_KEY_REVNAT = packer(lbmap.Lb4AffinityKey, only=("rev_nat_index",))
_U8 = packer(lbmap.U8Value)
AFFINITY_MATCH_VALUE = _U8.pack(1)  # lb_affinity_match values: present

# conntrack/NAT keys (the NAT map shares the conntrack key): saddr, daddr, sport, dport, nexthdr,
# flags with addresses and ports as raw network-order bytes; of the value, backend_id and rev_nat_index
_CT_KEY = packer(ctmap.Ct4Key, {"saddr": "4s", "daddr": "4s", "sport": "2s", "dport": "2s"}, skip=("pad",))
_CT_SVC = packer(ctmap.CtEntry, only=("backend_id", "rev_nat_index"))

_aton_cache: dict[str, bytes] = {}
_port_cache: dict[int, bytes] = {}


def aton(ip: str) -> bytes:
    b = _aton_cache.get(ip)
    if b is None:
        b = socket.inet_aton(ip)
        if len(_aton_cache) < 200_000:
            _aton_cache[ip] = b
    return b


def nport(port: int) -> bytes:
    b = _port_cache.get(port)
    if b is None:
        b = _port_cache[port] = port.to_bytes(2, "big")
    return b


def ntoa(b: bytes) -> str:
    return socket.inet_ntoa(b)


_MAGLEV_KEY = packer(lbmap.Lb4MaglevKey)
_MAGLEV_CHUNK = packer(lbmap.Lb4MaglevChunk)


def maglev_entries(rev_nat: int, ids: Sequence[int]) -> tuple[list[bytes], list[bytes]]:
    """A Maglev table (backend id per slot) as lb4_maglev keys and chunk values."""
    n = lbmap.LB_MAGLEV_CHUNK
    keys, values = [], []
    for c in range(0, len(ids), n):
        chunk = list(ids[c : c + n])
        chunk += [0] * (n - len(chunk))
        keys.append(_MAGLEV_KEY.pack(rev_nat, c // n))
        values.append(_MAGLEV_CHUNK.pack(*chunk))
    return keys, values


def maglev_keys(rev_nat: int, table_size: int) -> list[bytes]:
    n = lbmap.LB_MAGLEV_CHUNK
    return [_MAGLEV_KEY.pack(rev_nat, c) for c in range((table_size + n - 1) // n)]


def maglev_key_rev_nat(key: bytes) -> int:
    return int(_MAGLEV_KEY.unpack(key)[0])


def svc_key(fe: FeKey, slot: int) -> bytes:
    return _LB4_KEY.pack(aton(fe[0]), nport(fe[1]), slot, fe[2], LB_SCOPE_EXT)


def svc_value(backend_id: int, count: int, rev_nat: int, flags: int, flags2: int, local_count: int) -> bytes:
    return _LB4_SVC.pack(backend_id, count, rev_nat, flags, flags2, local_count)


def backend_key(backend_id: int) -> bytes:
    return _LB4_BE_KEY.pack(backend_id)


def backend_value(bk: BKey, state: int, node_ip: str | None) -> bytes:
    return _LB4_BE.pack(aton(bk[0]), nport(bk[1]), bk[2], state, aton(node_ip) if node_ip else b"\0\0\0\0")


def revnat_key(rev_nat: int) -> bytes:
    return _REVNAT_KEY.pack(rev_nat)


def revnat_value(fe: FeKey) -> bytes:
    return _REVNAT.pack(aton(fe[0]), nport(fe[1]))


def affinity_match_key(backend_id: int, rev_nat: int) -> bytes:
    return _AFF_MATCH.pack(backend_id, rev_nat)


def decode_svc_key(k: bytes) -> tuple[FeKey, int, int]:
    """((address, port, proto), slot, scope)."""
    addr, port, slot, proto, scope = _LB4_KEY.unpack(k)
    return (ntoa(addr), int.from_bytes(port, "big"), proto), slot, scope


def decode_svc_value(v: bytes) -> tuple[int, int, int, int, int, int]:
    """(backend_id, count, rev_nat, flags, flags2, local_count)."""
    return _LB4_SVC.unpack(v[: _LB4_SVC.size])  # type: ignore[return-value]


def decode_backend(v: bytes) -> tuple[BKey, int, str]:
    """((address, port, proto), state, node_ip)."""
    addr, port, proto, state, node = _LB4_BE.unpack(v[: _LB4_BE.size])
    return (ntoa(addr), int.from_bytes(port, "big"), proto), state, ntoa(node)


def decode_backend_key(k: bytes) -> int:
    return int(_LB4_BE_KEY.unpack(k)[0])


def decode_revnat_key(k: bytes) -> int:
    return int(_REVNAT_KEY.unpack(k)[0])


def decode_affinity_match_key(k: bytes) -> tuple[int, int]:
    bid, rn = _AFF_MATCH.unpack(k)
    return int(bid), int(rn)


@dataclass(frozen=True)
class PurgeRequest:
    """What to purge from conntrack, NAT and affinity after backends went away.

    dead: backend id -> (address, port, proto) of backends deleted from the backends map: every
    service-scope CT entry pointing to the id, every OUT/IN entry towards address:port, their NAT
    entries and affinity entries go. dead_pairs: (backend id, rev_nat_index, proto) of backends that
    left one frontend but still exist: that frontend's service-scope CT and affinity entries go.
    """

    dead: dict[int, BKey]
    dead_pairs: set[tuple[int, int, int]]

    def __bool__(self) -> bool:
        return bool(self.dead or self.dead_pairs)


class LBMaps:
    """The pinned load-balancer maps (and conntrack/NAT for purges) of one node, as raw fds."""

    NAMES = (SERVICES, BACKENDS, REVERSE_NAT, AFFINITY, AFFINITY_MATCH, MAGLEV, CT_TCP, CT_ANY, NAT)

    def __init__(self, bpf_root: str) -> None:
        from pycilium.bpf.maps import BY_NAME

        self.bpf_root = bpf_root
        self.maps: dict[str, PinnedMap[Any, Any]] = {}
        try:
            for name in self.NAMES:
                self.maps[name] = PinnedMap(BY_NAME[name], bpf_root)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()

    # --- the two write primitives -------------------------------------------------------------

    def update(self, name: str, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        if not keys:
            return
        m = self.maps[name]
        for i in range(0, len(keys), 8192):
            sc.map_update_batch(m.fd, keys[i : i + 8192], values[i : i + 8192])

    def delete(self, name: str, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        m = self.maps[name]
        n = 0
        for i in range(0, len(keys), 8192):
            n += sc.map_delete_batch(m.fd, keys[i : i + 8192])
        return n

    # --- reads --------------------------------------------------------------------------------

    def items(self, name: str) -> Iterator[tuple[bytes, bytes]]:
        m = self.maps[name]
        vs = m.info.value_size
        for k, v in m.raw_items():
            yield k, v[:vs]

    def lookup(self, name: str, key: bytes) -> bytes | None:
        m = self.maps[name]
        raw = sc.map_lookup(m.fd, key, m.info.value_size)
        return raw

    # --- purge --------------------------------------------------------------------------------

    def purge(
        self, req: PurgeRequest, keep_tuples: set[BKey] | frozenset[BKey] = frozenset()
    ) -> dict[str, int]:
        """Delete conntrack, NAT and affinity state of removed backends; returns deletions per map.

        keep_tuples: backends (address, port, proto) in use again under a new id, whose OUT/IN
        conntrack and NAT entries belong to new flows and stay.
        """
        out: dict[str, int] = {}
        if not req:
            return out
        dead_ids = set(req.dead)
        dead_tuples = {
            (aton(bk[0]), nport(bk[1]), bk[2]) for bk in req.dead.values() if bk not in keep_tuples
        }
        pairs = {(bid, rn) for bid, rn, _ in req.dead_pairs}
        protos = {bk[2] for bk in req.dead.values()} | {p for _, _, p in req.dead_pairs}
        ct_maps = []
        if 6 in protos:
            ct_maps.append(CT_TCP)
        if protos - {6}:
            ct_maps.append(CT_ANY)
        ct_key, ct_svc = _CT_KEY.unpack, _CT_SVC.unpack_from
        for name in ct_maps:
            doomed: list[bytes] = []
            for k, v in self.items(name):
                _saddr, daddr, _sport, dport, proto, flags = ct_key(k)
                if flags & CT_DIR_SVC:
                    bid, rn = ct_svc(v)
                    if bid in dead_ids or (pairs and (bid, rn) in pairs):
                        doomed.append(k)
                elif flags in (CT_DIR_OUT, CT_DIR_IN) and (daddr, dport, proto) in dead_tuples:
                    doomed.append(k)
            out[name] = self.delete(name, doomed)
        if dead_tuples:
            doomed = []
            for k, _v in self.items(NAT):
                saddr, daddr, sport, dport, proto, _flags = ct_key(k)
                if (daddr, dport, proto) in dead_tuples or (saddr, sport, proto) in dead_tuples:
                    doomed.append(k)
            out[NAT] = self.delete(NAT, doomed)
        doomed = []
        for k, v in self.items(AFFINITY):
            bid = _AFF_VAL_BACKEND.unpack_from(v)[0]
            if bid in dead_ids or (pairs and (bid, _AFF_KEY_REVNAT.unpack(k)[0]) in pairs):
                doomed.append(k)
        out[AFFINITY] = self.delete(AFFINITY, doomed)
        return out
