"""Shared fixture data for the lxc program tests: a compiled bpf_lxc with a private bpf root."""

from __future__ import annotations

from pycilium.bpf.maps import ALL_MAPS, PinnedMap
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

CLIENT = {"ip": "10.200.1.10", "ifindex": 10, "lxc_id": 10, "mac": "02:00:00:00:01:0a",
          "node_mac": "02:00:00:00:ff:0a", "sec_id": 1000}  # fmt: skip
LOCAL = {"ip": "10.200.1.20", "ifindex": 20, "lxc_id": 20, "mac": "02:00:00:00:01:14",
         "node_mac": "02:00:00:00:ff:14", "sec_id": 2000}  # fmt: skip
VIP, VPORT = "10.96.0.10", 80
REMOTE_BACKENDS = [("10.200.2.11", 8080), ("10.200.2.12", 8080), ("10.200.2.13", 8080)]


def clear_maps(root: str) -> None:
    for spec in ALL_MAPS:
        if spec.name == "events":
            continue
        with PinnedMap(spec, root) as m:
            m.clear()


def tcp(src: str, dst: str, sport: int, dport: int, flags: str = "S", smac: str = CLIENT["mac"],
        dmac: str = CLIENT["node_mac"], payload: bytes = b"") -> bytes:  # fmt: skip
    return bytes(Ether(src=smac, dst=dmac) / IP(src=src, dst=dst, ttl=64) / TCP(sport=sport, dport=dport, flags=flags)
                 / payload)  # fmt: skip


def udp(src: str, dst: str, sport: int, dport: int, smac: str = CLIENT["mac"], dmac: str = CLIENT["node_mac"],
        payload: bytes = b"hello") -> bytes:  # fmt: skip
    return bytes(Ether(src=smac, dst=dmac) / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload)


def icmp_echo(src: str, dst: str, ident: int, reply: bool = False, smac: str = CLIENT["mac"],
              dmac: str = CLIENT["node_mac"]) -> bytes:  # fmt: skip
    return bytes(
        Ether(src=smac, dst=dmac) / IP(src=src, dst=dst) / ICMP(type=0 if reply else 8, id=ident, seq=1)
    )


def checksums_valid(raw: bytes) -> bool:
    """Recompute IPv4 and L4 checksums with scapy and compare with what the program wrote."""
    pkt = Ether(raw)
    fresh = Ether(raw)
    del fresh[IP].chksum
    for layer in (TCP, UDP, ICMP):
        if layer in fresh:
            if layer is UDP and pkt[UDP].chksum == 0:
                continue
            del fresh[layer].chksum
    rebuilt = Ether(bytes(fresh))
    if rebuilt[IP].chksum != pkt[IP].chksum:
        return False
    for layer in (TCP, UDP, ICMP):
        if layer in pkt and rebuilt[layer].chksum != pkt[layer].chksum:
            return False
    return True
