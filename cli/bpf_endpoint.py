"""`pycilium bpf endpoint list`: the local endpoints map (pod IP -> veth, endpoint id, identity, MACs).

IP ADDRESS    LOCAL ENDPOINT INFO
10.0.1.5:0    id=339   sec_id=12345 flags=0x0006 ifindex=29  mac=0a:58:0a:00:01:05 nodemac=... [ PolicyIngress PolicyEgress ]
"""

from __future__ import annotations

import argparse
from typing import Any

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.endpointmap import EndpointInfo
from pycilium.bpf.maps.util import be32_to_ip, ip_to_be32, mac_str
from pycilium.cli.maps import bpf_error, open_map
from pycilium.cli.output import print_json, print_table

ENDPOINTS_MAP = "endpoints"
FLAG_NAMES = (
    (d("EP_F_HOST"), "Host"),
    (d("EP_F_POLICY_INGRESS"), "PolicyIngress"),
    (d("EP_F_POLICY_EGRESS"), "PolicyEgress"),
    (d("EP_F_NO_MAC_CHECK"), "NoMacCheck"),
)


def flag_names(flags: int) -> list[str]:
    names = [n for bit, n in FLAG_NAMES if flags & bit]
    known = 0
    for bit, _ in FLAG_NAMES:
        known |= bit
    if flags & ~known:
        names.append(f"Unknown={flags & ~known:#x}")
    return names


def _info(ip: str, v: EndpointInfo) -> dict[str, Any]:
    return {
        "ip": ip,
        "id": v.lxc_id,
        "identity": v.sec_id,
        "ifindex": v.ifindex,
        "flags": v.flags,
        "flag_names": flag_names(v.flags),
        "mac": mac_str(bytes(v.mac)),
        "node_mac": mac_str(bytes(v.node_mac)),
    }


def format_info(v: EndpointInfo) -> str:
    names = flag_names(v.flags)
    text = (
        f"id={v.lxc_id:<5} sec_id={v.sec_id:<5} flags={v.flags:#06x} ifindex={v.ifindex:<3} "
        f"mac={mac_str(bytes(v.mac))} nodemac={mac_str(bytes(v.node_mac))}"
    )
    return text + (f" [ {' '.join(names)} ]" if names else "")


def cmd_list(args: argparse.Namespace) -> int:
    with open_map(ENDPOINTS_MAP, args.bpf_root) as m:
        try:
            items = [(be32_to_ip(k.ip), v) for k, v in m.items()]
        except sc.BPFError as e:
            raise bpf_error(e, f"reading {ENDPOINTS_MAP}") from None
    items.sort(key=lambda kv: ip_to_be32(kv[0]).to_bytes(4, "little"))
    if args.output == "json":
        print_json([_info(ip, v) for ip, v in items])
        return 0
    if not items:
        print("No entries found.")
        return 0
    print_table([["IP ADDRESS", "LOCAL ENDPOINT INFO"], *([f"{ip}:0", format_info(v)] for ip, v in items)])
    return 0
