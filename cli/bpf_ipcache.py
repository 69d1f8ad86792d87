"""`pycilium bpf ipcache list|get`: the IP prefix -> identity / tunnel endpoint LPM trie.

    IP PREFIX/ADDRESS   IDENTITY
    10.0.1.23/32        identity=12345 tunnelendpoint=192.168.1.11 flags=<remote-node>

`get IP` answers with the kernel's own longest-prefix lookup and names the prefix that matched.
"""

from __future__ import annotations

import argparse
import ipaddress
from typing import Any

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.ipcache import IpcacheKey, RemoteEndpointInfo
from pycilium.bpf.maps.util import be32_to_ip, ip_to_be32
from pycilium.cli.maps import bpf_error, open_map
from pycilium.cli.output import print_json, print_table

IPCACHE_MAP = "ipcache"
_STATIC = d("IPCACHE_STATIC_PREFIX")
FLAG_NAMES = ((d("IPCACHE_F_REMOTE_NODE"), "remote-node"),)


def flag_names(flags: int) -> list[str]:
    names = [n for bit, n in FLAG_NAMES if flags & bit]
    known = 0
    for bit, _ in FLAG_NAMES:
        known |= bit
    if flags & ~known:
        names.append(f"unknown={flags & ~known:#x}")
    return names


def _prefix(k: IpcacheKey) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network((be32_to_ip(k.addr), k.prefixlen - _STATIC), strict=False)


def _info(v: RemoteEndpointInfo) -> dict[str, Any]:
    return {
        "identity": v.sec_identity,
        "tunnel_endpoint": be32_to_ip(v.tunnel_endpoint),
        "node_id": v.node_id,
        "flags": v.flags,
        "flag_names": flag_names(v.flags),
    }


def format_info(v: RemoteEndpointInfo) -> str:
    return (
        f"identity={v.sec_identity} tunnelendpoint={be32_to_ip(v.tunnel_endpoint)} "
        f"flags=<{','.join(flag_names(v.flags))}>"
    )


def _entries(bpf_root: str) -> list[tuple[ipaddress.IPv4Network, RemoteEndpointInfo]]:
    with open_map(IPCACHE_MAP, bpf_root) as m:
        try:
            items = [(_prefix(k), v) for k, v in m.items()]
        except sc.BPFError as e:
            raise bpf_error(e, f"reading {IPCACHE_MAP}") from None
    items.sort(key=lambda kv: (int(kv[0].network_address), kv[0].prefixlen))
    return items


def cmd_list(args: argparse.Namespace) -> int:
    entries = _entries(args.bpf_root)
    if args.output == "json":
        print_json([{"prefix": str(net), **_info(v)} for net, v in entries])
        return 0
    if not entries:
        print("No entries found.")
        return 0
    print_table([["IP PREFIX/ADDRESS", "IDENTITY"], *([str(net), format_info(v)] for net, v in entries)])
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    ip = ipaddress.IPv4Address(args.ip)
    with open_map(IPCACHE_MAP, args.bpf_root) as m:
        try:
            value = m.lookup(IpcacheKey(_STATIC + 32, ip_to_be32(str(ip))))
            matched = None
            if value is not None:  # name the prefix the kernel matched: the longest containing one
                for k, v in m.items():
                    net = _prefix(k)
                    if (
                        ip in net
                        and (matched is None or net.prefixlen > matched.prefixlen)
                        and bytes(v) == bytes(value)
                    ):
                        matched = net
        except sc.BPFError as e:
            raise bpf_error(e, f"looking up {ip} in {IPCACHE_MAP}") from None
    if value is None:
        if args.output == "json":
            print_json({"ip": str(ip), "found": False})
        else:
            print(f"{ip} does not map to any identity")
        return 1
    if args.output == "json":
        print_json(
            {"ip": str(ip), "found": True, "prefix": str(matched) if matched else None, **_info(value)}
        )
        return 0
    print(f"{ip} maps to {matched if matched else '?'}: {format_info(value)}")
    return 0
