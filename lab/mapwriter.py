"""Writes datapath map entries directly (no agent), through the ctypes mirrors: for the one-node lab
and the datapath tests, which drive the programs without a control plane."""

from __future__ import annotations

from dataclasses import dataclass

from pycilium.bpf.maps import BY_NAME, PinnedMap
from pycilium.bpf.maps.ctmap import Ct4Key, CtEntry
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.endpointmap import EndpointInfo, EndpointKey
from pycilium.bpf.maps.ipcache import IpcacheKey, RemoteEndpointInfo
from pycilium.bpf.maps.lbmap import (
    Lb4Backend,
    Lb4BackendKey,
    Lb4Key,
    Lb4ReverseNat,
    Lb4ReverseNatKey,
    Lb4Service,
    LbAffinityMatch,
    U8Value,
)
from pycilium.bpf.maps.policymap import PolicyEntry, PolicyKey
from pycilium.bpf.maps.util import ip_to_be32, mac_bytes, port_to_be16

PROTO = {"tcp": 6, "udp": 17, "icmp": 1, "any": 0}


@dataclass
class Maps:
    root: str

    def m(self, name: str) -> PinnedMap:  # type: ignore[type-arg]
        return PinnedMap(BY_NAME[name], self.root)

    def endpoint(self, ip: str, ifindex: int, lxc_id: int, mac: str, node_mac: str, sec_id: int,
                 flags: int = 0) -> None:  # fmt: skip
        info = EndpointInfo(ifindex=ifindex, lxc_id=lxc_id, flags=flags, sec_id=sec_id)
        info.mac[:] = list(mac_bytes(mac))
        info.node_mac[:] = list(mac_bytes(node_mac))
        with self.m("endpoints") as m:
            m.update(EndpointKey(ip_to_be32(ip)), info)

    def ipcache(self, cidr: str, identity: int, tunnel: str = "0.0.0.0") -> None:
        ip, _, plen = cidr.partition("/")
        with self.m("ipcache") as m:
            m.update(
                IpcacheKey(int(plen or 32), ip_to_be32(ip)), RemoteEndpointInfo(identity, ip_to_be32(tunnel))
            )

    def service(self, vip: str, port: int, proto: str, backends: list[tuple[str, int]], rev_nat: int,
                flags: int = 0, flags2: int = 0, affinity_timeout: int = 0, first_backend_id: int | None = None,
                local_count: int = 0, terminating: frozenset[int] = frozenset()) -> list[int]:  # fmt: skip
        """Write a service the way the agent does; returns backend ids."""
        pn = PROTO[proto]
        base = first_backend_id if first_backend_id is not None else rev_nat * 100
        ids = [base + i + 1 for i in range(len(backends))]
        active = [bid for i, bid in enumerate(ids) if i not in terminating]
        with self.m("lb4_backends") as be:
            for bid, (ip, bport) in zip(ids, backends, strict=True):
                state = d("BE_STATE_TERMINATING") if (bid - base - 1) in terminating else 0
                be.update(Lb4BackendKey(bid), Lb4Backend(ip_to_be32(ip), port_to_be16(bport), pn, state))
        with self.m("lb4_services") as sv:
            for slot, bid in enumerate(active, start=1):
                sv.update(Lb4Key(ip_to_be32(vip), port_to_be16(port), slot, pn), Lb4Service(backend_id=bid))
            with self.m("lb4_reverse_nat") as rn:
                rn.update(Lb4ReverseNatKey(rev_nat), Lb4ReverseNat(ip_to_be32(vip), port_to_be16(port)))
            with self.m("lb_affinity_match") as am:
                for bid in active:
                    am.update(LbAffinityMatch(bid, rev_nat), U8Value(1))
            sv.update(Lb4Key(ip_to_be32(vip), port_to_be16(port), 0, pn),
                      Lb4Service(backend_id=affinity_timeout, count=len(active), rev_nat_index=rev_nat,
                                 flags=flags, flags2=flags2, local_count=local_count))  # fmt: skip
        return ids

    def drop_slots(self, vip: str, port: int, proto: str, count: int) -> None:
        """Rewrite a service's frontend with `count` active slots (first ones kept)."""
        pn = PROTO[proto]
        with self.m("lb4_services") as sv:
            k = Lb4Key(ip_to_be32(vip), port_to_be16(port), 0, pn)
            cur = sv.lookup(k)
            assert cur is not None
            cur.count = count
            sv.update(k, cur)

    def policy(self, ep_id: int, identity: int, egress: bool, proto: str = "any", port: int = 0,
               deny: bool = False, prefixlen: int | None = None) -> None:  # fmt: skip
        if prefixlen is None:
            prefixlen = d("POLICY_STATIC_PREFIX") + (0 if proto == "any" else 8 + (16 if port else 0))
        k = PolicyKey(prefixlen=prefixlen, sec_label=identity, ep_id=ep_id, egress=int(egress),
                      protocol=PROTO[proto], dport=port_to_be16(port))  # fmt: skip
        with self.m("policy") as m:
            m.update(k, PolicyEntry(flags=d("POLICY_F_DENY") if deny else 0))

    def ct_entries(self, name: str = "ct4_global") -> list[tuple[Ct4Key, CtEntry]]:
        with self.m(name) as m:
            return list(m.items())

    def metric(self, reason: int, direction: int) -> int:
        with self.m("metrics") as m:
            return sum(
                v.count for k, vs in m.items_percpu() if k.reason == reason and k.dir == direction for v in vs
            )
