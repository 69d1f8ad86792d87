"""Small conversions shared by the map mirrors (addresses and ports are network order in maps)."""

from __future__ import annotations

import ipaddress
import socket
import struct

PROTO_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP", 0: "ANY"}
PROTO_NUMBERS = {"ICMP": 1, "TCP": 6, "UDP": 17, "ANY": 0}


def ip_to_be32(ip: str) -> int:
    """An IPv4 string as the integer whose in-memory (little-endian) bytes are network order."""
    return int(struct.unpack("<I", socket.inet_aton(ip))[0])


def be32_to_ip(v: int) -> str:
    return socket.inet_ntoa(struct.pack("<I", v & 0xFFFFFFFF))


def port_to_be16(port: int) -> int:
    return socket.htons(port)


def be16_to_port(v: int) -> int:
    return socket.ntohs(v)


def mac_bytes(mac: str) -> bytes:
    return bytes(int(p, 16) for p in mac.split(":"))


def mac_str(raw: bytes | bytearray) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def network(cidr: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(cidr, strict=False)
