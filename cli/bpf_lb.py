"""`pycilium bpf lb list [--revnat|--frontends|--backends]`: the load-balancer maps.

The default view is Cilium's::

    SERVICE ADDRESS        BACKEND ADDRESS (REVNAT_ID) (SLOT)
    10.96.0.10:53/UDP (0)  0.0.0.0:0 (5) (0) [ClusterIP, non-routable]
    10.96.0.10:53/UDP (1)  10.0.0.93:53/UDP (5) (1)

Slot 0 is the service entry (its flags decoded), slots 1..n point at backends. A `/i` after the
protocol marks the internal-scope frontend of a service with two scopes. NodePort frontends have
address 0.0.0.0 (any node address).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from pycilium.bpf import syscall as sc
from pycilium.bpf.maps.defines import d
from pycilium.bpf.maps.lbmap import Lb4Backend, Lb4Key, Lb4Service
from pycilium.bpf.maps.util import be16_to_port, be32_to_ip
from pycilium.cli.maps import bpf_error, open_map
from pycilium.cli.output import print_json, print_table, proto_name

BACKEND_STATES = {
    d("BE_STATE_ACTIVE"): "active",
    d("BE_STATE_TERMINATING"): "terminating",
    d("BE_STATE_QUARANTINED"): "quarantined",
    d("BE_STATE_MAINTENANCE"): "maintenance",
}
_TYPES = (
    (d("SVC_FLAG_EXTERNAL_IP"), "ExternalIPs"),
    (d("SVC_FLAG_NODEPORT"), "NodePort"),
    (d("SVC_FLAG_LOADBALANCER"), "LoadBalancer"),
    (d("SVC_FLAG_HOSTPORT"), "HostPort"),
    (d("SVC_FLAG_CLUSTERIP"), "ClusterIP"),
)


def service_flags(flags: int, flags2: int) -> list[str]:
    """SVC_FLAG_* / SVC_FLAG2_* as Cilium names them: type first, then the qualifiers."""
    names = [name for bit, name in _TYPES if flags & bit] or ["ClusterIP"]
    if flags & d("SVC_FLAG_EXT_LOCAL_SCOPE"):
        names.append("Local")
    if flags2 & d("SVC_FLAG2_INT_LOCAL_SCOPE"):
        names.append("InternalLocal")
    if flags & d("SVC_FLAG_AFFINITY"):
        names.append("sessionAffinity")
    if flags2 & d("SVC_FLAG2_TWO_SCOPES"):
        names.append("two-scopes")
    if flags2 & d("SVC_FLAG2_MAGLEV"):
        names.append("maglev")
    if not flags & d("SVC_FLAG_ROUTABLE"):
        names.append("non-routable")
    return names


@dataclass
class _Slot:
    key: Lb4Key
    value: Lb4Service


def _read(bpf_root: str, name: str) -> list[tuple[Any, Any]]:
    with open_map(name, bpf_root) as m:
        try:
            return list(m.items())
        except sc.BPFError as e:
            raise bpf_error(e, f"reading {name}") from None


def _frontend(k: Lb4Key) -> str:
    scope = "/i" if k.scope == d("LB_SCOPE_INT") else ""
    return f"{be32_to_ip(k.address)}:{be16_to_port(k.dport)}/{proto_name(k.proto)}{scope}"


def _backend_dict(bid: int, b: Lb4Backend | None) -> dict[str, Any]:
    if b is None:
        return {"backend_id": bid, "missing": True}
    return {
        "backend_id": bid,
        "address": be32_to_ip(b.address),
        "port": be16_to_port(b.port),
        "proto": proto_name(b.proto),
        "state": BACKEND_STATES.get(b.flags, f"state-{b.flags}"),
        "node_ip": be32_to_ip(b.node_ip) if b.node_ip else "",
    }


def _services(bpf_root: str) -> tuple[list[_Slot], dict[int, Lb4Backend]]:
    slots = [_Slot(k, v) for k, v in _read(bpf_root, "lb4_services")]
    backends = {k.backend_id: v for k, v in _read(bpf_root, "lb4_backends")}
    slots.sort(key=lambda s: (s.key.address.to_bytes(4, "little"), be16_to_port(s.key.dport), s.key.proto,
                              s.key.scope, s.key.backend_slot))  # fmt: skip
    return slots, backends


def _frontend_id(k: Lb4Key) -> tuple[int, int, int, int]:
    return (k.address, k.dport, k.proto, k.scope)


def cmd_list(args: argparse.Namespace) -> int:
    if args.revnat:
        return _list_revnat(args)
    if args.backends:
        return _list_backends(args)
    slots, backends = _services(args.bpf_root)
    fronts = {_frontend_id(s.key): s.value for s in slots if s.key.backend_slot == 0}
    if args.output == "json":
        out: list[dict[str, Any]] = []
        by_front: dict[tuple[int, int, int, int], dict[str, Any]] = {}
        for s in slots:
            fid = _frontend_id(s.key)
            svc = by_front.get(fid)
            if svc is None:
                f = fronts.get(fid)
                svc = by_front[fid] = {
                    "address": be32_to_ip(s.key.address),
                    "port": be16_to_port(s.key.dport),
                    "proto": proto_name(s.key.proto),
                    "scope": "internal" if s.key.scope == d("LB_SCOPE_INT") else "external",
                    "rev_nat": f.rev_nat_index if f else 0,
                    "flags": f.flags if f else 0,
                    "flags2": f.flags2 if f else 0,
                    "flag_names": service_flags(f.flags, f.flags2) if f else [],
                    "count": f.count if f else 0,
                    "local_count": f.local_count if f else 0,
                    "affinity_timeout": f.backend_id if f and f.flags & d("SVC_FLAG_AFFINITY") else 0,
                    "backends": [],
                }
                out.append(svc)
            if s.key.backend_slot and not args.frontends:
                entry = _backend_dict(s.value.backend_id, backends.get(s.value.backend_id))
                svc["backends"].append({"slot": s.key.backend_slot, **entry})
        print_json(out)
        return 0
    if not slots:
        print("No entries found.")
        return 0
    if args.frontends:
        rows = [["SERVICE ADDRESS", "REVNAT_ID", "BACKENDS", "FLAGS"]]
        for s in slots:
            if s.key.backend_slot == 0:
                v = s.value
                rows.append([_frontend(s.key), str(v.rev_nat_index), f"{v.count} ({v.local_count} local)",
                             f"[{', '.join(service_flags(v.flags, v.flags2))}]"])  # fmt: skip
        print_table(rows)
        return 0
    rows = [["SERVICE ADDRESS", "BACKEND ADDRESS (REVNAT_ID) (SLOT)"]]
    for s in slots:
        k, v = s.key, s.value
        front = f"{_frontend(k)} ({k.backend_slot})"
        if k.backend_slot == 0:
            flags = ", ".join(service_flags(v.flags, v.flags2))
            rows.append([front, f"0.0.0.0:0 ({v.rev_nat_index}) (0) [{flags}]"])
            continue
        f = fronts.get(_frontend_id(k))
        revnat = v.rev_nat_index or (f.rev_nat_index if f else 0)
        b = backends.get(v.backend_id)
        if b is None:
            target = f"<backend {v.backend_id} missing>"
        else:
            target = f"{be32_to_ip(b.address)}:{be16_to_port(b.port)}/{proto_name(b.proto)}"
        state = f" [{BACKEND_STATES.get(b.flags, b.flags)}]" if b is not None and b.flags else ""
        rows.append([front, f"{target} ({revnat}) ({k.backend_slot}){state}"])
    print_table(rows)
    return 0


def _list_revnat(args: argparse.Namespace) -> int:
    entries = sorted((k.rev_nat_index, v) for k, v in _read(args.bpf_root, "lb4_reverse_nat"))
    if args.output == "json":
        print_json(
            [{"id": i, "address": be32_to_ip(v.address), "port": be16_to_port(v.port)} for i, v in entries]
        )
        return 0
    if not entries:
        print("No entries found.")
        return 0
    print_table([["ID", "FRONTEND ADDRESS"], *([str(i), f"{be32_to_ip(v.address)}:{be16_to_port(v.port)}"]
                                                for i, v in entries)])  # fmt: skip
    return 0


def _list_backends(args: argparse.Namespace) -> int:
    entries = sorted((k.backend_id, v) for k, v in _read(args.bpf_root, "lb4_backends"))
    if args.output == "json":
        print_json([_backend_dict(i, v) for i, v in entries])
        return 0
    if not entries:
        print("No entries found.")
        return 0
    rows = [["ID", "BACKEND ADDRESS", "STATE", "NODE"]]
    for i, v in entries:
        b = _backend_dict(i, v)
        rows.append([str(i), f"{b['proto']}://{b['address']}:{b['port']}", b["state"], b["node_ip"]])
    print_table(rows)
    return 0
