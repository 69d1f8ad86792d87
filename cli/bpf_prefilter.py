"""`pycilium bpf prefilter list|update|delete`: source CIDRs the XDP prefilter drops.

Changes take effect immediately on every device the XDP program is attached to.
"""

from __future__ import annotations

import argparse
import ipaddress

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.ipcache import IpcacheKey
from pycilium.bpf.maps.prefilter import PrefilterValue
from pycilium.bpf.maps.util import be32_to_ip, ip_to_be32
from pycilium.cli.maps import bpf_error, open_map
from pycilium.cli.output import print_json, print_table

PREFILTER_MAP = "prefilter_v4"
_STATIC = d("IPCACHE_STATIC_PREFIX")


def _key(cidr: str) -> IpcacheKey:
    net = ipaddress.IPv4Network(cidr, strict=False)
    return IpcacheKey(_STATIC + net.prefixlen, ip_to_be32(str(net.network_address)))


def _cidrs(bpf_root: str) -> list[ipaddress.IPv4Network]:
    with open_map(PREFILTER_MAP, bpf_root) as m:
        try:
            keys = list(m.keys())
        except sc.BPFError as e:
            raise bpf_error(e, f"reading {PREFILTER_MAP}") from None
    nets = [ipaddress.IPv4Network((be32_to_ip(k.addr), k.prefixlen - _STATIC), strict=False) for k in keys]
    return sorted(nets, key=lambda n: (int(n.network_address), n.prefixlen))


def cmd_list(args: argparse.Namespace) -> int:
    nets = _cidrs(args.bpf_root)
    if args.output == "json":
        print_json([str(n) for n in nets])
        return 0
    if not nets:
        print("No entries found.")
        return 0
    print_table([["CIDR"], *([str(n)] for n in nets)])
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    with open_map(PREFILTER_MAP, args.bpf_root) as m:
        for cidr in args.cidrs:
            try:
                m.update(_key(cidr), PrefilterValue(0))
            except sc.BPFError as e:
                raise bpf_error(e, f"adding {cidr} to {PREFILTER_MAP}") from None
            print(f"Added {cidr}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    missing = 0
    with open_map(PREFILTER_MAP, args.bpf_root) as m:
        for cidr in args.cidrs:
            try:
                deleted = m.delete(_key(cidr))
            except sc.BPFError as e:
                raise bpf_error(e, f"deleting {cidr} from {PREFILTER_MAP}") from None
            if deleted:
                print(f"Deleted {cidr}")
            else:
                missing += 1
                print(f"{cidr} is not in the prefilter")
    return 1 if missing else 0
