"""`pycilium bpf nat list|flush`: the SNAT table snat_v4_external.

Cilium's line format, keys as stored (packet order of the packet the entry translates)::

    TCP OUT 10.0.1.5:43210 -> 192.0.2.9:443 XLATE_SRC 172.18.0.2:43210 Created=120sec ago NeedsCT=1
    TCP IN 192.0.2.9:443 -> 172.18.0.2:43210 XLATE_DST 10.0.1.5:43210 Created=120sec ago NeedsCT=1

OUT entries rewrite the source (masquerade), IN entries restore the destination of replies.
`Created` is CLOCK_MONOTONIC seconds; the line shows how long ago.
"""

from __future__ import annotations

import argparse
import socket
import time
from collections.abc import Iterator
from typing import Any

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.natmap import Nat4Entry
from pycilium.bpf.maps.packing import packer
from pycilium.cli.bpf_ct import KEY
from pycilium.cli.maps import bpf_error, open_map
from pycilium.cli.output import note, print_json, proto_name, write_lines

NAT_MAP = "snat_v4_external"
# created u64 (host order), to_addr (network order, raw), to_port (network order), needs_ct u8, pad
VALUE = packer(Nat4Entry, {"to_addr": "4s", "to_port": "2s"}, skip=("pad",))

_OUT, _IN = d("CT_DIR_OUT"), d("CT_DIR_IN")


def _decode(kraw: bytes, vraw: bytes, now: int) -> dict[str, Any]:
    saddr, daddr, sport, dport, nexthdr, kflags = KEY.unpack(kraw)
    created, to_addr, to_port_raw, needs_ct = VALUE.unpack(vraw[: VALUE.size])
    direction = "OUT" if kflags == _OUT else "IN" if kflags == _IN else f"DIR={kflags:#x}"
    return {
        "proto": proto_name(nexthdr),
        "nexthdr": nexthdr,
        "direction": direction,
        "src": socket.inet_ntoa(saddr),
        "sport": sport,
        "dst": socket.inet_ntoa(daddr),
        "dport": dport,
        "xlate": "XLATE_SRC" if kflags == _OUT else "XLATE_DST",
        "to_addr": socket.inet_ntoa(to_addr),
        "to_port": int.from_bytes(to_port_raw, "big"),
        "created": created,
        "age": max(0, now - created),
        "needs_ct": needs_ct,
    }


def _entries(bpf_root: str) -> Iterator[tuple[bytes, bytes]]:
    with open_map(NAT_MAP, bpf_root) as m:
        try:
            yield from sc.map_items(m.fd, m.info)
        except sc.BPFError as e:
            raise bpf_error(e, f"reading {NAT_MAP}") from None


def format_entry(e: dict[str, Any]) -> str:
    return (
        f"{e['proto']} {e['direction']} {e['src']}:{e['sport']} -> {e['dst']}:{e['dport']} "
        f"{e['xlate']} {e['to_addr']}:{e['to_port']} Created={e['age']}sec ago NeedsCT={e['needs_ct']}"
    )


def cmd_list(args: argparse.Namespace) -> int:
    now = int(time.monotonic())
    entries = (_decode(k, v, now) for k, v in _entries(args.bpf_root))
    if args.output == "json":
        print_json(list(entries))
        return 0
    count = 0

    def lines() -> Iterator[str]:
        nonlocal count
        for e in entries:
            count += 1
            yield format_entry(e)

    write_lines(lines())
    if count == 0:
        note("No entries found.")
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    with open_map(NAT_MAP, args.bpf_root) as m:
        try:
            n = m.clear()
        except sc.BPFError as e:
            raise bpf_error(e, f"flushing {NAT_MAP}") from None
        print(f"Flushed {n} entries from {m.path}")
    return 0
