"""`pycilium bpf policy get EPID|--all [-n]`: an endpoint's entries in the policy LPM trie.

    POLICY   DIRECTION   LABELS (source:key[=value])   PORT/PROTO   PROXY PORT   AUTH TYPE   BYTES   PACKETS   PREFIX
    Allow    Ingress     reserved:host                 ANY          NONE         disabled    1234    12        0
    Deny     Egress      k8s:app=db                    5432/TCP     NONE         disabled    0       0         24

PREFIX is the number of protocol+port bits the entry matches (0 any, 8 protocol, 24 protocol and
port; in between: a port range written as a port prefix, shown as ``0x1f90/12/TCP``). Deny rows
come first, then ingress before egress, then by identity. `-n` prints identities instead of labels.
Labels of non-reserved identities come from the agent; when it cannot be reached the identity
number is printed and a note goes to stderr.
"""

from __future__ import annotations

import argparse
from typing import Any

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.policymap import PolicyEntry, PolicyKey
from pycilium.bpf.maps.util import be16_to_port
from pycilium.cli.identities import resolve_labels
from pycilium.cli.maps import bpf_error, open_map
from pycilium.cli.output import note, print_json, print_table, proto_name

POLICY_MAP = "policy"
STATIC = d("POLICY_STATIC_PREFIX")
AUTH_TYPES = {0: "disabled", 1: "spire", 2: "test-always-fail"}
HEADER = ["POLICY", "DIRECTION", "LABELS (source:key[=value])", "PORT/PROTO", "PROXY PORT", "AUTH TYPE",
          "BYTES", "PACKETS", "PREFIX"]  # fmt: skip
HEADER_NUMERIC = [*HEADER[:2], "IDENTITY", *HEADER[3:]]


def port_proto(k: PolicyKey) -> str:
    prefix = k.prefixlen - STATIC
    proto = proto_name(k.protocol)
    if prefix <= 0:
        return "ANY"
    if prefix <= 8:
        return proto
    port = be16_to_port(k.dport)
    if prefix >= 24:
        return f"{port}/{proto}"
    return f"{port:#x}/{prefix - 8}/{proto}"


def _entry(k: PolicyKey, v: PolicyEntry) -> dict[str, Any]:
    prefix = max(0, k.prefixlen - STATIC)
    return {
        "endpoint": k.ep_id,
        "policy": "Deny" if v.flags & d("POLICY_F_DENY") else "Allow",
        "direction": "Egress" if k.egress == d("POLICY_EGRESS") else "Ingress",
        "identity": k.sec_label,
        "port_proto": port_proto(k),
        "proto": proto_name(k.protocol) if prefix >= 8 else "ANY",
        "port": be16_to_port(k.dport) if prefix > 8 else 0,
        "prefix": prefix,
        "proxy_port": be16_to_port(v.proxy_port),
        "auth_type": AUTH_TYPES.get(v.auth_type, str(v.auth_type)),
        "bytes": v.bytes,
        "packets": v.packets,
    }


def _sort_key(e: dict[str, Any]) -> tuple[int, int, int, int, str]:
    return (e["policy"] != "Deny", e["direction"] != "Ingress", e["identity"], e["prefix"], e["port_proto"])


def _rows(entries: list[dict[str, Any]], labels: dict[int, list[str]], numeric: bool) -> list[list[str]]:
    rows = [HEADER_NUMERIC if numeric else HEADER]
    for e in entries:
        ident = e["identity"]
        lbls = [str(ident)] if numeric else (labels.get(ident) or [str(ident)])
        proxy = str(e["proxy_port"]) if e["proxy_port"] else "NONE"
        rows.append([e["policy"], e["direction"], lbls[0], e["port_proto"], proxy, e["auth_type"],
                     str(e["bytes"]), str(e["packets"]), str(e["prefix"])])  # fmt: skip
        rows.extend(["", "", extra] for extra in lbls[1:])  # more labels on continuation lines
    return rows


def cmd_get(args: argparse.Namespace) -> int:
    with open_map(POLICY_MAP, args.bpf_root) as m:
        try:
            items = list(m.items())
        except sc.BPFError as err:
            raise bpf_error(err, f"reading {POLICY_MAP}") from None
    entries = [_entry(k, v) for k, v in items if args.all or k.ep_id == args.endpoint]
    entries.sort(key=lambda e: (e["endpoint"], *_sort_key(e)))
    labels: dict[int, list[str]] = {}
    if not args.numeric and entries:
        labels, why = resolve_labels({e["identity"] for e in entries}, args.host)
        if why:
            note(why)
    if args.output == "json":
        for entry in entries:
            entry["labels"] = labels.get(entry["identity"], [])
        print_json(entries)
        return 0
    if not entries:
        which = "any endpoint" if args.all else f"endpoint {args.endpoint}"
        print(f"Policy stats empty for {which}. Perhaps the policy enforcement is disabled?")
        return 0
    if not args.all:
        print_table(_rows(entries, labels, args.numeric))
        return 0
    first = True
    for ep in sorted({e["endpoint"] for e in entries}):
        if not first:
            print()
        first = False
        print(f"Endpoint {ep}:")
        print_table(_rows([e for e in entries if e["endpoint"] == ep], labels, args.numeric))
    return 0
