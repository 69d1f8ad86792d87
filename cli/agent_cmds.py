"""Commands that ask the agent over gRPC: `service list`, `endpoint list|get|delete`,
`identity list|get`, `status [--brief|--verbose]`."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

from pycilium.cli.agent_client import AgentClient, to_dict
from pycilium.cli.output import print_json, print_table, table

OK = "Ok"


def _client(args: argparse.Namespace) -> AgentClient:
    return AgentClient(args.host)


# ---- services -----------------------------------------------------------------------------------


def service_rows(services: Sequence[Any]) -> list[list[str]]:
    rows = [["ID", "Frontend", "Service Type", "Backend"]]
    for s in sorted(services, key=lambda s: s.id):
        front = f"{s.frontend_ip}:{s.frontend_port}/{s.protocol}"
        backends = [f"{i} => {b.ip}:{b.port}/{b.protocol} ({b.state or 'active'})"
                    for i, b in enumerate(s.backends, start=1)]  # fmt: skip
        rows.append([str(s.id), front, s.type, backends[0] if backends else ""])
        rows.extend(["", "", "", b] for b in backends[1:])
    return rows


def _show_list(args: argparse.Namespace, items: Sequence[Any], rows: Callable[[Any], list[list[str]]],
               empty: str) -> int:  # fmt: skip
    """A list command's output: JSON sorted by id, a message when empty, else the table."""
    if args.output == "json":
        print_json([to_dict(x) for x in sorted(items, key=lambda x: x.id)])
    elif not items:
        print(empty)
    else:
        print_table(rows(items))
    return 0


def cmd_service_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        services = c.list_services()
    return _show_list(args, services, service_rows, "No services found.")


# ---- endpoints ----------------------------------------------------------------------------------


def _enforcement(on: bool) -> str:
    return "Enabled" if on else "Disabled"


def endpoint_rows(endpoints: Sequence[Any]) -> list[list[str]]:
    rows = [
        ["ENDPOINT", "POLICY (ingress)", "POLICY (egress)", "IDENTITY", "LABELS (source:key[=value])", "IPv6",
         "IPv4", "STATUS"],
        ["", "ENFORCEMENT", "ENFORCEMENT"],
    ]  # fmt: skip
    for e in sorted(endpoints, key=lambda e: e.id):
        labels = sorted(e.labels) or ["no labels"]
        rows.append([str(e.id), _enforcement(e.ingress_enforced), _enforcement(e.egress_enforced), str(e.identity),
                     labels[0], "", e.ipv4, e.state])  # fmt: skip
        rows.extend(["", "", "", "", extra] for extra in labels[1:])
    return rows


def cmd_endpoint_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        endpoints = c.list_endpoints()
    return _show_list(args, endpoints, endpoint_rows, "No endpoints found.")


def cmd_endpoint_get(args: argparse.Namespace) -> int:
    with _client(args) as c:
        ep = c.get_endpoint(args.id)
    if args.output == "json":
        print_json(to_dict(ep))
        return 0
    fields = [
        ("ID", str(ep.id)),
        ("Pod", f"{ep.namespace}/{ep.pod_name}" if ep.pod_name else ""),
        ("State", ep.state),
        ("Identity", str(ep.identity)),
        ("Labels", ", ".join(sorted(ep.labels))),
        ("IPv4", ep.ipv4),
        ("Policy ingress", _enforcement(ep.ingress_enforced)),
        ("Policy egress", _enforcement(ep.egress_enforced)),
        ("Interface", f"{ep.ifname} (ifindex {ep.ifindex})" if ep.ifname or ep.ifindex else ""),
        ("MAC", ep.mac),
        ("Container", ep.container_id),
        ("Netns", ep.netns),
    ]
    print_table([[f"{k}:", v] for k, v in fields])
    return 0


def cmd_endpoint_delete(args: argparse.Namespace) -> int:
    with _client(args) as c:
        deleted = c.delete_endpoint(args.id)
    if not deleted:
        print(f"Endpoint {args.id} not found")
        return 1
    print(f"Endpoint {args.id} deleted")
    return 0


# ---- identities ---------------------------------------------------------------------------------


def identity_rows(identities: Sequence[Any]) -> list[list[str]]:
    rows = [["ID", "LABELS"]]
    for i in sorted(identities, key=lambda i: i.id):
        labels = sorted(i.labels) or [""]
        rows.append([str(i.id), labels[0]])
        rows.extend(["", extra] for extra in labels[1:])
    return rows


def cmd_identity_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        identities = c.list_identities()
    return _show_list(args, identities, identity_rows, "No identities found.")


def cmd_identity_get(args: argparse.Namespace) -> int:
    with _client(args) as c:
        ident = c.get_identity(args.id)
    if args.output == "json":
        print_json(to_dict(ident))
        return 0
    print_table(identity_rows([ident]))
    return 0


# ---- status -------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    s = int(seconds)
    parts = []
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            parts.append(f"{s // n}{unit}")
            s %= n
    parts.append(f"{s}s")
    return "".join(parts)


def _component(c: Any) -> str:
    state = c.state or OK
    return f"{state}   {c.message}".rstrip()


def ipam_line(ipam: Any) -> str:
    return f"IPv4: {len(ipam.allocations)}/{ipam.capacity} allocated from {ipam.cidr}"


def problems(st: Any) -> list[str]:
    """What is not healthy, one phrase each (empty: all OK)."""
    out = []
    for name, comp in (("pycilium", st.agent), ("kubernetes", st.kubernetes), ("cni", st.cni),
                       ("datapath", st.datapath)):  # fmt: skip
        if st.HasField(_field_of(name)) and comp.state not in ("", OK, "Disabled"):
            out.append(f"{name}: {comp.state}" + (f": {comp.message}" if comp.message else ""))
    if st.HasField("cluster_health") and st.cluster_health.state not in ("", OK, "Disabled"):
        out.append(f"cluster health: {st.cluster_health.state} {st.cluster_health.message}".rstrip())
    bad = [c.name for c in st.controllers if not c.healthy]
    if bad:
        out.append(f"controllers failing: {', '.join(sorted(bad))}")
    return out


def _field_of(name: str) -> str:
    return {"pycilium": "agent"}.get(name, name)


def status_text(st: Any, verbose: bool) -> str:
    kpr = st.kube_proxy_replacement
    lines: list[list[str]] = []
    lines.append(["Node:", f"{st.node_name} ({st.node_ip})" if st.node_ip else st.node_name])
    lines.append(["Kubernetes:", _component(st.kubernetes)])
    if kpr.enabled:
        devs = [f"{d} (Direct Routing)" if d == kpr.direct_routing_device else d for d in kpr.devices]
        lines.append(["KubeProxyReplacement:", "True" + (f"   [{', '.join(devs)}]" if devs else "")])
    else:
        lines.append(["KubeProxyReplacement:", "False"])
    cni = st.cni_config_path
    if st.HasField("cni") and st.cni.state not in ("", OK):
        cni = f"{cni}   ({st.cni.state}: {st.cni.message})" if cni else f"{st.cni.state}: {st.cni.message}"
    lines.append(["CNI Config file:", cni])
    agent = _component(st.agent)
    if st.version and not st.agent.message:
        agent = f"{agent}   {st.version}"
    if st.uptime_seconds:
        agent += f"   (up {_duration(st.uptime_seconds)})"
    lines.append(["pycilium:", agent])
    if st.HasField("datapath"):
        lines.append(["Datapath:", _component(st.datapath)])
    if st.HasField("ipam"):
        lines.append(["IPAM:", ipam_line(st.ipam)])
    lines.append(["Routing:", f"Network: {st.routing_mode or 'Native'}   Host: BPF"])
    m = st.masquerading
    if m.enabled:
        text = m.mode or "BPF"
        if m.devices:
            text += f"   [{', '.join(m.devices)}]"
        if m.cidr:
            text += f"   {m.cidr}"
        lines.append(["Masquerading:", text])
    else:
        lines.append(["Masquerading:", "Disabled"])
    healthy = sum(1 for c in st.controllers if c.healthy)
    lines.append(["Controller Status:", f"{healthy}/{len(st.controllers)} healthy"])
    if st.HasField("cluster_health"):
        lines.append(["Cluster health:", _component(st.cluster_health)])
    out = table(lines)
    if not verbose:
        return out
    extra: list[str] = []
    if kpr.enabled:
        extra.append("KubeProxyReplacement Details:")
        detail_rows = [["  Mode:", kpr.mode or "SNAT"], ["  Devices:", ", ".join(kpr.devices) or "-"]]
        detail_rows += [[f"  {k}:", v] for k, v in sorted(kpr.details.items())]
        extra.append(table(detail_rows).rstrip("\n"))
    if st.HasField("ipam") and st.ipam.allocations:
        extra.append("Allocated addresses:")
        for ip in sorted(
            st.ipam.allocations, key=lambda a: tuple(int(x) for x in a.split(".") if x.isdigit())
        ):
            extra.append(f"  {ip} ({st.ipam.allocations[ip]})")
    if st.controllers:
        extra.append("Controllers:")
        rows = [["  Name", "Last success", "Last error", "Count", "Message"]]
        now = time.time()
        for c in sorted(st.controllers, key=lambda c: c.name):
            succ = f"{_duration(now - c.last_success_unix)} ago" if c.last_success_unix else "never"
            fail = f"{_duration(now - c.last_failure_unix)} ago" if c.last_failure_unix else "never"
            rows.append([f"  {c.name}", succ, fail, f"{c.success_count}/{c.failure_count}",
                         "" if c.healthy else c.last_error])  # fmt: skip
        extra.append(table(rows).rstrip("\n"))
    return out + "\n".join(extra) + ("\n" if extra else "")


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        st = c.status(verbose=args.verbose)
    bad = problems(st)
    if args.output == "json":
        print_json(to_dict(st))
        return 1 if (args.brief and bad) else 0
    if args.brief:
        print("OK" if not bad else "; ".join(bad))
        return 1 if bad else 0
    print(status_text(st, args.verbose), end="")
    return 0
